//! AVX2 + FMA (+ F16C) dot products. Only called after run-time detection (see `isa`).
#![cfg(target_arch = "x86_64")]

use crate::attention::KvElem;
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
                    acc[j] = _mm256_fmadd_ps(
                        $load(wp.add(i + 8 * j)),
                        _mm256_loadu_ps(xp.add(i + 8 * j)),
                        acc[j],
                    );
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps($load(wp.add(i)), _mm256_loadu_ps(xp.add(i)), acc[0]);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(
                _mm256_add_ps(acc[0], acc[1]),
                _mm256_add_ps(acc[2], acc[3]),
            ));
            while i < n {
                s += $scalar(w[i]) * x[i];
                i += 1;
            }
            s
        }
    };
}

dot_impl!(
    dot_f32,
    f32,
    "avx2,fma",
    |p: *const f32| _mm256_loadu_ps(p),
    |v: f32| v
);
dot_impl!(dot_bf16, bf16, "avx2,fma", |p| load_bf16(p), |v: bf16| v
    .to_f32());
dot_impl!(dot_f16, f16, "avx2,fma,f16c", |p| load_f16(p), |v: f16| v
    .to_f32());

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

/// Rows of the input handled by one call of the register-blocked kernel.
pub const MR: usize = 6;
/// Weight rows (outputs) in one packed panel: two 8-wide vectors.
pub const NR: usize = 16;

/// Requests the cache line at `p`. Only a hint: any address is fine.
#[inline]
pub fn prefetch(p: *const f32) {
    // SAFETY: SSE is part of x86-64; a prefetch never faults.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
}

/// `c[i][j] += Σ_k x[i][k] · panel[k][j]` for i < MR, j < NR, the panel packed k-major
/// (`[kc][NR]`). Twelve accumulators stay in registers; each k costs two panel loads and six
/// broadcasts for twelve FMAs.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn kernel_6x16(
    kc: usize,
    x: [*const f32; MR],
    panel: *const f32,
    c: &mut [[f32; NR]; MR],
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for i in 0..MR {
        acc[i][0] = _mm256_loadu_ps(c[i].as_ptr());
        acc[i][1] = _mm256_loadu_ps(c[i].as_ptr().add(8));
    }
    for k in 0..kc {
        let p0 = _mm256_loadu_ps(panel.add(k * NR));
        let p1 = _mm256_loadu_ps(panel.add(k * NR + 8));
        for i in 0..MR {
            let xv = _mm256_broadcast_ss(&*x[i].add(k));
            acc[i][0] = _mm256_fmadd_ps(xv, p0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(xv, p1, acc[i][1]);
        }
    }
    for i in 0..MR {
        _mm256_storeu_ps(c[i].as_mut_ptr(), acc[i][0]);
        _mm256_storeu_ps(c[i].as_mut_ptr().add(8), acc[i][1]);
    }
}

/// How far ahead of itself the first pass over a panel prefetches it, in columns of 32 bytes.
pub const PF_COLUMNS: usize = 64;

