//! AVX2 + FMA (+ F16C) kernels: Attention's scores and weighted values for the heads of a K/V group.

use super::*;

/// Attention scores of `group` query heads (rows of `q`, each `dk` long) against keys at
/// `keys[j]` (each `dk` long): `out[g·nk + j] = scale · q_g · k_j`. Keys go eight at a time,
/// reduced together (`hsum8`); within a block, two keys at a time against up to five heads, so
/// each key element is loaded (and a bf16 one widened) once for the heads rather than once a
/// head. The block of keys stays in L1 while every head of the group reads it.
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
    // Prefetch about 2 KiB of keys ahead: the next block of f32 keys, the one after for bf16.
    let ahead = if T::BF16 { 16 } else { 8 };
    for j0 in (0..nk).step_by(8) {
        let kb = 8.min(nk - j0);
        prefetch_rows::<_MM_HINT_T0, T>(&keys[(j0 + ahead).min(nk)..(j0 + ahead + 8).min(nk)], dk);
        prefetch_rows::<_MM_HINT_T1, T>(&vals[j0..j0 + kb], dv);
        // A short last block repeats its last key; those results are dropped.
        let kp: [*const T; 8] = std::array::from_fn(|i| keys[j0 + i.min(kb - 1)]);
        let block = Block { kp, kb, j0, nk };
        let mut g0 = 0;
        while g0 < group {
            let gn = 5.min(group - g0);
            match gn {
                1 => scores_heads::<T, 1>(q, g0, dk, &block, scale, out),
                2 => scores_heads::<T, 2>(q, g0, dk, &block, scale, out),
                3 => scores_heads::<T, 3>(q, g0, dk, &block, scale, out),
                4 => scores_heads::<T, 4>(q, g0, dk, &block, scale, out),
                _ => scores_heads::<T, 5>(q, g0, dk, &block, scale, out),
            }
            g0 += gn;
        }
    }
}

/// Eight keys of [`attn_scores`] (`kb` of them real), from key `j0` of `nk`.
struct Block<T> {
    kp: [*const T; 8],
    kb: usize,
    j0: usize,
    nk: usize,
}

/// [`attn_scores`] of heads `g0..g0 + G` against one block of keys. Each (head, key) sums its
/// lanes over `dk` in the same order as one key at a time would: the scores do not depend on
/// how the heads are grouped.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_heads<T: KvElem, const G: usize>(
    q: &[f32],
    g0: usize,
    dk: usize,
    b: &Block<T>,
    scale: f32,
    out: &mut [f32],
) {
    let full = dk / 8 * 8;
    let qp: [*const f32; G] = std::array::from_fn(|g| q.as_ptr().add((g0 + g) * dk));
    let mut lanes = [[_mm256_setzero_ps(); 8]; G];
    for i in (0..8).step_by(2) {
        let (k0, k1) = (b.kp[i], b.kp[i + 1]);
        let mut acc = [[_mm256_setzero_ps(); 2]; G];
        let mut d = 0;
        while d < full {
            let (a0, a1) = (load8(k0.add(d)), load8(k1.add(d)));
            for g in 0..G {
                let qv = _mm256_loadu_ps(qp[g].add(d));
                acc[g][0] = _mm256_fmadd_ps(qv, a0, acc[g][0]);
                acc[g][1] = _mm256_fmadd_ps(qv, a1, acc[g][1]);
            }
            d += 8;
        }
        for g in 0..G {
            [lanes[g][i], lanes[g][i + 1]] = acc[g];
        }
    }
    for g in 0..G {
        let mut s = [0f32; 8];
        _mm256_storeu_ps(
            s.as_mut_ptr(),
            _mm256_mul_ps(hsum8(lanes[g]), _mm256_set1_ps(scale)),
        );
        for (i, si) in s.iter().enumerate().take(b.kb) {
            let mut v = *si;
            for d in full..dk {
                v += *qp[g].add(d) * (*b.kp[i].add(d)).widen() * scale;
            }
            out[(g0 + g) * b.nk + b.j0 + i] = v;
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
