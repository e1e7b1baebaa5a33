//! Properties of the incremental protocol parsers: chunking never changes
//! what they report, arbitrary input never panics, and they neither grow nor
//! allocate while parsing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use proptest::sample::Index;
use sluice_core::protocol::grpc::{GrpcError, GrpcEvent, GrpcFrameParser, GrpcMessage};
use sluice_core::protocol::websocket::{
    close_frame, Direction, Event, FrameHeader, FrameParser, MessageKind, Opcode, WsError,
};

// ---------------------------------------------------------------------------
// Allocation counting, per thread so parallel tests don't disturb each other.

struct CountingAlloc;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

// ---------------------------------------------------------------------------
// Chunking helpers.

/// Sorted, deduplicated cut points in `0..=len` picked by `cuts`.
fn cut_points(len: usize, cuts: &[Index]) -> Vec<usize> {
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(len + 1)).collect();
    points.sort_unstable();
    points.dedup();
    points
}

/// `bytes` cut at `points` (empty chunks included where points repeat 0/len).
fn chunks<'a>(bytes: &'a [u8], points: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    for &p in points {
        out.push(&bytes[start..p]);
        start = p;
    }
    out.push(&bytes[start..]);
    out
}

// ---------------------------------------------------------------------------
// gRPC.

/// A gRPC event with positions made absolute in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GrpcAbs {
    Started { pos: u64, message: GrpcMessage },
    Completed { end: u64, message: GrpcMessage },
}

fn grpc_run(
    parser: &mut GrpcFrameParser,
    pieces: &[&[u8]],
) -> (Vec<GrpcAbs>, Result<(), GrpcError>) {
    let mut events = Vec::new();
    let mut base = 0u64;
    for piece in pieces {
        let result = parser.feed(piece, |e| {
            events.push(match e {
                GrpcEvent::Started { at, message } => GrpcAbs::Started {
                    pos: at.stream_pos(base),
                    message,
                },
                GrpcEvent::Completed { end, message } => GrpcAbs::Completed {
                    end: base + end as u64,
                    message,
                },
            });
        });
        if result.is_err() {
            return (events, result);
        }
        base += piece.len() as u64;
    }
    (events, Ok(()))
}

fn grpc_stream() -> impl Strategy<Value = Vec<(bool, usize, u8)>> {
    let len = prop_oneof![
        4 => 0usize..40,
        2 => 40usize..600,
        1 => 5000usize..20_000,
    ];
    prop::collection::vec((any::<bool>(), len, any::<u8>()), 0..12)
}

/// Encodes messages and returns the bytes plus the events a parser must give.
fn grpc_encode(messages: &[(bool, usize, u8)]) -> (Vec<u8>, Vec<GrpcAbs>) {
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    for &(compressed, len, fill) in messages {
        let message = GrpcMessage {
            len: len as u32,
            compressed,
        };
        expected.push(GrpcAbs::Started {
            pos: bytes.len() as u64,
            message,
        });
        bytes.push(u8::from(compressed));
        bytes.extend_from_slice(&(len as u32).to_be_bytes());
        // Payloads that look like prefixes must still be skipped.
        bytes.resize(bytes.len() + len, fill);
        expected.push(GrpcAbs::Completed {
            end: bytes.len() as u64,
            message,
        });
    }
    (bytes, expected)
}

// ---------------------------------------------------------------------------
// WebSocket.

/// A WebSocket event with positions made absolute in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WsAbs {
    Frame {
        pos: u64,
        header: FrameHeader,
    },
    Started {
        pos: u64,
        kind: MessageKind,
        compressed: bool,
    },
    Size {
        pos: u64,
        size: u64,
        frames: u32,
    },
    Completed {
        end: u64,
        kind: MessageKind,
        size: u64,
        frames: u32,
    },
    Close {
        pos: u64,
        payload_len: u8,
    },
}

fn ws_abs(e: Event, base: u64) -> WsAbs {
    match e {
        Event::Frame { at, header } => WsAbs::Frame {
            pos: at.stream_pos(base),
            header,
        },
        Event::MessageStarted {
            at,
            kind,
            compressed,
        } => WsAbs::Started {
            pos: at.stream_pos(base),
            kind,
            compressed,
        },
        Event::MessageSize { at, size, frames } => WsAbs::Size {
            pos: at.stream_pos(base),
            size,
            frames,
        },
        Event::MessageCompleted {
            end,
            kind,
            size,
            frames,
        } => WsAbs::Completed {
            end: base + end as u64,
            kind,
            size,
            frames,
        },
        Event::Close { at, payload_len } => WsAbs::Close {
            pos: at.stream_pos(base),
            payload_len,
        },
    }
}