/// `M` input rows against one panel of 16 bf16 weight rows (see
/// [`crate::matmul::WeightData::BF16Panels`]): `c[i][j] = Σ_k x[i][k]·w[j][k]` over `k`
/// columns, an M×16 tile of accumulators in registers. Each column's 16 weights are one 32-byte
/// load, widened by a shift (rows 0..8, stored in the low halves) and a mask (rows 8..16, the
/// high halves); each input element is broadcast once and feeds both. M ≤ 6 keeps the 2·M
/// accumulators, the two weight vectors and the broadcast in the 16 ymm registers. Every two
/// columns it prefetches the line at `pf + kk·pf_step` (its own panel ahead, or the next one).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn kernel_panel_bf16<const M: usize>(
    k: usize,
    x: &[*const f32; M],
    panel: *const bf16,
    c: &mut [[f32; NR]; M],
    pf: *const bf16,
    pf_step: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let mut column = |kk: usize| {
        let v = _mm256_loadu_si256(panel.add(kk * NR) as *const __m256i);
        let w1 = _mm256_castsi256_ps(_mm256_and_si256(v, high));
        let w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        for i in 0..M {
            let xv = _mm256_broadcast_ss(&*x[i].add(kk));
            acc[i][0] = _mm256_fmadd_ps(xv, w0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(xv, w1, acc[i][1]);
        }
    };
    let mut kk = 0;
    while kk + 2 <= k {
        // Only a hint: an address past the matrix does not fault.
        _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(kk * pf_step) as *const i8);
        column(kk);
        column(kk + 1);
        kk += 2;
    }
    if kk < k {
        column(kk);
    }
    for i in 0..M {
        _mm256_storeu_ps(c[i].as_mut_ptr(), acc[i][0]);
        _mm256_storeu_ps(c[i].as_mut_ptr().add(8), acc[i][1]);
    }
}

macro_rules! pack_impl {
    ($name:ident, $t:ty, $load:expr, $scalar:expr) => {
        /// Packs `kc` columns of `nrows` rows (at most NR; row `r` starts at `rows[r·stride]`)
        /// k-major into `panel` (`[kc][NR]`), widening to f32 and zero padding missing rows,
        /// with 8×8 register transposes.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn $name(
            rows: &[$t],
            stride: usize,
            kc: usize,
            nrows: usize,
            panel: &mut [f32],
        ) {
            assert!(
                panel.len() >= kc * NR
                    && nrows <= NR
                    && (nrows == 0 || rows.len() >= (nrows - 1) * stride + kc)
            );
            for half in 0..2 {
                let mut kk = 0;
                while kk + 8 <= kc {
                    let v: [__m256; 8] = std::array::from_fn(|j| {
                        let r = half * 8 + j;
                        if r < nrows {
                            $load(rows.as_ptr().add(r * stride + kk))
                        } else {
                            _mm256_setzero_ps()
                        }
                    });
                    for (i, ti) in transpose8(v).iter().enumerate() {
                        _mm256_storeu_ps(panel.as_mut_ptr().add((kk + i) * NR + half * 8), *ti);
                    }
                    kk += 8;
                }
                for kk in kk..kc {
                    for j in 0..8 {
                        let r = half * 8 + j;
                        panel[kk * NR + r] = if r < nrows {
                            $scalar(rows[r * stride + kk])
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    };
}

pack_impl!(
    pack_panel,
    f32,
    |p: *const f32| _mm256_loadu_ps(p),
    |v: f32| v
);
pack_impl!(pack_panel_bf16, bf16, |p| load_bf16(p), |v: bf16| v
    .to_f32());

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
}

/// The first `cols / 8 · 8` columns of 16 bf16 rows (row `j` at `w[j·cols..]`) written in panel
/// order (see [`crate::matmul::WeightData::BF16Panels`]) to `out`; returns the columns done.
/// Eight columns at a time: rows `j` and `8 + j` interleaved into 32-bit pairs, then an 8×8
/// transpose of the pairs gives each column's 16 values in their slots.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn pack_panel_pairs(w: &[bf16], cols: usize, out: &mut [bf16]) -> usize {
    assert!(w.len() >= 16 * cols && out.len() >= 16 * cols);
    let done = cols / 8 * 8;
    for c in (0..done).step_by(8) {
        let pairs: [__m256; 8] = std::array::from_fn(|j| {
            let a = _mm_loadu_si128(w.as_ptr().add(j * cols + c) as *const __m128i);
            let b = _mm_loadu_si128(w.as_ptr().add((8 + j) * cols + c) as *const __m128i);
            _mm256_castsi256_ps(_mm256_set_m128i(
                _mm_unpackhi_epi16(a, b),
                _mm_unpacklo_epi16(a, b),
            ))
        });
        for (i, col) in transpose8(pairs).iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add((c + i) * NR) as *mut f32, *col);
        }
    }
    done
}

