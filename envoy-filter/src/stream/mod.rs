//! Limits inside a gRPC or WebSocket stream: body chunks in, decisions
//! per message out, and the chunk as it must be passed on.
//!
//! Host-agnostic: the caller hands over each chunk's bytes and a [`Judge`]
//! that decides messages against the rules; this module parses, asks, and
//! says how to rewrite the chunk. Envoy can only replace a body chunk's
//! prefix or append to it, so every edit is expressed as a whole new chunk.
//!
//! - [`GrpcStream`] (`grpc`): a call's length-prefixed messages.
//! - [`WebSocketStream`] (`websocket`): a connection's frames and messages,
//!   with closes and dropped messages written into the chunks.

mod grpc;
#[cfg(test)]
mod test_judge;
mod websocket;

use sluice_core::policy::{Direction, Flow};

pub use grpc::GrpcStream;
pub use websocket::WebSocketStream;

/// What one message (or WebSocket frame) asks of the stream rules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ask {
    /// 1 when a message starts here, else 0.
    pub messages: u64,
    /// Payload bytes this message or frame carries.
    pub bytes: u64,
    /// The message's size so far (for size bounds).
    pub size: u64,
    /// The message is compressed, so `bytes` and `size` are not what the
    /// receiver gets: size and byte rules cannot measure it.
    pub compressed: bool,
    /// The message ends here: `size` is its final size.
    pub ends: bool,
}

/// Why a message is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// A messages or bytes rate.
    Rate,
    /// A message size bound.
    TooBig,
    /// A compressed message where size or byte rules apply.
    Compressed,
}

/// The verdict on one [`Ask`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Pass it on.
    Pass,
    /// Refuse it; the stream ends (gRPC status, WebSocket close).
    Refuse {
        /// The rule that refused it.
        rule: String,
        /// Rate or size.
        violation: Violation,
        /// Seconds after which a retry could pass.
        retry_after: u64,
        /// The rate-limit headers for a gRPC refusal's metadata.
        metadata: Vec<(&'static str, String)>,
    },
    /// Discard the message, keep the connection (WebSocket `drop`).
    Drop {
        /// Rate or size: a size violation in a message already partly
        /// passed on cannot be dropped and closes instead.
        violation: Violation,
        /// The rule that dropped it.
        rule: String,
    },
}

/// What became of a message a rule refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforced {
    /// Discarded, the connection kept (WebSocket `drop`).
    Dropped,
    /// Refused: the call ended or was cut, the connection closed, or the
    /// message discarded because an earlier refusal closed its direction.
    Limited,
}

/// Decides messages against the stream rules of one request.
pub trait Judge {
    /// The verdict for `ask` travelling `direction`.
    fn judge(&mut self, direction: Direction, ask: Ask) -> Answer;

    /// Records what the stream did with a message `rule` refused (once per
    /// message): the answer alone cannot say, since a drop may have to
    /// close instead.
    fn enforced(&mut self, direction: Direction, rule: &str, outcome: Enforced);
}

/// What to do with a chunk after the stream rules saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Edit {
    /// Pass it on unchanged.
    Keep,
    /// Pass these bytes on instead.
    Replace(Vec<u8>),
    /// gRPC, response not started: end the call with a trailers-only status.
    RefuseCall {
        /// The `grpc-status`.
        status: u32,
        /// The `grpc-message`.
        message: String,
        /// `retry-after` and the rate-limit headers.
        metadata: Vec<(&'static str, String)>,
    },
    /// gRPC, response started: pass these bytes on instead, and the call
    /// is cut from now on (see [`GrpcStream`]).
    Cut(Vec<u8>),
}

/// The directions some stream rule counts: a stream reads and parses only
/// their chunks (every read is a host call and a copy of the chunk).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Watched {
    client: bool,
    server: bool,
}

impl Watched {
    /// Both directions.
    pub const BOTH: Watched = Watched {
        client: true,
        server: true,
    };

    /// The directions any of `flows` counts.
    pub fn of(flows: impl IntoIterator<Item = Flow>) -> Watched {
        flows
            .into_iter()
            .fold(Watched::default(), |w, flow| Watched {
                client: w.client || flow.includes(Direction::Client),
                server: w.server || flow.includes(Direction::Server),
            })
    }

    /// Whether messages travelling `direction` are counted.
    pub fn includes(self, direction: Direction) -> bool {
        match direction {
            Direction::Client => self.client,
            Direction::Server => self.server,
        }
    }
}

/// One value per direction of a stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PerDirection<T> {
    client: T,
    server: T,
}

impl<T> PerDirection<T> {
    /// The value for `direction`.
    fn get(&self, direction: Direction) -> &T {
        match direction {
            Direction::Client => &self.client,
            Direction::Server => &self.server,
        }
    }

    /// The value for `direction`, to change.
    fn get_mut(&mut self, direction: Direction) -> &mut T {
        match direction {
            Direction::Client => &mut self.client,
            Direction::Server => &mut self.server,
        }
    }
}

/// The direction the answers to `direction` travel.
fn opposite(direction: Direction) -> Direction {
    match direction {
        Direction::Client => Direction::Server,
        Direction::Server => Direction::Client,
    }
}

/// The gRPC status message for a call refused by a rate.
pub fn grpc_message(rule: &str, retry_after: u64) -> String {
    format!("rate limited by rule {rule}; retry after {retry_after}s")
}

/// gRPC's RESOURCE_EXHAUSTED.
pub const GRPC_RESOURCE_EXHAUSTED: u32 = 8;
/// gRPC's PERMISSION_DENIED: a client the access controls refuse.
pub const GRPC_PERMISSION_DENIED: u32 = 7;
/// gRPC's INTERNAL: what an endpoint answers a message it cannot parse.
pub const GRPC_INTERNAL: u32 = 13;
/// gRPC's UNIMPLEMENTED: what a server answers a compression it does not take.
pub const GRPC_UNIMPLEMENTED: u32 = 12;

/// The gRPC status and message for a message refused by `rule`: a rate
/// says when to retry; a size bound and a compressed message do not,
/// since retrying the same message can never pass.
pub fn grpc_message_refusal(rule: &str, violation: Violation, retry_after: u64) -> (u32, String) {
    match violation {
        Violation::Rate => (GRPC_RESOURCE_EXHAUSTED, grpc_message(rule, retry_after)),
        Violation::TooBig => (
            GRPC_RESOURCE_EXHAUSTED,
            format!("message too large for rule {rule}"),
        ),
        Violation::Compressed => (
            GRPC_UNIMPLEMENTED,
            format!(
                "compressed messages are refused: rule {rule} limits message sizes; \
                 send them uncompressed (grpc-encoding: identity)"
            ),
        ),
    }
}