fn ws_run(parser: &mut FrameParser, pieces: &[&[u8]]) -> (Vec<WsAbs>, Result<(), WsError>) {
    let mut events = Vec::new();
    let mut base = 0u64;
    for piece in pieces {
        let result = parser.feed(piece, |e| events.push(ws_abs(e, base)));
        if result.is_err() {
            return (events, result);
        }
        base += piece.len() as u64;
    }
    (events, Ok(()))
}

/// A control frame to interleave: opcode and payload length.
#[derive(Clone, Copy, Debug)]
struct Control {
    opcode: Opcode,
    len: usize,
}

/// A data message: its kind, compression, fragment sizes, and the control
/// frames that precede each fragment.
#[derive(Clone, Debug)]
struct Message {
    kind: MessageKind,
    compressed: bool,
    fragments: Vec<(Vec<Control>, usize)>,
    fill: u8,
}

fn control() -> impl Strategy<Value = Control> {
    prop_oneof![
        (0usize..=125).prop_map(|len| Control {
            opcode: Opcode::Ping,
            len
        }),
        (0usize..=125).prop_map(|len| Control {
            opcode: Opcode::Pong,
            len
        }),
        // A close payload is empty or at least a 2-byte code.
        prop_oneof![Just(0usize), 2usize..=125].prop_map(|len| Control {
            opcode: Opcode::Close,
            len
        }),
    ]
}

fn ws_message() -> impl Strategy<Value = Message> {
    let len = prop_oneof![
        8 => 0usize..126,
        3 => 126usize..400,
        1 => 65_530usize..65_545,
    ];
    let fragment = (prop::collection::vec(control(), 0..3), len);
    (
        prop_oneof![Just(MessageKind::Text), Just(MessageKind::Binary)],
        any::<bool>(),
        prop::collection::vec(fragment, 1..5),
        any::<u8>(),
    )
        .prop_map(|(kind, compressed, fragments, fill)| Message {
            kind,
            compressed,
            fragments,
            fill,
        })
}

/// Appends one frame, returning its header as the parser should report it.
fn push_frame(
    bytes: &mut Vec<u8>,
    fin: bool,
    rsv1: bool,
    opcode: Opcode,
    mask: Option<[u8; 4]>,
    len: usize,
    fill: u8,
) -> FrameHeader {
    let start = bytes.len();
    bytes.push(u8::from(fin) << 7 | u8::from(rsv1) << 6 | opcode.as_u8());
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        bytes.push(mask_bit | len as u8);
    } else if len <= 0xFFFF {
        bytes.push(mask_bit | 126);
        bytes.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        bytes.push(mask_bit | 127);
        bytes.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if let Some(key) = mask {
        bytes.extend_from_slice(&key);
    }
    let header_len = (bytes.len() - start) as u8;
    bytes.resize(bytes.len() + len, fill);
    FrameHeader {
        fin,
        rsv: u8::from(rsv1) << 2,
        opcode,
        mask,
        payload_len: len as u64,
        header_len,
    }
}

fn push_control(
    bytes: &mut Vec<u8>,
    expected: &mut Vec<WsAbs>,
    c: Control,
    mask: Option<[u8; 4]>,
    fill: u8,
) {
    let pos = bytes.len() as u64;
    let header = push_frame(bytes, true, false, c.opcode, mask, c.len, fill);
    expected.push(WsAbs::Frame { pos, header });
    if c.opcode == Opcode::Close {
        expected.push(WsAbs::Close {
            pos,
            payload_len: c.len as u8,
        });
    }
}

