//! Element-wise activations, as PyTorch computes them.

use crate::isa::{isa, Isa};

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `log(1 + e^x)`, linear above 20 like `torch.nn.functional.softplus` (beta 1, threshold 20).
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

pub fn silu_inplace(x: &mut [f32]) {
    silu_mul_with(isa(), x, None)
}

/// `a[i] = silu(a[i]) * b[i]`: the gated MLP.
pub fn silu_mul(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    silu_mul_with(isa(), a, Some(b))
}

/// `a[i] = e^a[i]`.
pub fn exp_inplace(a: &mut [f32]) {
    exp_inplace_with(isa(), a)
}

pub fn exp_inplace_with(isa: Isa, a: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an ISA with AVX2 (`has_avx2`) is only ever chosen after run-time detection.
        i if i.has_avx2() => unsafe { crate::x86::exp_inplace(a) },
        _ => a.iter_mut().for_each(|v| *v = v.exp()),
    }
}

/// `a[i] = 2^(a[i] − max a)`; returns (max a, Σ of the new a): a softmax's numerators from
/// scores in log2 units (scaled by log2 e where they were made, so a weight is one `exp2`), with
/// the shift and the sum that let slices of one softmax be combined.
pub fn exp2_shifted_with(isa: Isa, a: &mut [f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = crate::avx512::Avx512::for_isa(isa) {
        return k.exp2_shifted(a);
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an ISA with AVX2 (`has_avx2`) is only ever chosen after run-time detection.
        i if i.has_avx2() => unsafe { crate::x86::exp2_shifted(a) },
        _ => {
            let max = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            a.iter_mut().for_each(|v| *v = (*v - max).exp2());
            (max, a.iter().sum())
        }
    }
}

/// `a[i] = softplus(a[i] + b[i])`: Δ from dt_proj and its bias.
pub fn softplus_bias(a: &mut [f32], b: &[f32]) {
    softplus_bias_with(isa(), a, b)
}

pub fn softplus_bias_with(isa: Isa, a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = crate::avx512::Avx512::for_isa(isa) {
        return k.softplus_bias(a, b);
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an ISA with AVX2 (`has_avx2`) is only ever chosen after run-time detection.
        i if i.has_avx2() => unsafe { crate::x86::softplus_bias(a, b) },
        _ => a.iter_mut().zip(b).for_each(|(v, b)| *v = softplus(*v + b)),
    }
}

/// `a[i] = silu(a[i]) · b[i]` (or silu alone) on a given instruction set.
pub fn silu_mul_with(isa: Isa, a: &mut [f32], b: Option<&[f32]>) {
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = crate::avx512::Avx512::for_isa(isa) {
        return k.silu_mul(a, b);
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an ISA with AVX2 (`has_avx2`) is only ever chosen after run-time detection.
        i if i.has_avx2() => unsafe { crate::x86::silu_mul(a, b) },
        _ => {
            for (i, x) in a.iter_mut().enumerate() {
                *x = silu(*x) * b.map_or(1.0, |b| b[i]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    #[test]
    fn vector_softplus_matches_scalar() {
        let mut rng = Rng::new(3);
        let mut x = rng.normal_vec(301, 8.0);
        x.extend([
            -100.0, -87.0, -30.0, -19.9, -1e-4, 0.0, 1e-4, 19.99, 20.0, 20.01, 35.0, 1e6,
        ]);
        let b = rng.normal_vec(x.len(), 0.5);
        for isa in crate::isa::available() {
            let mut got = x.clone();
            softplus_bias_with(isa, &mut got, &b);
            for (i, g) in got.iter().enumerate() {
                let v = (x[i] + b[i]) as f64;
                let want = if v > 20.0 { v } else { v.exp().ln_1p() };
                assert!(
                    ((*g as f64) - want).abs() <= 1e-6 * want.abs() + 1e-38,
                    "{isa:?} softplus({v}) = {g} vs {want}"
                );
            }
        }
    }

    #[test]
    fn vector_silu_and_exp_match_scalar() {
        let mut rng = Rng::new(2);
        let mut x = rng.normal_vec(203, 6.0);
        x.extend([-100.0, -88.0, -30.0, 0.0, 30.0, 80.0]);
        let b = rng.normal_vec(x.len(), 1.0);
        let want: Vec<f32> = x.iter().zip(&b).map(|(v, g)| silu(*v) * g).collect();
        for isa in crate::isa::available() {
            let mut got = x.clone();
            silu_mul_with(isa, &mut got, Some(&b));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 2e-6 * w.abs().max(1.0),
                    "{isa:?} silu at {}: {g} vs {w}",
                    x[i]
                );
            }
        }
        for isa in crate::isa::available() {
            let mut got = x.clone();
            exp_inplace_with(isa, &mut got);
            for (g, v) in got.iter().zip(&x) {
                let want = (*v as f64).exp();
                assert!(
                    ((*g as f64) - want).abs() <= 3e-7 * want + 1e-38,
                    "{isa:?} exp({v}) = {g} vs {want}"
                );
            }
        }
        // Softmax numerators: every lane and the tail, the max and the sum.
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for isa in crate::isa::available() {
            let mut got = x.clone();
            let (m, sum) = exp2_shifted_with(isa, &mut got);
            assert_eq!(m, max, "{isa:?}");
            for (g, v) in got.iter().zip(&x) {
                let want = ((*v - max) as f64).exp2();
                assert!(
                    ((*g as f64) - want).abs() <= 3e-7 * want + 1e-38,
                    "{isa:?} 2^({v} - {max}) = {g} vs {want}"
                );
            }
            let total: f64 = got.iter().map(|&v| v as f64).sum();
            assert!(
                (sum as f64 - total).abs() <= 1e-6 * total,
                "{isa:?} sum {sum} vs {total}"
            );
        }
        #[cfg(target_arch = "x86_64")]
        if crate::isa::available().iter().any(|i| i.has_avx2()) {
            for &v in &[
                -100.0f32, -87.0, -20.5, -1.0, -1e-3, 0.0, 0.37, 1.0, 10.0, 50.0, 88.0,
            ] {
                let mut out = [0f32; 8];
                // SAFETY: Avx2 was detected just above.
                unsafe {
                    use std::arch::x86_64::*;
                    _mm256_storeu_ps(out.as_mut_ptr(), crate::x86::exp256(_mm256_set1_ps(v)));
                }
                let want = (v as f64).exp();
                assert!(
                    ((out[0] as f64) - want).abs() <= 3e-7 * want + 1e-38,
                    "exp({v}) = {} vs {want}",
                    out[0]
                );
            }
            // 2^x: within 2.5e-7 of itself over [-126, 127], 0 below -126.5.
            let mut rng = Rng::new(9);
            let mut xs: Vec<f32> = rng.normal_vec(512, 40.0);
            xs.extend([
                -150.0, -127.0, -126.0, -125.6, -0.5, 0.0, 0.5, 126.9, 127.0, 200.0,
            ]);
            for &v in &xs {
                let mut out = [0f32; 8];
                // SAFETY: Avx2 was detected just above.
                unsafe {
                    use std::arch::x86_64::*;
                    _mm256_storeu_ps(out.as_mut_ptr(), crate::x86::exp2_256(_mm256_set1_ps(v)));
                }
                let c = (v as f64).clamp(-127.0, 127.0);
                let want = c.exp2();
                if c < -126.5 {
                    assert_eq!(out[0], 0.0, "2^{v}");
                } else if want < f32::MIN_POSITIVE as f64 {
                    assert!(((out[0] as f64) - want).abs() <= 2f64.powi(-148), "2^{v}");
                } else {
                    assert!(
                        ((out[0] as f64) / want - 1.0).abs() <= 2.5e-7,
                        "2^{v} = {} vs {want}",
                        out[0]
                    );
                }
            }
        }
    }
}
