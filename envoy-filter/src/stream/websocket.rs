//! A WebSocket connection's two directions: frames parsed across chunks,
//! each message asked of the rules, and the chunk rewritten when a message
//! is dropped or the connection is closed (both ways) for a violation.

use sluice_core::policy::Direction;
use sluice_core::protocol::websocket::{self, CloseCode, Event, FrameParser, Opcode, WsError};
use sluice_core::protocol::ChunkPos;

use super::{opposite, Answer, Ask, Edit, Enforced, Judge, PerDirection, Violation, Watched};

/// A close this filter owes one side of a WebSocket connection.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Close {
    code: u16,
    reason: String,
}

/// One direction of a WebSocket connection.
#[derive(Debug)]
struct WsSide {
    parser: FrameParser,
    /// This direction was closed by the filter: drop what follows.
    closed: bool,
    /// The rule whose refusal closed this direction: it refuses every
    /// message discarded after.
    closed_by: Option<String>,
    /// The filter must close this direction at its next chunk.
    owed: Option<Close>,
    /// Dropping the data frames of the current message.
    dropping: bool,
    /// The current message is compressed (permessage-deflate).
    compressed: bool,
    /// Bytes of a dropped frame still to come in later chunks.
    drop_carry: u64,
    /// The start of a frame header kept back from the last chunk, so that
    /// a cut never falls inside a header already passed on.
    pending: Vec<u8>,
    /// The data frame whose header was seen last.
    frame: Option<FrameAt>,
}

/// Where a data frame sits in the current chunk.
#[derive(Clone, Copy, Debug)]
struct FrameAt {
    /// Offset of its header in the chunk.
    offset: usize,
    /// The whole header is in this chunk (so it can be cut out cleanly).
    whole: bool,
    /// Header plus payload.
    len: u64,
    /// Payload alone.
    payload: u64,
    /// It is the first frame of a message.
    starts: bool,
    /// It is the last frame of a message.
    fin: bool,
}

impl WsSide {
    fn new(direction: websocket::Direction, deflate: bool) -> WsSide {
        WsSide {
            parser: FrameParser::new(direction, deflate),
            closed: false,
            closed_by: None,
            owed: None,
            dropping: false,
            compressed: false,
            drop_carry: 0,
            pending: Vec::new(),
            frame: None,
        }
    }
}

/// The scratch entries a connection keeps between chunks.
const SCRATCH_KEPT: usize = 16;

/// A WebSocket connection's two directions.
#[derive(Debug)]
pub struct WebSocketStream {
    sides: PerDirection<WsSide>,
    /// The directions the rules count: only their frames are parsed.
    watched: Watched,
    /// Scratch, empty between chunks: a chunk's parser events.
    events: Vec<Event>,
    /// Scratch, empty between chunks: the data frames of the current
    /// message in a chunk, while all of it is there.
    unsent: Vec<FrameAt>,
}

/// The close frame towards the receiver of `direction`: masked towards the
/// upstream (client frames must be), plain towards the client.
fn close_towards_receiver(direction: Direction, close: &Close) -> Vec<u8> {
    let mask = match direction {
        // Any key works; a fixed one keeps the output reproducible.
        Direction::Client => Some([0x5a, 0x1c, 0xe0, 0x77]),
        Direction::Server => None,
    };
    websocket::close_frame(close.code, &close.reason, mask)
}

impl WebSocketStream {
    /// A connection whose messages may be permessage-deflate compressed
    /// (`deflate`: negotiated in the upgrade), which allows RSV1, and whose
    /// messages travelling the `watched` directions count.
    pub fn new(deflate: bool, watched: Watched) -> WebSocketStream {
        WebSocketStream {
            sides: PerDirection {
                client: WsSide::new(websocket::Direction::ClientToServer, deflate),
                server: WsSide::new(websocket::Direction::ServerToClient, deflate),
            },
            watched,
            events: Vec::new(),
            unsent: Vec::new(),
        }
    }

    /// Whether a chunk of `size` bytes travelling `direction` passes on
    /// unread: nothing but payload of the frame in progress, short of its
    /// end, with nothing to drop or close (payloads are never looked at),
    /// which the parser then passes over. A large message costs no copy of
    /// its chunks.
    pub fn passes_unread(&mut self, direction: Direction, size: usize) -> bool {
        let side = self.sides.get_mut(direction);
        let untouched = !side.closed
            && side.owed.is_none()
            && !side.dropping
            && side.drop_carry == 0
            && side.pending.is_empty();
        untouched && side.parser.skip_payload(size)
    }

