//! Scaled dot-product attention over keys held in several blocks (a shared prefix, a cache, the
//! rows being computed now), each key tagged with its absolute position. Which keys a query may
//! see is given as data ([`Visibility`]: causal, a sliding window, always-visible sink
//! positions), so the visible rows of a block of consecutive positions are two ranges, found
//! without asking about each key.
//!
//! Query head `h` reads key/value head `h / (heads / kv_heads)` (grouped-query attention).

use crate::act;
use crate::isa::{isa, Isa};
use crate::matmul::dot;
#[cfg(target_arch = "x86_64")]
use crate::x86;
use half::bf16;
use rayon::prelude::*;

/// The element types keys and values may be held in: f32, or bf16 (half the bytes to stream
/// per key, and the precision the official bf16 model computes K/V in).
pub trait KvElem: Copy + Send + Sync + Default + std::fmt::Debug + 'static {
    /// bf16 rather than f32: the kernels branch on this constant, so each type compiles to its
    /// own loop.
    const BF16: bool;
    fn widen(self) -> f32;
}

impl KvElem for f32 {
    const BF16: bool = false;
    #[inline]
    fn widen(self) -> f32 {
        self
    }
}

impl KvElem for bf16 {
    const BF16: bool = true;
    #[inline]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// Absolute positions of a block's rows.
#[derive(Clone, Copy, Debug)]
pub enum KeyPos<'a> {
    /// Row `i` is at position `start + i`.
    Contiguous(usize),
    /// Row `i` is at `slots[i]`; `usize::MAX` marks an empty slot.
    Slots(&'a [usize]),
}

/// How a block's rows are laid out in its `k` and `v` slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `[rows, kv_heads·d]`: a row holds every head, as a projection produces them.
    RowMajor,
    /// `[kv_heads, cap, d]`: each head's rows are contiguous, so attention for one head streams
    /// through memory (the hardware prefetcher follows it; strided rows defeat it).
    HeadMajor { cap: usize },
}

/// Keys and values of one block of rows, each row tagged with its position.
#[derive(Clone, Copy, Debug)]
pub struct KvBlock<'a, T: KvElem = f32> {
    pub k: &'a [T],
    pub v: &'a [T],
    pub rows: usize,
    pub layout: Layout,
    pub pos: KeyPos<'a>,
}

impl<'a, T: KvElem> KvBlock<'a, T> {
    /// Rows `[n, kv_heads·dk]` of keys and `[n, kv_heads·dv]` of values.
    pub fn row_major(k: &'a [T], v: &'a [T], kw: usize, pos: KeyPos<'a>) -> Self {
        KvBlock {
            k,
            v,
            rows: k.len().checked_div(kw).unwrap_or(0),
            layout: Layout::RowMajor,
            pos,
        }
    }

    fn position(&self, i: usize) -> usize {
        match self.pos {
            KeyPos::Contiguous(s) => s + i,
            KeyPos::Slots(p) => p[i],
        }
    }

    /// Offset of row `i` of head `h` in a slice whose rows are `d` long per head.
    #[inline]
    fn offset(&self, i: usize, h: usize, heads: usize, d: usize) -> usize {
        match self.layout {
            Layout::RowMajor => (i * heads + h) * d,
            Layout::HeadMajor { cap } => (h * cap + i) * d,
        }
    }

    /// Elements from one row of a head to the next, in a slice whose rows are `d` long per head.
    #[inline]
    fn row_stride(&self, heads: usize, d: usize) -> usize {
        match self.layout {
            Layout::RowMajor => heads * d,
            Layout::HeadMajor { .. } => d,
        }
    }

    /// Panics unless every row of every head lies inside the slices (the kernels read through
    /// raw pointers).
    fn check(&self, sh: AttnShape) {
        if self.rows == 0 {
            return;
        }
        if let Layout::HeadMajor { cap } = self.layout {
            assert!(
                self.rows <= cap,
                "K/V block: {} rows in a capacity of {cap}",
                self.rows
            );
        }
        let last = |heads, d| self.offset(self.rows - 1, heads - 1, heads, d) + d;
        assert!(
            last(sh.kv_heads, sh.dk) <= self.k.len(),
            "K/V block: {} keys are too short for {} rows",
            self.k.len(),
            self.rows
        );
        assert!(
            last(sh.kv_heads, sh.dv) <= self.v.len(),
            "K/V block: {} values are too short for {} rows",
            self.v.len(),
            self.rows
        );
        if let KeyPos::Slots(p) = self.pos {
            assert!(
                p.len() >= self.rows,
                "K/V block: {} positions for {} rows",
                p.len(),
                self.rows
            );
        }
    }
}

