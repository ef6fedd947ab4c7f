//! AVX-512: attention's scores and weighted values for many heads at once (a prefill tile's
//! queries of a K/V group), as outer products: every key and value element is widened to f32
//! once for all the heads, and no dot product needs a horizontal sum; and for a decode step's
//! few heads (`attn_scores_few`, `attn_values_few`), straight from the cache's rows.

use super::{lanes, Avx512};
use crate::attention::KvElem;
use crate::x86::prefetch_rows;
use std::arch::x86_64::*;

/// Keys (scores) and value rows (values) a block: a block's widened rows stay in L1 while every
/// head reads them.
const KEYS: usize = 32;

/// Sixteen elements from `p`, widened to f32.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load16<T: KvElem>(p: *const T) -> __m512 {
    if T::BF16 {
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    } else {
        _mm512_loadu_ps(p as *const f32)
    }
}

/// `call` with the const `G` set to `gn`, one of the listed head counts.
macro_rules! by_heads {
    ($gn:expr; $($g:literal)*; |$G:ident| $call:expr) => {
        match $gn {
            $($g => {
                const $G: usize = $g;
                $call
            })*
            _ => unreachable!(),
        }
    };
}

/// Transposes the 16 × 16 block in `r` (row i in `r[i]`) in place.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose16(r: &mut [__m512; 16]) {
    // 2 × 2 blocks of single floats, then of pairs, then 4 × 4 blocks of 128-bit lanes in two
    // steps.
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for i in 0..4 {
        let (a, b, c, d) = (
            _mm512_castps_pd(t[4 * i]),
            _mm512_castps_pd(t[4 * i + 1]),
            _mm512_castps_pd(t[4 * i + 2]),
            _mm512_castps_pd(t[4 * i + 3]),
        );
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for i in 0..2 {
        for j in 0..4 {
            t[8 * i + j] = _mm512_shuffle_f32x4::<0x88>(r[8 * i + j], r[8 * i + 4 + j]);
            t[8 * i + 4 + j] = _mm512_shuffle_f32x4::<0xdd>(r[8 * i + j], r[8 * i + 4 + j]);
        }
    }
    for j in 0..8 {
        r[j] = _mm512_shuffle_f32x4::<0x88>(t[j], t[8 + j]);
        r[8 + j] = _mm512_shuffle_f32x4::<0xdd>(t[j], t[8 + j]);
    }
}