    /// Whether chunks travelling `direction` must be read and passed to
    /// [`WebSocketStream::chunk`]: where a rule counts messages, and where
    /// the filter owes or has sent a close (a chunk of any other direction
    /// passes on unchanged).
    pub fn reads(&self, direction: Direction) -> bool {
        let side = self.sides.get(direction);
        self.watched.includes(direction) || side.owed.is_some() || side.closed
    }

    /// Sees a chunk travelling `direction`.
    pub fn chunk(&mut self, judge: &mut impl Judge, direction: Direction, bytes: &[u8]) -> Edit {
        let side = self.sides.get_mut(direction);
        if let Some(close) = side.owed.take() {
            side.closed = true;
            return Edit::Replace(close_towards_receiver(direction, &close));
        }
        if side.closed {
            if let Some(rule) = &side.closed_by {
                let mut starts = 0usize;
                let _ = side.parser.feed(bytes, |e| {
                    if let Event::MessageStarted { .. } = e {
                        starts = starts.saturating_add(1);
                    }
                });
                for _ in 0..starts {
                    judge.enforced(direction, rule, Enforced::Limited);
                }
            }
            return if bytes.is_empty() {
                Edit::Keep
            } else {
                Edit::Replace(Vec::new())
            };
        }
        // Where the next frame header begins in `bytes`, if no frame header
        // completes in it before.
        let tail = side.parser.payload_remaining();
        // Scratch kept across chunks, so that a chunk allocates no list.
        let mut events = std::mem::take(&mut self.events);
        let mut frames = std::mem::take(&mut self.unsent);
        let failure = side.parser.feed(bytes, |e| events.push(e)).err();
        // Work on the header bytes kept back followed by this chunk; keep
        // back again whatever header is still incomplete at its end.
        let pending = std::mem::take(&mut side.pending);
        let pending_len = pending.len();
        let whole_chunk: Vec<u8>;
        let chunk: &[u8] = if pending_len == 0 {
            bytes
        } else {
            whole_chunk = [pending.as_slice(), bytes].concat();
            &whole_chunk
        };
        let keep_back = side.parser.pending_header_len().min(chunk.len());
        // `keep_back` ≤ `chunk.len()`: exact.
        let limit = chunk.len().saturating_sub(keep_back);
        // A position reported by the parser, in `chunk` coordinates. An
        // offset lies within `bytes`, so the sum is within `chunk`: exact.
        let locate = |at: ChunkPos| {
            if at.carried > 0 {
                pending_len.saturating_sub(usize::from(at.carried))
            } else {
                pending_len.saturating_add(at.offset)
            }
        };

        // Byte ranges of `chunk` to leave out, and where to cut for a close.
        let mut removed: Vec<(usize, usize)> = Vec::new();
        let carry = side.drop_carry;
        if carry > 0 {
            let end = pending_len
                .saturating_add(usize::try_from(carry).unwrap_or(usize::MAX))
                .min(chunk.len());
            removed.push((pending_len, end));
            // `pending_len` ≤ `end` ≤ `pending_len + carry`: both exact.
            let dropped_here = end.saturating_sub(pending_len) as u64;
            side.drop_carry = carry.saturating_sub(dropped_here);
        }
        let mut cut: Option<(usize, Close, Option<String>)> = None;
        // The end of the last frame whose header is in this chunk.
        let mut frame_end: Option<usize> = None;
        // The data frames of the current message in this chunk (in
        // `frames`), while all of it is here: nothing of it has been passed
        // on, so a drop can still take it whole.
        let mut unsent = false;
        let mut events_left = events.drain(..);
        for event in events_left.by_ref() {
            match event {
                Event::Frame { at, header } => {
                    let data = !header.opcode.is_control();
                    let frame = FrameAt {
                        offset: locate(at),
                        whole: usize::from(at.carried) <= pending_len,
                        len: header.frame_len(),
                        payload: header.payload_len,
                        starts: header.opcode != Opcode::Continuation,
                        fin: header.fin,
                    };
                    side.frame = data.then_some(frame);
                    frame_end = Some(
                        frame
                            .offset
                            .saturating_add(usize::try_from(frame.len).unwrap_or(usize::MAX)),
                    );
                    if data {
                        if frame.starts {
                            frames.clear();
                            unsent = true;
                        }
                        if unsent && frame.whole {
                            frames.push(frame);
                        } else {
                            unsent = false;
                        }
                    }
                    if data && side.dropping {
                        drop_frame(side, &mut removed, chunk.len());
                    }
                }
                Event::MessageSize { size, .. } => {
                    let Some(frame) = side.frame else {
                        continue;
                    };
                    if side.dropping {
                        continue;
                    }
                    let ask = Ask {
                        messages: u64::from(frame.starts),
                        bytes: frame.payload,
                        size,
                        compressed: side.compressed,
                        ends: frame.fin,
                    };
                    let answer = judge.judge(direction, ask);
                    let at = if frame.whole { frame.offset } else { 0 };
                    match answer {
                        Answer::Pass => {}
                        // Dropping a compressed message would leave the
                        // receiver's decompression context out of step.
                        Answer::Drop { rule, .. } if unsent && !side.compressed => {
                            judge.enforced(direction, &rule, Enforced::Dropped);
                            side.dropping = true;
                            unsent = false;
                            // The earlier frames are whole and end before
                            // this one, after anything removed so far.
                            for f in frames.iter().take(frames.len().saturating_sub(1)) {
                                let end = f
                                    .offset
                                    .saturating_add(usize::try_from(f.len).unwrap_or(usize::MAX));
                                removed.push((f.offset, end.min(chunk.len())));
                            }
                            drop_frame(side, &mut removed, chunk.len());
                        }
                        Answer::Drop { violation, rule }
                        | Answer::Refuse {
                            violation, rule, ..
                        } => {
                            judge.enforced(direction, &rule, Enforced::Limited);
                            cut = Some((at, refusal_close(violation, &rule), Some(rule)));
                            break;
                        }
                    }
                }
                Event::MessageCompleted { .. } => side.dropping = false,
                Event::MessageStarted { compressed, .. } => side.compressed = compressed,
                Event::Close { .. } => {}
            }
        }

        if let (None, Some(error)) = (&cut, failure) {
            // The frame that broke the framing begins where the last frame
            // ended, or past what remained of an earlier chunk's frame.
            let at = frame_end
                .unwrap_or_else(|| usize::try_from(tail).unwrap_or(usize::MAX).min(chunk.len()));
            let (close, rule) = malformed_close(judge, direction, &side.parser, error);
            cut = Some((at.min(chunk.len()), close, rule));
        }
        // Messages after the refused one in this chunk are discarded with it.
        if let Some((_, _, Some(rule))) = &cut {
            for event in events_left {
                if let Event::MessageStarted { .. } = event {
                    judge.enforced(direction, rule, Enforced::Limited);
                }
            }
        } else {
            drop(events_left);
        }
        frames.clear();
        // A chunk of many small frames leaves no large scratch behind on a
        // connection that may stay open for hours.
        events.shrink_to(SCRATCH_KEPT);
        frames.shrink_to(SCRATCH_KEPT);
        self.events = events;
        self.unsent = frames;
        let Some((at, close, rule)) = cut else {
            side.pending = chunk.get(limit..).unwrap_or_default().to_vec();
            return if removed.is_empty() && pending_len == 0 && keep_back == 0 {
                Edit::Keep
            } else {
                Edit::Replace(without(chunk, &removed, limit))
            };
        };
        let mut out = without(chunk, &removed, at.min(limit));
        out.extend_from_slice(&close_towards_receiver(direction, &close));
        side.closed = true;
        side.closed_by = rule;
        let other = self.sides.get_mut(opposite(direction));
        if !other.closed {
            other.owed = Some(close);
        }
        Edit::Replace(out)
    }

