//! AVX-512 F: activations sixteen lanes at a time — e^x, ln x, SiLU·up (the gated MLP),
//! softplus (the SSM's Δ) and a softmax's shifted exponentials.

use super::{lanes, Avx512};
use crate::x86::{EXP2_POLY, EXP_LN2, EXP_MAX, EXP_POLY, LOG_POLY};
use std::arch::x86_64::*;

/// `exp` of 16 lanes: the same range reduction and polynomial as the AVX2 `exp256`, the power
/// of two applied by `vscalefps`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp512(x: __m512) -> __m512 {
    let x = _mm512_min_ps(x, _mm512_set1_ps(EXP_MAX));
    let x = _mm512_max_ps(x, _mm512_set1_ps(-EXP_MAX));
    let fx =
        _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_fmadd_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
            _mm512_set1_ps(0.5),
        ));
    let x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(EXP_LN2[0]), x);
    let x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(EXP_LN2[1]), x);
    let mut p = _mm512_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(*c));
    }
    let y = _mm512_add_ps(
        _mm512_fmadd_ps(_mm512_mul_ps(p, x), x, x),
        _mm512_set1_ps(1.0),
    );
    _mm512_scalef_ps(y, fx)
}

/// `2^x` of 16 lanes: x below -150 (or NaN) taken as -150, rounded to the nearest integer n,
/// 2^(x − n) by [`EXP2_POLY`], then `vscalefps` by n (far below 2^-126 it goes to 0, from 2^128
/// up to infinity). The caller scales its exponent by log2 e: with that multiply, four
/// operations fewer than [`exp512`], which reduces by ln 2 in two steps, but the multiply's
/// rounding puts e^x off by up to |x| · 2^-24 of itself (1.5e-6 at x = -72), where `exp512`
/// stays within an ulp or two: the scan's decays take it (their exponent Δ·a is rounded as
/// much already), and so do attention's scores, made in log2 units (the scale times log2 e, one
/// rounding of each score as before); SiLU does not.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp2_512(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-150.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let r = _mm512_sub_ps(x, n);
    let mut p = _mm512_set1_ps(EXP2_POLY[6]);
    for c in EXP2_POLY[..6].iter().rev() {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    _mm512_scalef_ps(p, n)
}

/// ln x for 16 lanes of positive, finite x: `vgetexpps` and `vgetmantps` split x = m·2^e with
/// m in [1, 2), m above √2 halved (and e one more), then the polynomial of the AVX2 `log256`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn log512(x: __m512) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    let mut e = _mm512_getexp_ps(x);
    let mut m = _mm512_getmant_ps::<_MM_MANT_NORM_1_2, _MM_MANT_SIGN_SRC>(x);
    let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m, _mm512_set1_ps(std::f32::consts::SQRT_2));
    m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5));
    e = _mm512_mask_add_ps(e, big, e, one);
    let m = _mm512_sub_ps(m, one);
    let z = _mm512_mul_ps(m, m);
    let mut p = _mm512_set1_ps(LOG_POLY[0]);
    for c in &LOG_POLY[1..] {
        p = _mm512_fmadd_ps(p, m, _mm512_set1_ps(*c));
    }
    let mut y = _mm512_mul_ps(_mm512_mul_ps(p, m), z);
    y = _mm512_fmadd_ps(e, _mm512_set1_ps(EXP_LN2[1]), y);
    y = _mm512_fnmadd_ps(_mm512_set1_ps(0.5), z, y);
    _mm512_fmadd_ps(e, _mm512_set1_ps(EXP_LN2[0]), _mm512_add_ps(m, y))
}

/// 1 / d for 16 lanes: `vrcp14ps` and one Newton step (to within an ulp or two of the
/// quotient; a division takes longer than the exponential on 16 lanes).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn recip(d: __m512) -> __m512 {
    let r = _mm512_rcp14_ps(d);
    _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0)))
}

impl Avx512 {
    /// `a[i] = silu(a[i]) · b[i]` (or just silu when `b` is None), sixteen lanes at a time, the
    /// tail masked.
    pub fn silu_mul(self, a: &mut [f32], b: Option<&[f32]>) {
        // SAFETY: `self` exists only where the CPU has AVX-512 F.
        unsafe { silu_mul(a, b) }
    }

    /// `a[i] = softplus(a[i] + b[i])`, sixteen lanes at a time, the tail masked: the AVX2
    /// kernel's log1p(eˣ) = ln(u)·eˣ/(u − 1), u = 1 + eˣ.
    pub fn softplus_bias(self, a: &mut [f32], b: &[f32]) {
        // SAFETY: `self` exists only where the CPU has AVX-512 F.
        unsafe { softplus_bias(a, b) }
    }

    /// [`crate::act::exp2_shifted_with`]: the max and the sum in sixteen lanes, reduced at the
    /// end, the tail masked.
    pub fn exp2_shifted(self, a: &mut [f32]) -> (f32, f32) {
        // SAFETY: `self` exists only where the CPU has AVX-512 F.
        unsafe { exp2_shifted(a) }
    }
}