impl Avx512 {
    /// `out[g·nk + j] = scale · q_g · k_j` for `group` heads (rows of `q`, each `dk` long)
    /// against the keys at `keys[j]` (as `crate::x86::attn_scores`). Each block of [`KEYS`] keys
    /// is widened and transposed once into `[dk][KEYS]`; then a head's scores of the block are
    /// two registers, each step over d one broadcast query element times the block's d-th
    /// elements.
    ///
    /// # Safety
    /// Each `keys[j]` must point to `dk` readable elements; `q` holds `group · dk`, `out`
    /// `group · keys.len()` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn attn_scores<T: KvElem>(
        self,
        q: &[f32],
        group: usize,
        dk: usize,
        keys: &[*const T],
        scale: f32,
        out: &mut [f32],
    ) {
        let nk = keys.len();
        debug_assert!(q.len() >= group * dk && out.len() >= group * nk);
        let dk16 = dk.next_multiple_of(16);
        let mut kt = vec![0f32; dk16 * KEYS];
        for j0 in (0..nk).step_by(KEYS) {
            let kb = KEYS.min(nk - j0);
            // kt[d·KEYS + j] = k_j[d], zeros past the block's keys and past dk.
            // (Past kb the block's scores are not stored: a short block leaves the rest of kt.)
            for half in 0..kb.div_ceil(16) {
                for d0 in (0..dk).step_by(16) {
                    let mut r = [_mm512_setzero_ps(); 16];
                    for (i, ri) in r.iter_mut().enumerate() {
                        let j = 16 * half + i;
                        if j < kb {
                            let p = keys[j0 + j].add(d0);
                            *ri = if d0 + 16 <= dk {
                                load16(p)
                            } else {
                                let mut tail = [0f32; 16];
                                for (d, x) in tail.iter_mut().enumerate().take(dk - d0) {
                                    *x = (*p.add(d)).widen();
                                }
                                _mm512_loadu_ps(tail.as_ptr())
                            };
                        }
                    }
                    transpose16(&mut r);
                    for (i, ri) in r.iter().enumerate() {
                        _mm512_storeu_ps(kt.as_mut_ptr().add((d0 + i) * KEYS + 16 * half), *ri);
                    }
                }
            }
            let mut g0 = 0;
            while g0 < group {
                let gn = 12.min(group - g0);
                by_heads!(gn; 1 2 3 4 5 6 7 8 9 10 11 12; |G| self
                    .scores_heads::<G>(q, g0, dk, &kt, j0, kb, nk, scale, out));
                g0 += gn;
            }
        }
    }

    /// [`Self::attn_scores`] of heads `g0..g0 + G` against one transposed block.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn scores_heads<const G: usize>(
        self,
        q: &[f32],
        g0: usize,
        dk: usize,
        kt: &[f32],
        j0: usize,
        kb: usize,
        nk: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; G];
        let qp: [*const f32; G] = std::array::from_fn(|g| q.as_ptr().add((g0 + g) * dk));
        for d in 0..dk {
            let k0 = _mm512_loadu_ps(kt.as_ptr().add(d * KEYS));
            let k1 = _mm512_loadu_ps(kt.as_ptr().add(d * KEYS + 16));
            for g in 0..G {
                let w = _mm512_set1_ps(*qp[g].add(d));
                acc[g][0] = _mm512_fmadd_ps(w, k0, acc[g][0]);
                acc[g][1] = _mm512_fmadd_ps(w, k1, acc[g][1]);
            }
        }
        let s = _mm512_set1_ps(scale);
        for (g, a) in acc.iter().enumerate() {
            let o = out.as_mut_ptr().add((g0 + g) * nk + j0);
            _mm512_mask_storeu_ps(o, lanes(kb), _mm512_mul_ps(a[0], s));
            if kb > 16 {
                _mm512_mask_storeu_ps(o.add(16), lanes(kb - 16), _mm512_mul_ps(a[1], s));
            }
        }
    }

    /// `out[g·dv..][d] = Σ_j p[g·nk + j] · v_j[d]` for `group` heads (as
    /// `crate::x86::attn_values`, the same sums in the same order). Each block of [`KEYS`]
    /// value rows is widened once into f32; then eight heads' accumulators over 32 columns at a
    /// time, each weight broadcast once for two registers.
    ///
    /// # Safety
    /// Each `vals[j]` must point to `dv` readable elements; `p` holds `group · vals.len()`,
    /// `out` `group · dv` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn attn_values<T: KvElem>(
        self,
        p: &[f32],
        group: usize,
        dv: usize,
        vals: &[*const T],
        out: &mut [f32],
    ) {
        let nk = vals.len();
        debug_assert!(p.len() >= group * nk && out.len() >= group * dv);
        out[..group * dv].fill(0.0);
        let mut wide = vec![0f32; KEYS * dv];
        for j0 in (0..nk).step_by(KEYS) {
            let kb = KEYS.min(nk - j0);
            for (j, &vp) in vals[j0..j0 + kb].iter().enumerate() {
                let dst = wide.as_mut_ptr().add(j * dv);
                let mut c = 0;
                while c + 16 <= dv {
                    _mm512_storeu_ps(dst.add(c), load16(vp.add(c)));
                    c += 16;
                }
                for c in c..dv {
                    *dst.add(c) = (*vp.add(c)).widen();
                }
            }
            let mut g0 = 0;
            while g0 < group {
                let gn = 8.min(group - g0);
                by_heads!(gn; 1 2 3 4 5 6 7 8; |G| self
                    .values_heads::<G>(p, g0, dv, &wide, j0, kb, nk, out));
                g0 += gn;
            }
        }
    }

    /// [`Self::attn_values`] of heads `g0..g0 + G` over one widened block, adding into `out`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn values_heads<const G: usize>(
        self,
        p: &[f32],
        g0: usize,
        dv: usize,
        wide: &[f32],
        j0: usize,
        kb: usize,
        nk: usize,
        out: &mut [f32],
    ) {
        let pr: [*const f32; G] = std::array::from_fn(|g| p.as_ptr().add((g0 + g) * nk + j0));
        let mut c = 0;
        while c < dv {
            // Two registers of columns where 32 remain, else one, masked past dv.
            let (m0, m1) = (lanes(dv - c), lanes((dv - c).saturating_sub(16)));
            // (Masked-off lanes are not touched: the second register's address may lie past the
            // row.)
            let o: [*mut f32; G] = std::array::from_fn(|g| out.as_mut_ptr().add((g0 + g) * dv + c));
            let mut acc: [[__m512; 2]; G] = std::array::from_fn(|g| {
                [
                    _mm512_maskz_loadu_ps(m0, o[g]),
                    _mm512_maskz_loadu_ps(m1, o[g].wrapping_add(16)),
                ]
            });
            for j in 0..kb {
                let v = wide.as_ptr().add(j * dv + c);
                let (v0, v1) = (
                    _mm512_maskz_loadu_ps(m0, v),
                    _mm512_maskz_loadu_ps(m1, v.wrapping_add(16)),
                );
                for g in 0..G {
                    let w = _mm512_set1_ps(*pr[g].add(j));
                    acc[g][0] = _mm512_fmadd_ps(w, v0, acc[g][0]);
                    acc[g][1] = _mm512_fmadd_ps(w, v1, acc[g][1]);
                }
            }
            for g in 0..G {
                _mm512_mask_storeu_ps(o[g], m0, acc[g][0]);
                _mm512_mask_storeu_ps(o[g].wrapping_add(16), m1, acc[g][1]);
            }
            c += 32;
        }
    }
}

