//! AVX2 + FMA (+ F16C) kernels: Activations: e^x and ln x in eight lanes, softplus, SiLU, the shifted exponentials of a softmax.

use super::*;

/// Cephes' expf: the clamp, ln 2 in two parts (high, low), the polynomial's coefficients from
/// the highest degree (shared with the AVX-512 exponential).
pub(crate) const EXP_MAX: f32 = 88.376_26;
pub(crate) const EXP_LN2: [f32; 2] = [0.693_359_4, -2.121_944_4e-4];
pub(crate) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// 2^r on [-1/2, 1/2]: a degree-6 fit of the relative error (1.3 ulp at most in f32 with FMAs),
/// from the constant term (shared with the AVX-512 `exp2_512`).
pub(crate) const EXP2_POLY: [f32; 7] = [
    1.0,
    std::f32::consts::LN_2,
    0.240_226_48,
    0.055_503_324,
    0.009_618_437,
    0.001_339_887_5,
    0.000_153_533_6,
];

/// Cephes' logf: ln(1 + m) ≈ m − m²/2 + m³·P(m) for m in [√½ − 1, √2 − 1), P's coefficients
/// from the highest degree (shared with the AVX-512 logarithm).
pub(crate) const LOG_POLY: [f32; 9] = [
    7.037_683_6e-2,
    -1.151_461e-1,
    1.167_699_9e-1,
    -1.242_014_1e-1,
    1.424_932_3e-1,
    -1.666_805_8e-1,
    2.000_071_5e-1,
    -2.499_999_4e-1,
    3.333_333e-1,
];

/// 2^x for 8 lanes: x clamped to [-127, 127], rounded to the nearest integer n, 2^(x − n) by
/// [`EXP2_POLY`], times 2^n from the exponent bits (0 for n = -127). As with the AVX-512
/// `exp2_512`, a caller's scaling of its exponent by log2 e rounds it (e^x off by up to
/// |x| · 2^-24 of itself): the scan's decays take it, where Δ·a is rounded as much already, and
/// attention's scores, made in log2 units.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp2_256(x: __m256) -> __m256 {
    let x = _mm256_min_ps(x, _mm256_set1_ps(127.0));
    let x = _mm256_max_ps(x, _mm256_set1_ps(-127.0));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let r = _mm256_sub_ps(x, n);
    let mut p = _mm256_set1_ps(EXP2_POLY[6]);
    for c in EXP2_POLY[..6].iter().rev() {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)))
}

/// e^x for 8 lanes (Cephes' expf: range reduction by ln 2, degree-6 polynomial, 2^n from the
/// exponent bits); relative error about 1e-7. Inputs below −88.4 give 0, above 88.4 are clamped.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp256(x: __m256) -> __m256 {
    let x = _mm256_min_ps(x, _mm256_set1_ps(EXP_MAX));
    let x = _mm256_max_ps(x, _mm256_set1_ps(-EXP_MAX));
    let fx = _mm256_floor_ps(_mm256_fmadd_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(0.5),
    ));
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(EXP_LN2[0]), x);
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(EXP_LN2[1]), x);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(*c));
    }
    let y = _mm256_add_ps(
        _mm256_fmadd_ps(_mm256_mul_ps(p, x), x, x),
        _mm256_set1_ps(1.0),
    );
    let n = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
    // n ≤ 0 underflows: the result is 0 there (x was clamped at −88.4).
    let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_max_epi32(n, _mm256_setzero_si256()),
        23,
    ));
    _mm256_mul_ps(y, pow2n)
}

/// ln x for 8 lanes of positive, finite x (Cephes' logf: x = m·2^e with m in [√½, √2), a
/// degree-8 polynomial in m − 1); relative error about 1e-7.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn log256(x: __m256) -> __m256 {
    let one = _mm256_set1_ps(1.0);
    let bits = _mm256_castps_si256(x);
    // Exponent and mantissa in [0.5, 1).
    let mut e = _mm256_cvtepi32_ps(_mm256_sub_epi32(
        _mm256_srli_epi32(bits, 23),
        _mm256_set1_epi32(126),
    ));
    let mut m = _mm256_castsi256_ps(_mm256_or_si256(
        _mm256_and_si256(bits, _mm256_set1_epi32(0x007F_FFFF)),
        _mm256_set1_epi32(0x3F00_0000),
    ));
    // Below √½ use 2m and one less exponent, so m − 1 is small either way.
    let small = _mm256_cmp_ps::<_CMP_LT_OQ>(m, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
    e = _mm256_sub_ps(e, _mm256_and_ps(small, one));
    m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), one);
    let z = _mm256_mul_ps(m, m);
    let mut p = _mm256_set1_ps(LOG_POLY[0]);
    for c in &LOG_POLY[1..] {
        p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(*c));
    }
    let mut y = _mm256_mul_ps(_mm256_mul_ps(p, m), z);
    y = _mm256_fmadd_ps(e, _mm256_set1_ps(EXP_LN2[1]), y);
    y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5), z, y);
    _mm256_fmadd_ps(e, _mm256_set1_ps(EXP_LN2[0]), _mm256_add_ps(m, y))
}