/// Lane `i` of the result is the sum of the lanes of `a[i]`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum8(a: [__m256; 8]) -> __m256 {
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

/// Attention scores of `group` query heads (rows of `q`, each `dk` long) against keys at
/// `keys[j]` (each `dk` long): `out[g·nk + j] = scale · q_g · k_j`. Keys go eight at a time:
/// eight dot products share each query load and are reduced together, and the block of keys
/// stays in L1 while every head of the group reads it.
///
/// Rows of a cache are strided (one position holds every head), too sparse a pattern for the
/// hardware prefetcher to run ahead: the next block's keys are requested while this one is
/// used, and the value rows `vals[j]` (`dv` long, read by [`attn_values`] next) into L2.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn attn_scores<T: KvElem>(
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
    let full = dk / 8 * 8;
    let size = std::mem::size_of::<T>();
    // Prefetch about 2 KiB of keys ahead: the next block of f32 keys, the one after for bf16.
    let ahead = if T::BF16 { 16 } else { 8 };
    for j0 in (0..nk).step_by(8) {
        let kb = 8.min(nk - j0);
        for &p in &keys[(j0 + ahead).min(nk)..(j0 + ahead + 8).min(nk)] {
            for off in (0..dk * size).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>((p as *const i8).add(off));
            }
        }
        for &p in &vals[j0..j0 + kb] {
            for off in (0..dv * size).step_by(64) {
                _mm_prefetch::<_MM_HINT_T1>((p as *const i8).add(off));
            }
        }
        // A short last block repeats its last key; those results are dropped.
        let kp: [*const T; 8] = std::array::from_fn(|i| keys[j0 + i.min(kb - 1)]);
        for g in 0..group {
            let qp = q.as_ptr().add(g * dk);
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut d = 0;
            while d < full {
                let qv = _mm256_loadu_ps(qp.add(d));
                for i in 0..8 {
                    acc[i] = _mm256_fmadd_ps(qv, load8(kp[i].add(d)), acc[i]);
                }
                d += 8;
            }
            let mut s = [0f32; 8];
            _mm256_storeu_ps(
                s.as_mut_ptr(),
                _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale)),
            );
            for (i, si) in s.iter().enumerate().take(kb) {
                let mut v = *si;
                for d in full..dk {
                    v += *qp.add(d) * (*kp[i].add(d)).widen() * scale;
                }
                out[g * nk + j0 + i] = v;
            }
        }
    }
}

/// Weighted sum of value rows for `group` heads: `out[g·dv..][d] = Σ_j p[g·nk + j] · v_j[d]`.
/// Walks the values 16 columns at a time with up to five heads' accumulators in registers,
/// over blocks of keys small enough that a block's rows stay in L1 across the column passes:
/// each value row is read from memory once.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn attn_values<T: KvElem>(
    p: &[f32],
    group: usize,
    dv: usize,
    vals: &[*const T],
    out: &mut [f32],
) {
    out[..group * dv].fill(0.0);
    let mut g0 = 0;
    while g0 < group {
        let gn = 5.min(group - g0);
        match gn {
            1 => values_heads::<T, 1>(p, g0, dv, vals, out),
            2 => values_heads::<T, 2>(p, g0, dv, vals, out),
            3 => values_heads::<T, 3>(p, g0, dv, vals, out),
            4 => values_heads::<T, 4>(p, g0, dv, vals, out),
            _ => values_heads::<T, 5>(p, g0, dv, vals, out),
        }
        g0 += gn;
    }
}

