//! Hymba's per-sequence cache (spec §5), built from three kinds of storage:
//!
//! - the meta-token prefix ([`MetaPrefix`]): K/V of the meta tokens in every K/V group and the
//!   SSM/conv state after them, computed once per model and shared by every sequence;
//! - one K/V store per reuse group ([`KvStore`]): a growing buffer for a group with a global
//!   layer, a ring of `W + 1` rows otherwise; consumers of a group read the producer's store,
//!   so shared K/V is stored once;
//! - an SSM state (E×N) and a conv state ((K−1)×E) per layer ([`LayerState`]).
//!
//! Stores know the absolute position of every row; masks are built from positions, never
//! from slot indices.

use hymba_kernels::attention::{KeyPos, KvBlock};
use std::sync::Arc;

/// Keys `[n, Hkv·dqk]` and values `[n, Hkv·dv]` in row order.
#[derive(Clone, Debug, Default)]
pub struct KvRows {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl KvRows {
    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * 4
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
        LayerState { ssm: vec![0.0; e * n], conv: vec![0.0; (k - 1) * e] }
    }
}

/// The state after the meta tokens: computed once when the model loads.
#[derive(Debug)]
pub struct MetaPrefix {
    /// M
    pub len: usize,
    /// Meta-token K/V per K/V group, positions 0..M.
    pub kv: Vec<KvRows>,
    /// SSM and conv state per layer after the meta tokens.
    pub states: Vec<LayerState>,
}

impl MetaPrefix {
    pub fn bytes(&self) -> usize {
        self.kv.iter().map(KvRows::bytes).sum::<usize>()
            + self.states.iter().map(|s| (s.ssm.len() + s.conv.len()) * 4).sum::<usize>()
    }
}

/// The K/V one group keeps for the real tokens of a sequence.
#[derive(Clone, Debug)]
pub enum KvStore {
    /// Every token from position `start` on.
    Global { rows: KvRows, start: usize },
    /// The last `cap` tokens; `pos[i]` is the position held in slot `i`.
    Window { rows: KvRows, pos: Vec<usize>, cap: usize },
}

impl KvStore {
    /// The stored rows as an attention block.
    pub fn block(&self) -> KvBlock<'_> {
        match self {
            KvStore::Global { rows, start } => KvBlock { k: &rows.k, v: &rows.v, pos: KeyPos::Contiguous(*start) },
            KvStore::Window { rows, pos, .. } => KvBlock { k: &rows.k, v: &rows.v, pos: KeyPos::Slots(pos) },
        }
    }

    /// Appends rows for positions `pos0..`, given with widths `kw` and `vw`.
    pub fn append(&mut self, new: &KvRows, pos0: usize, kw: usize, vw: usize) {
        match self {
            KvStore::Global { rows, .. } => {
                rows.k.extend_from_slice(&new.k);
                rows.v.extend_from_slice(&new.v);
            }
            KvStore::Window { rows, pos, cap } => {
                let n = new.k.len() / kw;
                // Only the last `cap` rows can survive.
                for i in n.saturating_sub(*cap)..n {
                    let p = pos0 + i;
                    let (nk, nv) = (&new.k[i * kw..(i + 1) * kw], &new.v[i * vw..(i + 1) * vw]);
                    if pos.len() < *cap {
                        rows.k.extend_from_slice(nk);
                        rows.v.extend_from_slice(nv);
                        pos.push(p);
                    } else {
                        // Overwrite the oldest slot.
                        let slot = (0..*cap).min_by_key(|&s| pos[s]).expect("cap > 0");
                        rows.k[slot * kw..(slot + 1) * kw].copy_from_slice(nk);
                        rows.v[slot * vw..(slot + 1) * vw].copy_from_slice(nv);
                        pos[slot] = p;
                    }
                }
            }
        }
    }

    /// Bytes of K/V held (positions bookkeeping included).
    pub fn bytes(&self) -> usize {
        match self {
            KvStore::Global { rows, .. } => rows.bytes(),
            KvStore::Window { rows, pos, .. } => rows.bytes() + pos.len() * std::mem::size_of::<usize>(),
        }
    }
}

/// Everything one sequence holds between forward calls.
#[derive(Clone, Debug)]
pub struct Cache {
    pub(crate) meta: Arc<MetaPrefix>,
    /// Next absolute position (M for a sequence with no tokens yet).
    pub(crate) pos: usize,
    /// One store per K/V group.
    pub(crate) kv: Vec<KvStore>,
    /// One per layer.
    pub(crate) states: Vec<LayerState>,
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

impl Cache {
    /// Real tokens processed so far (meta tokens excluded).
    pub fn len(&self) -> usize {
        self.pos - self.meta.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> CacheBytes {
        let mut b = CacheBytes { meta_prefix_shared: self.meta.bytes(), ..Default::default() };
        for s in &self.kv {
            match s {
                KvStore::Global { .. } => b.global_kv += s.bytes(),
                KvStore::Window { .. } => b.window_kv += s.bytes(),
            }
        }
        for s in &self.states {
            b.ssm_state += s.ssm.len() * 4;
            b.conv_state += s.conv.len() * 4;
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
        let mut s = KvStore::Window { rows: KvRows::default(), pos: Vec::new(), cap: 3 };
        let rows = |ps: std::ops::Range<usize>| KvRows {
            k: ps.clone().map(|p| p as f32).collect(),
            v: ps.map(|p| -(p as f32)).collect(),
        };
        s.append(&rows(10..12), 10, 1, 1);
        s.append(&rows(12..13), 12, 1, 1);
        s.append(&rows(13..18), 13, 1, 1);
        let KvStore::Window { rows, pos, .. } = &s else { unreachable!() };
        let mut got: Vec<(usize, f32, f32)> = (0..3).map(|i| (pos[i], rows.k[i], rows.v[i])).collect();
        got.sort_by_key(|x| x.0);
        assert_eq!(got, vec![(15, 15.0, -15.0), (16, 16.0, -16.0), (17, 17.0, -17.0)]);
    }
}
