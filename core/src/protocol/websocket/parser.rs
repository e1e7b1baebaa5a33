//! The incremental RFC 6455 frame parser.

use core::cmp::min;

use super::{ChunkPos, Direction, Event, FrameHeader, MessageKind, Opcode, WsError};

/// Longest frame header: 2 bytes + 8-byte length + 4-byte masking key.
pub const MAX_HEADER_LEN: usize = 14;

/// Longest control-frame payload (§5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// The data message in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Message {
    kind: MessageKind,
    size: u64,
    frames: u32,
}

/// Incremental parser for one direction of one WebSocket connection.
///
/// Holds at most the 14 header bytes that straddle a chunk edge; payloads
/// are skipped, never copied. After an error every call returns that error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameParser {
    direction: Direction,
    /// permessage-deflate was negotiated: RSV1 may mark compressed messages.
    deflate: bool,
    header: [u8; MAX_HEADER_LEN],
    /// Bytes of `header` filled; non-zero at the start of a `feed` only when
    /// a header straddles the chunk edge.
    header_len: u8,
    /// Full length of the header being read, known once 2 bytes are in.
    header_need: u8,
    /// Payload bytes of the current frame still to skip.
    remaining: u64,
    /// The frame whose payload is being skipped ends a data message.
    ends_message: bool,
    message: Option<Message>,
    peer_closed: bool,
    error: Option<WsError>,
}

impl FrameParser {
    /// A parser for frames flowing in `direction`; `deflate` tells whether
    /// permessage-deflate was negotiated (allowing RSV1 on data messages).
    pub const fn new(direction: Direction, deflate: bool) -> Self {
        Self {
            direction,
            deflate,
            header: [0; MAX_HEADER_LEN],
            header_len: 0,
            header_need: 2,
            remaining: 0,
            ends_message: false,
            message: None,
            peer_closed: false,
            error: None,
        }
    }

    /// The direction this parser checks masking for.
    pub const fn direction(&self) -> Direction {
        self.direction
    }

    /// Whether RSV1 is accepted as the permessage-deflate flag.
    pub const fn deflate(&self) -> bool {
        self.deflate
    }

    /// The error the connection failed with, if it has.
    pub const fn error(&self) -> Option<WsError> {
        self.error
    }

    /// Whether a close frame has been seen in this direction.
    pub const fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Bytes of a frame header seen but not complete yet: always the last
    /// bytes fed. A filter that must be able to cut before any frame holds
    /// them back until the header completes.
    pub const fn pending_header_len(&self) -> usize {
        self.header_len as usize
    }

    /// Whether the stream is at a frame boundary (no partial header or
    /// payload) and not failed; a fragmented message may still be open.
    pub const fn at_frame_boundary(&self) -> bool {
        self.header_len == 0 && self.remaining == 0 && self.error.is_none()
    }

    /// Payload bytes of the current frame still to come: where the next
    /// frame header begins in the next chunk fed (if it is that long).
    pub const fn payload_remaining(&self) -> u64 {
        self.remaining
    }

    /// Passes over the next `len` bytes of the stream without seeing them,
    /// when they are all payload of the current frame and its end lies
    /// beyond them (payloads are never looked at, and no event is due):
    /// true if they were, false (nothing done) if the bytes must be
    /// [fed](FrameParser::feed).
    pub fn skip_payload(&mut self, len: usize) -> bool {
        let len = len as u64;
        if self.error.is_some() || len >= self.remaining {
            return false;
        }
        // `len` < `remaining`: exact.
        self.remaining = self.remaining.saturating_sub(len);
        true
    }

    /// The kind and running wire size of the data message in progress.
    pub fn message_in_progress(&self) -> Option<(MessageKind, u64)> {
        self.message.map(|m| (m.kind, m.size))
    }

