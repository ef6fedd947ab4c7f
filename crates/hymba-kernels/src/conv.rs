//! Depthwise causal 1-D convolution over time, with a carried state so a sequence can be fed in
//! chunks: `out_t[c] = bias[c] + Σ_{k<K} w[c,k] · x_{t−K+1+k}[c]`, inputs before the start of
//! the sequence being whatever the state holds (zeros for a new sequence).

/// `x`, `out`: `[T, C]`; `state`: `[K−1, C]`, the previous inputs, oldest first (updated to the
/// last K−1 inputs); `taps`: `[K, C]`, tap-major (see [`taps`]), so each tap is one
/// vectorised multiply-add over the channels; `bias`: `[C]`.
pub fn causal_conv(x: &[f32], state: &mut [f32], taps: &[f32], bias: &[f32], out: &mut [f32]) {
    let c = bias.len();
    let k = taps.len() / c;
    let t = x.len() / c;
    assert_eq!(state.len(), (k - 1) * c);
    assert_eq!(out.len(), x.len());
    // history row j: j < K−1 comes from the state, the rest from x.
    let hist = |j: usize| -> &[f32] {
        if j < k - 1 {
            &state[j * c..(j + 1) * c]
        } else {
            &x[(j - (k - 1)) * c..(j - (k - 2)) * c]
        }
    };
    for ti in 0..t {
        let o = &mut out[ti * c..(ti + 1) * c];
        o.copy_from_slice(bias);
        for (kk, tap) in taps.chunks_exact(c).enumerate() {
            for ((o, w), h) in o.iter_mut().zip(tap).zip(hist(ti + kk)) {
                *o += w * h;
            }
        }
    }
    // New state: the last K−1 rows of (state ++ x).
    let mut new = Vec::with_capacity(state.len());
    for j in t..t + k - 1 {
        new.extend_from_slice(hist(j));
    }
    state.copy_from_slice(&new);
}

/// Conv weights `[C, K]` (the checkpoint's `[C, 1, K]`) rearranged tap-major, `[K, C]`.
pub fn taps(w: &[f32], c: usize) -> Vec<f32> {
    let k = w.len() / c;
    (0..k)
        .flat_map(|kk| (0..c).map(move |ch| w[ch * k + kk]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, Rng};

    /// Feeding a sequence in chunks gives the output of feeding it at once.
    #[test]
    fn chunked_equals_whole() {
        let mut rng = Rng::new(3);
        let (c, k, t) = (13, 4, 11);
        let x = rng.normal_vec(t * c, 1.0);
        let w = rng.normal_vec(c * k, 1.0);
        let wt = taps(&w, c);
        let b = rng.normal_vec(c, 1.0);
        let mut s0 = vec![0.0; (k - 1) * c];
        let mut whole = vec![0.0; t * c];
        causal_conv(&x, &mut s0, &wt, &b, &mut whole);
        let mut s1 = vec![0.0; (k - 1) * c];
        let mut parts = vec![0.0; t * c];
        for (a, e) in [(0, 1), (1, 3), (3, 4), (4, 11)] {
            causal_conv(&x[a * c..e * c], &mut s1, &wt, &b, &mut parts[a * c..e * c]);
        }
        assert_close(&whole, &parts, 1e-6, "conv");
        assert_eq!(s0, s1);
        // Direct formula for the last row.
        let ti = t - 1;
        for ch in 0..c {
            let mut v = b[ch];
            for kk in 0..k {
                v += w[ch * k + kk] * x[(ti + kk + 1 - k) * c + ch];
            }
            assert!((v - whole[ti * c + ch]).abs() < 1e-5);
        }
    }
}