/// [`attn_values`] for heads `g0..g0 + G`, adding into `out`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn values_heads<T: KvElem, const G: usize>(
    p: &[f32],
    g0: usize,
    dv: usize,
    vals: &[*const T],
    out: &mut [f32],
) {
    const KEYS: usize = 64;
    let nk = vals.len();
    let full = dv / 16 * 16;
    for j0 in (0..nk).step_by(KEYS) {
        let block = &vals[j0..(j0 + KEYS).min(nk)];
        let pr: [*const f32; G] = std::array::from_fn(|g| p.as_ptr().add((g0 + g) * nk + j0));
        let mut c = 0;
        while c < full {
            let mut acc: [[__m256; 2]; G] = std::array::from_fn(|g| {
                let o = out.as_ptr().add((g0 + g) * dv + c);
                [_mm256_loadu_ps(o), _mm256_loadu_ps(o.add(8))]
            });
            for (j, &vp) in block.iter().enumerate() {
                let v0 = load8(vp.add(c));
                let v1 = load8(vp.add(c + 8));
                for g in 0..G {
                    let w = _mm256_broadcast_ss(&*pr[g].add(j));
                    acc[g][0] = _mm256_fmadd_ps(w, v0, acc[g][0]);
                    acc[g][1] = _mm256_fmadd_ps(w, v1, acc[g][1]);
                }
            }
            for (g, a) in acc.iter().enumerate() {
                let o = out.as_mut_ptr().add((g0 + g) * dv + c);
                _mm256_storeu_ps(o, a[0]);
                _mm256_storeu_ps(o.add(8), a[1]);
            }
            c += 16;
        }
        for g in 0..G {
            for d in full..dv {
                let mut s = out[(g0 + g) * dv + d];
                for (j, &vp) in block.iter().enumerate() {
                    s += *pr[g].add(j) * (*vp.add(d)).widen();
                }
                out[(g0 + g) * dv + d] = s;
            }
        }
    }
}

/// The f16 scale of a block, by the F16C instruction.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale(d: [u8; 2]) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(
        _mm_cvtsi32_si128(u16::from_le_bytes(d) as i32),
    ))
}

/// `Σ_i dw_i · xd_i · (Σ lanes of dot(i) − corr_i)` over `n` block pairs, where `dot(i)` is
/// the integer product of weight block i with input block i in eight lanes, `dw(i)` the f16
/// bits of the weight block's scale and `xd` the input blocks' scales, widened. Four blocks go
/// together: their lane sums are folded by horizontal adds into one vector (block j's halves
/// in lanes j and j + 4), which takes the corrections (`corr4(i)`: those of blocks i..i + 4,
/// `corr1(i)`: one block's), the conversion to float and the four scales (widened together) in
/// one instruction each, where a block at a time paid for each. Two accumulators, so
/// consecutive groups do not wait on each other's FMA.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fold_blocks(
    n: usize,
    dot: impl Fn(usize) -> __m256i,
    dw: impl Fn(usize) -> u16,
    xd: &[f32],
    corr4: impl Fn(usize) -> __m128i,
    corr1: impl Fn(usize) -> i32,
) -> f32 {
    let n = n.min(xd.len());
    let four = |i: usize, acc: __m256| {
        let d = [dot(i), dot(i + 1), dot(i + 2), dot(i + 3)];
        let h = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
        let dots = _mm256_cvtepi32_ps(_mm256_sub_epi32(h, _mm256_zextsi128_si256(corr4(i))));
        let bits = |j: usize| dw(i + j) as i16;
        let sc = _mm_mul_ps(
            _mm_cvtph_ps(_mm_set_epi16(
                0,
                0,
                0,
                0,
                bits(3),
                bits(2),
                bits(1),
                bits(0),
            )),
            _mm_loadu_ps(xd.as_ptr().add(i)),
        );
        _mm256_fmadd_ps(_mm256_set_m128(sc, sc), dots, acc)
    };
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut i = 0;
    while i + 8 <= n {
        acc[0] = four(i, acc[0]);
        acc[1] = four(i + 4, acc[1]);
        i += 8;
    }
    if i + 4 <= n {
        acc[0] = four(i, acc[0]);
        i += 4;
    }
    let mut s = hsum(_mm256_add_ps(acc[0], acc[1]));
    for i in i..n {
        let dot = hsum(_mm256_cvtepi32_ps(dot(i))) - corr1(i) as f32;
        s += scale(dw(i).to_le_bytes()) * *xd.get_unchecked(i) * dot;
    }
    s
}

