use alloc::vec::Vec;

use super::*;

const C2S: Direction = Direction::ClientToServer;
const S2C: Direction = Direction::ServerToClient;
const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn feed(p: &mut FrameParser, chunk: &[u8]) -> (Vec<Event>, Result<(), WsError>) {
    let mut events = Vec::new();
    let result = p.feed(chunk, |e| events.push(e));
    (events, result)
}

/// Events for `bytes` fed whole to a fresh parser; panics on error.
fn events_of(direction: Direction, deflate: bool, bytes: &[u8]) -> Vec<Event> {
    let mut p = FrameParser::new(direction, deflate);
    let (events, result) = feed(&mut p, bytes);
    assert_eq!(result, Ok(()));
    events
}

/// The error `bytes` fail with, fed whole and byte by byte.
fn error_of(direction: Direction, deflate: bool, bytes: &[u8]) -> WsError {
    let mut whole = FrameParser::new(direction, deflate);
    let (_, result) = feed(&mut whole, bytes);
    let Err(error) = result else {
        panic!("no error for {bytes:02x?}");
    };
    let mut split = FrameParser::new(direction, deflate);
    let split_result = bytes
        .iter()
        .try_for_each(|b| split.feed(core::slice::from_ref(b), |_| {}));
    assert_eq!(split_result, Err(error));
    assert_eq!(whole.error(), Some(error));
    error
}

fn at(offset: usize) -> ChunkPos {
    ChunkPos { offset, carried: 0 }
}

fn header(
    fin: bool,
    opcode: Opcode,
    mask: Option<[u8; 4]>,
    payload_len: u64,
    header_len: u8,
) -> FrameHeader {
    FrameHeader {
        fin,
        rsv: 0,
        opcode,
        mask,
        payload_len,
        header_len,
    }
}

