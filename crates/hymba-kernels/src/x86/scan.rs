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
        for j in 0..C {
            let dt = *delta.get_unchecked(ti * e + ch + j);
            let xv = *x.get_unchecked(ti * e + ch + j);
            let dtv = _mm256_set1_ps(dt);
            let dx = _mm256_set1_ps(dt * xv);
            let mut acc = _mm256_setzero_ps();
            for v in 0..NV {
                let decay = exp256(_mm256_mul_ps(
                    dtv,
                    _mm256_loadu_ps(a.as_ptr().add(j * n + 8 * v)),
                ));
                st[j][v] = _mm256_fmadd_ps(decay, st[j][v], _mm256_mul_ps(dx, bv[v]));
                acc = _mm256_fmadd_ps(st[j][v], cv[v], acc);
            }
            *y.add(ti * e + ch + j) = hsum(acc) + d[j] * xv;
        }
    }
    for (j, sj) in st.iter().enumerate() {
        for (v, sv) in sj.iter().enumerate() {
            _mm256_storeu_ps(s.as_mut_ptr().add(j * n + 8 * v), *sv);
        }
    }
}
