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
    /// 1002: protocol error (a frame that breaks RFC 6455).
    pub const PROTOCOL_ERROR: u16 = 1002;
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
    let mut payload = Vec::with_capacity(MAX_CLOSE_REASON_LEN.saturating_add(2));
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    if let Some(key) = mask {
        for (byte, k) in payload.iter_mut().zip(key.iter().cycle()) {
            *byte ^= k;
        }
    }
    let mut frame = Vec::with_capacity(payload.len().saturating_add(6));
    // FIN + opcode 0x8.
    frame.push(0x88);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    // ≤ 125 (2 + MAX_CLOSE_REASON_LEN), so it fits the 7-bit length.
    frame.push(mask_bit | payload.len() as u8);
    if let Some(key) = mask {
        frame.extend_from_slice(&key);
    }
    frame.extend_from_slice(&payload);
    frame
}

/// The longest prefix of `s` of at most `max` bytes ending on a char boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    // A UTF-8 character is at most 4 bytes, so this looks at ≤ 4 ends;
    // 0 is always a boundary.
    let end = (0..=max).rev().find(|&end| s.is_char_boundary(end));
    s.get(..end.unwrap_or(0)).unwrap_or_default()
}