/// Proof that this CPU has AVX-512 VNNI on 256-bit registers (AVX512-VNNI and -VL) beside AVX2,
/// FMA and F16C: made only by [`Vnni::detect`], so the `_vnni` kernels that need it run nowhere
/// else.
#[derive(Clone, Copy, Debug)]
pub struct Vnni(());

impl Vnni {
    pub fn detect() -> Option<Vnni> {
        let ok = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl");
        ok.then_some(Vnni(()))
    }
}

/// Σ of four products of unsigned by signed bytes in each of eight i32 lanes: maddubs (pairs to
/// i16) then madd with ones on AVX2. The quantized operands here never saturate the pairs
/// (|w|, |x| ≤ 127, or a nibble ≤ 15 by |x| ≤ 127), so this equals [`mul_u8i8_vnni`] exactly.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn mul_u8i8(a: __m256i, b: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
}

/// [`mul_u8i8`] in one VNNI instruction (`vpdpbusd`).
#[inline]
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
unsafe fn mul_u8i8_vnni(a: __m256i, b: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
}

macro_rules! quant_dots_impl {
    ($q8:ident, $q4:ident, $feat:literal, $mul:ident) => {
        /// Q8_0 weights · Q8_0 activations whose block scales come widened (`xd`). The byte
        /// products want an unsigned operand, so the sign of the weights moves onto the
        /// activations (GGML's `mul_sum_i8_pairs`); see [`fold_blocks`] for the rest.
        #[target_feature(enable = $feat)]
        pub unsafe fn $q8(
            w: &[crate::quant::BlockQ8_0],
            x: &[crate::quant::BlockQ8_0],
            xd: &[f32],
        ) -> f32 {
            let dot = |i: usize| {
                let a = unpack_q8_0(w.get_unchecked(i));
                let b = unpack_q8_0(x.get_unchecked(i));
                $mul(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a))
            };
            let n = w.len().min(x.len());
            fold_blocks(
                n,
                dot,
                |i| u16::from_le_bytes(w.get_unchecked(i).d),
                xd,
                |_| _mm_setzero_si128(),
                |_| 0,
            )
        }

        /// Q4_0 weights · Q8_0 activations whose block scales come widened (`xd`) and whose
        /// block sums come precomputed (`xs`). The nibbles (0..15) multiply the activations
        /// directly, unsigned by signed, and 8·Σx per block is taken off after: Σ(q − 8)·x =
        /// Σq·x − 8·Σx, exactly, in integers; see [`fold_blocks`] for the rest.
        #[target_feature(enable = $feat)]
        pub unsafe fn $q4(
            w: &[crate::quant::BlockQ4_0],
            x: &[crate::quant::BlockQ8_0],
            xd: &[f32],
            xs: &[i32],
        ) -> f32 {
            let low = _mm256_set1_epi8(0x0F);
            let dot = |i: usize| {
                let t = _mm_loadu_si128(w.get_unchecked(i).qs.as_ptr() as *const __m128i);
                let q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), low);
                let y = _mm256_loadu_si256(x.get_unchecked(i).qs.as_ptr() as *const __m256i);
                $mul(q, y)
            };
            let n = w.len().min(x.len()).min(xs.len());
            // 8·Σx per block, in the lanes of the folded sums.
            let corr4 =
                |i: usize| _mm_slli_epi32(_mm_loadu_si128(xs.as_ptr().add(i) as *const __m128i), 3);
            fold_blocks(
                n,
                dot,
                |i| u16::from_le_bytes(w.get_unchecked(i).d),
                xd,
                corr4,
                |i| 8 * *xs.get_unchecked(i),
            )
        }
    };
}