impl Avx512 {
    /// [`Self::attn_values`] for a decode step's few heads (`group` at most [`FEW_HEADS`]), read
    /// from the value rows as they are: with one pass of heads over a block, widening it into a
    /// buffer first would be work no other head reuses. Blocks of [`FEW_KEYS`] rows stay in L1
    /// across the column passes; a pass holds every head's sums of 64 columns in registers (a
    /// value element widened once for all the heads). Each output is the same chain of FMAs,
    /// key after key, as `crate::x86::attn_values`'s vector columns, so the sums are the same
    /// bits there (its last `dv % 16` columns are products then sums).
    ///
    /// # Safety
    /// Each `vals[j]` must point to `dv` readable elements; `p` holds `group · vals.len()`,
    /// `out` `group · dv` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn attn_values_few<T: KvElem>(
        self,
        p: &[f32],
        group: usize,
        dv: usize,
        vals: &[*const T],
        out: &mut [f32],
    ) {
        let nk = vals.len();
        debug_assert!(group <= FEW_HEADS && p.len() >= group * nk && out.len() >= group * dv);
        out[..group * dv].fill(0.0);
        for j0 in (0..nk).step_by(FEW_KEYS) {
            let block = &vals[j0..(j0 + FEW_KEYS).min(nk)];
            by_heads!(group; 1 2 3 4 5 6; |G| values_rows::<T, G>(p, dv, block, j0, nk, out));
        }
    }
}

