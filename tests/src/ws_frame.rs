//! WebSocket frames by hand (RFC 6455, 5.2), for the raw client and the
//! upstream's quiet path: encoding with the 7-, 16- or 64-bit length form,
//! and incremental parsing of masked or unmasked frames.

use anyhow::Result;

/// Frame opcodes.
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// A parsed frame, its payload unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The status code and reason of a Close frame.
    pub fn close(&self) -> Option<(u16, String)> {
        if self.opcode != opcode::CLOSE || self.payload.len() < 2 {
            return None;
        }
        let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        Some((
            code,
            String::from_utf8_lossy(&self.payload[2..]).into_owned(),
        ))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// Encodes one frame; `mask` for client frames (which must be masked),
/// `None` for server frames.
pub fn encode(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0F));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if let Ok(len16) = u16::try_from(len) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&len16.to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().zip(key.iter().cycle()).map(|(b, m)| b ^ m));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// One complete frame at the start of `buf` and the bytes it took, or
/// `None` if more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<(Frame, usize)>> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    let (len, mut header) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (usize::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(b);
                (usize::try_from(u64::from_be_bytes(bytes))?, 10)
            }
            None => return Ok(None),
        },
        n => (usize::from(n), 2),
    };
    let masked = b1 & 0x80 != 0;
    let key = if masked {
        let Some(key) = buf.get(header..header + 4) else {
            return Ok(None);
        };
        header += 4;
        Some([key[0], key[1], key[2], key[3]])
    } else {
        None
    };
    let Some(payload) = buf.get(header..header + len) else {
        return Ok(None);
    };
    let payload = match key {
        Some(key) => payload
            .iter()
            .zip(key.iter().cycle())
            .map(|(b, m)| b ^ m)
            .collect(),
        None => payload.to_vec(),
    };
    let frame = Frame {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0F,
        masked,
        payload,
    };
    Ok(Some((frame, header + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_masked_or_not() {
        for len in [0, 125, 126, 300, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for mask in [None, Some([0x37, 0xfa, 0x21, 0x3d])] {
                let bytes = encode(true, opcode::BINARY, &payload, mask);
                let (frame, used) = parse(&bytes).unwrap().unwrap();
                assert_eq!(used, bytes.len(), "length {len}");
                assert_eq!(frame.masked, mask.is_some());
                assert_eq!(frame.payload, payload, "length {len}");
                assert!(parse(&bytes[..bytes.len() - 1]).unwrap().is_none());
            }
        }
    }
}
