//! AVX2 + FMA (+ F16C) kernels, a file per family of operations (matmul, attention, quant,
//! act, scan) over the shared loads and sums here. Only called after run-time detection (see
//! `isa`).
#![cfg(target_arch = "x86_64")]

use crate::attention::KvElem;
use half::{bf16, f16};
use std::arch::x86_64::*;

mod act;
mod attention;
mod matmul;
mod quant;
mod scan;

pub use act::*;
pub use attention::*;
pub use matmul::*;
pub use quant::*;
pub use scan::*;

/// Asks for every cache line of `len` elements at each of `rows` (`HINT`: `_MM_HINT_T0` into
/// L1, `_MM_HINT_T1` into L2): for rows too far apart for the hardware prefetcher to run ahead.
///
/// # Safety
/// Each row must point into one allocation of at least `len` elements (nothing is read).
#[inline]
pub(crate) unsafe fn prefetch_rows<const HINT: i32, T>(rows: &[*const T], len: usize) {
    for &p in rows {
        for off in (0..len * std::mem::size_of::<T>()).step_by(64) {
            _mm_prefetch::<HINT>((p as *const i8).add(off));
        }
    }
}

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

/// 8 K/V elements at `p` as f32.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load8<T: KvElem>(p: *const T) -> __m256 {
    if T::BF16 {
        load_bf16(p as *const bf16)
    } else {
        _mm256_loadu_ps(p as *const f32)
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_f16(p: *const f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// Lane `i` of the result is the sum of the lanes of `a[i]`.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn hsum8(a: [__m256; 8]) -> __m256 {
    let t0 = _mm256_hadd_ps(a[0], a[1]);
    let t1 = _mm256_hadd_ps(a[2], a[3]);
    let t2 = _mm256_hadd_ps(a[4], a[5]);
    let t3 = _mm256_hadd_ps(a[6], a[7]);
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(u0, u1),
        _mm256_permute2f128_ps::<0x31>(u0, u1),
    )
}

/// `iters` rounds of 12 independent 8-wide FMAs on registers: the FMA units' peak, no memory.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn fma_loop(iters: usize) -> f32 {
    let mut acc = [_mm256_set1_ps(0.0); 12];
    let (a, b) = (_mm256_set1_ps(0.999_9), _mm256_set1_ps(1e-4));
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut s = _mm256_setzero_ps();
    for v in acc {
        s = _mm256_add_ps(s, v);
    }
    hsum(s)
}