/// Encodes a stream and returns the bytes plus the events a parser must give.
fn ws_encode(
    messages: &[(Vec<Control>, Message)],
    mask: Option<[u8; 4]>,
    deflate: bool,
) -> (Vec<u8>, Vec<WsAbs>) {
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    for (before, message) in messages {
        for &c in before {
            push_control(&mut bytes, &mut expected, c, mask, message.fill);
        }
        let compressed = deflate && message.compressed;
        let mut size = 0u64;
        let count = message.fragments.len();
        for (i, (controls, len)) in message.fragments.iter().enumerate() {
            if i > 0 {
                for &c in controls {
                    push_control(&mut bytes, &mut expected, c, mask, message.fill);
                }
            }
            let first = i == 0;
            let fin = i + 1 == count;
            let opcode = match (first, message.kind) {
                (false, _) => Opcode::Continuation,
                (true, MessageKind::Text) => Opcode::Text,
                (true, MessageKind::Binary) => Opcode::Binary,
            };
            let pos = bytes.len() as u64;
            let header = push_frame(
                &mut bytes,
                fin,
                first && compressed,
                opcode,
                mask,
                *len,
                message.fill,
            );
            expected.push(WsAbs::Frame { pos, header });
            if first {
                expected.push(WsAbs::Started {
                    pos,
                    kind: message.kind,
                    compressed,
                });
            }
            size += *len as u64;
            expected.push(WsAbs::Size {
                pos,
                size,
                frames: i as u32 + 1,
            });
            if fin {
                expected.push(WsAbs::Completed {
                    end: bytes.len() as u64,
                    kind: message.kind,
                    size,
                    frames: count as u32,
                });
            }
        }
    }
    (bytes, expected)
}

/// Messages, each preceded by top-level control frames.
type Messages = Vec<(Vec<Control>, Message)>;

/// A stream: messages, whether masked, whether deflate, and the mask key.
fn ws_stream() -> impl Strategy<Value = (Messages, bool, bool, [u8; 4])> {
    (
        prop::collection::vec((prop::collection::vec(control(), 0..2), ws_message()), 0..6),
        any::<bool>(),
        any::<bool>(),
        any::<[u8; 4]>(),
    )
}

fn direction(masked: bool) -> Direction {
    if masked {
        Direction::ClientToServer
    } else {
        Direction::ServerToClient
    }
}

