//! Scaled dot-product attention over keys held in several blocks (a shared prefix, a cache, the
//! rows being computed now), each key tagged with its absolute position. Which keys a query may
//! see is the caller's predicate over (query position, key position): this kernel knows nothing
//! of windows or meta tokens.
//!
//! Query head `h` reads key/value head `h / (heads / kv_heads)` (grouped-query attention).

use crate::isa::isa;
use crate::matmul::{axpy_with, dot_with};
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
    let (qw, ow) = (sh.heads * sh.dk, sh.heads * sh.dv);
    assert_eq!(q.len(), q_pos.len() * qw);
    assert_eq!(out.len(), q_pos.len() * ow);
    let (kw, vw) = (sh.kv_heads * sh.dk, sh.kv_heads * sh.dv);
    let group = sh.heads / sh.kv_heads;
    let isa = isa();
    out.par_chunks_mut(group * sh.dv).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(keys, scores): &mut (Vec<(usize, usize)>, Vec<f32>), (task, o)| {
            let (t, kh) = (task / sh.kv_heads, task % sh.kv_heads);
            let tp = q_pos[t];
            keys.clear();
            for (bi, b) in blocks.iter().enumerate() {
                for i in 0..b.k.len() / kw {
                    let p = b.position(i);
                    if p != usize::MAX && sees(tp, p) {
                        keys.push((bi, i));
                    }
                }
            }
            o.fill(0.0);
            if keys.is_empty() {
                return;
            }
            let nk = keys.len();
            // scores[g * nk + j]: query head kh·group + g against key j.
            scores.clear();
            scores.resize(group * nk, 0.0);
            for (j, &(bi, i)) in keys.iter().enumerate() {
                let k = &blocks[bi].k[i * kw + kh * sh.dk..i * kw + (kh + 1) * sh.dk];
                for g in 0..group {
                    let h = kh * group + g;
                    let qh = &q[t * qw + h * sh.dk..t * qw + (h + 1) * sh.dk];
                    scores[g * nk + j] = dot_with(isa, qh, k) * scale;
                }
            }
            for g in 0..group {
                let s = &mut scores[g * nk..(g + 1) * nk];
                let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for v in s.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                for v in s.iter_mut() {
                    *v /= sum;
                }
            }
            for (j, &(bi, i)) in keys.iter().enumerate() {
                let v = &blocks[bi].v[i * vw + kh * sh.dv..i * vw + (kh + 1) * sh.dv];
                for g in 0..group {
                    axpy_with(isa, scores[g * nk + j], v, &mut o[g * sh.dv..(g + 1) * sh.dv]);
                }
            }
        },
    );
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

    #[test]
    fn matches_reference_with_slots_windows_and_gqa() {
        let mut rng = Rng::new(5);
        for &(heads, kv_heads, dk, dv) in &[(4, 2, 8, 16), (3, 3, 5, 7), (6, 1, 4, 4)] {
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
            attention(&q, &qp, &blocks, sh, 0.3, &sees, &mut o1);
            attention_ref(&q, &qp, &blocks, sh, 0.3, &sees, &mut o2);
            assert_close(&o1, &o2, 1e-5, "attention");
        }
    }
}
