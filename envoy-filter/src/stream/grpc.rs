//! A gRPC call's streams: each direction's messages asked of the rules as
//! they start; a refusal ends the call cleanly before the response, or cuts
//! it after: the refused direction stops, and the caller ends the call (the
//! upstream's trailers rewritten, or a reset).

use sluice_core::policy::Direction;
use sluice_core::protocol::{GrpcEvent, GrpcFrameParser};

use super::{
    grpc_message_refusal, Answer, Ask, Edit, Enforced, Judge, PerDirection, Watched, GRPC_INTERNAL,
};

/// The status a cut call ends with when the upstream ends it in time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CutStatus {
    /// The `grpc-status`.
    pub status: u32,
    /// The `grpc-message`.
    pub message: String,
}

/// Why a direction's messages are no longer passed on.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Blocked {
    /// A rule refused a message: each later message is refused by it.
    Rule(String),
    /// The messages could not be parsed: nothing after can be counted.
    Malformed,
}

/// A gRPC call's streams.
#[derive(Debug)]
pub struct GrpcStream {
    parsers: PerDirection<GrpcFrameParser>,
    /// The directions the rules count: only their messages are parsed.
    watched: Watched,
    /// Directions whose messages are no longer passed on, and why.
    blocked: PerDirection<Option<Blocked>>,
    /// The status to put in the trailers, once a message was refused after
    /// the response started.
    cut: Option<CutStatus>,
}

impl GrpcStream {
    /// A call whose messages travelling the `watched` directions count.
    pub fn new(watched: Watched) -> Self {
        // No length cap of its own: the parser skips payloads without
        // holding them, and a cap would stop the counting at the first
        // message over it. `message_size` rules bound messages, measured by
        // the length their prefix declares; without one, the upstream's own
        // limit (gRPC's default is 4 MiB) applies.
        let parser = GrpcFrameParser::with_max_message_len(u32::MAX);
        GrpcStream {
            parsers: PerDirection {
                client: parser.clone(),
                server: parser,
            },
            watched,
            blocked: PerDirection::default(),
            cut: None,
        }
    }

    /// Whether chunks travelling `direction` must be read and passed to
    /// [`GrpcStream::chunk`]: only where a rule counts messages (a chunk
    /// of any other direction passes on unchanged).
    pub fn reads(&self, direction: Direction) -> bool {
        self.watched.includes(direction)
    }

    /// Whether a chunk of `size` bytes travelling `direction` passes on
    /// unread: it holds nothing but payload of a message already judged
    /// (payloads are never looked at), which the parser then passes over.
    /// A large message costs no copy of its chunks.
    pub fn passes_unread(&mut self, direction: Direction, size: usize) -> bool {
        self.blocked.get(direction).is_none() && self.parsers.get_mut(direction).skip_payload(size)
    }