/// Encodes a frame header (minimal length) followed by `payload_len` zeros.
fn frame(first_byte: u8, mask: Option<[u8; 4]>, payload_len: usize) -> Vec<u8> {
    let mut out = Vec::from([first_byte]);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if payload_len < 126 {
        out.push(mask_bit | payload_len as u8);
    } else if payload_len <= 0xFFFF {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(payload_len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(payload_len as u64).to_be_bytes());
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
    out.extend(core::iter::repeat_n(0, payload_len));
    out
}

// RFC 6455 §5.7 examples.

#[test]
fn rfc_single_frame_unmasked_text() {
    let bytes = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
    assert_eq!(
        events_of(S2C, false, &bytes),
        [
            Event::Frame {
                at: at(0),
                header: header(true, Opcode::Text, None, 5, 2)
            },
            Event::MessageStarted {
                at: at(0),
                kind: MessageKind::Text,
                compressed: false
            },
            Event::MessageSize {
                at: at(0),
                size: 5,
                frames: 1
            },
            Event::MessageCompleted {
                end: 7,
                kind: MessageKind::Text,
                size: 5,
                frames: 1
            },
        ]
    );
}

#[test]
fn rfc_single_frame_masked_text() {
    let bytes = [
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    let events = events_of(C2S, false, &bytes);
    assert_eq!(
        events[0],
        Event::Frame {
            at: at(0),
            header: header(true, Opcode::Text, Some(KEY), 5, 6)
        }
    );
    assert_eq!(
        events[3],
        Event::MessageCompleted {
            end: 11,
            kind: MessageKind::Text,
            size: 5,
            frames: 1
        }
    );
    assert_eq!(events.len(), 4);
}

#[test]
fn rfc_fragmented_unmasked_text() {
    let bytes = [0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f];
    assert_eq!(
        events_of(S2C, false, &bytes),
        [
            Event::Frame {
                at: at(0),
                header: header(false, Opcode::Text, None, 3, 2)
            },
            Event::MessageStarted {
                at: at(0),
                kind: MessageKind::Text,
                compressed: false
            },
            Event::MessageSize {
                at: at(0),
                size: 3,
                frames: 1
            },
            Event::Frame {
                at: at(5),
                header: header(true, Opcode::Continuation, None, 2, 2)
            },
            Event::MessageSize {
                at: at(5),
                size: 5,
                frames: 2
            },
            Event::MessageCompleted {
                end: 9,
                kind: MessageKind::Text,
                size: 5,
                frames: 2
            },
        ]
    );
}

#[test]
fn rfc_ping_and_masked_pong() {
    let ping = [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
    assert_eq!(
        events_of(S2C, false, &ping),
        [Event::Frame {
            at: at(0),
            header: header(true, Opcode::Ping, None, 5, 2)
        }]
    );
    let pong = [
        0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    assert_eq!(
        events_of(C2S, false, &pong),
        [Event::Frame {
            at: at(0),
            header: header(true, Opcode::Pong, Some(KEY), 5, 6)
        }]
    );
}

#[test]
fn rfc_16_bit_length() {
    let mut bytes = Vec::from([0x82, 0x7E, 0x01, 0x00]);
    bytes.resize(4 + 256, 0xAA);
    let events = events_of(S2C, false, &bytes);
    assert_eq!(
        events[0],
        Event::Frame {
            at: at(0),
            header: header(true, Opcode::Binary, None, 256, 4)
        }
    );
    assert_eq!(
        events[3],
        Event::MessageCompleted {
            end: 260,
            kind: MessageKind::Binary,
            size: 256,
            frames: 1
        }
    );
}

#[test]
fn rfc_64_bit_length() {
    let mut bytes = Vec::from([0x82, 0x7F, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00]);
    bytes.resize(10 + 65536, 0);
    let events = events_of(S2C, false, &bytes);
    assert_eq!(
        events[0],
        Event::Frame {
            at: at(0),
            header: header(true, Opcode::Binary, None, 65536, 10)
        }
    );
    assert_eq!(
        events[3],
        Event::MessageCompleted {
            end: 65546,
            kind: MessageKind::Binary,
            size: 65536,
            frames: 1
        }
    );
}

#[test]
fn length_encoding_boundaries() {
    for (len, header_len) in [
        (0usize, 2u8),
        (125, 2),
        (126, 4),
        (0xFFFF, 4),
        (0x1_0000, 10),
    ] {
        for mask in [None, Some(KEY)] {
            let direction = if mask.is_some() { C2S } else { S2C };
            let bytes = frame(0x82, mask, len);
            let extra = if mask.is_some() { 4 } else { 0 };
            let events = events_of(direction, false, &bytes);
            assert_eq!(
                events[0],
                Event::Frame {
                    at: at(0),
                    header: header(true, Opcode::Binary, mask, len as u64, header_len + extra)
                }
            );
            assert_eq!(
                events.last(),
                Some(&Event::MessageCompleted {
                    end: bytes.len(),
                    kind: MessageKind::Binary,
                    size: len as u64,
                    frames: 1
                })
            );
        }
    }
}

#[test]
fn largest_length_is_skipped_without_buffering() {
    let mut bytes = Vec::from([0x02, 0x7F]);
    bytes.extend_from_slice(&(i64::MAX as u64).to_be_bytes());
    let mut p = FrameParser::new(S2C, false);
    let (events, result) = feed(&mut p, &bytes);
    assert_eq!(result, Ok(()));
    assert_eq!(
        events[2],
        Event::MessageSize {
            at: at(0),
            size: i64::MAX as u64,
            frames: 1
        }
    );
    let block = alloc::vec![0u8; 1 << 16];
    for _ in 0..64 {
        assert_eq!(feed(&mut p, &block), (Vec::new(), Ok(())));
    }
    assert_eq!(
        p.message_in_progress(),
        Some((MessageKind::Binary, i64::MAX as u64))
    );
    assert!(!p.at_frame_boundary());
}

#[test]
fn fragments_with_interleaved_controls() {
    let mut bytes = frame(0x01, Some(KEY), 3); // text, not FIN
    let ping_at = bytes.len();
    bytes.extend(frame(0x89, Some(KEY), 4));
    let cont_at = bytes.len();
    bytes.extend(frame(0x00, Some(KEY), 200));
    let pong_at = bytes.len();
    bytes.extend(frame(0x8A, Some(KEY), 0));
    let last_at = bytes.len();
    bytes.extend(frame(0x80, Some(KEY), 1));
    let events = events_of(C2S, false, &bytes);
    let sizes: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::MessageSize { at, size, frames } => Some((at.offset, *size, *frames)),
            _ => None,
        })
        .collect();
    assert_eq!(sizes, [(0, 3, 1), (cont_at, 203, 2), (last_at, 204, 3)]);
    let frames: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Frame { at, header } => Some((at.offset, header.opcode)),
            _ => None,
        })
        .collect();
    assert_eq!(
        frames,
        [
            (0, Opcode::Text),
            (ping_at, Opcode::Ping),
            (cont_at, Opcode::Continuation),
            (pong_at, Opcode::Pong),
            (last_at, Opcode::Continuation),
        ]
    );
    assert_eq!(
        events.last(),
        Some(&Event::MessageCompleted {
            end: bytes.len(),
            kind: MessageKind::Text,
            size: 204,
            frames: 3
        })
    );
}