/// Which keys a query sees: those at or before it, and of those, the last `window + 1` positions
/// (itself and `window` before it) and the first `sinks` positions. `window: None` sees every
/// earlier key (causal attention).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Visibility {
    pub window: Option<usize>,
    pub sinks: usize,
}

impl Visibility {
    /// Whether a query at position `t` sees the key at `s`.
    #[inline]
    pub fn sees(&self, t: usize, s: usize) -> bool {
        s <= t && (self.window.is_none_or(|w| t - s <= w) || s < self.sinks)
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
pub fn attention<T: KvElem>(
    q: &[f32],
    q_pos: &[usize],
    blocks: &[KvBlock<T>],
    sh: AttnShape,
    scale: f32,
    vis: Visibility,
    out: &mut [f32],
) {
    attention_with(isa(), q, q_pos, blocks, sh, scale, vis, out)
}

/// [`attention`] on a given instruction set.
#[allow(clippy::too_many_arguments)]
pub fn attention_with<T: KvElem>(
    isa: Isa,
    q: &[f32],
    q_pos: &[usize],
    blocks: &[KvBlock<T>],
    sh: AttnShape,
    scale: f32,
    vis: Visibility,
    out: &mut [f32],
) {
    let (qw, ow) = (sh.heads * sh.dk, sh.heads * sh.dv);
    assert_eq!(q.len(), q_pos.len() * qw);
    assert_eq!(out.len(), q_pos.len() * ow);
    let group = sh.heads / sh.kv_heads;
    let rows = q_pos.len() * sh.kv_heads;
    for b in blocks {
        b.check(sh);
    }
    // Scores in log2 units, so a softmax weight is one exp2 (`act::exp2_shifted_with`).
    let scale = scale * std::f32::consts::LOG2_E;
    // Phase 1: the keys each query row sees, as runs of consecutive rows of a block (a ring's
    // slots are in position order but for one wrap, so runs are long). Shared by its K/V heads.
    let lists: Vec<Vec<Run>> = q_pos
        .par_iter()
        .with_min_len(8)
        .map(|&tp| visible_runs(blocks, tp, vis))
        .collect();
    // Few (query, K/V head) pairs, as in decode: split each one's keys so every core has work
    // (four tasks a thread), and long key lists further, into slices of at least SPLIT_KEYS
    // keys up to 32 tasks a thread: a task's values, prefetched into L2 while its scores are
    // made, are still there when its values pass reads them.
    let threads = rayon::current_num_threads();
    let most = lists
        .iter()
        .map(|r| r.iter().map(|r| r.len as usize).sum::<usize>())
        .max()
        .unwrap_or(0);
    let splits = (4 * threads)
        .div_ceil(rows)
        .max((32 * threads).div_ceil(rows).min(most / SPLIT_KEYS));
    if splits == 1 && q_pos.len() >= 2 * TILE {
        return tiles(isa, q, &lists, blocks, sh, scale, out);
    }
    // Phase 2: softmax-weighted sums over each slice of keys, unnormalised, with the slice's max
    // and sum so slices combine exactly (the flash-decoding split). Tasks go K/V head by K/V head
    // (`w` counts (head, row, slice)), so the rows a thread takes one after another read the same
    // head's keys and values, still in its cache, rather than every head's in turn.
    let n = q_pos.len();
    let parts: Vec<Partial> = (0..rows * splits)
        .into_par_iter()
        .map(|w| {
            SCRATCH.with_borrow_mut(|(keys, vals, scores)| {
                let (task, c) = (w / splits, w % splits);
                let (kh, t) = (task / n, task % n);
                let runs = &lists[t];
                let total: usize = runs.iter().map(|r| r.len as usize).sum();
                let chunk = total.div_ceil(splits);
                let (lo, hi) = ((c * chunk).min(total), ((c + 1) * chunk).min(total));
                keys.clear();
                vals.clear();
                let mut at = 0;
                for r in runs {
                    let (s, e) = (lo.max(at), hi.min(at + r.len as usize));
                    if s < e {
                        // A run's rows are evenly spaced: one offset and a stride, not one
                        // lookup per key.
                        let b = &blocks[r.block as usize];
                        let first = r.start as usize + s - at;
                        let (ks, vs) = (
                            b.row_stride(sh.kv_heads, sh.dk),
                            b.row_stride(sh.kv_heads, sh.dv),
                        );
                        // SAFETY: `check` showed every row of every head lies inside the slices.
                        let (k0, v0) = unsafe {
                            (
                                b.k.as_ptr().add(b.offset(first, kh, sh.kv_heads, sh.dk)),
                                b.v.as_ptr().add(b.offset(first, kh, sh.kv_heads, sh.dv)),
                            )
                        };
                        keys.extend((0..e - s).map(|j| k0.wrapping_add(j * ks) as *const u8));
                        vals.extend((0..e - s).map(|j| v0.wrapping_add(j * vs) as *const u8));
                    }
                    at += r.len as usize;
                }
                let nk = keys.len();
                // SAFETY: the pointers were made from `*const T` just above.
                let (keys, vals) = unsafe { (as_typed::<T>(keys), as_typed::<T>(vals)) };
                let mut part = Partial {
                    max: vec![f32::NEG_INFINITY; group],
                    sum: vec![0.0; group],
                    acc: vec![0.0; group * sh.dv],
                };
                if nk == 0 {
                    return part;
                }
                let qg = &q[t * qw + kh * group * sh.dk..t * qw + (kh + 1) * group * sh.dk];
                scores.clear();
                scores.resize(group * nk, 0.0);
                // SAFETY: every pointer starts a row slice with at least dk (keys) or dv
                // (values) elements, taken from the blocks above.
                unsafe { head_scores(isa, qg, group, sh.dk, keys, vals, sh.dv, scale, scores) };
                for (g, s) in scores.chunks_exact_mut(nk).enumerate() {
                    (part.max[g], part.sum[g]) = act::exp2_shifted_with(isa, s);
                }
                unsafe { head_values(isa, scores, group, sh.dv, vals, &mut part.acc) };
                part
            })
        })
        .collect();
    // Phase 3: combine the slices of every (row, head).
    out.par_chunks_mut(group * sh.dv)
        .with_min_len(8)
        .enumerate()
        .for_each(|(task, o)| {
            let (t, kh) = (task / sh.kv_heads, task % sh.kv_heads);
            let at = (kh * n + t) * splits;
            let ps = &parts[at..at + splits];
            for g in 0..group {
                let m = ps
                    .iter()
                    .map(|p| p.max[g])
                    .fold(f32::NEG_INFINITY, f32::max);
                let og = &mut o[g * sh.dv..(g + 1) * sh.dv];
                og.fill(0.0);
                if m == f32::NEG_INFINITY {
                    continue; // sees no key
                }
                let mut total = 0f32;
                for p in ps.iter().filter(|p| p.max[g] > f32::NEG_INFINITY) {
                    let f = (p.max[g] - m).exp2();
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

/// The fewest keys a decode split of a long key list takes (see [`attention_with`]).
const SPLIT_KEYS: usize = 512;

/// Query rows a task of [`tiles`] takes together.
const TILE: usize = 16;

/// Heads (query rows × a group's q heads) from which scores and values run as outer products on
/// AVX-512 (`crate::avx512::Avx512::attn_scores`): a prefill tile's, not a decode step's.
const MANY_HEADS: usize = 16;

/// Attention of many query rows (prefill) in tiles of [`TILE`] consecutive rows: a tile's keys
/// are the union of what its rows see, each key and value row read once for all the tile's
/// queries (rather than once a row, which made prefill attention wait on L2 and L3); scores a
/// row may not see are masked out before its softmax. `lists`: each row's visible runs.
fn tiles<T: KvElem>(
    isa: Isa,
    q: &[f32],
    lists: &[Vec<Run>],
    blocks: &[KvBlock<T>],
    sh: AttnShape,
    scale: f32,
    out: &mut [f32],
) {
    let (qw, ow) = (sh.heads * sh.dk, sh.heads * sh.dv);
    let group = sh.heads / sh.kv_heads;
    out.par_chunks_mut(TILE * ow)
        .zip(q.par_chunks(TILE * qw))
        .zip(lists.par_chunks(TILE))
        .for_each(|((o, qt), rows)| {
            let r = rows.len();
            // The union of the rows' runs, in block order, and where each row's keys sit in it.
            let mut union: Vec<Run> = Vec::new();
            let mut all: Vec<&Run> = rows.iter().flatten().collect();
            all.sort_by_key(|x| (x.block, x.start));
            for x in all {
                match union.last_mut() {
                    Some(u) if u.block == x.block && x.start <= u.start + u.len => {
                        u.len = u.len.max(x.start + x.len - u.start)
                    }
                    _ => union.push(Run { ..*x }),
                }
            }
            let mut at = Vec::with_capacity(union.len());
            let mut nk = 0;
            for u in &union {
                at.push(nk);
                nk += u.len as usize;
            }
            // Each row's keys as ranges of the union's, in order: the rest is masked.
            let mut seen: Vec<Vec<(usize, usize)>> = vec![Vec::new(); r];
            for (row, spans) in rows.iter().zip(seen.iter_mut()) {
                for x in row.iter().filter(|x| x.len > 0) {
                    let ui = union
                        .iter()
                        .position(|u| {
                            u.block == x.block && u.start <= x.start && x.start < u.start + u.len
                        })
                        .expect("a row's run lies in the union");
                    let from = at[ui] + (x.start - union[ui].start) as usize;
                    spans.push((from, from + x.len as usize));
                }
                spans.sort_unstable();
            }
            let sees_any: Vec<bool> = seen.iter().map(|s| !s.is_empty()).collect();
            let (mut keys, mut vals) = (Vec::with_capacity(nk), Vec::with_capacity(nk));
            let (mut qg, mut scores, mut acc) = (Vec::new(), Vec::new(), Vec::new());
            for kh in 0..sh.kv_heads {
                keys.clear();
                vals.clear();
                for u in &union {
                    let b = &blocks[u.block as usize];
                    let (ks, vs) = (
                        b.row_stride(sh.kv_heads, sh.dk),
                        b.row_stride(sh.kv_heads, sh.dv),
                    );
                    // SAFETY: `check` showed every row of every head lies inside the slices.
                    let (k0, v0) = unsafe {
                        (
                            b.k.as_ptr()
                                .add(b.offset(u.start as usize, kh, sh.kv_heads, sh.dk)),
                            b.v.as_ptr()
                                .add(b.offset(u.start as usize, kh, sh.kv_heads, sh.dv)),
                        )
                    };
                    keys.extend((0..u.len as usize).map(|j| k0.wrapping_add(j * ks)));
                    vals.extend((0..u.len as usize).map(|j| v0.wrapping_add(j * vs)));
                }
                // The tile's queries of this K/V head's group, one after another.
                qg.clear();
                for i in 0..r {
                    let from = i * qw + kh * group * sh.dk;
                    qg.extend_from_slice(&qt[from..from + group * sh.dk]);
                }
                scores.clear();
                scores.resize(r * group * nk, 0.0);
                // SAFETY: every pointer starts a row slice of at least dk (keys) or dv (values)
                // elements, taken from the blocks above.
                unsafe {
                    head_scores(
                        isa,
                        &qg,
                        r * group,
                        sh.dk,
                        &keys,
                        &vals,
                        sh.dv,
                        scale,
                        &mut scores,
                    )
                };
                let mut sums = vec![0f32; r * group];
                for (qi, s) in scores.chunks_exact_mut(nk).enumerate() {
                    let i = qi / group;
                    if !sees_any[i] {
                        continue;
                    }
                    let mut next = 0;
                    for &(a, b) in &seen[i] {
                        s[next..a.max(next)].fill(f32::NEG_INFINITY);
                        next = next.max(b);
                    }
                    s[next..].fill(f32::NEG_INFINITY);
                    sums[qi] = act::exp2_shifted_with(isa, s).1;
                }
                acc.clear();
                acc.resize(r * group * sh.dv, 0.0);
                // SAFETY: as above.
                unsafe { head_values(isa, &scores, r * group, sh.dv, &vals, &mut acc) };
                for (qi, a) in acc.chunks_exact(sh.dv).enumerate() {
                    let (i, g) = (qi / group, qi % group);
                    let dst = &mut o[i * ow + (kh * group + g) * sh.dv..][..sh.dv];
                    if sees_any[i] {
                        let inv = 1.0 / sums[qi];
                        for (d, x) in dst.iter_mut().zip(a) {
                            *d = x * inv;
                        }
                    } else {
                        dst.fill(0.0); // sees no key
                    }
                }
            }
        });
}

/// Rows `start..start + len` of block `block`.
#[derive(Clone, Copy)]
struct Run {
    block: u32,
    start: u32,
    len: u32,
}

/// The rows of `blocks` a query at `tp` sees, in block order, merged into runs. A block of
/// consecutive positions gives at most two ranges (the sinks, the window), computed; a ring's
/// slots are checked one by one.
fn visible_runs<T: KvElem>(blocks: &[KvBlock<T>], tp: usize, vis: Visibility) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    let mut push = |block: usize, lo: usize, hi: usize| {
        if lo >= hi {
            return;
        }
        let (block, lo, hi) = (block as u32, lo as u32, hi as u32);
        match runs.last_mut() {
            Some(r) if r.block == block && r.start + r.len == lo => r.len += hi - lo,
            _ => runs.push(Run {
                block,
                start: lo,
                len: hi - lo,
            }),
        }
    };
    for (bi, b) in blocks.iter().enumerate() {
        match b.pos {
            KeyPos::Contiguous(first) => {
                // Row i holds position first + i: rows up to `end` are at or before the query.
                let end = (tp + 1).saturating_sub(first).min(b.rows);
                match vis.window {
                    None => push(bi, 0, end),
                    Some(w) => {
                        let sinks = vis.sinks.saturating_sub(first).min(end);
                        let recent = tp.saturating_sub(w).saturating_sub(first).min(end);
                        push(bi, 0, sinks);
                        push(bi, recent.max(sinks), end);
                    }
                }
            }
            KeyPos::Slots(p) => {
                for (i, &pos) in p[..b.rows].iter().enumerate() {
                    if pos != usize::MAX && vis.sees(tp, pos) {
                        push(bi, i, i + 1);
                    }
                }
            }
        }
    }
    runs
}

thread_local! {
    /// Per-thread key and value row pointers (of whichever element type) and scores, reused
    /// across calls: allocating them afresh made long-context decode spend its time zeroing new
    /// pages.
    static SCRATCH: std::cell::RefCell<(Vec<*const u8>, Vec<*const u8>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// # Safety
/// Every pointer must have been made from a `*const T`.
unsafe fn as_typed<T>(p: &[*const u8]) -> &[*const T] {
    std::slice::from_raw_parts(p.as_ptr() as *const *const T, p.len())
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
/// Each `vals[j]` to `dv` (only prefetched here).
#[allow(clippy::too_many_arguments)]
unsafe fn head_scores<T: KvElem>(
    isa: Isa,
    q: &[f32],
    group: usize,
    dk: usize,
    keys: &[*const T],
    vals: &[*const T],
    dv: usize,
    scale: f32,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if group >= MANY_HEADS {
        // bf16 keys on AMX tiles, the queries in two bf16 terms.
        if T::BF16 && dk.is_multiple_of(32) && isa.level() == crate::isa::Level::Amx {
            if let Some(amx) = crate::amx::Amx::detect() {
                // SAFETY: T is bf16 (a u16 pattern); the pointers are as the caller promises.
                let k16 =
                    std::slice::from_raw_parts(keys.as_ptr() as *const *const u16, keys.len());
                return amx.attn_scores(q, group, dk, k16, scale, out);
            }
        }
        if let Some(k) = crate::avx512::Avx512::for_isa(isa) {
            return k.attn_scores(q, group, dk, keys, scale, out);
        }
    }
    // A decode step's few heads: AVX-512, four keys at a time.
    #[cfg(target_arch = "x86_64")]
    if group <= crate::avx512::attention::FEW_HEADS {
        if let Some(k) = crate::avx512::Avx512::for_isa(isa) {
            return k.attn_scores_few(q, group, dk, keys, vals, dv, scale, out);
        }
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        i if i.has_avx2() => x86::attn_scores(q, group, dk, keys, vals, dv, scale, out),
        _ => {
            let nk = keys.len();
            for (j, &kp) in keys.iter().enumerate() {
                let k = std::slice::from_raw_parts(kp, dk);
                for g in 0..group {
                    let qg = &q[g * dk..(g + 1) * dk];
                    let s = if T::BF16 {
                        qg.iter().zip(k).map(|(a, b)| a * b.widen()).sum()
                    } else {
                        dot(qg, std::slice::from_raw_parts(kp as *const f32, dk))
                    };
                    out[g * nk + j] = s * scale;
                }
            }
        }
    }
}

/// # Safety
/// Each `vals[j]` must point to `dv` readable floats.
unsafe fn head_values<T: KvElem>(
    isa: Isa,
    p: &[f32],
    group: usize,
    dv: usize,
    vals: &[*const T],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if group >= MANY_HEADS {
        // bf16 values on AMX tiles, the weights in two bf16 terms.
        if T::BF16 && dv.is_multiple_of(16) && isa.level() == crate::isa::Level::Amx {
            if let Some(amx) = crate::amx::Amx::detect() {
                // SAFETY: T is bf16 (a u16 pattern); the pointers are as the caller promises.
                let v16: &[*const u16] =
                    std::slice::from_raw_parts(vals.as_ptr() as *const *const u16, vals.len());
                return amx.attn_values(p, group, dv, v16, out);
            }
        }
        if let Some(k) = crate::avx512::Avx512::for_isa(isa) {
            return k.attn_values(p, group, dv, vals, out);
        }
    }
    // A decode step's few heads: AVX-512 straight from the rows.
    #[cfg(target_arch = "x86_64")]
    if group <= crate::avx512::attention::FEW_HEADS {
        if let Some(k) = crate::avx512::Avx512::for_isa(isa) {
            return k.attn_values_few(p, group, dv, vals, out);
        }
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        i if i.has_avx2() => x86::attn_values(p, group, dv, vals, out),
        _ => {
            let nk = vals.len();
            for (j, &vp) in vals.iter().enumerate() {
                let v = std::slice::from_raw_parts(vp, dv);
                for g in 0..group {
                    let w = p[g * nk + j];
                    for (a, b) in out[g * dv..(g + 1) * dv].iter_mut().zip(v) {
                        *a += w * b.widen();
                    }
                }
            }
        }
    }
}

/// Reference: gathers every visible key of every block into one list per query and head, then
/// a textbook softmax in f64.
pub fn attention_ref<T: KvElem>(
    q: &[f32],
    q_pos: &[usize],
    blocks: &[KvBlock<T>],
    sh: AttnShape,
    scale: f32,
    vis: Visibility,
    out: &mut [f32],
) {
    for (t, &tp) in q_pos.iter().enumerate() {
        for h in 0..sh.heads {
            let kh = h * sh.kv_heads / sh.heads;
            let mut sv: Vec<(f64, Vec<f32>)> = Vec::new();
            for b in blocks {
                for i in 0..b.rows {
                    let p = b.position(i);
                    if p == usize::MAX || !vis.sees(tp, p) {
                        continue;
                    }
                    let (ko, vo) = (
                        b.offset(i, kh, sh.kv_heads, sh.dk),
                        b.offset(i, kh, sh.kv_heads, sh.dv),
                    );
                    let mut s = 0f64;
                    for j in 0..sh.dk {
                        s += (q[t * sh.heads * sh.dk + h * sh.dk + j] * b.k[ko + j].widen()) as f64;
                    }
                    sv.push((
                        s * scale as f64,
                        b.v[vo..vo + sh.dv].iter().map(|v| v.widen()).collect(),
                    ));
                }
            }
            let max = sv.iter().map(|x| x.0).fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = sv.iter().map(|x| (x.0 - max).exp()).sum();
            for j in 0..sh.dv {
                let o: f64 = sv
                    .iter()
                    .map(|(s, v)| (s - max).exp() / sum * v[j] as f64)
                    .sum();
                out[t * sh.heads * sh.dv + h * sh.dv + j] = o as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, Rng};

    /// Decode over long key lists (split into many slices of at least SPLIT_KEYS keys, merged
    /// at the end), one and two query rows, five heads a K/V head, f32 and bf16 K/V in heads
    /// order: the reference's outputs on every ISA.
    #[test]
    fn long_key_lists_split_and_match_reference() {
        fn case<T: KvElem>(rng: &mut Rng, to: fn(f32) -> T) {
            let sh = AttnShape {
                heads: 10,
                kv_heads: 2,
                dk: 16,
                dv: 40,
            };
            let n = 3000;
            let mut vec =
                |len: usize| -> Vec<T> { rng.normal_vec(len, 1.0).into_iter().map(to).collect() };
            let (k, v) = (vec(n * sh.kv_heads * sh.dk), vec(n * sh.kv_heads * sh.dv));
            let blocks = [KvBlock {
                k: &k,
                v: &v,
                rows: n,
                layout: Layout::HeadMajor { cap: n },
                pos: KeyPos::Contiguous(0),
            }];
            let vis = Visibility {
                window: None,
                sinks: 0,
            };
            for q_pos in [vec![n - 1], vec![n - 1, 1500]] {
                let q = rng.normal_vec(q_pos.len() * sh.heads * sh.dk, 1.0);
                let len = q_pos.len() * sh.heads * sh.dv;
                let (mut got, mut want) = (vec![f32::NAN; len], vec![0.0; len]);
                attention_ref(&q, &q_pos, &blocks, sh, 0.25, vis, &mut want);
                for isa in crate::isa::available() {
                    attention_with(isa, &q, &q_pos, &blocks, sh, 0.25, vis, &mut got);
                    let what = format!("{isa:?}, {} rows, bf16={}", q_pos.len(), T::BF16);
                    assert_close(&got, &want, 1e-5, &what);
                }
            }
        }
        let mut rng = Rng::new(8);
        case::<f32>(&mut rng, |v| v);
        case::<half::bf16>(&mut rng, half::bf16::from_f32);
    }

    /// One query with two visible keys: most key slices are empty when decode splits keys.
    #[test]
    fn single_query_with_few_keys() {
        let mut rng = Rng::new(6);
        let sh = AttnShape {
            heads: 2,
            kv_heads: 1,
            dk: 8,
            dv: 24,
        };
        let k = rng.normal_vec(5 * 8, 1.0);
        let v = rng.normal_vec(5 * 24, 1.0);
        let blocks = [KvBlock::row_major(&k, &v, 8, KeyPos::Contiguous(0))];
        let q = rng.normal_vec(16, 1.0);
        let vis = Visibility {
            window: Some(1),
            sinks: 0,
        };
        let (mut o1, mut o2) = (vec![0.0; 48], vec![0.0; 48]);
        attention_ref(&q, &[4], &blocks, sh, 0.5, vis, &mut o2);
        for isa in crate::isa::available() {
            attention_with(isa, &q, &[4], &blocks, sh, 0.5, vis, &mut o1);
            assert_close(&o1, &o2, 1e-5, &format!("attention {isa:?}"));
        }
    }

    /// One case against the reference on every ISA: a prefix of `prefix` rows at positions 1..,
    /// a head-major ring of 5 slots (capacity 6) at `slots`, one of them empty, and `n` new rows
    /// at `first..`, which are the queries (but query `nothing`, put at position 0, before every
    /// key); K/V held as `T` (from the same random f32s).
    #[allow(clippy::too_many_arguments)]
    fn against_reference<T: KvElem>(
        rng: &mut Rng,
        to: fn(f32) -> T,
        sh: AttnShape,
        prefix: usize,
        slots: [usize; 5],
        first: usize,
        n: usize,
        vis: Visibility,
        nothing: Option<usize>,
    ) {
        let (kw, vw) = (sh.kv_heads * sh.dk, sh.kv_heads * sh.dv);
        let mut vec = |n: usize| -> Vec<T> { rng.normal_vec(n, 1.0).into_iter().map(to).collect() };
        let (pk, pv) = (vec(prefix * kw), vec(prefix * vw));
        let (rk, rv) = (vec(6 * kw), vec(6 * vw));
        let (nk, nv) = (vec(n * kw), vec(n * vw));
        let blocks = [
            KvBlock::row_major(&pk, &pv, kw, KeyPos::Contiguous(1)),
            KvBlock {
                k: &rk,
                v: &rv,
                rows: 5,
                layout: Layout::HeadMajor { cap: 6 },
                pos: KeyPos::Slots(&slots),
            },
            KvBlock::row_major(&nk, &nv, kw, KeyPos::Contiguous(first)),
        ];
        let mut qp: Vec<usize> = (first..first + n).collect();
        if let Some(i) = nothing {
            qp[i] = 0;
        }
        let q = rng.normal_vec(n * sh.heads * sh.dk, 1.0);
        let (mut o1, mut o2) = (
            vec![0.0; n * sh.heads * sh.dv],
            vec![0.0; n * sh.heads * sh.dv],
        );
        attention_ref(&q, &qp, &blocks, sh, 0.3, vis, &mut o2);
        for isa in crate::isa::available() {
            o1.fill(f32::NAN);
            attention_with(isa, &q, &qp, &blocks, sh, 0.3, vis, &mut o1);
            assert_close(
                &o1,
                &o2,
                1e-5,
                &format!("attention {isa:?} {sh:?} {n} rows bf16={}", T::BF16),
            );
        }
    }

    fn shape(heads: usize, kv_heads: usize, dk: usize, dv: usize) -> AttnShape {
        AttnShape {
            heads,
            kv_heads,
            dk,
            dv,
        }
    }

    /// Three query rows over a prefix, a ring with an empty slot and the new rows; GQA shapes
    /// with odd widths.
    fn matches_reference_in<T: KvElem>(to: fn(f32) -> T) {
        let mut rng = Rng::new(5);
        for &(heads, kv_heads, dk, dv) in &[
            (4, 2, 8, 16),
            (3, 3, 5, 7),
            (6, 1, 4, 4),
            (14, 2, 24, 40),
            (10, 5, 64, 128),
        ] {
            let vis = Visibility {
                window: Some(4),
                sinks: 3,
            };
            let slots = [17, 18, usize::MAX, 15, 16];
            against_reference(
                &mut rng,
                to,
                shape(heads, kv_heads, dk, dv),
                3,
                slots,
                20,
                3,
                vis,
                None,
            );
        }
    }

    /// Prefill-sized: enough query rows for tiles (two full ones and a short one), a window, and
    /// one row that sees nothing.
    fn tiles_match_reference_in<T: KvElem>(to: fn(f32) -> T) {
        let mut rng = Rng::new(7);
        // (10, 2, 16, 48): five q heads a K/V head, so a tile's 80 (row, head)s end in a lone
        // 16 on AMX, and 48 columns in a half-empty pair.
        for &(heads, kv_heads, dk, dv) in &[
            (3, 3, 5, 7),
            (10, 5, 64, 128),
            (4, 2, 24, 40),
            (10, 2, 16, 48),
        ] {
            let vis = Visibility {
                window: Some(6),
                sinks: 4,
            };
            let slots = [37, 38, usize::MAX, 35, 36];
            let sh = shape(heads, kv_heads, dk, dv);
            against_reference(&mut rng, to, sh, 4, slots, 40, 2 * TILE + 5, vis, Some(10));
        }
    }

    /// The runs computed for a block of consecutive positions hold exactly the rows whose
    /// positions `Visibility::sees`, for every small case.
    #[test]
    fn computed_runs_are_the_visible_rows() {
        let none: [f32; 0] = [];
        for first in 0..6 {
            for rows in 0..8 {
                let blocks = [KvBlock {
                    k: &none[..],
                    v: &none[..],
                    rows,
                    layout: Layout::RowMajor,
                    pos: KeyPos::Contiguous(first),
                }];
                for tp in 0..16 {
                    for window in [None, Some(0), Some(1), Some(2), Some(4), Some(9)] {
                        for sinks in 0..6 {
                            let vis = Visibility { window, sinks };
                            let got: Vec<usize> = visible_runs(&blocks, tp, vis)
                                .iter()
                                .flat_map(|r| r.start as usize..(r.start + r.len) as usize)
                                .collect();
                            let want: Vec<usize> =
                                (0..rows).filter(|&i| vis.sees(tp, first + i)).collect();
                            assert_eq!(got, want, "first {first} rows {rows} tp {tp} {vis:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn tiles_match_reference() {
        tiles_match_reference_in::<f32>(|v| v);
        tiles_match_reference_in::<bf16>(bf16::from_f32);
    }

    #[test]
    fn matches_reference_with_slots_windows_and_gqa() {
        matches_reference_in::<f32>(|v| v);
    }

    #[test]
    fn matches_reference_with_bf16_keys_and_values() {
        matches_reference_in::<bf16>(bf16::from_f32);
    }
}
