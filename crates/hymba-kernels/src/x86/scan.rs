//! AVX2 + FMA (+ F16C) kernels: The selective scan, several channels at a time.

use super::*;

/// `C` consecutive channels (from `ch`) of the selective scan over `t` steps, each state row
/// (`NV` vectors of 8) in registers: `s ← exp(Δ·a) ⊙ s + Δ·x·b`, `y = s·c + d·x`. The channels'
/// exponentials are independent, so several of them keep the FMA units busy where one
/// channel's chain of polynomial steps would leave them waiting (a decode step has t = 1).
/// `a`, `d` and `s` start at channel `ch`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn scan_channels<const C: usize, const NV: usize>(
    t: usize,
    e: usize,
    ch: usize,
    x: &[f32],
    delta: &[f32],
    a: &[f32],
    b: &[f32],
    c: &[f32],
    d: &[f32],
    s: &mut [f32],
    y: *mut f32,
) {
    let n = 8 * NV;
    debug_assert!(s.len() >= C * n && a.len() >= C * n && d.len() >= C);
    let mut st = [[_mm256_setzero_ps(); NV]; C];
    for (j, sj) in st.iter_mut().enumerate() {
        for (v, sv) in sj.iter_mut().enumerate() {
            *sv = _mm256_loadu_ps(s.as_ptr().add(j * n + 8 * v));
        }
    }
    for ti in 0..t {
        let bv: [__m256; NV] =
            std::array::from_fn(|v| _mm256_loadu_ps(b.as_ptr().add(ti * n + 8 * v)));
        let cv: [__m256; NV] =
            std::array::from_fn(|v| _mm256_loadu_ps(c.as_ptr().add(ti * n + 8 * v)));
        let row = ti * e + ch;
        let mut acc = [_mm256_setzero_ps(); C];
        for j in 0..C {
            let dt = *delta.get_unchecked(row + j);
            let xv = *x.get_unchecked(row + j);
            // exp(Δ·a) as 2^(Δ·log2 e · a): one scalar multiply a channel and step.
            let dtv = _mm256_set1_ps(dt * std::f32::consts::LOG2_E);
            let dx = _mm256_set1_ps(dt * xv);
            for v in 0..NV {
                let decay = exp2_256(_mm256_mul_ps(
                    dtv,
                    _mm256_loadu_ps(a.as_ptr().add(j * n + 8 * v)),
                ));
                st[j][v] = _mm256_fmadd_ps(decay, st[j][v], _mm256_mul_ps(dx, bv[v]));
                acc[j] = _mm256_fmadd_ps(st[j][v], cv[v], acc[j]);
            }
        }
        // The outputs of four channels are neighbours: their sums reduced together and stored
        // at once (one channel's horizontal sum after another's made a chain of shuffles).
        if C == 4 {
            let s01 = _mm256_hadd_ps(acc[0], acc[1]);
            let s23 = _mm256_hadd_ps(acc[2], acc[3]);
            let s = _mm256_hadd_ps(s01, s23);
            let sum = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            let dx = _mm_mul_ps(_mm_loadu_ps(d.as_ptr()), _mm_loadu_ps(x.as_ptr().add(row)));
            _mm_storeu_ps(y.add(row), _mm_add_ps(sum, dx));
        } else {
            for j in 0..C {
                *y.add(row + j) = hsum(acc[j]) + d[j] * *x.get_unchecked(row + j);
            }
        }
    }
    for (j, sj) in st.iter().enumerate() {
        for (v, sv) in sj.iter().enumerate() {
            _mm256_storeu_ps(s.as_mut_ptr().add(j * n + 8 * v), *sv);
        }
    }
}
