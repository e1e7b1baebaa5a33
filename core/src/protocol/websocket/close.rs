//! Building close frames the filter sends when it ends a WebSocket.

use alloc::vec::Vec;

/// Longest close reason: a control payload is ≤ 125 bytes, 2 of them the code.
pub const MAX_CLOSE_REASON_LEN: usize = 123;

/// Close status codes Sluice sends (RFC 6455 §7.4.1), as plain `u16`s.
///
/// An uninhabited type used only as a namespace, so the constants read as
/// `CloseCode::POLICY_VIOLATION` while [`close_frame`] takes any code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseCode {}

impl CloseCode {
    /// 1000: normal closure.
    pub const NORMAL: u16 = 1000;
    /// 1008: policy violation (used when a rate limit ends the connection).
    pub const POLICY_VIOLATION: u16 = 1008;
    /// 1009: a message too big to process.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// 1011: the server hit an unexpected condition.
    pub const INTERNAL_ERROR: u16 = 1011;
}

/// A complete close frame with status `code` and `reason`.
///
/// The reason is cut to [`MAX_CLOSE_REASON_LEN`] bytes on a UTF-8 character
/// boundary. Pass a `mask` for frames sent towards the server (client-to-
/// server frames must be masked) and `None` for frames sent to the client.
pub fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let reason = truncate_utf8(reason, MAX_CLOSE_REASON_LEN);
    // ≤ 125, so it fits the 7-bit length.
    let payload_len = 2 + reason.len();
    let mut frame = Vec::with_capacity(2 + 4 + payload_len);
    // FIN + opcode 0x8.
    frame.push(0x88);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    frame.push(mask_bit | payload_len as u8);
    if let Some(key) = mask {
        frame.extend_from_slice(&key);
    }
    let payload_start = frame.len();
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(reason.as_bytes());
    if let Some(key) = mask {
        for (byte, k) in frame[payload_start..].iter_mut().zip(key.iter().cycle()) {
            *byte ^= k;
        }
    }
    frame
}

/// The longest prefix of `s` of at most `max` bytes ending on a char boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    // A UTF-8 character is at most 4 bytes, so this steps back ≤ 3 times.
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}
