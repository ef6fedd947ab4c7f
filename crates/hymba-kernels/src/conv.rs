//! Depthwise causal 1-D convolution over time, with a carried state so a sequence can be fed in
//! chunks: `out_t[c] = bias[c] + Σ_{k<K} w[c,k] · x_{t−K+1+k}[c]`, inputs before the start of
//! the sequence being whatever the state holds (zeros for a new sequence).

/// `x`, `out`: `[T, C]`; `state`: `[K−1, C]`, the previous inputs, oldest first (updated to the
/// last K−1 inputs); `taps`: `[K, C]`, tap-major (see [`taps`]), so each tap is one
/// vectorised multiply-add over the channels; `bias`: `[C]`.
pub fn causal_conv(x: &[f32], state: &mut [f32], taps: &[f32], bias: &[f32], out: &mut [f32]) {
    let c = bias.len();
    let t = x.len() / c;
    assert_eq!(out.len(), x.len());
    let inp = ConvInput {
        x,
        width: c,
        from: 0,
        t,
    };
    causal_conv_rows(&inp, state, taps, bias, 0..t, out);
    advance_state(&inp, c, state);
}

/// A causal conv's input: `t` rows of C channels, row i's at `x[i · width + from..][..C]` (a
/// column range of a wider matrix, read in place).
#[derive(Clone, Copy)]
pub struct ConvInput<'a> {
    pub x: &'a [f32],
    pub width: usize,
    pub from: usize,
    pub t: usize,
}

impl ConvInput<'_> {
    fn row(&self, i: usize, c: usize) -> &[f32] {
        &self.x[i * self.width + self.from..][..c]
    }
}

/// Output rows `rows` of [`causal_conv`] into `out` (`[rows.len(), C]`), from the state before
/// this input (not changed: [`advance_state`] moves it on once every row is done), so a long
/// input's rows can be computed by several tasks.
pub fn causal_conv_rows(
    inp: &ConvInput,
    state: &[f32],
    taps: &[f32],
    bias: &[f32],
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let c = bias.len();
    let k = taps.len() / c;
    assert_eq!(state.len(), (k - 1) * c);
    assert!(rows.end <= inp.t && out.len() == rows.len() * c);
    assert!(inp.t == 0 || (inp.t - 1) * inp.width + inp.from + c <= inp.x.len());
    // History row j: j < K−1 comes from the state, the rest from the input.
    let hist = |j: usize| -> &[f32] {
        if j < k - 1 {
            &state[j * c..(j + 1) * c]
        } else {
            inp.row(j - (k - 1), c)
        }
    };
    for (ti, o) in rows.zip(out.chunks_exact_mut(c)) {
        o.copy_from_slice(bias);
        for (kk, tap) in taps.chunks_exact(c).enumerate() {
            for ((o, w), h) in o.iter_mut().zip(tap).zip(hist(ti + kk)) {
                *o += w * h;
            }
        }
    }
}

/// The conv state (`[K−1, C]`) after `inp`: the last K−1 rows of (state ++ input).
pub fn advance_state(inp: &ConvInput, c: usize, state: &mut [f32]) {
    let (km1, t) = (state.len() / c, inp.t);
    let kept = km1.saturating_sub(t);
    state.copy_within((km1 - kept) * c.., 0);
    for j in kept..km1 {
        state[j * c..(j + 1) * c].copy_from_slice(inp.row(t + j - km1, c));
    }
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
        // The same columns read in place from a wider matrix, its rows in parts from one state:
        // the same outputs, bit for bit, and the same state after.
        let (width, from) = (c + 5, 3);
        let mut wide = rng.normal_vec(t * width, 1.0);
        for ti in 0..t {
            wide[ti * width + from..][..c].copy_from_slice(&x[ti * c..(ti + 1) * c]);
        }
        let inp = ConvInput {
            x: &wide,
            width,
            from,
            t,
        };
        let s2 = vec![0.0; (k - 1) * c];
        let mut rows = vec![0.0; t * c];
        for (a, e) in [(0, 2), (2, 7), (7, 11)] {
            causal_conv_rows(&inp, &s2, &wt, &b, a..e, &mut rows[a * c..e * c]);
        }
        assert_eq!(whole, rows);
        let mut s2 = s2;
        advance_state(&inp, c, &mut s2);
        assert_eq!(s0, s2);
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