    /// Sees a chunk travelling `direction`; `response_started` says whether
    /// a clean trailers-only answer is still possible. Each message is
    /// judged as the parser meets its prefix: no list of them is kept.
    pub fn chunk(
        &mut self,
        judge: &mut impl Judge,
        direction: Direction,
        bytes: &[u8],
        response_started: bool,
    ) -> Edit {
        let blocked = self.blocked.get(direction);
        // The first message refused in this chunk, and where it starts.
        let mut refused: Option<(usize, Refusal)> = None;
        // Where the last message that ended in this chunk ended: a prefix
        // that cannot be parsed begins there (or at the chunk's start).
        let mut parsed_to = 0usize;
        let failure = self
            .parsers
            .get_mut(direction)
            .feed(bytes, |event| match event {
                GrpcEvent::Started { at, message } => {
                    // A message after a refusal (in an earlier chunk or
                    // this one) is never passed on: refused by that rule.
                    let refused_by = match (blocked, &refused) {
                        (Some(Blocked::Malformed), _) => return,
                        (Some(Blocked::Rule(rule)), _) => Some(rule),
                        (None, Some((_, refusal))) => match &refusal.blocked {
                            Blocked::Rule(rule) => Some(rule),
                            Blocked::Malformed => None,
                        },
                        (None, None) => None,
                    };
                    if let Some(rule) = refused_by {
                        judge.enforced(direction, rule, Enforced::Limited);
                        return;
                    }
                    let len = u64::from(message.len);
                    let ask = Ask {
                        messages: 1,
                        bytes: len,
                        size: len,
                        compressed: message.compressed,
                        ends: true,
                    };
                    let (rule, violation, retry_after, metadata) = match judge.judge(direction, ask)
                    {
                        Answer::Pass => return,
                        Answer::Refuse {
                            rule,
                            violation,
                            retry_after,
                            metadata,
                        } => (rule, violation, retry_after, metadata),
                        // Only WebSocket rules drop; end the call all the same.
                        Answer::Drop { rule, violation } => (rule, violation, 1, Vec::new()),
                    };
                    judge.enforced(direction, &rule, Enforced::Limited);
                    let (status, message) = grpc_message_refusal(&rule, violation, retry_after);
                    let refusal = Refusal {
                        status,
                        message,
                        metadata,
                        blocked: Blocked::Rule(rule),
                    };
                    refused = Some((at.offset, refusal));
                }
                GrpcEvent::Completed { end, .. } => parsed_to = end,
            })
            .err();
        if blocked.is_some() {
            return if bytes.is_empty() {
                Edit::Keep
            } else {
                Edit::Replace(Vec::new())
            };
        }
        if let Some((offset, refusal)) = refused {
            // Everything before the refused message passes on.
            let passed = bytes.get(..offset).unwrap_or(bytes);
            return self.end(direction, refusal, passed, response_started);
        }
        match failure {
            None => Edit::Keep,
            // Nothing after the bad prefix can be counted, so none of it
            // may pass: the call ends as for a refused message.
            Some(error) => {
                let refusal = Refusal {
                    // What a gRPC endpoint answers a message it cannot parse.
                    status: GRPC_INTERNAL,
                    message: format!("malformed gRPC message stream: {error}"),
                    metadata: Vec::new(),
                    blocked: Blocked::Malformed,
                };
                let passed = bytes.get(..parsed_to).unwrap_or(bytes);
                self.end(direction, refusal, passed, response_started)
            }
        }
    }

