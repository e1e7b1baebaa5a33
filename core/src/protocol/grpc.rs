//! gRPC length-prefixed message framing, parsed incrementally.
//!
//! Each gRPC message on an HTTP/2 stream is a 5-byte prefix (a compressed
//! flag byte, 0 or 1, then a big-endian `u32` length) followed by that many
//! payload bytes. Body chunks bear no relation to messages: one chunk may hold
//! many messages, and a message (or even its prefix) may span many chunks.
//!
//! A message is reported as started as soon as its prefix is complete, before
//! any of its payload is forwarded, so a limiter can refuse it in time.

use core::cmp::min;

use super::ChunkPos;

/// Length of the gRPC message prefix: flag byte + 4-byte length.
pub const HEADER_LEN: usize = 5;

/// gRPC's own default limit on a received message (4 MiB).
pub const DEFAULT_MAX_MESSAGE_LEN: u32 = 4 * 1024 * 1024;

/// The prefix of one gRPC message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GrpcMessage {
    /// Payload length in bytes, as written in the prefix.
    pub len: u32,
    /// Whether the compressed flag was set (payload uses the stream's encoding).
    pub compressed: bool,
}

/// Something the parser saw in a chunk, in stream order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GrpcEvent {
    /// A message's prefix is complete: count it now, before its payload.
    Started {
        /// Where the message's prefix begins.
        at: ChunkPos,
        /// The parsed prefix.
        message: GrpcMessage,
    },
    /// A message's last payload byte has been seen.
    Completed {
        /// Offset in the chunk just past the message's last byte.
        end: usize,
        /// The prefix of the message that ended.
        message: GrpcMessage,
    },
}

/// Why a gRPC stream cannot be parsed further.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum GrpcError {
    /// The compressed-flag byte was neither 0 nor 1.
    #[error("invalid gRPC compressed flag {0:#04x}: must be 0 or 1")]
    InvalidFlag(u8),
    /// A message prefix announced more bytes than the configured limit.
    #[error("gRPC message of {len} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge {
        /// Length announced by the prefix.
        len: u32,
        /// The parser's `max_message_len`.
        max: u32,
    },
}

/// Incremental parser for one direction of one gRPC stream.
///
/// Holds at most the 5 prefix bytes that straddle a chunk edge; payloads are
/// skipped, never copied. After an error every call returns that error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcFrameParser {
    max_message_len: u32,
    /// Payload bytes still to skip in the current message.
    remaining: u32,
    /// The message whose payload is being skipped, if any.
    current: Option<GrpcMessage>,
    header: [u8; HEADER_LEN],
    /// How many bytes of `header` are filled (only between chunks is it
    /// non-zero at the start of a `feed`).
    header_len: u8,
    error: Option<GrpcError>,
}

impl Default for GrpcFrameParser {
    fn default() -> Self {
        Self::new()
    }
}

impl GrpcFrameParser {
    /// A parser with gRPC's default 4 MiB message limit.
    pub const fn new() -> Self {
        Self::with_max_message_len(DEFAULT_MAX_MESSAGE_LEN)
    }

    /// A parser that rejects messages longer than `max_message_len` bytes.
    pub const fn with_max_message_len(max_message_len: u32) -> Self {
        Self {
            max_message_len,
            remaining: 0,
            current: None,
            header: [0; HEADER_LEN],
            header_len: 0,
            error: None,
        }
    }

    /// The largest message length this parser accepts.
    pub const fn max_message_len(&self) -> u32 {
        self.max_message_len
    }

    /// The error the stream failed with, if it has.
    pub const fn error(&self) -> Option<GrpcError> {
        self.error
    }

    /// Whether the stream is between messages (no partial prefix or payload),
    /// i.e. whether ending the stream here leaves no truncated message.
    pub const fn is_idle(&self) -> bool {
        self.current.is_none() && self.header_len == 0 && self.error.is_none()
    }

    /// The message whose payload is in progress, if any.
    pub const fn current_message(&self) -> Option<GrpcMessage> {
        self.current
    }