quant_dots_impl!(dot_q8_0, dot_q4_0, "avx2,fma,f16c", mul_u8i8);
quant_dots_impl!(
    dot_q8_0_vnni,
    dot_q4_0_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    mul_u8i8_vnni
);

/// A Q8_0 block's 32 values as signed bytes.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn unpack_q8_0(b: &crate::quant::BlockQ8_0) -> __m256i {
    _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i)
}

/// A Q4_0 block's 32 values as signed bytes (−8..7), in order: low nibbles are values 0..16,
/// high nibbles 16..32.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn unpack_q4_0(b: &crate::quant::BlockQ4_0) -> __m256i {
    let t = _mm_loadu_si128(b.qs.as_ptr() as *const __m128i);
    let q = _mm256_and_si256(
        _mm256_set_m128i(_mm_srli_epi16(t, 4), t),
        _mm256_set1_epi8(0x0F),
    );
    _mm256_sub_epi8(q, _mm256_set1_epi8(8))
}

macro_rules! quant_tile_impl {
    ($name:ident, $blk:ty, $unpack:ident, $feat:literal, $mul:ident) => {
        /// `R` quantized weight rows against `M` Q8_0 input rows, whose block scales are given
        /// widened in `xd`: an R×M tile of dot products in registers. Each weight block is
        /// unpacked and its scale widened once for the M inputs, each input block loaded once
        /// for the R rows.
        #[target_feature(enable = $feat)]
        pub unsafe fn $name<const R: usize, const M: usize>(
            w: [&[$blk]; R],
            x: [&[crate::quant::BlockQ8_0]; M],
            xd: [&[f32]; M],
            out: &mut [[f32; M]; R],
        ) {
            let mut acc = [[_mm256_setzero_ps(); M]; R];
            for b in 0..w[0].len() {
                let wq: [__m256i; R] = std::array::from_fn(|j| $unpack(w[j].get_unchecked(b)));
                // maddubs needs an unsigned operand: |w|, with w's signs moved onto x.
                let wa: [__m256i; R] = std::array::from_fn(|j| _mm256_sign_epi8(wq[j], wq[j]));
                let wd: [f32; R] = std::array::from_fn(|j| scale(w[j].get_unchecked(b).d));
                for m in 0..M {
                    let y = _mm256_loadu_si256(x[m].get_unchecked(b).qs.as_ptr() as *const __m256i);
                    let dx = *xd[m].get_unchecked(b);
                    for j in 0..R {
                        let dot = $mul(wa[j], _mm256_sign_epi8(y, wq[j]));
                        acc[j][m] = _mm256_fmadd_ps(
                            _mm256_set1_ps(wd[j] * dx),
                            _mm256_cvtepi32_ps(dot),
                            acc[j][m],
                        );
                    }
                }
            }
            for j in 0..R {
                for m in 0..M {
                    out[j][m] = hsum(acc[j][m]);
                }
            }
        }
    };
}

quant_tile_impl!(
    dot_tile_q8_0,
    crate::quant::BlockQ8_0,
    unpack_q8_0,
    "avx2,fma,f16c",
    mul_u8i8
);
quant_tile_impl!(
    dot_tile_q4_0,
    crate::quant::BlockQ4_0,
    unpack_q4_0,
    "avx2,fma,f16c",
    mul_u8i8
);
quant_tile_impl!(
    dot_tile_q8_0_vnni,
    crate::quant::BlockQ8_0,
    unpack_q8_0,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    mul_u8i8_vnni
);
quant_tile_impl!(
    dot_tile_q4_0_vnni,
    crate::quant::BlockQ4_0,
    unpack_q4_0,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    mul_u8i8_vnni
);