    /// Parses one body chunk, calling `on_event` for each event in stream
    /// order (see [`Event`]).
    ///
    /// On error, events before the offending frame have been delivered and
    /// the parser is left failed: this and later calls return the error.
    pub fn feed<F>(&mut self, chunk: &[u8], mut on_event: F) -> Result<(), WsError>
    where
        F: FnMut(Event),
    {
        if let Some(error) = self.error {
            return Err(error);
        }
        let mut pos = 0usize;
        while let Some(rest) = chunk.get(pos..).filter(|rest| !rest.is_empty()) {
            if self.remaining > 0 {
                let take = min(self.remaining, rest.len() as u64);
                // `take` ≤ `rest.len()`, a usize, and ≤ `remaining`: neither
                // saturates.
                pos = pos.saturating_add(take as usize);
                self.remaining = self.remaining.saturating_sub(take);
                if self.remaining == 0 {
                    self.end_frame(pos, &mut on_event);
                }
                continue;
            }

            let at = ChunkPos {
                // A partial header only survives a chunk edge, so carried
                // bytes mean we are at the start of this chunk.
                offset: if self.header_len == 0 { pos } else { 0 },
                carried: self.header_len,
            };
            // Header bytes go one at a time: at most 14 per frame, and each
            // check runs as soon as the byte it needs is in.
            let mut complete = false;
            while let Some(&byte) = chunk.get(pos) {
                // `pos` < `chunk.len()`, and `header_len` < `header_need` ≤ 14
                // here: neither saturates.
                pos = pos.saturating_add(1);
                let filled = usize::from(self.header_len);
                if let Some(slot) = self.header.get_mut(filled) {
                    *slot = byte;
                }
                self.header_len = self.header_len.saturating_add(1);
                match self.header_len {
                    1 => self.check_first_byte(byte)?,
                    2 => self.check_second_byte(byte)?,
                    _ => {}
                }
                if self.header_len >= self.header_need {
                    complete = true;
                    break;
                }
            }
            if complete {
                let header = self.finish_header()?;
                self.start_frame(at, header, pos, &mut on_event);
            }
        }
        Ok(())
    }

    fn fail(&mut self, error: WsError) -> WsError {
        self.error = Some(error);
        error
    }

    /// FIN, RSV and opcode, checked against the message state.
    fn check_first_byte(&mut self, byte: u8) -> Result<(), WsError> {
        let fin = byte & 0x80 != 0;
        let rsv = (byte >> 4) & 0b111;
        let Some(opcode) = Opcode::from_u8(byte & 0x0F) else {
            return Err(self.fail(WsError::UnknownOpcode(byte & 0x0F)));
        };
        if opcode.is_control() && !fin {
            return Err(self.fail(WsError::FragmentedControl(opcode)));
        }
        // permessage-deflate (RFC 7692) uses RSV1 on a message's first frame
        // only; nothing negotiated here gives meaning to RSV2 or RSV3.
        let starts_message = matches!(opcode, Opcode::Text | Opcode::Binary);
        let allowed = if self.deflate && starts_message {
            0b100
        } else {
            0
        };
        if rsv & !allowed != 0 {
            return Err(self.fail(WsError::ReservedBits { opcode, rsv }));
        }
        match (opcode, self.message) {
            (Opcode::Continuation, None) => Err(self.fail(WsError::UnexpectedContinuation)),
            (Opcode::Text | Opcode::Binary, Some(open)) => {
                Err(self.fail(WsError::MessageInProgress(open.kind)))
            }
            _ => Ok(()),
        }
    }

    /// MASK against the direction, and the header's full length.
    fn check_second_byte(&mut self, byte: u8) -> Result<(), WsError> {
        let masked = byte & 0x80 != 0;
        if masked != self.direction.requires_mask() {
            let error = if masked {
                WsError::MaskedFrame
            } else {
                WsError::UnmaskedFrame
            };
            return Err(self.fail(error));
        }
        // 2 bytes, then the extended length, then the masking key.
        self.header_need = match (byte & 0x7F, masked) {
            (126, false) => 4,
            (126, true) => 8,
            (127, false) => 10,
            (127, true) => 14,
            (_, false) => 2,
            (_, true) => 6,
        };
        Ok(())
    }