#[test]
fn close_is_reported_and_may_interleave() {
    let mut bytes = frame(0x02, None, 2);
    let close_at = bytes.len();
    bytes.extend(close_frame(CloseCode::NORMAL, "bye", None));
    bytes.extend(frame(0x80, None, 0));
    let mut p = FrameParser::new(S2C, false);
    let (events, result) = feed(&mut p, &bytes);
    assert_eq!(result, Ok(()));
    assert!(p.peer_closed());
    assert!(events.contains(&Event::Close {
        at: at(close_at),
        payload_len: 5
    }));
    assert_eq!(
        events.last(),
        Some(&Event::MessageCompleted {
            end: bytes.len(),
            kind: MessageKind::Binary,
            size: 2,
            frames: 2
        })
    );
}

#[test]
fn empty_close_and_empty_message() {
    let mut bytes = frame(0x81, None, 0);
    bytes.extend([0x88, 0x00]);
    assert_eq!(
        events_of(S2C, false, &bytes),
        [
            Event::Frame {
                at: at(0),
                header: header(true, Opcode::Text, None, 0, 2)
            },
            Event::MessageStarted {
                at: at(0),
                kind: MessageKind::Text,
                compressed: false
            },
            Event::MessageSize {
                at: at(0),
                size: 0,
                frames: 1
            },
            Event::MessageCompleted {
                end: 2,
                kind: MessageKind::Text,
                size: 0,
                frames: 1
            },
            Event::Frame {
                at: at(2),
                header: header(true, Opcode::Close, None, 0, 2)
            },
            Event::Close {
                at: at(2),
                payload_len: 0
            },
        ]
    );
}

#[test]
fn header_split_at_every_byte() {
    let mut bytes = frame(0x82, Some(KEY), 70_000); // 14-byte header
    bytes.extend(frame(0x89, Some(KEY), 2));
    let whole = events_of(C2S, false, &bytes);
    let mut p = FrameParser::new(C2S, false);
    let mut split = Vec::new();
    for (i, b) in bytes.iter().enumerate() {
        let (events, result) = feed(&mut p, core::slice::from_ref(b));
        assert_eq!(result, Ok(()));
        split.extend(events.into_iter().map(|e| (i, e)));
    }
    // The first header completes on its 14th byte, with 13 carried.
    assert_eq!(
        split[0],
        (
            13,
            Event::Frame {
                at: ChunkPos {
                    offset: 0,
                    carried: 13
                },
                header: header(true, Opcode::Binary, Some(KEY), 70_000, 14)
            }
        )
    );
    assert_eq!(split.len(), whole.len());
    // Same events once positions are made absolute.
    for ((base, e), w) in split.iter().zip(&whole) {
        match (e, w) {
            (Event::Frame { at: a, header: h }, Event::Frame { at: b, header: g }) => {
                assert_eq!(a.stream_pos(*base as u64), b.stream_pos(0));
                assert_eq!(h, g);
            }
            (Event::MessageCompleted { end, .. }, Event::MessageCompleted { end: e2, .. }) => {
                assert_eq!(base + end, *e2);
            }
            (Event::MessageStarted { .. }, Event::MessageStarted { .. })
            | (Event::MessageSize { .. }, Event::MessageSize { .. }) => {}
            other => panic!("mismatch {other:?}"),
        }
    }
}

