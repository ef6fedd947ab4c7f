//! Hymba's per-sequence cache (spec §5), built from three kinds of storage (each held by a
//! [`Backend`]; [`Kv`] and [`LayerState`] are the CPU's):
//!
//! - the meta-token prefix ([`MetaPrefix`]): K/V of the meta tokens in every K/V group and the
//!   SSM/conv state after them, computed once per model and shared by every sequence;
//! - one K/V store per reuse group ([`KvStore`]): a growing buffer for a group with a global
//!   layer, a ring of the last `W` rows otherwise (a query's own row comes from the call's new
//!   rows); consumers of a group read the producer's store, so shared K/V is stored once. Rows
//!   are kept head-major ([`HeadRows`]), so attention streams each head's rows from memory;
//!   session files keep them row-major;
//! - an SSM state (E×N) and a conv state ((K−1)×E) per layer ([`LayerState`]).
//!
//! Stores know the absolute position of every row; masks are built from positions, never
//! from slot indices.

use crate::backend::{Backend, Cpu, KeyPositions, KvStorage, RecurrentState};
use half::bf16;
use hymba_kernels::attention::{KeyPos, KvBlock, Layout};
use std::ops::Range;
use std::sync::Arc;

/// The element type the K/V caches hold. f32 keeps every bit the projections produce; bf16
/// halves the bytes attention streams per key (and the cache's size), and is the precision the
/// official code keeps K/V in for a bf16 checkpoint. With bf16, new K/V rows are rounded to bf16
/// before any attention reads them, so every path (prefill at once, in chunks, token by token,
/// batched) sees the same kind of values and agrees to bf16's precision: an element two paths
/// compute a few f32 ulps apart may still round to neighbouring bf16 values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum KvDtype {
    #[default]
    F32,
    BF16,
}

impl KvDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::BF16 => 2,
        }
    }
}

/// As `--kv-cache` takes it.
impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDtype::F32 => "f32",
            KvDtype::BF16 => "bf16",
        })
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(KvDtype::F32),
            "bf16" => Ok(KvDtype::BF16),
            _ => Err(format!(
                "unknown K/V cache type {s:?}: expected f32 or bf16"
            )),
        }
    }
}

/// Storage of one [`HeadRows`], in its element type.
#[derive(Clone, Debug)]
enum Buf {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
}

/// `old` (`[heads, old_cap, d]`, `rows` used) copied into a new `[heads, cap, d]`.
fn regrow<T: Copy + Default>(
    old: &[T],
    heads: usize,
    d: usize,
    rows: usize,
    old_cap: usize,
    cap: usize,
) -> Vec<T> {
    let mut data = vec![T::default(); heads * cap * d];
    let n = rows * d;
    for h in 0..heads {
        data[h * cap * d..][..n].copy_from_slice(&old[h * old_cap * d..][..n]);
    }
    data
}

/// Rows of `heads` vectors of `d` values, stored head-major (`[heads, cap, d]`): attention
/// for one head then reads contiguous memory. Grows by doubling, up to `max` rows.
#[derive(Clone, Debug)]
pub struct HeadRows {
    data: Buf,
    heads: usize,
    d: usize,
    rows: usize,
    cap: usize,
    max: usize,
}

impl HeadRows {
    pub fn new(heads: usize, d: usize, max: usize, dtype: KvDtype) -> Self {
        let data = match dtype {
            KvDtype::F32 => Buf::F32(Vec::new()),
            KvDtype::BF16 => Buf::BF16(Vec::new()),
        };
        HeadRows {
            data,
            heads,
            d,
            rows: 0,
            cap: 0,
            max,
        }
    }