/// e^x for 8 lanes (Cephes' expf: range reduction by ln 2, degree-6 polynomial, 2^n from the
/// exponent bits); relative error about 1e-7. Inputs below −88.4 give 0, above 88.4 are clamped.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp256(x: __m256) -> __m256 {
    let x = _mm256_min_ps(x, _mm256_set1_ps(88.376_26));
    let x = _mm256_max_ps(x, _mm256_set1_ps(-88.376_26));
    let fx = _mm256_floor_ps(_mm256_fmadd_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(0.5),
    ));
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), x);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(c));
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
    let mut p = _mm256_set1_ps(7.037_683_6e-2);
    for c in [
        -1.151_461e-1,
        1.167_699_9e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_8e-1,
        2.000_071_5e-1,
        -2.499_999_4e-1,
        3.333_333e-1,
    ] {
        p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(c));
    }
    let mut y = _mm256_mul_ps(_mm256_mul_ps(p, m), z);
    y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.121_944_4e-4), y);
    y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5), z, y);
    _mm256_fmadd_ps(e, _mm256_set1_ps(0.693_359_4), _mm256_add_ps(m, y))
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

/// [`crate::quant::quantize_q8_0_ref`] eight lanes at a time: the same scale, and round half
/// away from zero done exactly (truncate, then step away from zero when the dropped fraction,
/// exact in f32, is at least one half).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q8_0(x: &[f32], out: &mut [crate::quant::BlockQ8_0]) {
    let sign = _mm256_set1_ps(-0.0);
    let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(32)) {
        let v: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(xs.as_ptr().add(8 * j)));
        let m = v.iter().fold(_mm256_setzero_ps(), |m, &v| {
            _mm256_max_ps(m, _mm256_andnot_ps(sign, v))
        });
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let amax = lanes.iter().fold(0f32, |a, &l| a.max(l));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        b.d = f16::from_f32(d).to_le_bytes();
        let q: [__m256i; 4] = std::array::from_fn(|j| {
            let y = _mm256_mul_ps(v[j], id);
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
            let up = _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_andnot_ps(sign, _mm256_sub_ps(y, t)), half);
            let step = _mm256_and_ps(up, _mm256_or_ps(_mm256_and_ps(y, sign), one));
            _mm256_cvtps_epi32(_mm256_add_ps(t, step))
        });
        // Saturating packs interleave 128-bit lanes; the permutation restores the order.
        let p = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, p);
    }
}

/// [`crate::quant::quantize_q4_0_ref`] eight lanes at a time, byte for byte: the same scale (from
/// the first value of the largest magnitude), `x · id` then `+ 8.5` rounded separately as the
/// reference does (no FMA), truncated and clamped. A block holding a NaN, or whose scale's
/// inverse overflows, takes the reference.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q4_0(x: &[f32], out: &mut [crate::quant::BlockQ4_0]) {
    let sign = _mm256_set1_ps(-0.0);
    let (off, zero, fifteen) = (
        _mm256_set1_ps(8.5),
        _mm256_setzero_si256(),
        _mm256_set1_epi32(15),
    );
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(32)) {
        let v: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(xs.as_ptr().add(8 * j)));
        let nan = v.iter().fold(0, |m, &v| {
            m | _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v))
        });
        if nan != 0 {
            crate::quant::quantize_q4_0_ref(xs, std::slice::from_mut(b));
            continue;
        }
        let abs: [__m256; 4] = v.map(|v| _mm256_andnot_ps(sign, v));
        let m = abs
            .iter()
            .fold(_mm256_setzero_ps(), |m, &a| _mm256_max_ps(m, a));
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let amax = lanes.iter().fold(0f32, |a, &l| a.max(l));
        // The reference keeps the first value of that magnitude (a strict `<`).
        let at = (0..4)
            .find_map(|j| {
                let hit =
                    _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(abs[j], _mm256_set1_ps(amax)));
                (hit != 0).then(|| 8 * j + hit.trailing_zeros() as usize)
            })
            .unwrap_or(0);
        let d = xs[at] / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        if !id.is_finite() {
            crate::quant::quantize_q4_0_ref(xs, std::slice::from_mut(b));
            continue;
        }
        b.d = f16::from_f32(d).to_le_bytes();
        let idv = _mm256_set1_ps(id);
        let q: [__m256i; 4] = v.map(|v| {
            let t = _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(v, idv), off));
            // An infinite value times a zero scale is NaN, which the reference casts to 0.
            _mm256_min_epi32(_mm256_max_epi32(t, zero), fifteen)
        });
        // Byte j holds values j (low nibble) and j + 16 (high).
        let t = [
            _mm256_or_si256(q[0], _mm256_slli_epi32(q[2], 4)),
            _mm256_or_si256(q[1], _mm256_slli_epi32(q[3], 4)),
        ];
        let half = |t: __m256i| {
            _mm_packs_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t))
        };
        _mm_storeu_si128(
            b.qs.as_mut_ptr() as *mut __m128i,
            _mm_packus_epi16(half(t[0]), half(t[1])),
        );
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