/// `a[i] = softplus(a[i] + b[i])` with PyTorch's threshold (linear above 20). log1p(eˣ) is
/// taken as ln(u)·eˣ/(u − 1) with u = 1 + eˣ, which keeps its precision where eˣ is tiny.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn softplus_bias(a: &mut [f32], b: &[f32]) {
    let n = a.len().min(b.len());
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i + 8 <= n {
        let x = _mm256_add_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
        );
        let ex = exp256(_mm256_min_ps(x, _mm256_set1_ps(20.0)));
        let u = _mm256_add_ps(one, ex);
        let d = _mm256_sub_ps(u, one);
        // u = 1 exactly: log1p(eˣ) = eˣ to within rounding.
        let exact = _mm256_cmp_ps::<_CMP_EQ_OQ>(d, _mm256_setzero_ps());
        let l = _mm256_div_ps(
            _mm256_mul_ps(log256(u), ex),
            _mm256_blendv_ps(d, one, exact),
        );
        let l = _mm256_blendv_ps(l, ex, exact);
        let big = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(20.0));
        _mm256_storeu_ps(a.as_mut_ptr().add(i), _mm256_blendv_ps(l, x, big));
        i += 8;
    }
    for j in i..n {
        a[j] = crate::act::softplus(a[j] + b[j]);
    }
}

/// `a[i] = e^a[i]`, 8 lanes at a time.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp_inplace(a: &mut [f32]) {
    let n = a.len();
    let mut i = 0;
    while i + 8 <= n {
        let p = a.as_mut_ptr().add(i);
        _mm256_storeu_ps(p, exp256(_mm256_loadu_ps(p)));
        i += 8;
    }
    for v in &mut a[i..] {
        *v = v.exp();
    }
}

/// [`crate::act::exp2_shifted_with`]: the max and the sum in eight lanes, reduced at the end.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp2_shifted(a: &mut [f32]) -> (f32, f32) {
    let n = a.len();
    let full = n / 8 * 8;
    let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
    for i in (0..full).step_by(8) {
        m = _mm256_max_ps(m, _mm256_loadu_ps(a.as_ptr().add(i)));
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), m);
    let max = lanes
        .iter()
        .chain(&a[full..])
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let mv = _mm256_set1_ps(max);
    let mut acc = _mm256_setzero_ps();
    for i in (0..full).step_by(8) {
        let p = a.as_mut_ptr().add(i);
        let e = exp2_256(_mm256_sub_ps(_mm256_loadu_ps(p), mv));
        _mm256_storeu_ps(p, e);
        acc = _mm256_add_ps(acc, e);
    }
    let mut sum = hsum(acc);
    for v in &mut a[full..] {
        *v = (*v - max).exp2();
        sum += *v;
    }
    (max, sum)
}

/// `a[i] = silu(a[i]) · b[i]` (or just silu when `b` is None), 8 lanes at a time.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn silu_mul(a: &mut [f32], b: Option<&[f32]>) {
    let n = a.len();
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i + 8 <= n {
        let x = _mm256_loadu_ps(a.as_ptr().add(i));
        let e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), x));
        let mut s = _mm256_div_ps(x, _mm256_add_ps(one, e));
        if let Some(b) = b {
            s = _mm256_mul_ps(s, _mm256_loadu_ps(b.as_ptr().add(i)));
        }
        _mm256_storeu_ps(a.as_mut_ptr().add(i), s);
        i += 8;
    }
    for j in i..n {
        a[j] = crate::act::silu(a[j]) * b.map_or(1.0, |b| b[j]);
    }
}