    pub fn dtype(&self) -> KvDtype {
        match self.data {
            Buf::F32(_) => KvDtype::F32,
            Buf::BF16(_) => KvDtype::BF16,
        }
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    /// Values per row (all heads).
    pub fn width(&self) -> usize {
        self.heads * self.d
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Element `j` of head `h` in slot `slot`, widened.
    pub fn get(&self, slot: usize, h: usize, j: usize) -> f32 {
        let i = (h * self.cap + slot) * self.d + j;
        match &self.data {
            Buf::F32(v) => v[i],
            Buf::BF16(v) => v[i].to_f32(),
        }
    }

    /// Bytes of the rows held.
    pub fn bytes(&self) -> usize {
        self.rows * self.heads * self.d * self.dtype().size()
    }

    fn reserve(&mut self, rows: usize) {
        assert!(
            rows <= self.max,
            "K/V rows: {rows} exceed the maximum of {}",
            self.max
        );
        if rows <= self.cap {
            return;
        }
        let cap = rows.max(2 * self.cap).max(16).min(self.max);
        let (heads, d, used, old) = (self.heads, self.d, self.rows, self.cap);
        self.data = match &self.data {
            Buf::F32(v) => Buf::F32(regrow(v, heads, d, used, old, cap)),
            Buf::BF16(v) => Buf::BF16(regrow(v, heads, d, used, old, cap)),
        };
        self.cap = cap;
    }

    /// Writes row-major `row` (`heads·d`) into slot `slot` (at most one past the last row).
    pub fn set(&mut self, slot: usize, row: &[f32]) {
        debug_assert_eq!(row.len(), self.heads * self.d);
        assert!(
            slot <= self.rows,
            "K/V rows: slot {slot} past the end ({})",
            self.rows
        );
        if slot == self.rows {
            self.reserve(slot + 1);
            self.rows += 1;
        }
        for (h, v) in row.chunks_exact(self.d).enumerate() {
            let at = (h * self.cap + slot) * self.d;
            match &mut self.data {
                Buf::F32(data) => data[at..][..self.d].copy_from_slice(v),
                Buf::BF16(data) => {
                    for (o, &x) in data[at..][..self.d].iter_mut().zip(v) {
                        *o = bf16::from_f32(x);
                    }
                }
            }
        }
    }

    /// Appends row-major rows (`[n, heads·d]`).
    pub fn extend(&mut self, rows: &[f32]) {
        let w = self.heads * self.d;
        self.reserve(self.rows + rows.len() / w.max(1));
        for r in rows.chunks_exact(w) {
            self.set(self.rows, r);
        }
    }

    /// The rows in row-major order (`[len, heads·d]`), widened to f32, as saved to disk.
    pub fn to_row_major(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.heads * self.d);
        for i in 0..self.rows {
            for h in 0..self.heads {
                let at = (h * self.cap + i) * self.d;
                match &self.data {
                    Buf::F32(v) => out.extend_from_slice(&v[at..][..self.d]),
                    Buf::BF16(v) => out.extend(v[at..][..self.d].iter().map(|x| x.to_f32())),
                }
            }
        }
        out
    }
}

/// The keys and values of one group's rows.
#[derive(Clone, Debug)]
pub struct Kv {
    pub k: HeadRows,
    pub v: HeadRows,
}

impl KvStorage for Kv {
    fn len(&self) -> usize {
        self.k.len()
    }

    fn bytes(&self) -> usize {
        self.k.bytes() + self.v.bytes()
    }

    fn dtype(&self) -> KvDtype {
        self.k.dtype()
    }
}

impl Kv {
    pub fn new(heads: usize, dk: usize, dv: usize, max: usize, dtype: KvDtype) -> Self {
        Kv {
            k: HeadRows::new(heads, dk, max, dtype),
            v: HeadRows::new(heads, dv, max, dtype),
        }
    }

    /// The rows as an attention block.
    pub fn block<'a>(&'a self, pos: KeyPos<'a>) -> KvView<'a> {
        debug_assert_eq!(self.k.cap, self.v.cap);
        let (rows, layout) = (self.len(), Layout::HeadMajor { cap: self.k.cap });
        match (&self.k.data, &self.v.data) {
            (Buf::F32(k), Buf::F32(v)) => KvView::F32(KvBlock {
                k,
                v,
                rows,
                layout,
                pos,
            }),
            (Buf::BF16(k), Buf::BF16(v)) => KvView::BF16(KvBlock {
                k,
                v,
                rows,
                layout,
                pos,
            }),
            _ => unreachable!("a group's keys and values are made with one element type"),
        }
    }
}

/// A block of cached K/V in the element type it is held in.
#[derive(Clone, Copy, Debug)]
pub enum KvView<'a> {
    F32(KvBlock<'a, f32>),
    BF16(KvBlock<'a, bf16>),
}

impl<'a> KvView<'a> {
    pub fn f32(&self) -> Option<KvBlock<'a, f32>> {
        match self {
            KvView::F32(b) => Some(*b),
            KvView::BF16(_) => None,
        }
    }

    pub fn bf16(&self) -> Option<KvBlock<'a, bf16>> {
        match self {
            KvView::BF16(b) => Some(*b),
            KvView::F32(_) => None,
        }
    }
}

/// Recurrent state of one layer's SSM branch.
#[derive(Clone, Debug)]
pub struct LayerState {
    /// S [E, N]
    pub ssm: Vec<f32>,
    /// the last K−1 conv inputs, oldest first [K−1, E]
    pub conv: Vec<f32>,
}