    /// Passes over the next `len` bytes of the stream without seeing them,
    /// when they are all payload of the message in progress (payloads are
    /// never looked at): true if they were, false (nothing done) if they
    /// are not, and the bytes must be [fed](GrpcFrameParser::feed).
    pub fn skip_payload(&mut self, len: usize) -> bool {
        let Ok(len) = u32::try_from(len) else {
            return false;
        };
        if self.current.is_none() || self.error.is_some() || len > self.remaining {
            return false;
        }
        // `len` ≤ `remaining`: exact.
        self.remaining = self.remaining.saturating_sub(len);
        if self.remaining == 0 {
            self.current = None;
        }
        true
    }

    /// Parses one body chunk, calling `on_event` for every message started
    /// or completed in it, in stream order.
    ///
    /// On error, events before the offending prefix have been delivered and
    /// the parser is left failed: this and later calls return the error.
    pub fn feed<F>(&mut self, chunk: &[u8], mut on_event: F) -> Result<(), GrpcError>
    where
        F: FnMut(GrpcEvent),
    {
        if let Some(error) = self.error {
            return Err(error);
        }
        let mut pos = 0usize;
        while let Some(rest) = chunk.get(pos..).filter(|rest| !rest.is_empty()) {
            if let Some(message) = self.current {
                // `remaining` ≤ u32::MAX, so the min fits in u32.
                let take = min(self.remaining as usize, rest.len());
                // `take` ≤ `rest.len()` and ≤ `remaining`: neither saturates.
                pos = pos.saturating_add(take);
                self.remaining = self.remaining.saturating_sub(take as u32);
                if self.remaining == 0 {
                    self.current = None;
                    on_event(GrpcEvent::Completed { end: pos, message });
                }
                continue;
            }

            let carried = self.header_len;
            let at = ChunkPos {
                // A partial prefix only survives a chunk edge, so if some of
                // it was carried over we are at the start of this chunk.
                offset: if carried == 0 { pos } else { 0 },
                carried,
            };
            let filled = usize::from(self.header_len);
            let unfilled = self.header.get_mut(filled..).unwrap_or_default();
            let take = min(unfilled.len(), rest.len());
            if let (Some(to), Some(from)) = (unfilled.get_mut(..take), rest.get(..take)) {
                to.copy_from_slice(from);
            }
            // `take` ≤ `rest.len()` and ≤ HEADER_LEN: neither saturates.
            pos = pos.saturating_add(take);
            self.header_len = self.header_len.saturating_add(take as u8);

            // Check the flag as soon as it arrives: garbage fails fast.
            let flag = self.header[0];
            if flag > 1 {
                return Err(self.fail(GrpcError::InvalidFlag(flag)));
            }
            if usize::from(self.header_len) < HEADER_LEN {
                continue;
            }

            self.header_len = 0;
            let [_, a, b, c, d] = self.header;
            let message = GrpcMessage {
                len: u32::from_be_bytes([a, b, c, d]),
                compressed: flag == 1,
            };
            if message.len > self.max_message_len {
                return Err(self.fail(GrpcError::MessageTooLarge {
                    len: message.len,
                    max: self.max_message_len,
                }));
            }
            on_event(GrpcEvent::Started { at, message });
            if message.len == 0 {
                on_event(GrpcEvent::Completed { end: pos, message });
            } else {
                self.current = Some(message);
                self.remaining = message.len;
            }
        }
        Ok(())
    }

    fn fail(&mut self, error: GrpcError) -> GrpcError {
        self.error = Some(error);
        error
    }
}

#[cfg(test)]
mod tests {
    use alloc::vec::Vec;

    use super::*;

