//! Scaled dot-product attention over keys held in several blocks (a shared prefix, a cache, the
//! rows being computed now), each key tagged with its absolute position. Which keys a query may
//! see is the caller's predicate over (query position, key position): this kernel knows nothing
//! of windows or meta tokens.
//!
//! Query head `h` reads key/value head `h / (heads / kv_heads)` (grouped-query attention).

use crate::isa::{isa, Isa};
use crate::matmul::dot;
#[cfg(target_arch = "x86_64")]
use crate::x86;
use rayon::prelude::*;

/// Absolute positions of a block's rows.
#[derive(Clone, Copy, Debug)]
pub enum KeyPos<'a> {
    /// Row `i` is at position `start + i`.
    Contiguous(usize),
    /// Row `i` is at `slots[i]`; `usize::MAX` marks an empty slot.
    Slots(&'a [usize]),
}

/// Keys `[rows, kv_heads·dk]` and values `[rows, kv_heads·dv]` of one block.
#[derive(Clone, Copy, Debug)]
pub struct KvBlock<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub pos: KeyPos<'a>,
}

impl KvBlock<'_> {
    fn position(&self, i: usize) -> usize {
        match self.pos {
            KeyPos::Contiguous(s) => s + i,
            KeyPos::Slots(p) => p[i],
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub dk: usize,
    pub dv: usize,
}

/// `q`: `[T, heads·dk]` at positions `q_pos`; `out`: `[T, heads·dv]`. A query that sees no key
/// gets zeros. Work is split over (query row, K/V head): each task reads a key or value row once
/// for all the query heads that share it.
pub fn attention(
    q: &[f32],
    q_pos: &[usize],
    blocks: &[KvBlock],
    sh: AttnShape,
    scale: f32,
    sees: &(dyn Fn(usize, usize) -> bool + Sync),
    out: &mut [f32],
) {
    attention_with(isa(), q, q_pos, blocks, sh, scale, sees, out)
}

/// [`attention`] on a given instruction set.
#[allow(clippy::too_many_arguments)]
pub fn attention_with(
    isa: Isa,
    q: &[f32],
    q_pos: &[usize],
    blocks: &[KvBlock],
    sh: AttnShape,
    scale: f32,
    sees: &(dyn Fn(usize, usize) -> bool + Sync),
    out: &mut [f32],
) {
    let (qw, ow) = (sh.heads * sh.dk, sh.heads * sh.dv);
    assert_eq!(q.len(), q_pos.len() * qw);
    assert_eq!(out.len(), q_pos.len() * ow);
    let (kw, vw) = (sh.kv_heads * sh.dk, sh.kv_heads * sh.dv);
    let group = sh.heads / sh.kv_heads;
    let rows = q_pos.len() * sh.kv_heads;
    // Few (query, K/V head) pairs, as in decode: split each one's keys so every core has work.
    let target = 4 * rayon::current_num_threads();
    let splits = if rows >= target { 1 } else { target.div_ceil(rows) };
    // Phase 1: the keys each (query row, K/V head) sees, as (block, row).
    let lists: Vec<Vec<(u32, u32)>> = (0..rows)
        .into_par_iter()
        .map(|task| {
            let tp = q_pos[task / sh.kv_heads];
            let mut l = Vec::new();
            for (bi, b) in blocks.iter().enumerate() {
                for i in 0..b.k.len() / kw {
                    let p = b.position(i);
                    if p != usize::MAX && sees(tp, p) {
                        l.push((bi as u32, i as u32));
                    }
                }
            }
            l
        })
        .collect();
    // Phase 2: softmax-weighted sums over each slice of keys, unnormalised, with the slice's max
    // and sum so slices combine exactly (the flash-decoding split).
    let parts: Vec<Partial> = (0..rows * splits)
        .into_par_iter()
        .map(|w| {
            SCRATCH.with_borrow_mut(|(keys, vals, scores)| {
                let (task, c) = (w / splits, w % splits);
                let (t, kh) = (task / sh.kv_heads, task % sh.kv_heads);
                let list = &lists[task];
                let chunk = list.len().div_ceil(splits);
                let range = (c * chunk).min(list.len())..((c + 1) * chunk).min(list.len());
                keys.clear();
                vals.clear();
                for &(bi, i) in &list[range] {
                    let (b, i) = (&blocks[bi as usize], i as usize);
                    keys.push(b.k[i * kw + kh * sh.dk..].as_ptr());
                    vals.push(b.v[i * vw + kh * sh.dv..].as_ptr());
                }
                let nk = keys.len();
                let mut part = Partial { max: vec![f32::NEG_INFINITY; group], sum: vec![0.0; group], acc: vec![0.0; group * sh.dv] };
                if nk == 0 {
                    return part;
                }
                let qg = &q[t * qw + kh * group * sh.dk..t * qw + (kh + 1) * group * sh.dk];
                scores.clear();
                scores.resize(group * nk, 0.0);
                // SAFETY: every pointer starts a row slice with at least dk (keys) or dv
                // (values) elements, taken from the blocks above.
                unsafe { head_scores(isa, qg, group, sh.dk, keys, scale, scores) };
                for (g, s) in scores.chunks_exact_mut(nk).enumerate() {
                    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for v in s.iter_mut() {
                        *v = (*v - max).exp();
                        sum += *v;
                    }
                    part.max[g] = max;
                    part.sum[g] = sum;
                }
                unsafe { head_values(isa, scores, group, sh.dv, vals, &mut part.acc) };
                part
            })
        })
        .collect();
    // Phase 3: combine the slices of every (row, head).
    out.par_chunks_mut(group * sh.dv).enumerate().for_each(|(task, o)| {
        let ps = &parts[task * splits..(task + 1) * splits];
        for g in 0..group {
            let m = ps.iter().map(|p| p.max[g]).fold(f32::NEG_INFINITY, f32::max);
            let og = &mut o[g * sh.dv..(g + 1) * sh.dv];
            og.fill(0.0);
            if m == f32::NEG_INFINITY {
                continue; // sees no key
            }
            let mut total = 0f32;
            for p in ps.iter().filter(|p| p.max[g] > f32::NEG_INFINITY) {
                let f = (p.max[g] - m).exp();
                total += f * p.sum[g];
                for (a, b) in og.iter_mut().zip(&p.acc[g * sh.dv..(g + 1) * sh.dv]) {
                    *a += f * b;
                }
            }
            for a in og.iter_mut() {
                *a /= total;
            }
        }
    });
}

thread_local! {
    /// Per-thread key and value row pointers and scores, reused across calls: allocating them
    /// afresh made long-context decode spend its time zeroing new pages.
    static SCRATCH: std::cell::RefCell<(Vec<*const f32>, Vec<*const f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// One slice's unnormalised attention for the heads of a group: per head the max score, the
/// sum of exp(score − max), and Σ exp(score − max)·v.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

/// # Safety
/// Each `keys[j]` must point to `dk` readable floats.
unsafe fn head_scores(isa: Isa, q: &[f32], group: usize, dk: usize, keys: &[*const f32], scale: f32, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::attn_scores(q, group, dk, keys, scale, out),
        _ => {
            let nk = keys.len();
            for (j, &kp) in keys.iter().enumerate() {
                let k = std::slice::from_raw_parts(kp, dk);
                for g in 0..group {
                    out[g * nk + j] = dot(&q[g * dk..(g + 1) * dk], k) * scale;
                }
            }
        }
    }
}

/// # Safety
/// Each `vals[j]` must point to `dv` readable floats.
unsafe fn head_values(isa: Isa, p: &[f32], group: usize, dv: usize, vals: &[*const f32], out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::attn_values(p, group, dv, vals, out),
        _ => {
            let nk = vals.len();
            for (j, &vp) in vals.iter().enumerate() {
                let v = std::slice::from_raw_parts(vp, dv);
                for g in 0..group {
                    let w = p[g * nk + j];
                    for (a, b) in out[g * dv..(g + 1) * dv].iter_mut().zip(v) {
                        *a += w * b;
                    }
                }
            }
        }
    }
}

/// Reference: gathers every visible key of every block into one list per query and head, then
/// a textbook softmax in f64.
pub fn attention_ref(
    q: &[f32],
    q_pos: &[usize],
    blocks: &[KvBlock],
    sh: AttnShape,
    scale: f32,
    sees: &dyn Fn(usize, usize) -> bool,
    out: &mut [f32],
) {
    let (kw, vw) = (sh.kv_heads * sh.dk, sh.kv_heads * sh.dv);
    for (t, &tp) in q_pos.iter().enumerate() {
        for h in 0..sh.heads {
            let kh = h * sh.kv_heads / sh.heads;
            let mut sv: Vec<(f64, Vec<f32>)> = Vec::new();
            for b in blocks {
                for i in 0..b.k.len() / kw {
                    let p = b.position(i);
                    if p == usize::MAX || !sees(tp, p) {
                        continue;
                    }
                    let mut s = 0f64;
                    for j in 0..sh.dk {
                        s += (q[t * sh.heads * sh.dk + h * sh.dk + j] * b.k[i * kw + kh * sh.dk + j]) as f64;
                    }
                    sv.push((s * scale as f64, b.v[i * vw + kh * sh.dv..i * vw + (kh + 1) * sh.dv].to_vec()));
                }
            }
            let max = sv.iter().map(|x| x.0).fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = sv.iter().map(|x| (x.0 - max).exp()).sum();
            for j in 0..sh.dv {
                let o: f64 = sv.iter().map(|(s, v)| (s - max).exp() / sum * v[j] as f64).sum();
                out[t * sh.heads * sh.dv + h * sh.dv + j] = o as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, Rng};

    /// One query with two visible keys: most key slices are empty when decode splits keys.
    #[test]
    fn single_query_with_few_keys() {
        let mut rng = Rng::new(6);
        let sh = AttnShape { heads: 2, kv_heads: 1, dk: 8, dv: 24 };
        let k = rng.normal_vec(5 * 8, 1.0);
        let v = rng.normal_vec(5 * 24, 1.0);
        let blocks = [KvBlock { k: &k, v: &v, pos: KeyPos::Contiguous(0) }];
        let q = rng.normal_vec(16, 1.0);
        let sees = |t: usize, s: usize| s <= t && t - s <= 1;
        let (mut o1, mut o2) = (vec![0.0; 48], vec![0.0; 48]);
        attention_ref(&q, &[4], &blocks, sh, 0.5, &sees, &mut o2);
        for isa in crate::isa::available() {
            attention_with(isa, &q, &[4], &blocks, sh, 0.5, &sees, &mut o1);
            assert_close(&o1, &o2, 1e-5, &format!("attention {isa:?}"));
        }
    }

    #[test]
    fn matches_reference_with_slots_windows_and_gqa() {
        let mut rng = Rng::new(5);
        for &(heads, kv_heads, dk, dv) in &[(4, 2, 8, 16), (3, 3, 5, 7), (6, 1, 4, 4), (14, 2, 24, 40), (10, 5, 64, 128)] {
            let sh = AttnShape { heads, kv_heads, dk, dv };
            let (kw, vw) = (kv_heads * dk, kv_heads * dv);
            // A prefix at 0..3, a ring of 5 slots with one empty, new rows at 20..23.
            let pk = rng.normal_vec(3 * kw, 1.0);
            let pv = rng.normal_vec(3 * vw, 1.0);
            let rk = rng.normal_vec(5 * kw, 1.0);
            let rv = rng.normal_vec(5 * vw, 1.0);
            let slots = [17, 18, usize::MAX, 15, 16];
            let nk = rng.normal_vec(3 * kw, 1.0);
            let nv = rng.normal_vec(3 * vw, 1.0);
            let blocks = [
                KvBlock { k: &pk, v: &pv, pos: KeyPos::Contiguous(0) },
                KvBlock { k: &rk, v: &rv, pos: KeyPos::Slots(&slots) },
                KvBlock { k: &nk, v: &nv, pos: KeyPos::Contiguous(20) },
            ];
            let qp = [20, 21, 22];
            let q = rng.normal_vec(3 * heads * dk, 1.0);
            let sees = |t: usize, s: usize| s <= t && (t - s <= 4 || s < 3);
            let (mut o1, mut o2) = (vec![0.0; 3 * heads * dv], vec![0.0; 3 * heads * dv]);
            attention_ref(&q, &qp, &blocks, sh, 0.3, &sees, &mut o2);
            for isa in crate::isa::available() {
                attention_with(isa, &q, &qp, &blocks, sh, 0.3, &sees, &mut o1);
                assert_close(&o1, &o2, 1e-5, &format!("attention {isa:?} {heads}/{kv_heads} dk={dk} dv={dv}"));
            }
        }
    }
}