#[test]
fn deflate_allows_rsv1_on_first_frame_only() {
    let events = events_of(S2C, true, &[0xC1, 0x01, 0x00]);
    assert_eq!(
        events[1],
        Event::MessageStarted {
            at: at(0),
            kind: MessageKind::Text,
            compressed: true
        }
    );
    if let Event::Frame { header, .. } = events[0] {
        assert!(header.rsv1());
        assert_eq!(header.rsv, 0b100);
        assert_eq!(header.frame_len(), 3);
    }
    // Fragmented compressed message: RSV1 on the first frame, then clear.
    let mut bytes = Vec::from([0x42, 0x01, 0x00]);
    bytes.extend([0x80, 0x01, 0x00]);
    assert_eq!(events_of(S2C, true, &bytes).len(), 6);
}

// Every protocol error.

#[test]
fn unknown_opcodes() {
    for op in [0x3u8, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF] {
        assert_eq!(
            error_of(S2C, false, &[0x80 | op, 0x00]),
            WsError::UnknownOpcode(op)
        );
    }
}

#[test]
fn reserved_bits() {
    let rsv = |opcode, rsv| WsError::ReservedBits { opcode, rsv };
    assert_eq!(
        error_of(S2C, false, &[0xC1, 0x00]),
        rsv(Opcode::Text, 0b100)
    );
    assert_eq!(
        error_of(S2C, true, &[0xA2, 0x00]),
        rsv(Opcode::Binary, 0b010)
    );
    assert_eq!(error_of(S2C, true, &[0x91, 0x00]), rsv(Opcode::Text, 0b001));
    assert_eq!(error_of(S2C, true, &[0xC9, 0x00]), rsv(Opcode::Ping, 0b100));
    assert_eq!(
        error_of(S2C, true, &[0x41, 0x00, 0xC0, 0x00]),
        rsv(Opcode::Continuation, 0b100)
    );
}

#[test]
fn masking_must_match_direction() {
    assert_eq!(error_of(C2S, false, &[0x81, 0x05]), WsError::UnmaskedFrame);
    assert_eq!(error_of(S2C, false, &[0x81, 0x85]), WsError::MaskedFrame);
    assert!(C2S.requires_mask());
    assert!(!S2C.requires_mask());
}

#[test]
fn control_frame_rules() {
    assert_eq!(
        error_of(S2C, false, &[0x09, 0x00]),
        WsError::FragmentedControl(Opcode::Ping)
    );
    assert_eq!(
        error_of(S2C, false, &[0x08, 0x00]),
        WsError::FragmentedControl(Opcode::Close)
    );
    assert_eq!(
        error_of(S2C, false, &[0x8A, 0x7E, 0x00, 0x7E]),
        WsError::ControlTooLong {
            opcode: Opcode::Pong,
            len: 126
        }
    );
    assert_eq!(
        error_of(S2C, false, &[0x88, 0x01, 0x03]),
        WsError::InvalidCloseLength
    );
    // 125 is fine.
    assert_eq!(events_of(S2C, false, &frame(0x89, None, 125)).len(), 1);
}

