//! Rotary position embedding in the rotate-half form:
//! `rope(a) = a * [cos; cos] + rotate_half(a) * [sin; sin]`, `rotate_half([a1; a2]) = [-a2; a1]`.

/// Inverse frequencies `base^(-2j/dim)`, j < dim/2, computed in f32 as PyTorch does
/// (`1 / base ** (arange(0, dim, 2).float() / dim)`).
pub fn inv_freq(base: f64, dim: usize) -> Vec<f32> {
    let b = base as f32;
    (0..dim / 2)
        .map(|j| 1.0 / b.powf((2 * j) as f32 / dim as f32))
        .collect()
}

/// Rotates every head (of width `2 * inv_freq.len()`) of one row in place, for position `pos`.
pub fn apply(row: &mut [f32], pos: usize, inv_freq: &[f32]) {
    rotate(row, pos, inv_freq, 1.0)
}

/// The inverse rotation (by `-pos`): the backward pass of [`apply`], since a rotation's
/// transpose is its inverse.
pub fn apply_inverse(row: &mut [f32], pos: usize, inv_freq: &[f32]) {
    rotate(row, pos, inv_freq, -1.0)
}

fn rotate(row: &mut [f32], pos: usize, inv_freq: &[f32], sign: f32) {
    let half = inv_freq.len();
    let dim = 2 * half;
    assert_eq!(row.len() % dim, 0);
    // Angles are formed in f32 like the reference (`outer(t, inv_freq)` in float32).
    let (mut cos, mut sin) = (Vec::with_capacity(half), Vec::with_capacity(half));
    for &f in inv_freq {
        let a = (pos as f32 * f) as f64;
        cos.push(a.cos() as f32);
        sin.push(sign * a.sin() as f32);
    }
    for head in row.chunks_exact_mut(dim) {
        let (a1, a2) = head.split_at_mut(half);
        for j in 0..half {
            let (x1, x2) = (a1[j], a2[j]);
            a1[j] = x1 * cos[j] - x2 * sin[j];
            a2[j] = x2 * cos[j] + x1 * sin[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, Rng};

    /// The inverse undoes the rotation, and the rotation keeps each pair's length.
    #[test]
    fn inverse_undoes_apply() {
        let mut rng = Rng::new(5);
        let f = inv_freq(10000.0, 6);
        let x = rng.normal_vec(18, 1.0);
        let mut y = x.clone();
        apply(&mut y, 37, &f);
        let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((n(&x) - n(&y)).abs() < 1e-4 * n(&x));
        assert!(x.iter().zip(&y).any(|(a, b)| (a - b).abs() > 1e-3));
        apply_inverse(&mut y, 37, &f);
        assert_close(&x, &y, 1e-5, "rope inverse");
    }
}
