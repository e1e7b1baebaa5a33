//! Incremental parsers for the streaming protocols Sluice counts inside
//! request and response bodies: gRPC length-prefixed messages and
//! RFC 6455 WebSocket frames.
//!
//! Envoy hands a filter body chunks cut at arbitrary points, so both parsers
//! keep only the few header bytes that straddle a chunk edge and never buffer
//! payloads: memory per stream direction is a small constant. They report
//! events through a caller-supplied `FnMut`, each with its byte offset inside
//! the chunk, so the filter can count a message as soon as its header is
//! complete and cut the chunk before the first message it must refuse.
//!
//! A message or frame whose header began in an earlier chunk is reported
//! with [`ChunkPos::carried`] > 0: those header bytes have already been
//! seen, and the in-chunk offset is 0.

// The parsers read bytes clients send: an index out of bounds or an
// overflow here would be a panic any client could trigger.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

pub mod grpc;
pub mod websocket;

pub use grpc::{GrpcError, GrpcEvent, GrpcFrameParser, GrpcMessage};
pub use websocket::{
    close_frame, CloseCode, Direction, Event as WebSocketEvent, FrameHeader,
    FrameParser as WebSocketFrameParser, MessageKind, Opcode, WsError,
};

/// Where a message or frame begins, relative to the chunk being fed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkPos {
    /// Offset in the current chunk of the first header byte seen in it
    /// (0 when the header began in an earlier chunk).
    pub offset: usize,
    /// How many header bytes arrived in earlier chunks (0 if it began here).
    pub carried: u8,
}

impl ChunkPos {
    /// Whether the whole header lies in the current chunk, so cutting the
    /// chunk at `offset` removes the message or frame entirely.
    pub const fn starts_in_chunk(self) -> bool {
        self.carried == 0
    }

    /// Absolute stream position of the first header byte, given the stream
    /// position of the current chunk's first byte.
    pub const fn stream_pos(self, chunk_start: u64) -> u64 {
        // `offset` is 0 whenever `carried` > 0, so this never underflows for
        // a consistent `chunk_start`; saturate anyway rather than panic.
        chunk_start
            .saturating_add(self.offset as u64)
            .saturating_sub(self.carried as u64)
    }
}
