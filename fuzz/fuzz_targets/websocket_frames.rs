//! Feeds arbitrary bytes to the WebSocket frame parser, whole and in pieces,
//! and checks both give the same events and outcome.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_core::protocol::websocket::{Direction, Event, FrameParser};

#[path = "shared/chunks.rs"]
mod chunks;
use chunks::pieces;

/// Makes an event's positions absolute in the stream.
fn absolute(e: Event, base: u64) -> (u64, Event) {
    match e {
        Event::Frame { at, .. }
        | Event::MessageStarted { at, .. }
        | Event::MessageSize { at, .. }
        | Event::Close { at, .. } => (at.stream_pos(base), strip(e)),
        Event::MessageCompleted { end, .. } => (base + end as u64, strip(e)),
    }
}

/// The event with chunk-relative fields zeroed, for comparison.
fn strip(mut e: Event) -> Event {
    match &mut e {
        Event::Frame { at, .. }
        | Event::MessageStarted { at, .. }
        | Event::MessageSize { at, .. }
        | Event::Close { at, .. } => {
            at.offset = 0;
            at.carried = 0;
        }
        Event::MessageCompleted { end, .. } => *end = 0,
    }
    e
}

fn run(
    direction: Direction,
    deflate: bool,
    pieces: &mut dyn Iterator<Item = &[u8]>,
) -> (Vec<(u64, Event)>, Option<String>) {
    let mut parser = FrameParser::new(direction, deflate);
    let mut events = Vec::new();
    let mut base = 0u64;
    for piece in pieces {
        let result = parser.feed(piece, |e| events.push(absolute(e, base)));
        if let Err(error) = result {
            // Errors stick.
            assert_eq!(parser.feed(&[0x82, 0x00], |_| {}), Err(error));
            return (events, Some(error.to_string()));
        }
        base += piece.len() as u64;
    }
    (events, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&config, stream)) = data.split_first() else {
        return;
    };
    let direction = if config & 1 == 0 {
        Direction::ClientToServer
    } else {
        Direction::ServerToClient
    };
    let deflate = config & 2 != 0;
    let whole = run(direction, deflate, &mut std::iter::once(stream));
    let split = run(direction, deflate, &mut pieces(stream, config, 20));
    assert_eq!(whole, split);
});
