//! AVX-512 F: the selective scan for states of 16 (Hymba's), a channel's state one register.

use super::act::exp2_512;
use std::arch::x86_64::*;

/// Proof that this CPU has AVX-512 F: made only by [`Avx512::for_isa`], so the kernels that
/// take it cannot run anywhere else.
#[derive(Clone, Copy, Debug)]
pub struct Avx512(());

impl Avx512 {
    /// Where `isa` allows AVX-512 (its levels from AVX-512 BF16 up) and the CPU has it.
    pub fn for_isa(isa: crate::isa::Isa) -> Option<Self> {
        let ok =
            isa.level() >= crate::isa::Level::Avx512Bf16 && is_x86_feature_detected!("avx512f");
        ok.then_some(Avx512(()))
    }

    /// Eight consecutive channels (from `ch`) of the selective scan over `t` steps, 16 states
    /// each: `s ← exp(Δ·a) ⊙ s + Δ·x·b`, `y = s·c + d·x` (see `crate::x86::scan_channels`).
    /// With 32 registers the eight states stay in registers across the steps, and the eight
    /// outputs of a step are reduced together and stored at once. `a`, `d` and `s` start at
    /// channel `ch`.
    ///
    /// # Safety
    /// `x`, `delta` hold `t` rows of `e`, `b`, `c` `t` rows of 16, `a` and `s` 8 × 16 values,
    /// `d` 8, and `y` `t` rows of `e`, with `ch + 8 <= e`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scan_channels(
        self,
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
        const C: usize = 8;
        debug_assert!(s.len() >= C * 16 && a.len() >= C * 16 && d.len() >= C && ch + C <= e);
        let mut st: [__m512; C] = std::array::from_fn(|j| _mm512_loadu_ps(s.as_ptr().add(16 * j)));
        let dv = _mm256_loadu_ps(d.as_ptr());
        // A row's x, Δ and y lie a row of channels apart, too far for the hardware prefetcher:
        // asked for 16 rows ahead (2048-row scan 4.1-4.2 ns a channel-step against 4.2-4.4).
        const AHEAD: usize = 16;
        for ti in 0..t {
            let row = ti * e + ch;
            if ti + AHEAD < t {
                let ahead = row + AHEAD * e;
                _mm_prefetch::<_MM_HINT_T0>(x.as_ptr().add(ahead) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(delta.as_ptr().add(ahead) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(y.add(ahead) as *const i8);
            }
            let bv = _mm512_loadu_ps(b.as_ptr().add(16 * ti));
            let cv = _mm512_loadu_ps(c.as_ptr().add(16 * ti));
            let mut half = [_mm256_setzero_ps(); C];
            for j in 0..C {
                let dt = *delta.get_unchecked(row + j);
                let xv = *x.get_unchecked(row + j);
                // exp(Δ·a) as 2^(Δ·log2 e · a): one scalar multiply a channel and step.
                let decay = exp2_512(_mm512_mul_ps(
                    _mm512_set1_ps(dt * std::f32::consts::LOG2_E),
                    _mm512_loadu_ps(a.as_ptr().add(16 * j)),
                ));
                let dbx = _mm512_mul_ps(_mm512_set1_ps(dt * xv), bv);
                st[j] = _mm512_fmadd_ps(decay, st[j], dbx);
                let acc = _mm512_mul_ps(st[j], cv);
                half[j] = _mm256_add_ps(
                    _mm512_castps512_ps256(acc),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)),
                );
            }
            // Eight halves to eight sums, lane j channel j.
            let sum = crate::x86::hsum8(half);
            let dx = _mm256_mul_ps(dv, _mm256_loadu_ps(x.as_ptr().add(row)));
            _mm256_storeu_ps(y.add(row), _mm256_add_ps(sum, dx));
        }
        for (j, sj) in st.iter().enumerate() {
            _mm512_storeu_ps(s.as_mut_ptr().add(16 * j), *sj);
        }
    }
}
