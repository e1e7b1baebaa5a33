//! Chunking shared by the stream-parser fuzz targets.

/// Cuts `data` into pieces of fewer than `max` bytes, sizes drawn from a
/// small generator seeded by `seed`, so the fuzzer controls the chunking too.
pub fn pieces(data: &[u8], seed: u8, max: usize) -> impl Iterator<Item = &[u8]> {
    let mut state = u32::from(seed) | 1;
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let size = ((state >> 16) as usize % max.max(1)).min(rest.len());
        let (head, tail) = rest.split_at(size);
        rest = tail;
        Some(head)
    })
}
