//! A gRPC call's streams: each direction's messages asked of the rules as
//! they start; a refusal ends the call cleanly before the response, or cuts
//! it after: the refused direction stops, and the caller ends the call (the
//! upstream's trailers rewritten, or a reset).

use sluice_core::policy::Direction;
use sluice_core::protocol::{GrpcEvent, GrpcFrameParser};

use super::{grpc_message_refusal, Answer, Ask, Edit, Enforced, Judge, PerDirection};

/// The status a cut call ends with when the upstream ends it in time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CutStatus {
    /// The `grpc-status`.
    pub status: u32,
    /// The `grpc-message`.
    pub message: String,
}

/// A gRPC call's streams.
#[derive(Debug, Default)]
pub struct GrpcStream {
    parsers: PerDirection<GrpcFrameParser>,
    /// Directions whose messages are no longer passed on, with the rule
    /// that cut them (each later message is refused by it).
    blocked: PerDirection<Option<String>>,
    /// The status to put in the trailers, once a message was refused after
    /// the response started.
    cut: Option<CutStatus>,
}

impl GrpcStream {
    /// Sees a chunk travelling `direction`; `response_started` says whether
    /// a clean trailers-only answer is still possible.
    pub fn chunk(
        &mut self,
        judge: &mut impl Judge,
        direction: Direction,
        bytes: &[u8],
        response_started: bool,
    ) -> Edit {
        let mut starts: Vec<(usize, u64, bool)> = Vec::new();
        // A malformed stream is the endpoints' business: stop counting and
        // pass it on rather than guess.
        let _ = self.parsers.get_mut(direction).feed(bytes, |event| {
            if let GrpcEvent::Started { at, message } = event {
                starts.push((at.offset, u64::from(message.len), message.compressed));
            }
        });
        if let Some(rule) = self.blocked.get(direction) {
            for _ in &starts {
                judge.enforced(direction, rule, Enforced::Limited);
            }
            return if bytes.is_empty() {
                Edit::Keep
            } else {
                Edit::Replace(Vec::new())
            };
        }
        let mut starts = starts.into_iter();
        while let Some((offset, len, compressed)) = starts.next() {
            let ask = Ask {
                messages: 1,
                bytes: len,
                size: len,
                compressed,
                ends: true,
            };
            let (rule, violation, retry_after, metadata) = match judge.judge(direction, ask) {
                Answer::Pass => continue,
                Answer::Refuse {
                    rule,
                    violation,
                    retry_after,
                    metadata,
                } => (rule, violation, retry_after, metadata),
                // Only WebSocket rules drop; end the call all the same.
                Answer::Drop { rule, violation } => (rule, violation, 1, Vec::new()),
            };
            // The refused message and those after it in this chunk are
            // never passed on.
            for _ in 0..=starts.len() {
                judge.enforced(direction, &rule, Enforced::Limited);
            }
            let (status, message) = grpc_message_refusal(&rule, violation, retry_after);
            if !response_started {
                return Edit::RefuseCall {
                    status,
                    message,
                    metadata,
                };
            }
            *self.blocked.get_mut(direction) = Some(rule);
            self.cut = Some(CutStatus { status, message });
            // Everything before the refused message passes on.
            let passed = bytes.get(..offset).unwrap_or(bytes);
            return Edit::Cut(passed.to_vec());
        }
        Edit::Keep
    }

    /// The status to put in the trailers, if a message was refused after
    /// the response started.
    pub fn cut(&self) -> Option<&CutStatus> {
        self.cut.as_ref()
    }

    /// Whether messages travelling `direction` are no longer passed on.
    pub fn blocked(&self, direction: Direction) -> bool {
        self.blocked.get(direction).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::test_judge::{budget, refuse};
    use crate::stream::Violation;

    fn grpc_message_bytes(len: usize) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&(len as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len));
        m
    }

    #[test]
    fn grpc_refuses_cleanly_before_the_response_and_blocks_after() -> Result<(), String> {
        let mut judge = budget(1, refuse(Violation::Rate));
        let mut call = GrpcStream::default();
        let two = [grpc_message_bytes(3), grpc_message_bytes(2)].concat();
        assert_eq!(
            call.chunk(&mut judge, Direction::Client, &two, false),
            Edit::RefuseCall {
                status: 8,
                message: "rate limited by rule r; retry after 3s".into(),
                metadata: vec![("retry-after", "3".into())],
            }
        );

        let mut judge = budget(1, refuse(Violation::Rate));
        let mut call = GrpcStream::default();
        let edit = call.chunk(&mut judge, Direction::Server, &two, true);
        assert_eq!(edit, Edit::Cut(grpc_message_bytes(3)));
        assert_eq!(
            call.cut(),
            Some(&CutStatus {
                status: 8,
                message: "rate limited by rule r; retry after 3s".into()
            })
        );
        assert!(call.blocked(Direction::Server) && !call.blocked(Direction::Client));
        assert_eq!(
            call.chunk(&mut judge, Direction::Server, &grpc_message_bytes(1), true),
            Edit::Replace(Vec::new())
        );
        // Each refused message is counted once: the one that cut the call
        // and the one discarded after it.
        assert_eq!(
            judge.enforced,
            vec![
                (Direction::Server, "r".to_owned(), Enforced::Limited),
                (Direction::Server, "r".to_owned(), Enforced::Limited),
            ]
        );
        // The client's half-close still goes through.
        assert_eq!(
            call.chunk(&mut judge, Direction::Client, &[], true),
            Edit::Keep
        );
        Ok(())
    }

    #[test]
    fn grpc_counts_messages_however_chunks_are_cut() -> Result<(), String> {
        let stream = [
            grpc_message_bytes(4),
            grpc_message_bytes(0),
            grpc_message_bytes(9),
        ]
        .concat();
        for cut in 1..stream.len() {
            let mut judge = budget(10, Answer::Pass);
            let mut call = GrpcStream::default();
            call.chunk(&mut judge, Direction::Client, &stream[..cut], false);
            call.chunk(&mut judge, Direction::Client, &stream[cut..], false);
            let sizes: Vec<u64> = judge.asks.iter().map(|(_, a)| a.bytes).collect();
            assert_eq!(sizes, [4, 0, 9], "cut at {cut}");
        }
        Ok(())
    }
}