    fn frame(compressed: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.push(u8::from(compressed));
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn skipping_payload_leaves_the_parser_where_feeding_it_would() {
        let stream = [frame(false, &[7; 10]), frame(true, &[8; 3])].concat();
        let mut fed = GrpcFrameParser::new();
        let mut skipped = GrpcFrameParser::new();
        // Nothing to skip before a prefix, nor past the payload's end.
        assert!(!skipped.skip_payload(1));
        let (_, r) = feed_all(&mut skipped, &stream[..7]);
        assert_eq!(r, Ok(()));
        assert!(!skipped.skip_payload(9), "two payload bytes were fed");
        assert!(skipped.skip_payload(4));
        assert!(skipped.skip_payload(4));
        assert!(skipped.is_idle());
        let (_, r) = feed_all(&mut fed, &stream[..15]);
        assert_eq!(r, Ok(()));
        assert_eq!(skipped, fed);
        let (events, _) = feed_all(&mut skipped, &stream[15..]);
        assert_eq!(events, feed_all(&mut fed, &stream[15..]).0);
        assert_eq!(events.first(), Some(&started(0, 0, 3, true)));
    }

    fn feed_all(p: &mut GrpcFrameParser, chunk: &[u8]) -> (Vec<GrpcEvent>, Result<(), GrpcError>) {
        let mut events = Vec::new();
        let result = p.feed(chunk, |e| events.push(e));
        (events, result)
    }

    fn started(offset: usize, carried: u8, len: u32, compressed: bool) -> GrpcEvent {
        GrpcEvent::Started {
            at: ChunkPos { offset, carried },
            message: GrpcMessage { len, compressed },
        }
    }

    fn completed(end: usize, len: u32, compressed: bool) -> GrpcEvent {
        GrpcEvent::Completed {
            end,
            message: GrpcMessage { len, compressed },
        }
    }

    #[test]
    fn several_messages_in_one_chunk() {
        let mut bytes = frame(false, b"abc");
        bytes.extend(frame(true, b""));
        bytes.extend(frame(false, b"xy"));
        let mut p = GrpcFrameParser::new();
        let (events, result) = feed_all(&mut p, &bytes);
        assert_eq!(result, Ok(()));
        assert_eq!(
            events,
            [
                started(0, 0, 3, false),
                completed(8, 3, false),
                started(8, 0, 0, true),
                completed(13, 0, true),
                started(13, 0, 2, false),
                completed(20, 2, false),
            ]
        );
        assert!(p.is_idle());
    }

    #[test]
    fn header_split_over_chunks() {
        let bytes = frame(true, b"hello");
        let mut p = GrpcFrameParser::new();
        let (e1, r1) = feed_all(&mut p, &bytes[..2]);
        assert_eq!((e1.as_slice(), r1), (&[][..], Ok(())));
        assert!(!p.is_idle());
        let (e2, r2) = feed_all(&mut p, &bytes[2..4]);
        assert_eq!((e2.as_slice(), r2), (&[][..], Ok(())));
        let (e3, r3) = feed_all(&mut p, &bytes[4..6]);
        assert_eq!(r3, Ok(()));
        // Four prefix bytes came earlier; the fifth is at offset 0 here.
        assert_eq!(e3, [started(0, 4, 5, true)]);
        if let GrpcEvent::Started { at, .. } = e3[0] {
            assert_eq!(at.stream_pos(4), 0);
            assert!(!at.starts_in_chunk());
        }
        let (e4, r4) = feed_all(&mut p, &bytes[6..]);
        assert_eq!(r4, Ok(()));
        assert_eq!(e4, [completed(4, 5, true)]);
        assert!(p.is_idle());
    }

    #[test]
    fn payload_split_over_many_chunks() {
        let payload = [7u8; 100];
        let mut bytes = frame(false, &payload);
        bytes.extend(frame(false, b"z"));
        let mut p = GrpcFrameParser::new();
        let mut all = Vec::new();
        let mut base = 0;
        for chunk in bytes.chunks(9) {
            let (events, result) = feed_all(&mut p, chunk);
            assert_eq!(result, Ok(()));
            all.extend(events.into_iter().map(|e| (base, e)));
            base += chunk.len();
        }
        // Message 1 spans 0..105: it ends in the chunk at 99, offset 6. The
        // second prefix (105..110) straddles the chunk edge at 108.
        assert_eq!(
            all,
            [
                (0, started(0, 0, 100, false)),
                (99, completed(6, 100, false)),
                (108, started(0, 3, 1, false)),
                (108, completed(3, 1, false)),
            ]
        );
    }

    #[test]
    fn empty_chunk_is_a_no_op() {
        let mut p = GrpcFrameParser::new();
        assert_eq!(feed_all(&mut p, &[]), (Vec::new(), Ok(())));
        assert!(p.is_idle());
    }

    #[test]
    fn invalid_flag_fails_at_first_byte_and_sticks() {
        let mut p = GrpcFrameParser::new();
        let mut bytes = frame(false, b"ok");
        bytes.push(2);
        let (events, result) = feed_all(&mut p, &bytes);
        assert_eq!(events, [started(0, 0, 2, false), completed(7, 2, false)]);
        assert_eq!(result, Err(GrpcError::InvalidFlag(2)));
        assert_eq!(p.error(), Some(GrpcError::InvalidFlag(2)));
        assert!(!p.is_idle());
        // Stays failed, even for valid input or an empty chunk.
        assert_eq!(
            feed_all(&mut p, &frame(false, b"")),
            (Vec::new(), Err(GrpcError::InvalidFlag(2)))
        );
        assert_eq!(
            feed_all(&mut p, &[]),
            (Vec::new(), Err(GrpcError::InvalidFlag(2)))
        );
    }

    #[test]
    fn message_over_limit_reports_its_length() {
        let mut p = GrpcFrameParser::with_max_message_len(10);
        assert_eq!(p.max_message_len(), 10);
        let ok = frame(false, &[0; 10]);
        let (events, result) = feed_all(&mut p, &ok);
        assert_eq!(result, Ok(()));
        assert_eq!(events.len(), 2);
        let mut big = Vec::from([0u8]);
        big.extend_from_slice(&11u32.to_be_bytes());
        // Prefix split so the error comes from the second chunk.
        assert_eq!(feed_all(&mut p, &big[..3]), (Vec::new(), Ok(())));
        let err = GrpcError::MessageTooLarge { len: 11, max: 10 };
        assert_eq!(feed_all(&mut p, &big[3..]), (Vec::new(), Err(err)));
        assert_eq!(feed_all(&mut p, &ok), (Vec::new(), Err(err)));
    }

    #[test]
    fn default_limit_is_four_mebibytes() {
        let mut p = GrpcFrameParser::default();
        let mut at_limit = Vec::from([1u8]);
        at_limit.extend_from_slice(&DEFAULT_MAX_MESSAGE_LEN.to_be_bytes());
        let (events, result) = feed_all(&mut p, &at_limit);
        assert_eq!(result, Ok(()));
        assert_eq!(events, [started(0, 0, 4 << 20, true)]);
        assert_eq!(
            p.current_message(),
            Some(GrpcMessage {
                len: 4 << 20,
                compressed: true
            })
        );

        let mut p = GrpcFrameParser::default();
        let mut over = Vec::from([0u8]);
        over.extend_from_slice(&u32::MAX.to_be_bytes());
        let (_, result) = feed_all(&mut p, &over);
        assert_eq!(
            result,
            Err(GrpcError::MessageTooLarge {
                len: u32::MAX,
                max: DEFAULT_MAX_MESSAGE_LEN
            })
        );
    }

    #[test]
    fn largest_possible_message_is_skipped_without_buffering() {
        let mut p = GrpcFrameParser::with_max_message_len(u32::MAX);
        let mut bytes = Vec::from([0u8]);
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        let (events, result) = feed_all(&mut p, &bytes);
        assert_eq!(result, Ok(()));
        assert_eq!(events, [started(0, 0, u32::MAX, false)]);
        let block = alloc::vec![0u8; 1 << 20];
        for _ in 0..4095 {
            assert_eq!(feed_all(&mut p, &block), (Vec::new(), Ok(())));
        }
        let (events, result) = feed_all(&mut p, &block);
        assert_eq!(result, Ok(()));
        assert_eq!(events, [completed((1 << 20) - 1, u32::MAX, false)]);
        assert!(!p.is_idle());
    }

    #[test]
    fn error_messages_read_well() {
        use alloc::string::ToString;
        assert_eq!(
            GrpcError::InvalidFlag(0x80).to_string(),
            "invalid gRPC compressed flag 0x80: must be 0 or 1"
        );
        assert_eq!(
            GrpcError::MessageTooLarge { len: 5, max: 4 }.to_string(),
            "gRPC message of 5 bytes exceeds the limit of 4 bytes"
        );
    }

    #[test]
    fn parser_is_small() {
        assert!(core::mem::size_of::<GrpcFrameParser>() <= 48);
    }
}
