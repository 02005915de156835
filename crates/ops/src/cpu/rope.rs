//! Rotary position embedding, halves ("NeoX") layout (docs/models.md §1.2).

/// Rotates the first `r` dims of every head of x `[T, heads, d]` in place for positions
/// `pos0 + t`: for i < r/2, `x'[i] = x[i]·cos − x[i+r/2]·sin`, `x'[i+r/2] = x[i+r/2]·cos + x[i]·sin`.
/// cos/sin are `[positions, r/2]` tables. Dims r..d pass through.
pub fn rope(x: &mut [f32], heads: usize, d: usize, r: usize, cos: &[f32], sin: &[f32], pos0: usize) {
    let half = r / 2;
    for (t, tok) in x.chunks_exact_mut(heads * d).enumerate() {
        let c = &cos[(pos0 + t) * half..][..half];
        let s = &sin[(pos0 + t) * half..][..half];
        for head in tok.chunks_exact_mut(d) {
            let (lo, hi) = head[..r].split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                lo[i] = a * c[i] - b * s[i];
                hi[i] = b * c[i] + a * s[i];
            }
        }
    }
}