/// [`crate::act::exp_shifted_with`]: the max and the sum in eight lanes, reduced at the end.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp_shifted(a: &mut [f32]) -> (f32, f32) {
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
        let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p), mv));
        _mm256_storeu_ps(p, e);
        acc = _mm256_add_ps(acc, e);
    }
    let mut sum = hsum(acc);
    for v in &mut a[full..] {
        *v = (*v - max).exp();
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

macro_rules! dot_tile_impl {
    ($name:ident, $t:ty, $feat:literal, $load:expr, $scalar:expr) => {
        /// `R` weight rows against `M` input rows (each as long as the weight rows): an R×M
        /// tile of dot products in registers. Each weight vector, widened once, feeds `M` FMAs
        /// and each input vector `R`, so with R = 2 an input load (from L2 when the rows are
        /// long) serves two FMAs. R·M ≤ 12 keeps the tile in the 16 ymm registers.
        /// With `prefetch`, the R rows that follow in memory are requested while these are
        /// used: short rows in a row-by-row walk are too brief for the hardware prefetcher, and
        /// the loop otherwise waits on memory.
        #[target_feature(enable = $feat)]
        pub unsafe fn $name<const R: usize, const M: usize>(
            w: [&[$t]; R],
            xs: &[*const f32; M],
            out: &mut [[f32; M]; R],
            prefetch: bool,
        ) {
            let k = w[0].len();
            let mut acc = [[_mm256_setzero_ps(); M]; R];
            let mut i = 0;
            while i + 8 <= k {
                if prefetch {
                    for j in 0..R {
                        // Only a hint: an address past the matrix does not fault.
                        _mm_prefetch::<_MM_HINT_T0>(
                            w[j].as_ptr().wrapping_add(i + R * k) as *const i8
                        );
                    }
                }
                let wv: [__m256; R] = std::array::from_fn(|j| $load(w[j].as_ptr().add(i)));
                for r in 0..M {
                    let xv = _mm256_loadu_ps(xs[r].add(i));
                    for j in 0..R {
                        acc[j][r] = _mm256_fmadd_ps(wv[j], xv, acc[j][r]);
                    }
                }
                i += 8;
            }
            for j in 0..R {
                for r in 0..M {
                    let mut s = hsum(acc[j][r]);
                    for l in i..k {
                        s += $scalar(w[j][l]) * *xs[r].add(l);
                    }
                    out[j][r] = s;
                }
            }
        }
    };
}

dot_tile_impl!(
    dot_tile_f32,
    f32,
    "avx2,fma",
    |p: *const f32| _mm256_loadu_ps(p),
    |v: f32| v
);
dot_tile_impl!(
    dot_tile_bf16,
    bf16,
    "avx2,fma",
    |p| load_bf16(p),
    |v: bf16| v.to_f32()
);
dot_tile_impl!(
    dot_tile_f16,
    f16,
    "avx2,fma,f16c",
    |p| load_f16(p),
    |v: f16| v.to_f32()
);

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