impl LayerState {
    pub fn zeros(e: usize, n: usize, k: usize) -> Self {
        LayerState {
            ssm: vec![0.0; e * n],
            conv: vec![0.0; (k - 1) * e],
        }
    }
}

impl RecurrentState for LayerState {
    fn ssm_bytes(&self) -> usize {
        self.ssm.len() * 4
    }

    fn conv_bytes(&self) -> usize {
        self.conv.len() * 4
    }
}

/// The state after the meta tokens: computed once per model.
pub struct MetaPrefix<B: Backend = Cpu> {
    /// M
    pub len: usize,
    /// Meta-token K/V per K/V group, positions 0..M.
    pub kv: Vec<B::Kv>,
    /// SSM and conv state per layer after the meta tokens.
    pub states: Vec<B::State>,
}

impl<B: Backend> MetaPrefix<B> {
    pub fn bytes(&self) -> usize {
        self.kv.iter().map(KvStorage::bytes).sum::<usize>()
            + self
                .states
                .iter()
                .map(|s| s.ssm_bytes() + s.conv_bytes())
                .sum::<usize>()
    }
}

/// The K/V one group keeps for the real tokens of a sequence.
pub enum KvStore<B: Backend = Cpu> {
    /// Every token from position `start` on.
    Global { kv: B::Kv, start: usize },
    /// The last `cap` tokens; `pos[i]` is the position held in slot `i`. Slots fill in order,
    /// then the oldest is replaced: the token at `p` sits in slot `(p − start) mod cap`, where
    /// `start` is the first position the ring was given.
    Window {
        kv: B::Kv,
        pos: Vec<usize>,
        cap: usize,
    },
}

impl<B: Backend> Clone for KvStore<B> {
    fn clone(&self) -> Self {
        match self {
            KvStore::Global { kv, start } => KvStore::Global {
                kv: kv.clone(),
                start: *start,
            },
            KvStore::Window { kv, pos, cap } => KvStore::Window {
                kv: kv.clone(),
                pos: pos.clone(),
                cap: *cap,
            },
        }
    }
}

impl<B: Backend> KvStore<B> {
    /// The stored rows, for attention.
    pub fn view<'a>(&'a self, b: &B) -> B::KvView<'a> {
        match self {
            KvStore::Global { kv, start } => b.kv_view(kv, KeyPositions::Contiguous(*start)),
            KvStore::Window { kv, pos, .. } => b.kv_view(kv, KeyPositions::Ring { slots: pos }),
        }
    }

    /// Stores rows `rows` of this call's keys and values (row order, as the projections produce
    /// them), the first at position `pos0`.
    pub fn append(&mut self, b: &B, k: &B::Rows, v: &B::Rows, rows: Range<usize>, pos0: usize) {
        match self {
            KvStore::Global { kv, .. } => {
                let at = kv.len();
                b.kv_write(kv, at, pos0, k, v, rows);
            }
            KvStore::Window { kv, pos, cap } => {
                let n = rows.len();
                // Only the last `cap` rows can survive; runs of consecutive slots are written
                // together.
                let mut run: Option<(usize, usize)> = None; // (first row, first slot)
                for i in n.saturating_sub(*cap)..n {
                    let p = pos0 + i;
                    // A free slot while the ring fills, then the oldest one.
                    let slot = if pos.len() < *cap {
                        pos.len()
                    } else {
                        (0..*cap).min_by_key(|&s| pos[s]).expect("cap > 0")
                    };
                    if let Some((r0, s0)) = run {
                        if slot != s0 + (i - r0) {
                            b.kv_write(kv, s0, pos0 + r0, k, v, rows.start + r0..rows.start + i);
                            run = Some((i, slot));
                        }
                    } else {
                        run = Some((i, slot));
                    }
                    if slot == pos.len() {
                        pos.push(p);
                    } else {
                        pos[slot] = p;
                    }
                }
                if let Some((r0, s0)) = run {
                    b.kv_write(kv, s0, pos0 + r0, k, v, rows.start + r0..rows.end);
                }
            }
        }
    }

    /// Bytes of K/V held (positions bookkeeping included).
    pub fn bytes(&self) -> usize {
        match self {
            KvStore::Global { kv, .. } => kv.bytes(),
            KvStore::Window { kv, pos, .. } => {
                kv.bytes() + pos.len() * std::mem::size_of::<usize>()
            }
        }
    }
}