#[test]
fn non_minimal_lengths_are_taken_and_oversized_ones_refused() {
    // 5 bytes announced in the 16-bit and 64-bit forms, masked: one message
    // each, whose payload ends where the announced length says.
    let sixteen = [
        0x81, 0xFE, 0x00, 0x05, 1, 2, 3, 4, b'h', b'e', b'l', b'l', b'o',
    ];
    let mut sixty_four = Vec::from([0x82, 0xFF, 0, 0, 0, 0, 0, 0, 0, 5, 1, 2, 3, 4]);
    sixty_four.extend_from_slice(b"world");
    for (bytes, header_len) in [(&sixteen[..], 8), (&sixty_four[..], 14)] {
        let mut p = FrameParser::new(C2S, false);
        let (events, result) = feed(&mut p, bytes);
        assert_eq!(result, Ok(()));
        let Some(Event::Frame { header, .. }) = events.first() else {
            panic!("no frame in {events:?}");
        };
        assert_eq!((header.payload_len, header.header_len), (5, header_len));
        assert!(matches!(
            events.last(),
            Some(Event::MessageCompleted { end, size: 5, .. }) if *end == bytes.len()
        ));
        assert!(p.at_frame_boundary());
        // Cut 2 bytes before its end, the frame still owes those 2.
        let mut p = FrameParser::new(C2S, false);
        let cut = bytes.len() - 2;
        assert_eq!(feed(&mut p, &bytes[..cut]).1, Ok(()));
        assert_eq!(p.payload_remaining(), 2);
    }
    assert_eq!(
        error_of(S2C, false, &[0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0]),
        WsError::LengthOverflow
    );
}

#[test]
fn fragmentation_rules() {
    assert_eq!(
        error_of(S2C, false, &[0x80, 0x00]),
        WsError::UnexpectedContinuation
    );
    assert_eq!(
        error_of(S2C, false, &[0x01, 0x00, 0x82, 0x00]),
        WsError::MessageInProgress(MessageKind::Text)
    );
    assert_eq!(
        error_of(S2C, false, &[0x02, 0x00, 0x89, 0x00, 0x01, 0x00]),
        WsError::MessageInProgress(MessageKind::Binary)
    );
    // A finished message frees the slot; a continuation after it fails.
    assert_eq!(
        error_of(S2C, false, &[0x81, 0x00, 0x00, 0x00]),
        WsError::UnexpectedContinuation
    );
}

#[test]
fn error_is_sticky_and_events_before_it_are_kept() {
    let mut p = FrameParser::new(S2C, false);
    let mut bytes = frame(0x81, None, 1);
    bytes.push(0x83);
    let (events, result) = feed(&mut p, &bytes);
    assert_eq!(events.len(), 4);
    assert_eq!(result, Err(WsError::UnknownOpcode(3)));
    assert_eq!(
        feed(&mut p, &frame(0x81, None, 1)),
        (Vec::new(), Err(WsError::UnknownOpcode(3)))
    );
    assert_eq!(
        feed(&mut p, &[]),
        (Vec::new(), Err(WsError::UnknownOpcode(3)))
    );
    assert!(!p.at_frame_boundary());
}

#[test]
fn error_messages_read_well() {
    use alloc::string::ToString;
    assert_eq!(
        WsError::ReservedBits {
            opcode: Opcode::Ping,
            rsv: 0b100
        }
        .to_string(),
        "reserved bits 0b100 not allowed on a Ping frame"
    );
    assert_eq!(
        WsError::UnknownOpcode(0xB).to_string(),
        "unknown WebSocket opcode 0xb"
    );
}

#[test]
fn parser_accessors_and_size() {
    let mut p = FrameParser::new(C2S, true);
    assert_eq!(p.direction(), C2S);
    assert!(p.deflate());
    assert!(p.at_frame_boundary());
    feed(&mut p, &frame(0x01, Some(KEY), 3)).1.unwrap();
    assert_eq!(p.message_in_progress(), Some((MessageKind::Text, 3)));
    assert!(p.at_frame_boundary());
    assert!(core::mem::size_of::<FrameParser>() <= 64);
}

#[test]
fn opcode_round_trip() {
    for v in 0u8..16 {
        if let Some(op) = Opcode::from_u8(v) {
            assert_eq!(op.as_u8(), v);
            assert_eq!(op.is_control(), v >= 8);
        }
    }
}

// Close frame builder.