impl Avx512 {
    /// [`Self::attn_scores`] for a decode step's few heads (`group` at most [`FEW_HEADS`]):
    /// four keys at a time against every head, each key element widened once for the heads and
    /// each (head, key) a 16-lane sum over dk, the four keys' sums of a head reduced together.
    ///
    /// Rows of a cache are strided (one position holds every head), too sparse a pattern for the
    /// hardware prefetcher to run ahead: keys are asked for 16 ahead of their use, and the value
    /// rows `vals[j]` (`dv` long, read by the values pass next) into L2.
    ///
    /// # Safety
    /// Each `keys[j]` must point to `dk` readable elements, each `vals[j]` to `dv`; `q` holds
    /// `group · dk`, `out` `group · keys.len()` values.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn attn_scores_few<T: KvElem>(
        self,
        q: &[f32],
        group: usize,
        dk: usize,
        keys: &[*const T],
        vals: &[*const T],
        dv: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let nk = keys.len();
        debug_assert!(group <= FEW_HEADS && q.len() >= group * dk && out.len() >= group * nk);
        debug_assert_eq!(vals.len(), nk);
        for j0 in (0..nk).step_by(4) {
            let kb = 4.min(nk - j0);
            prefetch_rows::<_MM_HINT_T0, T>(&keys[(j0 + 16).min(nk)..(j0 + 20).min(nk)], dk);
            prefetch_rows::<_MM_HINT_T1, T>(&vals[j0..j0 + kb], dv);
            // A short last block repeats its last key; those sums are not stored.
            let kp: [*const T; 4] = std::array::from_fn(|i| keys[j0 + i.min(kb - 1)]);
            let o = out.as_mut_ptr().add(j0);
            by_heads!(group; 1 2 3 4 5 6; |G| scores_rows::<T, G>(q, dk, kp, kb, nk, scale, o));
        }
    }
}

/// [`Avx512::attn_scores_few`] of `G` heads against four keys: `o[g·nk + i]` for the first `kb`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn scores_rows<T: KvElem, const G: usize>(
    q: &[f32],
    dk: usize,
    kp: [*const T; 4],
    kb: usize,
    nk: usize,
    scale: f32,
    o: *mut f32,
) {
    let mut acc = [[_mm512_setzero_ps(); 4]; G];
    let mut d = 0;
    while d < dk {
        // Masked past dk: zeros in both operands.
        let m = lanes(dk - d);
        let k: [__m512; 4] = std::array::from_fn(|i| load16_masked(kp[i].wrapping_add(d), m));
        for (g, a) in acc.iter_mut().enumerate() {
            let qv = _mm512_maskz_loadu_ps(m, q.as_ptr().add(g * dk + d));
            for i in 0..4 {
                a[i] = _mm512_fmadd_ps(qv, k[i], a[i]);
            }
        }
        d += 16;
    }
    let s = _mm_set1_ps(scale);
    for (g, a) in acc.iter().enumerate() {
        _mm_mask_storeu_ps(o.add(g * nk), (1 << kb) - 1, _mm_mul_ps(sum4(a), s));
    }
}

/// The lane sums of four registers, `[Σ a[0], Σ a[1], Σ a[2], Σ a[3]]`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn sum4(a: &[__m512; 4]) -> __m128 {
    // Within each 128-bit lane: [a0₀+a0₂, a1₀+a1₂, a0₁+a0₃, a1₁+a1₃], the same for a2, a3 ...
    let t01 = _mm512_add_ps(
        _mm512_unpacklo_ps(a[0], a[1]),
        _mm512_unpackhi_ps(a[0], a[1]),
    );
    let t23 = _mm512_add_ps(
        _mm512_unpacklo_ps(a[2], a[3]),
        _mm512_unpackhi_ps(a[2], a[3]),
    );
    // ... then [a0, a1, a2, a3]'s four lanes summed, in each 128-bit lane ...
    let (lo, hi) = (
        _mm512_unpacklo_pd(_mm512_castps_pd(t01), _mm512_castps_pd(t23)),
        _mm512_unpackhi_pd(_mm512_castps_pd(t01), _mm512_castps_pd(t23)),
    );
    let u = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    // ... and the four 128-bit lanes added.
    let v = _mm512_add_ps(u, _mm512_shuffle_f32x4::<0b01_00_11_10>(u, u));
    let w = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v));
    _mm512_castps512_ps128(w)
}

/// Heads up to which [`Avx512::attn_scores_few`] and [`Avx512::attn_values_few`] take a group
/// (4 · G sums and four key or value registers in 32 registers).
pub(crate) const FEW_HEADS: usize = 6;