/// Everything one sequence holds between forward calls.
pub struct Cache<B: Backend = Cpu> {
    pub(crate) meta: Arc<MetaPrefix<B>>,
    /// Next absolute position (M for a sequence with no tokens yet).
    pub(crate) pos: usize,
    /// One store per K/V group.
    pub(crate) kv: Vec<KvStore<B>>,
    /// One per layer.
    pub(crate) states: Vec<B::State>,
}

/// Bytes a cache holds, by kind, read from its live buffers.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CacheBytes {
    pub global_kv: usize,
    pub window_kv: usize,
    pub ssm_state: usize,
    pub conv_state: usize,
    /// Held once per model, shared by every sequence (not in `per_sequence`).
    pub meta_prefix_shared: usize,
    pub per_sequence: usize,
}

impl<B: Backend> Clone for Cache<B> {
    fn clone(&self) -> Self {
        Cache {
            meta: self.meta.clone(),
            pos: self.pos,
            kv: self.kv.clone(),
            states: self.states.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for Cache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("pos", &self.pos)
            .field("kv_dtype", &self.kv_dtype())
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl<B: Backend> Cache<B> {
    /// The element type of its K/V (that of the model that made it).
    pub fn kv_dtype(&self) -> KvDtype {
        self.meta
            .kv
            .first()
            .or_else(|| {
                self.kv.first().map(|s| match s {
                    KvStore::Global { kv, .. } | KvStore::Window { kv, .. } => kv,
                })
            })
            .map_or(KvDtype::F32, KvStorage::dtype)
    }

    /// Real tokens processed so far (meta tokens excluded).
    pub fn len(&self) -> usize {
        self.pos - self.meta.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> CacheBytes {
        let mut b = CacheBytes {
            meta_prefix_shared: self.meta.bytes(),
            ..Default::default()
        };
        for s in &self.kv {
            match s {
                KvStore::Global { .. } => b.global_kv += s.bytes(),
                KvStore::Window { .. } => b.window_kv += s.bytes(),
            }
        }
        for s in &self.states {
            b.ssm_state += s.ssm_bytes();
            b.conv_state += s.conv_bytes();
        }
        b.per_sequence = b.global_kv + b.window_kv + b.ssm_state + b.conv_state;
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_cap_positions() {
        let mut s: KvStore = KvStore::Window {
            kv: Kv::new(1, 1, 1, 3, KvDtype::F32),
            pos: Vec::new(),
            cap: 3,
        };
        let mut append = |ps: std::ops::Range<usize>| {
            let k: Vec<f32> = ps.clone().map(|p| p as f32).collect();
            let v: Vec<f32> = ps.clone().map(|p| -(p as f32)).collect();
            s.append(&Cpu, &k, &v, 0..ps.len(), ps.start);
        };
        append(10..12);
        append(12..13);
        append(13..18);
        let KvStore::Window { kv, pos, .. } = &s else {
            unreachable!()
        };
        let mut got: Vec<(usize, f32, f32)> = (0..3)
            .map(|i| (pos[i], kv.k.get(i, 0, 0), kv.v.get(i, 0, 0)))
            .collect();
        got.sort_by_key(|x| x.0);
        assert_eq!(
            got,
            vec![(15, 15.0, -15.0), (16, 16.0, -16.0), (17, 17.0, -17.0)]
        );
    }

    /// Rows keep their values across growth, in a head-major layout, and read back in order, in
    /// f32 and in bf16 (values chosen to be exact in bf16).
    #[test]
    fn head_rows_grow_and_read_back() {
        for dtype in [KvDtype::F32, KvDtype::BF16] {
            let (heads, d) = (3, 2);
            let rows: Vec<f32> = (0..40 * heads * d).map(|v| v as f32 / 4.0).collect();
            let mut r = HeadRows::new(heads, d, 100, dtype);
            r.extend(&rows[..heads * d]);
            r.extend(&rows[heads * d..37 * heads * d]);
            for i in 37..40 {
                r.set(i, &rows[i * heads * d..(i + 1) * heads * d]);
            }
            assert_eq!(r.len(), 40);
            assert_eq!(r.to_row_major(), rows);
            assert_eq!(r.bytes(), 40 * heads * d * dtype.size());
            // Head 1 of row 5 sits in head 1's contiguous run.
            assert_eq!(
                [r.get(5, 1, 0), r.get(5, 1, 1)],
                [rows[(5 * heads + 1) * d], rows[(5 * heads + 1) * d + 1]]
            );
            r.set(3, &[9.0; 6]);
            assert_eq!(&r.to_row_major()[3 * heads * d..4 * heads * d], &[9.0; 6]);
        }
    }
}