    /// Whether the filter still owes a close to the side whose chunks travel
    /// `direction` (it is sent with that side's next chunk).
    pub fn owes_close(&self, direction: Direction) -> bool {
        self.sides.get(direction).owed.is_some()
    }
}

/// The close for a message `rule` refused for `violation`.
fn refusal_close(violation: Violation, rule: &str) -> Close {
    let (code, reason) = match violation {
        Violation::Rate => (CloseCode::POLICY_VIOLATION, format!("rate limited: {rule}")),
        Violation::TooBig => (
            CloseCode::MESSAGE_TOO_BIG,
            format!("message too big: {rule}"),
        ),
        Violation::Compressed => (
            CloseCode::POLICY_VIOLATION,
            format!("compressed message refused: {rule}"),
        ),
    };
    Close { code, reason }
}

/// The close for frames that break RFC 6455, and the rule that refused
/// them if one did. Nothing after them can be parsed, so nothing after
/// them can be counted: the connection ends (1002), save for a compressed
/// message where none was negotiated because the rules keep compression
/// off: that is the rules' refusal (1008), as if it had been negotiated.
fn malformed_close(
    judge: &mut impl Judge,
    direction: Direction,
    parser: &FrameParser,
    error: WsError,
) -> (Close, Option<String>) {
    let compressed = !parser.deflate()
        && matches!(
            error,
            WsError::ReservedBits {
                opcode: Opcode::Text | Opcode::Binary,
                rsv: 0b100,
            }
        );
    // An ask with no message or byte in it charges nothing: only a rule
    // that refuses compression can answer it.
    let ask = Ask {
        compressed: true,
        ..Ask::default()
    };
    match compressed.then(|| judge.judge(direction, ask)) {
        Some(
            Answer::Refuse {
                rule,
                violation: Violation::Compressed,
                ..
            }
            | Answer::Drop {
                rule,
                violation: Violation::Compressed,
            },
        ) => {
            judge.enforced(direction, &rule, Enforced::Limited);
            (refusal_close(Violation::Compressed, &rule), Some(rule))
        }
        _ => (
            Close {
                code: CloseCode::PROTOCOL_ERROR,
                reason: format!("malformed frame: {error}"),
            },
            None,
        ),
    }
}

