//! Feeds arbitrary bytes to the gRPC frame parser, whole and in pieces, and
//! checks both give the same events and outcome.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_core::protocol::grpc::{GrpcEvent, GrpcFrameParser};

#[path = "shared/chunks.rs"]
mod chunks;
use chunks::pieces;

/// An event with its position made absolute in the stream.
#[derive(Debug, PartialEq, Eq)]
enum Abs {
    Started(u64, u32, bool),
    Completed(u64, u32, bool),
}

fn run(max: u32, pieces: &mut dyn Iterator<Item = &[u8]>) -> (Vec<Abs>, Option<String>) {
    let mut parser = GrpcFrameParser::with_max_message_len(max);
    let mut events = Vec::new();
    let mut base = 0u64;
    for piece in pieces {
        let result = parser.feed(piece, |e| {
            events.push(match e {
                GrpcEvent::Started { at, message } => {
                    Abs::Started(at.stream_pos(base), message.len, message.compressed)
                }
                GrpcEvent::Completed { end, message } => {
                    Abs::Completed(base + end as u64, message.len, message.compressed)
                }
            })
        });
        if let Err(error) = result {
            // Errors stick.
            assert_eq!(parser.feed(&[0; 5], |_| {}), Err(error));
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
    let max = match config & 0b11 {
        0 => u32::MAX,
        1 => 16,
        _ => sluice_core::protocol::grpc::DEFAULT_MAX_MESSAGE_LEN,
    };
    let whole = run(max, &mut std::iter::once(stream));
    let split = run(max, &mut pieces(stream, config, 16));
    assert_eq!(whole, split);
});