#[target_feature(enable = "avx512f")]
fn silu_mul(a: &mut [f32], b: Option<&[f32]>) {
    let n = a.len();
    assert!(b.is_none_or(|b| b.len() >= n));
    let one = _mm512_set1_ps(1.0);
    for i in (0..n).step_by(16) {
        let m = lanes(n - i);
        // SAFETY: the mask keeps every load and store inside `a` and `b` (checked above).
        unsafe {
            let p = a.as_mut_ptr().add(i);
            let x = _mm512_maskz_loadu_ps(m, p);
            let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
            let mut s = _mm512_mul_ps(x, recip(_mm512_add_ps(one, e)));
            if let Some(b) = b {
                s = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, b.as_ptr().add(i)));
            }
            _mm512_mask_storeu_ps(p, m, s);
        }
    }
}

#[target_feature(enable = "avx512f")]
fn softplus_bias(a: &mut [f32], b: &[f32]) {
    let n = a.len();
    assert!(b.len() >= n);
    let one = _mm512_set1_ps(1.0);
    let limit = _mm512_set1_ps(20.0);
    for i in (0..n).step_by(16) {
        let m = lanes(n - i);
        // SAFETY: the mask keeps every load and store inside `a` and `b` (checked above).
        unsafe {
            let p = a.as_mut_ptr().add(i);
            let x = _mm512_add_ps(
                _mm512_maskz_loadu_ps(m, p),
                _mm512_maskz_loadu_ps(m, b.as_ptr().add(i)),
            );
            let ex = exp512(_mm512_min_ps(x, limit));
            let u = _mm512_add_ps(one, ex);
            let d = _mm512_sub_ps(u, one);
            let l = _mm512_mul_ps(_mm512_mul_ps(log512(u), ex), recip(d));
            // u = 1 exactly: log1p(eˣ) = eˣ to within rounding.
            let l = _mm512_mask_blend_ps(
                _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(d, _mm512_setzero_ps()),
                l,
                ex,
            );
            let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, limit);
            _mm512_mask_storeu_ps(p, m, _mm512_mask_blend_ps(big, l, x));
        }
    }
}

#[target_feature(enable = "avx512f")]
fn exp2_shifted(a: &mut [f32]) -> (f32, f32) {
    let n = a.len();
    let mask = |i: usize| lanes(n - i);
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..n).step_by(16) {
        // SAFETY: the mask keeps the load inside `a`.
        let v = unsafe { _mm512_maskz_loadu_ps(mask(i), a.as_ptr().add(i)) };
        m = _mm512_mask_max_ps(m, mask(i), m, v);
    }
    let max = _mm512_reduce_max_ps(m);
    let mv = _mm512_set1_ps(max);
    let mut acc = _mm512_setzero_ps();
    for i in (0..n).step_by(16) {
        let k = mask(i);
        // SAFETY: the mask keeps the load and the store inside `a`.
        unsafe {
            let p = a.as_mut_ptr().add(i);
            let e = exp2_512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p), mv));
            _mm512_mask_storeu_ps(p, k, e);
            acc = _mm512_mask_add_ps(acc, k, acc, e);
        }
    }
    (max, _mm512_reduce_add_ps(acc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    /// `exp2_512` against f64's 2^x over the scan's range, zero, far below f32's range, and
    /// positive exponents up to f32's top.
    #[test]
    fn exp2_matches_f64() {
        let Some(_) = Avx512::for_isa(crate::isa::isa()) else {
            eprintln!("SKIPPED exp2_matches_f64: no AVX-512 here");
            return;
        };
        let mut rng = Rng::new(5);
        let mut xs: Vec<f32> = rng
            .normal_vec(4096, 1.0)
            .iter()
            .map(|v| -v.abs() * 40.0)
            .collect();
        xs.extend([
            0.0,
            -0.5,
            -0.4999999,
            -1.0,
            -126.0,
            -127.5,
            -149.0,
            -200.0,
            -1e30,
            f32::NEG_INFINITY,
            0.5,
            1.0,
            3.3,
            64.0,
            126.9,
        ]);
        while !xs.len().is_multiple_of(16) {
            xs.push(-3.25);
        }
        for chunk in xs.chunks(16) {
            let mut got = [0f32; 16];
            // SAFETY: AVX-512 F was found above.
            unsafe {
                _mm512_storeu_ps(got.as_mut_ptr(), exp2_512(_mm512_loadu_ps(chunk.as_ptr())))
            };
            for (&x, &g) in chunk.iter().zip(&got) {
                let want = (x as f64).max(-150.0).exp2();
                if want < f32::MIN_POSITIVE as f64 {
                    // Subnormal results: within one subnormal step, or 0.
                    assert!(
                        (g as f64 - want).abs() <= 2f64.powi(-149),
                        "2^{x}: {g} vs {want}"
                    );
                } else {
                    let rel = (g as f64 / want - 1.0).abs();
                    assert!(rel <= 2.5e-7, "2^{x}: {g} vs {want} ({rel:e})");
                }
            }
        }
    }
}