    /// Ends the call for `refusal`: cleanly before the response started,
    /// else by a cut after `passed`, the bytes still passed on.
    fn end(
        &mut self,
        direction: Direction,
        refusal: Refusal,
        passed: &[u8],
        response_started: bool,
    ) -> Edit {
        let Refusal {
            status,
            message,
            metadata,
            blocked,
        } = refusal;
        if !response_started {
            return Edit::RefuseCall {
                status,
                message,
                metadata,
            };
        }
        *self.blocked.get_mut(direction) = Some(blocked);
        self.cut = Some(CutStatus { status, message });
        Edit::Cut(passed.to_vec())
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

/// How a call ends when a message in it is refused or cannot be parsed.
struct Refusal {
    status: u32,
    message: String,
    metadata: Vec<(&'static str, String)>,
    blocked: Blocked,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::test_judge::{budget, refuse, SizeJudge};
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
        let mut call = GrpcStream::new(Watched::BOTH);
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
        let mut call = GrpcStream::new(Watched::BOTH);
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
    fn chunks_of_payload_alone_pass_unread_and_counting_goes_on() -> Result<(), String> {
        let big = grpc_message_bytes(100);
        let stream = [big.clone(), grpc_message_bytes(1)].concat();
        let mut judge = budget(10, Answer::Pass);
        let mut call = GrpcStream::new(Watched::BOTH);
        assert_eq!(
            call.chunk(&mut judge, Direction::Client, &stream[..10], false),
            Edit::Keep
        );
        // Payload up to the message's end: unread.
        assert!(!call.passes_unread(Direction::Client, 96), "past its end");
        assert!(call.passes_unread(Direction::Client, 50));
        assert!(call.passes_unread(Direction::Client, 45));
        // The next prefix must be read.
        assert!(!call.passes_unread(Direction::Client, 6));
        assert_eq!(
            call.chunk(&mut judge, Direction::Client, &stream[big.len()..], false),
            Edit::Keep
        );
        let sizes: Vec<u64> = judge.asks.iter().map(|(_, a)| a.size).collect();
        assert_eq!(sizes, [100, 1]);
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
            let mut call = GrpcStream::new(Watched::BOTH);
            call.chunk(&mut judge, Direction::Client, &stream[..cut], false);
            call.chunk(&mut judge, Direction::Client, &stream[cut..], false);
            let sizes: Vec<u64> = judge.asks.iter().map(|(_, a)| a.bytes).collect();
            assert_eq!(sizes, [4, 0, 9], "cut at {cut}");
        }
        Ok(())
    }

    /// A prefix announcing `len` bytes, without the payload.
    fn prefix(len: u32) -> Vec<u8> {
        [&[0u8][..], &len.to_be_bytes()].concat()
    }

    #[test]
    fn a_message_over_four_mebibytes_meets_the_size_rules() -> Result<(), String> {
        // Its prefix, a little of it, and small messages: all one chunk.
        let stream = [
            prefix((4 << 20) + 1),
            vec![7; 10],
            grpc_message_bytes(1),
            grpc_message_bytes(1),
        ]
        .concat();
        let mut judge = SizeJudge::new(refuse(Violation::TooBig));
        let mut call = GrpcStream::new(Watched::BOTH);
        assert_eq!(
            call.chunk(&mut judge, Direction::Client, &stream, false),
            Edit::RefuseCall {
                status: 8,
                message: "message too large for rule r".into(),
                metadata: vec![("retry-after", "3".into())],
            }
        );
        // Without a size rule, counting goes on past it.
        let mut judge = budget(10, Answer::Pass);
        let mut call = GrpcStream::new(Watched::BOTH);
        assert_eq!(
            call.chunk(&mut judge, Direction::Client, &stream, false),
            Edit::Keep
        );
        let sizes: Vec<u64> = judge.asks.iter().map(|(_, a)| a.size).collect();
        assert_eq!(sizes, [(4 << 20) + 1]);
        Ok(())
    }

    #[test]
    fn a_malformed_prefix_ends_the_call() -> Result<(), String> {
        let good = grpc_message_bytes(3);
        // Flag 2 is neither "plain" nor "compressed".
        let mut bad = grpc_message_bytes(1);
        bad[0] = 2;
        let stream = [good.clone(), bad, grpc_message_bytes(1)].concat();
        let message = "malformed gRPC message stream: \
                       invalid gRPC compressed flag 0x02: must be 0 or 1";
        let mut judge = budget(10, refuse(Violation::Rate));
        let mut call = GrpcStream::new(Watched::BOTH);
        assert_eq!(
            call.chunk(&mut judge, Direction::Client, &stream, false),
            Edit::RefuseCall {
                status: 13,
                message: message.into(),
                metadata: Vec::new(),
            }
        );
        // After the response started, the call is cut where the bad prefix
        // begins, however the chunks fall.
        for cut in 0..=stream.len() {
            let mut judge = budget(10, refuse(Violation::Rate));
            let mut call = GrpcStream::new(Watched::BOTH);
            let mut passed = Vec::new();
            for piece in [&stream[..cut], &stream[cut..]] {
                match call.chunk(&mut judge, Direction::Server, piece, true) {
                    Edit::Keep => passed.extend_from_slice(piece),
                    Edit::Cut(b) | Edit::Replace(b) => passed.extend(b),
                    other => return Err(format!("{other:?}")),
                }
            }
            assert_eq!(passed, good, "cut at {cut}");
            assert!(call.blocked(Direction::Server), "cut at {cut}");
            assert_eq!(
                call.cut(),
                Some(&CutStatus {
                    status: 13,
                    message: message.into()
                })
            );
            assert_eq!(judge.asks.len(), 1, "cut at {cut}");
            assert!(judge.enforced.is_empty());
        }
        Ok(())
    }
}