#[test]
fn close_frame_unmasked_bytes() {
    assert_eq!(
        close_frame(CloseCode::NORMAL, "", None),
        [0x88, 0x02, 0x03, 0xe8]
    );
    // 1008 = 0x03F0.
    assert_eq!(
        close_frame(CloseCode::POLICY_VIOLATION, "Hello", None),
        [0x88, 0x07, 0x03, 0xf0, 0x48, 0x65, 0x6c, 0x6c, 0x6f]
    );
    assert_eq!(
        close_frame(CloseCode::MESSAGE_TOO_BIG, "", None)[2..],
        [0x03, 0xf1]
    );
    assert_eq!(
        close_frame(CloseCode::INTERNAL_ERROR, "", None)[2..],
        [0x03, 0xf3]
    );
}

#[test]
fn close_frame_masked_bytes() {
    // Payload 03 e8 'H' 'e' 'l' 'l' 'o' XOR 37 fa 21 3d 37 fa 21, worked by
    // hand; 'H'..'o' under this key match the RFC's masked "Hello" example
    // shifted by the two code bytes.
    assert_eq!(
        close_frame(CloseCode::NORMAL, "Hello", Some(KEY)),
        [0x88, 0x87, 0x37, 0xfa, 0x21, 0x3d, 0x34, 0x12, 0x69, 0x58, 0x5b, 0x96, 0x4e]
    );
}

#[test]
fn close_reason_is_truncated_on_char_boundary() {
    let ascii = "a".repeat(200);
    let f = close_frame(1000, &ascii, None);
    assert_eq!(f[1], 125);
    assert_eq!(f.len(), 2 + 125);

    // 62 two-byte chars = 124 bytes: cut to 61 chars (122 bytes).
    let two = "é".repeat(62);
    let f = close_frame(1000, &two, None);
    assert_eq!(f[1], 2 + 122);
    assert_eq!(core::str::from_utf8(&f[4..]), Ok("é".repeat(61).as_str()));

    // 41 three-byte chars fit exactly; 42 are cut back to 41.
    let three = "€".repeat(42);
    let f = close_frame(1000, &three, None);
    assert_eq!(f[1], 125);
    assert_eq!(core::str::from_utf8(&f[4..]), Ok("€".repeat(41).as_str()));

    // 31 four-byte chars = 124 bytes: cut to 30 (120 bytes).
    let four = "🦀".repeat(31);
    let f = close_frame(1000, &four, Some(KEY));
    assert_eq!(f[1], 0x80 | 122);
    assert_eq!(f.len(), 2 + 4 + 122);
}

#[test]
fn close_frames_parse_back() {
    let reason = "x".repeat(300);
    for (direction, mask) in [(S2C, None), (C2S, Some(KEY))] {
        let bytes = close_frame(CloseCode::POLICY_VIOLATION, &reason, mask);
        let mut p = FrameParser::new(direction, false);
        let (events, result) = feed(&mut p, &bytes);
        assert_eq!(result, Ok(()));
        assert_eq!(
            events[1],
            Event::Close {
                at: at(0),
                payload_len: 125
            }
        );
        assert!(p.at_frame_boundary());
        assert!(p.peer_closed());
    }
}

#[test]
fn skipping_payload_short_of_the_frame_end_leaves_the_parser_where_feeding_would() {
    // A 300-byte binary frame, then a small text frame.
    let bytes = [frame(0x82, None, 300), frame(0x81, None, 2)].concat();
    let mut fed = FrameParser::new(S2C, false);
    let mut skipped = FrameParser::new(S2C, false);
    assert!(!skipped.skip_payload(1), "nothing to skip before a header");
    for p in [&mut fed, &mut skipped] {
        assert_eq!(feed(p, &bytes[..10]).1, Ok(()));
    }
    // A 4-byte header and 6 payload bytes fed, 294 left: up to 293 pass
    // unseen, the frame's end does not.
    assert!(!skipped.skip_payload(294));
    assert!(skipped.skip_payload(200));
    assert!(skipped.skip_payload(93));
    assert!(!skipped.skip_payload(1), "the last byte ends the frame");
    assert_eq!(feed(&mut fed, &bytes[10..303]).1, Ok(()));
    assert_eq!(skipped, fed);
    let rest = bytes.get(303..).unwrap_or_default();
    assert_eq!(feed(&mut skipped, rest), feed(&mut fed, rest));
    assert!(skipped.at_frame_boundary());
}
