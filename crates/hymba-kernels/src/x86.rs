//! AVX2 + FMA (+ F16C) dot products. Only called after run-time detection (see `isa`).
#![cfg(target_arch = "x86_64")]

use half::{bf16, f16};
use std::arch::x86_64::*;

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// 8 bf16 at `p` widened to f32 (bf16 is the top half of an f32).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_bf16(p: *const bf16) -> __m256 {
    let h = _mm_loadu_si128(p as *const __m128i);
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_f16(p: *const f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

macro_rules! dot_impl {
    ($name:ident, $t:ty, $feat:literal, $load:expr, $scalar:expr) => {
        /// Σ w[i]·x[i], four independent 8-wide accumulators.
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(w: &[$t], x: &[f32]) -> f32 {
            debug_assert_eq!(w.len(), x.len());
            let n = w.len();
            let (wp, xp) = (w.as_ptr(), x.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for j in 0..4 {
                    acc[j] = _mm256_fmadd_ps($load(wp.add(i + 8 * j)), _mm256_loadu_ps(xp.add(i + 8 * j)), acc[j]);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps($load(wp.add(i)), _mm256_loadu_ps(xp.add(i)), acc[0]);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
            while i < n {
                s += $scalar(w[i]) * x[i];
                i += 1;
            }
            s
        }
    };
}

dot_impl!(dot_f32, f32, "avx2,fma", |p: *const f32| _mm256_loadu_ps(p), |v: f32| v);
dot_impl!(dot_bf16, bf16, "avx2,fma", |p| load_bf16(p), |v: bf16| v.to_f32());
dot_impl!(dot_f16, f16, "avx2,fma,f16c", |p| load_f16(p), |v: f16| v.to_f32());

/// One f32 row `w` against four rows of `x` at once, so each weight load feeds four FMAs.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_f32_x4(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    let n = w.len();
    let wp = w.as_ptr();
    let xp = x.map(|r| r.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
    let mut i = 0;
    while i + 16 <= n {
        let w0 = _mm256_loadu_ps(wp.add(i));
        let w1 = _mm256_loadu_ps(wp.add(i + 8));
        for r in 0..4 {
            acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp[r].add(i)), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp[r].add(i + 8)), acc[r][1]);
        }
        i += 16;
    }
    let mut out = [0f32; 4];
    for r in 0..4 {
        out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
        for j in i..n {
            out[r] += w[j] * x[r][j];
        }
    }
    out
}
