//! RMSNorm, computed in f32: `w * x / sqrt(mean(x^2) + eps)`.

use rayon::prelude::*;

/// Rows from which a call splits its rows over the thread pool (a prompt's, not a decode step's).
const PAR_ROWS: usize = 32;

/// Σ x² in eight partial sums (independent chains the compiler keeps in vector registers, where
/// one running sum waits on every add), added at the end.
fn sum_squares(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for v in tail {
        s += v * v;
    }
    s
}

/// One row: `out = w ⊙ x / rms(x)`.
fn norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let r = 1.0 / (sum_squares(x) / w.len() as f32 + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * r);
    }
}

/// Normalises each row of `x` (rows of `w.len()`) into `out`.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    assert_eq!(x.len(), out.len());
    assert_eq!(x.len() % d, 0);
    if x.len() >= PAR_ROWS * d {
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, xr)| norm_row(xr, w, eps, o));
    } else {
        for (xr, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            norm_row(xr, w, eps, o);
        }
    }
}

/// In-place variant of [`rmsnorm`].
pub fn rmsnorm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    assert_eq!(x.len() % d, 0);
    let row = |xr: &mut [f32]| {
        let r = 1.0 / (sum_squares(xr) / d as f32 + eps).sqrt();
        for (v, g) in xr.iter_mut().zip(w) {
            *v = g * (*v * r);
        }
    };
    if x.len() >= PAR_ROWS * d {
        x.par_chunks_mut(d).for_each(row);
    } else {
        x.chunks_exact_mut(d).for_each(row);
    }
}

/// Reference: each row's mean square in f64.
pub fn rmsnorm_ref(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
        let r = 1.0 / (ms + eps as f64).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = (g as f64 * v as f64 * r) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, Rng};

    /// Both variants against the f64 reference, on odd widths and on row counts below and above
    /// the one that splits rows over threads; a row's result does not depend on the others.
    #[test]
    fn matches_reference() {
        let mut rng = Rng::new(4);
        for d in [1usize, 7, 8, 13, 1601] {
            for rows in [1usize, 3, PAR_ROWS + 5] {
                let x = rng.normal_vec(rows * d, 3.0);
                let w = rng.normal_vec(d, 1.0);
                let mut want = vec![0.0; x.len()];
                rmsnorm_ref(&x, &w, 1e-6, &mut want);
                let mut got = vec![f32::NAN; x.len()];
                rmsnorm(&x, &w, 1e-6, &mut got);
                assert_close(&got, &want, 1e-5, &format!("rmsnorm d {d} rows {rows}"));
                let mut inplace = x.clone();
                rmsnorm_inplace(&mut inplace, &w, 1e-6);
                assert_eq!(inplace, got, "in place, d {d} rows {rows}");
                let mut alone = vec![0.0; d];
                rmsnorm(&x[(rows - 1) * d..], &w, 1e-6, &mut alone);
                assert_eq!(alone, got[(rows - 1) * d..], "last row alone, d {d}");
            }
        }
    }
}