// ---------------------------------------------------------------------------
// Properties.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn grpc_any_chunking_gives_the_same_events(
        messages in grpc_stream(),
        cuts in prop::collection::vec(any::<Index>(), 0..24),
    ) {
        let (bytes, expected) = grpc_encode(&messages);
        let points = cut_points(bytes.len(), &cuts);

        let mut whole = GrpcFrameParser::with_max_message_len(u32::MAX);
        prop_assert_eq!(grpc_run(&mut whole, &[&bytes]), (expected.clone(), Ok(())));
        prop_assert!(whole.is_idle());

        let mut split = GrpcFrameParser::with_max_message_len(u32::MAX);
        prop_assert_eq!(grpc_run(&mut split, &chunks(&bytes, &points)), (expected.clone(), Ok(())));

        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        let mut bytewise = GrpcFrameParser::with_max_message_len(u32::MAX);
        prop_assert_eq!(grpc_run(&mut bytewise, &singles), (expected, Ok(())));
        prop_assert_eq!(&whole, &bytewise);
    }

    #[test]
    fn grpc_arbitrary_bytes_never_panic_and_ignore_chunking(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
        cuts in prop::collection::vec(any::<Index>(), 0..16),
        max in prop_oneof![Just(u32::MAX), 0u32..64],
    ) {
        let points = cut_points(bytes.len(), &cuts);
        let mut whole = GrpcFrameParser::with_max_message_len(max);
        let mut split = GrpcFrameParser::with_max_message_len(max);
        let a = grpc_run(&mut whole, &[&bytes]);
        let b = grpc_run(&mut split, &chunks(&bytes, &points));
        prop_assert_eq!(&a, &b);
        if let Err(error) = a.1 {
            // Errors stick.
            prop_assert_eq!(whole.feed(&[0, 0, 0, 0, 0], |_| {}), Err(error));
        }
    }

    #[test]
    fn websocket_any_chunking_gives_the_same_events(
        (messages, masked, deflate, key) in ws_stream(),
        cuts in prop::collection::vec(any::<Index>(), 0..24),
    ) {
        let mask = masked.then_some(key);
        let (bytes, expected) = ws_encode(&messages, mask, deflate);
        let points = cut_points(bytes.len(), &cuts);
        let dir = direction(masked);

        let mut whole = FrameParser::new(dir, deflate);
        prop_assert_eq!(ws_run(&mut whole, &[&bytes]), (expected.clone(), Ok(())));
        prop_assert!(whole.at_frame_boundary());
        prop_assert_eq!(whole.message_in_progress(), None);

        let mut split = FrameParser::new(dir, deflate);
        prop_assert_eq!(ws_run(&mut split, &chunks(&bytes, &points)), (expected.clone(), Ok(())));

        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        let mut bytewise = FrameParser::new(dir, deflate);
        prop_assert_eq!(ws_run(&mut bytewise, &singles), (expected, Ok(())));
        prop_assert_eq!(&whole, &bytewise);
    }

    #[test]
    fn websocket_arbitrary_bytes_never_panic_and_ignore_chunking(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
        cuts in prop::collection::vec(any::<Index>(), 0..16),
        masked in any::<bool>(),
        deflate in any::<bool>(),
    ) {
        let points = cut_points(bytes.len(), &cuts);
        let dir = direction(masked);
        let mut whole = FrameParser::new(dir, deflate);
        let mut split = FrameParser::new(dir, deflate);
        let a = ws_run(&mut whole, &[&bytes]);
        let b = ws_run(&mut split, &chunks(&bytes, &points));
        prop_assert_eq!(&a, &b);
        if let Err(error) = a.1 {
            prop_assert_eq!(whole.feed(&[0x82, 0x00], |_| {}), Err(error));
        }
    }

    #[test]
    fn websocket_valid_prefix_then_garbage_never_panics(
        (messages, masked, deflate, key) in ws_stream(),
        garbage in prop::collection::vec(any::<u8>(), 0..64),
        cuts in prop::collection::vec(any::<Index>(), 0..16),
    ) {
        let mask = masked.then_some(key);
        let (mut bytes, _) = ws_encode(&messages, mask, deflate);
        bytes.extend(garbage);
        let points = cut_points(bytes.len(), &cuts);
        let dir = direction(masked);
        let a = ws_run(&mut FrameParser::new(dir, deflate), &[&bytes]);
        let b = ws_run(&mut FrameParser::new(dir, deflate), &chunks(&bytes, &points));
        prop_assert_eq!(a, b);
    }

    #[test]
    fn feeding_never_allocates(
        (messages, masked, deflate, key) in ws_stream(),
        grpc in grpc_stream(),
        cuts in prop::collection::vec(any::<Index>(), 0..24),
    ) {
        let (ws_bytes, _) = ws_encode(&messages, masked.then_some(key), deflate);
        let (grpc_bytes, _) = grpc_encode(&grpc);
        let ws_pieces = chunks(&ws_bytes, &cut_points(ws_bytes.len(), &cuts));
        let grpc_pieces = chunks(&grpc_bytes, &cut_points(grpc_bytes.len(), &cuts));
        let mut ws = FrameParser::new(direction(masked), deflate);
        let mut g = GrpcFrameParser::with_max_message_len(u32::MAX);
        let ws_size = std::mem::size_of_val(&ws);
        let g_size = std::mem::size_of_val(&g);

        let before = allocations();
        let mut seen = 0u64;
        for piece in &ws_pieces {
            prop_assert!(ws.feed(piece, |_| seen += 1).is_ok());
        }
        for piece in &grpc_pieces {
            prop_assert!(g.feed(piece, |_| seen += 1).is_ok());
        }
        let after = allocations();
        prop_assert_eq!(after - before, 0, "parsers allocated while feeding");
        prop_assert!(seen > 0 || (messages.is_empty() && grpc.is_empty()));
        prop_assert_eq!(std::mem::size_of_val(&ws), ws_size);
        prop_assert_eq!(std::mem::size_of_val(&g), g_size);
    }
}

#[test]
fn parsers_are_small_and_fixed_size() {
    // The parsers hold no heap storage at all (no Vec, Box or String), so
    // their whole memory is their inline size.
    assert!(std::mem::size_of::<GrpcFrameParser>() <= 48);
    assert!(std::mem::size_of::<FrameParser>() <= 64);
    assert!(std::mem::size_of::<Event>() <= 48);
}

#[test]
fn close_frames_built_here_parse_as_close() {
    for masked in [false, true] {
        let bytes = close_frame(1009, "too big", masked.then_some([1, 2, 3, 4]));
        let (events, result) = ws_run(&mut FrameParser::new(direction(masked), false), &[&bytes]);
        assert_eq!(result, Ok(()));
        assert_eq!(
            events.last(),
            Some(&WsAbs::Close {
                pos: 0,
                payload_len: 9
            })
        );
    }
}

#[test]
fn allocation_counter_sees_allocations() {
    // Guards `feeding_never_allocates` against a counter that never counts.
    let before = allocations();
    let v: Vec<u8> = Vec::with_capacity(16);
    assert!(allocations() > before);
    drop(v);
}