    /// Decodes the complete header in `self.header` and resets it.
    fn finish_header(&mut self) -> Result<FrameHeader, WsError> {
        let h = self.header;
        let header_len = self.header_len;
        self.header_len = 0;
        self.header_need = 2;

        let (payload_len, mask_at) = match h[1] & 0x7F {
            // §5.2 asks senders for the shortest length encoding, but common
            // receivers (Python websockets, Node ws, gorilla) take a longer
            // one: the endpoints carry on, so the count must too.
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
            127 => {
                let len = u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]);
                if len >> 63 != 0 {
                    return Err(self.fail(WsError::LengthOverflow));
                }
                (len, 10)
            }
            short => (u64::from(short), 2),
        };
        let mask = if h[1] & 0x80 != 0 {
            // `mask_at` is 2, 4 or 10, so the key lies within the 14 bytes.
            h.get(mask_at..)
                .and_then(|key| key.first_chunk::<4>())
                .copied()
        } else {
            None
        };
        // Checked in `check_first_byte`, which rejected unknown opcodes.
        let opcode = Opcode::from_u8(h[0] & 0x0F).unwrap_or(Opcode::Continuation);
        if opcode.is_control() && payload_len > MAX_CONTROL_PAYLOAD {
            return Err(self.fail(WsError::ControlTooLong {
                opcode,
                len: payload_len,
            }));
        }
        if opcode == Opcode::Close && payload_len == 1 {
            return Err(self.fail(WsError::InvalidCloseLength));
        }
        Ok(FrameHeader {
            fin: h[0] & 0x80 != 0,
            rsv: (h[0] >> 4) & 0b111,
            opcode,
            mask,
            payload_len,
            header_len,
        })
    }

    /// Updates message state for a validated header and reports it; `pos`
    /// is the chunk offset just past the header.
    fn start_frame<F: FnMut(Event)>(
        &mut self,
        at: ChunkPos,
        header: FrameHeader,
        pos: usize,
        on_event: &mut F,
    ) {
        on_event(Event::Frame { at, header });
        let kind = match header.opcode {
            Opcode::Text => Some(MessageKind::Text),
            Opcode::Binary => Some(MessageKind::Binary),
            _ => None,
        };
        if let Some(kind) = kind {
            self.message = Some(Message {
                kind,
                size: 0,
                frames: 0,
            });
            on_event(Event::MessageStarted {
                at,
                kind,
                compressed: header.rsv1(),
            });
        }
        match header.opcode {
            Opcode::Text | Opcode::Binary | Opcode::Continuation => {
                if let Some(message) = self.message.as_mut() {
                    message.size = message.size.saturating_add(header.payload_len);
                    message.frames = message.frames.saturating_add(1);
                    on_event(Event::MessageSize {
                        at,
                        size: message.size,
                        frames: message.frames,
                    });
                }
                self.ends_message = header.fin;
            }
            Opcode::Close => {
                self.peer_closed = true;
                self.ends_message = false;
                on_event(Event::Close {
                    at,
                    // ≤ 125, checked in `finish_header`.
                    payload_len: header.payload_len as u8,
                });
            }
            Opcode::Ping | Opcode::Pong => self.ends_message = false,
        }
        self.remaining = header.payload_len;
        if self.remaining == 0 {
            self.end_frame(pos, on_event);
        }
    }

    /// The current frame's payload is done at chunk offset `end`.
    fn end_frame<F: FnMut(Event)>(&mut self, end: usize, on_event: &mut F) {
        if !self.ends_message {
            return;
        }
        self.ends_message = false;
        if let Some(message) = self.message.take() {
            on_event(Event::MessageCompleted {
                end,
                kind: message.kind,
                size: message.size,
                frames: message.frames,
            });
        }
    }
}