/// Value rows a block of [`Avx512::attn_values_few`].
const FEW_KEYS: usize = 64;

/// Sixteen elements from `p` where `m` allows (zeros elsewhere, nothing read there), widened.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn load16_masked<T: KvElem>(p: *const T, m: __mmask16) -> __m512 {
    if T::BF16 {
        let h = _mm256_maskz_loadu_epi16(m, p as *const i16);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    } else {
        _mm512_maskz_loadu_ps(m, p as *const f32)
    }
}

/// [`Avx512::attn_values_few`] of `G` heads over one block of value rows (keys `j0..`), adding
/// into `out`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn values_rows<T: KvElem, const G: usize>(
    p: &[f32],
    dv: usize,
    block: &[*const T],
    j0: usize,
    nk: usize,
    out: &mut [f32],
) {
    let pr: [*const f32; G] = std::array::from_fn(|g| p.as_ptr().add(g * nk + j0));
    let mut c = 0;
    while c < dv {
        // Masked past dv: those lanes are neither read nor written.
        let m: [__mmask16; 4] = std::array::from_fn(|i| lanes((dv - c).saturating_sub(16 * i)));
        let o: [*mut f32; G] = std::array::from_fn(|g| out.as_mut_ptr().add(g * dv + c));
        let mut acc: [[__m512; 4]; G] = std::array::from_fn(|g| {
            std::array::from_fn(|i| _mm512_maskz_loadu_ps(m[i], o[g].wrapping_add(16 * i)))
        });
        for (j, &vp) in block.iter().enumerate() {
            let v: [__m512; 4] =
                std::array::from_fn(|i| load16_masked(vp.wrapping_add(c + 16 * i), m[i]));
            for g in 0..G {
                let w = _mm512_set1_ps(*pr[g].add(j));
                for i in 0..4 {
                    acc[g][i] = _mm512_fmadd_ps(w, v[i], acc[g][i]);
                }
            }
        }
        for g in 0..G {
            for i in 0..4 {
                _mm512_mask_storeu_ps(o[g].wrapping_add(16 * i), m[i], acc[g][i]);
            }
        }
        c += 64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    /// `n` random rows of `width` elements as `T`, and their addresses.
    fn random_rows<T: KvElem>(
        rng: &mut Rng,
        n: usize,
        width: usize,
        to: fn(f32) -> T,
    ) -> (Vec<Vec<T>>, Vec<*const T>) {
        let rows: Vec<Vec<T>> = (0..n)
            .map(|_| rng.normal_vec(width, 1.0).into_iter().map(to).collect())
            .collect();
        let ptrs = rows.iter().map(|r| r.as_ptr()).collect();
        (rows, ptrs)
    }

    /// `attn_values_few` against the AVX2 kernel: bit for bit in its vector columns (the same
    /// chain of FMAs an output), within an ulp a term in the last `dv % 16`, which AVX2 sums as
    /// products then adds; every head count it takes, widths that leave each mask partly set,
    /// and key counts on both sides of a block; f32 and bf16 rows.
    #[test]
    fn values_few_equal_avx2_values() {
        let Some(k) = Avx512::for_isa(crate::isa::isa()) else {
            eprintln!("SKIPPED values_few_equal_avx2_values: no AVX-512 BF16 level on this CPU");
            return;
        };
        fn case<T: KvElem>(k: Avx512, rng: &mut Rng, to: fn(f32) -> T) {
            for group in 1..=FEW_HEADS {
                for &dv in &[4usize, 17, 64, 128, 130] {
                    for &nk in &[1usize, 63, 64, 65, 200] {
                        let (rows, vals) = random_rows(rng, nk, dv, to);
                        let p = rng.normal_vec(group * nk, 1.0);
                        let (mut got, mut want) =
                            (vec![f32::NAN; group * dv], vec![f32::NAN; group * dv]);
                        // SAFETY: AVX-512 BF16 level (so F, BW, VL, AVX2 and FMA) checked above;
                        // each row holds dv elements, p group · nk, the outputs group · dv.
                        unsafe {
                            k.attn_values_few(&p, group, dv, &vals, &mut got);
                            crate::x86::attn_values(&p, group, dv, &vals, &mut want);
                        }
                        let what = format!("group {group}, dv {dv}, {nk} keys, bf16={}", T::BF16);
                        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                            let (g, c) = (i / dv, i % dv);
                            if c < dv / 16 * 16 {
                                assert_eq!(
                                    a.to_bits(),
                                    b.to_bits(),
                                    "{what}: output {i}: {a} vs {b}"
                                );
                                continue;
                            }
                            let terms: f32 = (0..nk)
                                .map(|j| (p[g * nk + j] * rows[j][c].widen()).abs())
                                .sum();
                            let bound = terms * nk as f32 * f32::EPSILON;
                            assert!((a - b).abs() <= bound, "{what}: output {i}: {a} vs {b}");
                        }
                    }
                }
            }
        }
        let mut rng = Rng::new(11);
        case::<f32>(k, &mut rng, |v| v);
        case::<half::bf16>(k, &mut rng, half::bf16::from_f32);
    }

    /// `attn_scores_few` against f64 dot products, within f32's rounding of the terms' sum:
    /// every head count, widths with a partial last register, key counts around its blocks of
    /// four; f32 and bf16 keys. A swapped key, head or lane gives errors of the scores' size.
    #[test]
    fn scores_few_match_f64() {
        let Some(k) = Avx512::for_isa(crate::isa::isa()) else {
            eprintln!("SKIPPED scores_few_match_f64: no AVX-512 BF16 level on this CPU");
            return;
        };
        fn case<T: KvElem>(k: Avx512, rng: &mut Rng, to: fn(f32) -> T) {
            for group in 1..=FEW_HEADS {
                for &dk in &[3usize, 16, 40, 64, 128] {
                    for &nk in &[1usize, 3, 4, 5, 37] {
                        let (rows, keys) = random_rows(rng, nk, dk, to);
                        let q = rng.normal_vec(group * dk, 1.0);
                        let mut got = vec![f32::NAN; group * nk];
                        // SAFETY: AVX-512 BF16 level (so F, BW, VL) checked above; each key
                        // (and value: the keys again) holds dk elements, q group · dk.
                        unsafe {
                            k.attn_scores_few(&q, group, dk, &keys, &keys, dk, 0.3, &mut got)
                        };
                        for g in 0..group {
                            for j in 0..nk {
                                let terms = (0..dk)
                                    .map(|d| q[g * dk + d] as f64 * rows[j][d].widen() as f64);
                                let (want, size) =
                                    terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                                let (a, want) = (got[g * nk + j] as f64, 0.3 * want);
                                let bound = 0.3 * size * dk as f64 * f32::EPSILON as f64;
                                assert!(
                                    (a - want).abs() <= bound,
                                    "group {group}, dk {dk}, {nk} keys, bf16={}: head {g} key {j}: {a} vs {want}",
                                    T::BF16
                                );
                            }
                        }
                    }
                }
            }
        }
        let mut rng = Rng::new(12);
        case::<f32>(k, &mut rng, |v| v);
        case::<half::bf16>(k, &mut rng, half::bf16::from_f32);
    }

    #[test]
    fn transpose16_transposes() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("SKIPPED transpose16_transposes: this CPU has no AVX-512 F");
            return;
        }
        let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
        let mut out = [0f32; 256];
        // SAFETY: the CPU has AVX-512 F (checked above); 16 rows of 16 floats each way.
        unsafe {
            let mut r: [__m512; 16] =
                std::array::from_fn(|i| _mm512_loadu_ps(m.as_ptr().add(16 * i)));
            transpose16(&mut r);
            for (i, ri) in r.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(16 * i), *ri);
            }
        }
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(out[16 * i + j], m[16 * j + i], "row {i} column {j}");
            }
        }
    }
}
