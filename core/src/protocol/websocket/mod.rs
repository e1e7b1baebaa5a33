//! RFC 6455 WebSocket framing, parsed incrementally, and close-frame builders.
//!
//! The parser follows one direction of a WebSocket connection through
//! arbitrarily cut body chunks and reports frames, data-message starts, the
//! running size of each data message and message completions, each with its
//! offset in the chunk. Payloads are skipped, never unmasked or inflated, so
//! sizes are wire sizes (compressed when permessage-deflate is in use).

mod close;
mod parser;
#[cfg(test)]
mod tests;

pub use close::{close_frame, CloseCode, MAX_CLOSE_REASON_LEN};
pub use parser::{FrameParser, MAX_HEADER_LEN};

use super::ChunkPos;

/// Which way frames flow, which decides whether they must be masked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client (downstream) to the server: frames must be masked.
    ClientToServer,
    /// From the server (upstream) to the client: frames must not be masked.
    ServerToClient,
}

impl Direction {
    /// Whether frames in this direction must carry a masking key (§5.1).
    pub const fn requires_mask(self) -> bool {
        matches!(self, Direction::ClientToServer)
    }
}

/// A frame opcode defined by RFC 6455.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// 0x0: a further fragment of the data message in progress.
    Continuation = 0x0,
    /// 0x1: first frame of a text message.
    Text = 0x1,
    /// 0x2: first frame of a binary message.
    Binary = 0x2,
    /// 0x8: connection close.
    Close = 0x8,
    /// 0x9: ping.
    Ping = 0x9,
    /// 0xA: pong.
    Pong = 0xA,
}

impl Opcode {
    /// The opcode for a 4-bit value, or `None` if RFC 6455 reserves it.
    pub const fn from_u8(value: u8) -> Option<Opcode> {
        match value {
            0x0 => Some(Opcode::Continuation),
            0x1 => Some(Opcode::Text),
            0x2 => Some(Opcode::Binary),
            0x8 => Some(Opcode::Close),
            0x9 => Some(Opcode::Ping),
            0xA => Some(Opcode::Pong),
            _ => None,
        }
    }

    /// The opcode's 4-bit wire value.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// Whether this is a control opcode (close, ping, pong).
    pub const fn is_control(self) -> bool {
        self.as_u8() & 0x8 != 0
    }
}

/// The kind of a data message, fixed by its first frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// A text message (opcode 0x1).
    Text,
    /// A binary message (opcode 0x2).
    Binary,
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrameHeader {
    /// FIN: this is the last frame of its message.
    pub fin: bool,
    /// RSV1..RSV3 as a 3-bit value (RSV1 = 0b100).
    pub rsv: u8,
    /// The frame's opcode.
    pub opcode: Opcode,
    /// The masking key, present on client-to-server frames.
    pub mask: Option<[u8; 4]>,
    /// Payload length on the wire.
    pub payload_len: u64,
    /// Header length in bytes (2 to 14).
    pub header_len: u8,
}

impl FrameHeader {
    /// Whether RSV1 is set (with permessage-deflate: the message is compressed).
    pub const fn rsv1(&self) -> bool {
        self.rsv & 0b100 != 0
    }

    /// Total frame length on the wire: header plus payload (saturating).
    pub const fn frame_len(&self) -> u64 {
        self.payload_len.saturating_add(self.header_len as u64)
    }
}

/// Something the parser saw in a chunk, delivered in stream order.
///
/// For the first frame of a data message the order is `Frame`,
/// `MessageStarted`, `MessageSize`; for later fragments `Frame`,
/// `MessageSize`; `MessageCompleted` follows the last payload byte of the
/// final fragment. Control frames yield `Frame` (and `Close` for a close).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// A frame header is complete.
    Frame {
        /// Where the frame begins.
        at: ChunkPos,
        /// The parsed header.
        header: FrameHeader,
    },
    /// A data message began: count it here, before forwarding its payload.
    MessageStarted {
        /// Where the message's first frame begins.
        at: ChunkPos,
        /// Text or binary.
        kind: MessageKind,
        /// RSV1 was set on the first frame (permessage-deflate).
        compressed: bool,
    },
    /// A data frame header made the message's running size known: the sum
    /// of the payload lengths of its frames so far, this one included.
    MessageSize {
        /// Where the frame that grew the message begins.
        at: ChunkPos,
        /// Running wire payload size of the message (saturating).
        size: u64,
        /// Data frames in the message so far.
        frames: u32,
    },
    /// The final fragment's last payload byte has been seen.
    MessageCompleted {
        /// Offset in the chunk just past the message's last byte.
        end: usize,
        /// Text or binary.
        kind: MessageKind,
        /// Total wire payload size of the message (saturating).
        size: u64,
        /// Data frames in the message.
        frames: u32,
    },
    /// The peer sent a close frame (reported at its header).
    Close {
        /// Where the close frame begins.
        at: ChunkPos,
        /// Length of the close payload (status code and reason), ≤ 125.
        payload_len: u8,
    },
}

/// A violation of RFC 6455 framing; the connection should be failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum WsError {
    /// An opcode RFC 6455 reserves.
    #[error("unknown WebSocket opcode {0:#x}")]
    UnknownOpcode(u8),
    /// RSV bits set that no negotiated extension allows.
    #[error("reserved bits {rsv:#05b} not allowed on a {opcode:?} frame")]
    ReservedBits {
        /// The frame's opcode.
        opcode: Opcode,
        /// RSV1..RSV3 as a 3-bit value.
        rsv: u8,
    },
    /// A client-to-server frame without a masking key (§5.1).
    #[error("client-to-server WebSocket frame is not masked")]
    UnmaskedFrame,
    /// A server-to-client frame with a masking key (§5.1).
    #[error("server-to-client WebSocket frame is masked")]
    MaskedFrame,
    /// A close, ping or pong frame without FIN (§5.5).
    #[error("fragmented {0:?} control frame")]
    FragmentedControl(Opcode),
    /// A control frame payload over 125 bytes (§5.5).
    #[error("{opcode:?} control frame payload of {len} bytes exceeds 125")]
    ControlTooLong {
        /// The frame's opcode.
        opcode: Opcode,
        /// The announced payload length.
        len: u64,
    },
    /// A close frame with a 1-byte payload, too short for a status code.
    #[error("close frame payload of 1 byte cannot hold a status code")]
    InvalidCloseLength,
    /// A 64-bit length with its most significant bit set (§5.2).
    #[error("64-bit payload length has its most significant bit set")]
    LengthOverflow,
    /// A continuation frame with no data message in progress.
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    /// A text or binary frame while a fragmented message is unfinished.
    #[error("new {0:?} message while a fragmented message is in progress")]
    MessageInProgress(MessageKind),
}