/// Marks the current frame's bytes in this chunk for removal, and how many
/// more follow in later chunks.
fn drop_frame(side: &mut WsSide, removed: &mut Vec<(usize, usize)>, chunk_len: usize) {
    let Some(frame) = side.frame.filter(|f| f.whole) else {
        return;
    };
    let end = frame
        .offset
        .saturating_add(usize::try_from(frame.len).unwrap_or(usize::MAX));
    removed.push((frame.offset, end.min(chunk_len)));
    side.drop_carry = (end.saturating_sub(chunk_len)) as u64;
}

/// The bytes of `chunk[..limit]` outside the (sorted, disjoint) `removed` ranges.
fn without(chunk: &[u8], removed: &[(usize, usize)], limit: usize) -> Vec<u8> {
    let chunk = chunk.get(..limit).unwrap_or(chunk);
    let mut out = Vec::with_capacity(chunk.len());
    let mut pos = 0;
    for &(start, end) in removed {
        // Empty (None) when the range starts at or before `pos`.
        if let Some(kept) = chunk.get(pos..start.min(chunk.len())) {
            out.extend_from_slice(kept);
        }
        pos = pos.max(end);
    }
    out.extend_from_slice(chunk.get(pos..).unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::test_judge::{budget, refuse, SizeJudge};

    fn masked_text(payload: &[u8], fin: bool, first: bool) -> Vec<u8> {
        let opcode = if first { 0x1 } else { 0x0 };
        let mut f = vec![
            (u8::from(fin) << 7) | opcode,
            0x80 | payload.len() as u8,
            1,
            2,
            3,
            4,
        ];
        f.extend(
            payload
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]),
        );
        f
    }

    #[test]
    fn chunks_of_payload_alone_pass_unread_and_counting_goes_on() -> Result<(), String> {
        let big = [&[0x82u8, 126, 0x01, 0x00][..], &[9u8; 256]].concat();
        let small = [0x81u8, 0x01, b'x'];
        let stream = [big.clone(), small.to_vec()].concat();
        let mut judge = budget(10, Answer::Pass);
        let mut ws = WebSocketStream::new(false, Watched::BOTH);
        assert_eq!(
            ws.chunk(&mut judge, Direction::Server, &stream[..10]),
            Edit::Keep
        );
        // 250 payload bytes to come: all but the last pass unread.
        assert!(!ws.passes_unread(Direction::Server, 250), "the frame's end");
        assert!(ws.passes_unread(Direction::Server, 200));
        assert!(ws.passes_unread(Direction::Server, 49));
        assert_eq!(
            ws.chunk(&mut judge, Direction::Server, &stream[259..]),
            Edit::Keep
        );
        let sizes: Vec<u64> = judge.asks.iter().map(|(_, a)| a.size).collect();
        assert_eq!(sizes, [256, 1]);
        Ok(())
    }

    #[test]
    fn websocket_close_goes_both_ways() -> Result<(), String> {
        let mut judge = budget(1, refuse(Violation::Rate));
        let mut ws = WebSocketStream::new(false, Watched::BOTH);
        let first = masked_text(b"hi", true, true);
        let second = masked_text(b"yo", true, true);
        let edit = ws.chunk(
            &mut judge,
            Direction::Client,
            &[first.clone(), second].concat(),
        );
        let close_up =
            websocket::close_frame(1008, "rate limited: r", Some([0x5a, 0x1c, 0xe0, 0x77]));
        assert_eq!(edit, Edit::Replace([first, close_up].concat()));
        assert!(ws.owes_close(Direction::Server));
        // The upstream's answer is replaced by our close to the client.
        let edit = ws.chunk(&mut judge, Direction::Server, &[0x88, 0x00]);
        assert_eq!(
            edit,
            Edit::Replace(websocket::close_frame(1008, "rate limited: r", None))
        );
        assert_eq!(
            ws.chunk(&mut judge, Direction::Client, b"more"),
            Edit::Replace(Vec::new())
        );
        Ok(())
    }

    #[test]
    fn websocket_close_is_clean_when_fed_byte_by_byte() -> Result<(), String> {
        let mut judge = budget(1, refuse(Violation::Rate));
        let mut ws = WebSocketStream::new(false, Watched::BOTH);
        let first = masked_text(b"hi", true, true);
        let stream = [first.clone(), masked_text(b"yo", true, true)].concat();
        let mut out = Vec::new();
        for byte in &stream {
            match ws.chunk(&mut judge, Direction::Client, std::slice::from_ref(byte)) {
                Edit::Keep => out.push(*byte),
                Edit::Replace(b) => out.extend(b),
                other => return Err(format!("{other:?}")),
            }
        }
        let close_up =
            websocket::close_frame(1008, "rate limited: r", Some([0x5a, 0x1c, 0xe0, 0x77]));
        assert_eq!(out, [first, close_up].concat());
        Ok(())
    }

    #[test]
    fn websocket_drop_removes_whole_fragmented_messages_but_not_pings() -> Result<(), String> {
        let drop = Answer::Drop {
            violation: Violation::Rate,
            rule: "r".into(),
        };
        let mut judge = budget(0, drop);
        let mut ws = WebSocketStream::new(false, Watched::BOTH);
        let ping = vec![0x89, 0x80, 9, 9, 9, 9];
        let part1 = masked_text(b"abc", false, true);
        let part2 = masked_text(b"def", true, false);
        let bytes = [part1, ping.clone(), part2].concat();
        for cut in 1..bytes.len() {
            let mut ws2 = WebSocketStream::new(false, Watched::BOTH);
            let mut j = budget(0, judge.over.clone());
            let mut out = Vec::new();
            for piece in [&bytes[..cut], &bytes[cut..]] {
                match ws2.chunk(&mut j, Direction::Client, piece) {
                    Edit::Keep => out.extend_from_slice(piece),
                    Edit::Replace(b) => out.extend(b),
                    other => return Err(format!("{other:?}")),
                }
            }
            assert_eq!(out, ping, "cut at {cut}");
        }
        assert_eq!(
            ws.chunk(&mut judge, Direction::Client, &bytes),
            Edit::Replace(ping)
        );
        Ok(())
    }

    fn drop_too_big() -> Answer {
        Answer::Drop {
            violation: Violation::TooBig,
            rule: "r".into(),
        }
    }

    fn close_too_big() -> Vec<u8> {
        websocket::close_frame(1009, "message too big: r", Some([0x5a, 0x1c, 0xe0, 0x77]))
    }

    #[test]
    fn websocket_size_bound_closes_with_1009() -> Result<(), String> {
        let mut judge = SizeJudge::new(refuse(Violation::TooBig));
        let mut ws = WebSocketStream::new(false, Watched::BOTH);
        let small = masked_text(b"abcd", false, true);
        let grows = masked_text(b"e", true, false);
        let edit = ws.chunk(
            &mut judge,
            Direction::Client,
            &[small.clone(), grows].concat(),
        );
        assert_eq!(edit, Edit::Replace([small, close_too_big()].concat()));
        assert_eq!(judge.enforced, [("r".to_owned(), Enforced::Limited)]);
        Ok(())
    }

    #[test]
    fn drop_takes_a_message_whole_while_none_of_it_was_passed_on() -> Result<(), String> {
        let ping = vec![0x89, 0x80, 9, 9, 9, 9];
        let small = masked_text(b"abcd", false, true);
        let grows = masked_text(b"e", true, false);
        let next = masked_text(b"ok", true, true);
        // All in one chunk: dropped whole, the ping inside it kept.
        let mut judge = SizeJudge::new(drop_too_big());
        let mut ws = WebSocketStream::new(false, Watched::BOTH);
        let edit = ws.chunk(
            &mut judge,
            Direction::Client,
            &[small.clone(), ping.clone(), grows.clone(), next.clone()].concat(),
        );
        assert_eq!(edit, Edit::Replace([ping.clone(), next.clone()].concat()));
        assert_eq!(judge.enforced, [("r".to_owned(), Enforced::Dropped)]);
        // The first fragment already passed on: the drop has to close.
        let mut judge = SizeJudge::new(drop_too_big());
        let mut ws = WebSocketStream::new(false, Watched::BOTH);
        assert_eq!(ws.chunk(&mut judge, Direction::Client, &small), Edit::Keep);
        let edit = ws.chunk(&mut judge, Direction::Client, &[grows, next].concat());
        assert_eq!(edit, Edit::Replace(close_too_big()));
        // The message that closed, and "ok" discarded with it.
        let limited = ("r".to_owned(), Enforced::Limited);
        assert_eq!(judge.enforced, [limited.clone(), limited]);
        Ok(())
    }

    #[test]
    fn messages_discarded_after_a_close_are_refused_by_its_rule() -> Result<(), String> {
        let mut judge = SizeJudge::new(refuse(Violation::TooBig));
        let mut ws = WebSocketStream::new(false, Watched::BOTH);
        let big = masked_text(b"abcdef", true, true);
        let edit = ws.chunk(
            &mut judge,
            Direction::Client,
            &[big.clone(), big.clone()].concat(),
        );
        assert_eq!(edit, Edit::Replace(close_too_big()));
        ws.chunk(
            &mut judge,
            Direction::Client,
            &masked_text(b"x", true, true),
        );
        assert_eq!(judge.enforced.len(), 3);
        assert!(judge.enforced.iter().all(|(_, o)| *o == Enforced::Limited));
        Ok(())
    }

    fn close_up(code: u16, reason: &str) -> Vec<u8> {
        websocket::close_frame(code, reason, Some([0x5a, 0x1c, 0xe0, 0x77]))
    }

    /// Feeds `pieces` travelling from the client; what is passed on.
    fn pass_on(
        ws: &mut WebSocketStream,
        judge: &mut impl Judge,
        pieces: &[&[u8]],
    ) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        for piece in pieces {
            match ws.chunk(judge, Direction::Client, piece) {
                Edit::Keep => out.extend_from_slice(piece),
                Edit::Replace(b) => out.extend(b),
                other => return Err(format!("{other:?}")),
            }
        }
        Ok(out)
    }

    #[test]
    fn a_non_minimal_length_is_counted_like_any_other() -> Result<(), String> {
        // "hello" with its length in the 16-bit form.
        let long_form = [0x81, 0xFE, 0x00, 0x05, 1, 2, 3, 4]
            .into_iter()
            .chain(
                b"hello"
                    .iter()
                    .zip([1, 2, 3, 4].iter().cycle())
                    .map(|(b, k)| b ^ k),
            )
            .collect::<Vec<u8>>();
        let mut judge = budget(1, refuse(Violation::Rate));
        let mut ws = WebSocketStream::new(false, Watched::BOTH);
        let mut stream = long_form.clone();
        for _ in 0..100 {
            stream.extend(masked_text(b"hi", true, true));
        }
        let out = pass_on(&mut ws, &mut judge, &[&stream])?;
        assert_eq!(out, [long_form, close_up(1008, "rate limited: r")].concat());
        assert_eq!(judge.asks.len(), 2);
        Ok(())
    }

    #[test]
    fn a_malformed_frame_closes_with_1002_both_ways() -> Result<(), String> {
        let good = masked_text(b"hi", true, true);
        // Opcode 0x3 is reserved.
        let bad = [0x83, 0x80, 1, 2, 3, 4];
        let after = masked_text(b"yo", true, true);
        let stream = [good.clone(), bad.to_vec(), after].concat();
        let reason = "malformed frame: unknown WebSocket opcode 0x3";
        let expected = [good.clone(), close_up(1002, reason)].concat();
        // However the bytes are cut into chunks.
        for cut in 0..=stream.len() {
            let mut judge = budget(10, refuse(Violation::Rate));
            let mut ws = WebSocketStream::new(false, Watched::BOTH);
            let out = pass_on(&mut ws, &mut judge, &[&stream[..cut], &stream[cut..]])?;
            assert_eq!(out, expected, "cut at {cut}");
            assert!(ws.owes_close(Direction::Server), "cut at {cut}");
            assert!(judge.enforced.is_empty());
        }
        let mut judge = budget(10, refuse(Violation::Rate));
        let mut ws = WebSocketStream::new(false, Watched::BOTH);
        pass_on(&mut ws, &mut judge, &[&stream])?;
        assert_eq!(
            ws.chunk(&mut judge, Direction::Server, &[0x81, 0x02, b'o', b'k']),
            Edit::Replace(websocket::close_frame(1002, reason, None))
        );
        assert_eq!(
            ws.chunk(&mut judge, Direction::Client, &good),
            Edit::Replace(Vec::new())
        );
        // Only the first message was ever asked about.
        assert_eq!(judge.asks.len(), 1);
        Ok(())
    }

    /// Refuses compressed messages, as a size rule does; records enforcements.
    struct RefusesCompressed {
        enforced: Vec<(String, Enforced)>,
    }

    impl Judge for RefusesCompressed {
        fn judge(&mut self, _: Direction, ask: Ask) -> Answer {
            if ask.compressed {
                refuse(Violation::Compressed)
            } else {
                Answer::Pass
            }
        }

        fn enforced(&mut self, _: Direction, rule: &str, outcome: Enforced) {
            self.enforced.push((rule.to_owned(), outcome));
        }
    }

    #[test]
    fn rsv1_without_deflate_is_the_rules_refusal_or_a_protocol_error() -> Result<(), String> {
        let good = masked_text(b"hi", true, true);
        let mut compressed = masked_text(b"zz", true, true);
        compressed[0] |= 0x40;
        let stream = [good.clone(), compressed, good.clone()].concat();
        // A rule that kept compression off refuses it: 1008.
        let mut judge = RefusesCompressed {
            enforced: Vec::new(),
        };
        let mut ws = WebSocketStream::new(false, Watched::BOTH);
        let out = pass_on(&mut ws, &mut judge, &[&stream])?;
        let refused = close_up(1008, "compressed message refused: r");
        assert_eq!(out, [good.clone(), refused].concat());
        assert_eq!(judge.enforced, [("r".to_owned(), Enforced::Limited)]);
        // No rule cares about compression: a frame that breaks the framing.
        let mut judge = budget(10, refuse(Violation::Rate));
        let mut ws = WebSocketStream::new(false, Watched::BOTH);
        let out = pass_on(&mut ws, &mut judge, &[&stream])?;
        let reason = "malformed frame: reserved bits 0b100 not allowed on a Text frame";
        assert_eq!(out, [good, close_up(1002, reason)].concat());
        assert!(judge.enforced.is_empty());
        Ok(())
    }

    #[test]
    fn a_malformed_frame_after_a_long_payload_is_cut_where_it_begins() -> Result<(), String> {
        // A 200-byte binary frame over three chunks, then an unmasked frame.
        let mut long = vec![0x82, 0xFE, 0x00, 200, 1, 2, 3, 4];
        long.extend(std::iter::repeat_n(0u8, 200));
        let stream = [long.clone(), vec![0x81, 0x00]].concat();
        let mut judge = budget(10, refuse(Violation::Rate));
        let mut ws = WebSocketStream::new(false, Watched::BOTH);
        let out = pass_on(
            &mut ws,
            &mut judge,
            &[&stream[..50], &stream[50..100], &stream[100..]],
        )?;
        let reason = "malformed frame: client-to-server WebSocket frame is not masked";
        assert_eq!(out, [long, close_up(1002, reason)].concat());
        Ok(())
    }
}
