//! Q8_0 / Q4_0 weights in panels of 16 rows for integer dot products on 16 rows at once
//! (AVX-512 VNNI's `vpdpbusd`: 16 lanes, each the sum of four unsigned-by-signed byte products).
//!
//! A panel block holds one block (32 columns) of 16 weight rows: their 16 f16 scales apart from
//! the values, and the values as unsigned bytes ordered so that a 64-byte vector carries four
//! consecutive columns of each of the 16 rows (byte `4j + i` of vector `s` is row j's column
//! `4s + i`). An input block's four bytes `4s..4s + 4`, broadcast, then multiply all 16 rows in one
//! instruction, and a block's sums land one row a lane: no horizontal sums, each scale product
//! once a block for 16 rows, each weight byte read once for every input row of a tile.
//!
//! The bytes are unsigned: Q8_0 values stored as `q + 128`, Q4_0 nibbles as stored (`q + 8`
//! in 0..15), so `Σ w·x = Σ stored·x − C·Σx` exactly in integers (C = 128 or 8), with Σx an
//! input block's sum, taken once per input row. Every row's result is then
//! `Σ_blocks fma(dot_b, d_w·d_x, acc)` in block order, the same float operations in the portable
//! kernel as in the vector one, for any number of input rows: bit-identical results on every
//! instruction set and batch size.

use crate::isa::Isa;
use crate::matmul::PANEL;
use crate::quant::{self, BlockQ4_0, BlockQ8_0, QK};
use half::f16;
use rayon::prelude::*;

/// One block of 16 Q8_0 rows (see the module docs): values `q + 128`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PanelQ8_0 {
    pub d: [f16; PANEL],
    pub qs: [u8; PANEL * QK],
}

/// One block of 16 Q4_0 rows: vector s (64 bytes) holds columns `8s..8s + 4` of each row in its
/// low nibbles and columns `8s + 4..8s + 8` in its high nibbles, byte `4j + i` for row j.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PanelQ4_0 {
    pub d: [f16; PANEL],
    pub qs: [u8; PANEL * QK / 2],
}

impl Default for PanelQ8_0 {
    fn default() -> Self {
        // Padding rows: value 0 (stored 128) with scale 0.
        PanelQ8_0 {
            d: [f16::ZERO; PANEL],
            qs: [128; PANEL * QK],
        }
    }
}

impl Default for PanelQ4_0 {
    fn default() -> Self {
        PanelQ4_0 {
            d: [f16::ZERO; PANEL],
            qs: [0x88; PANEL * QK / 2],
        }
    }
}

/// A quantized block format that has a panel layout.
pub trait Panelled: Copy + Send + Sync {
    type Panel: Copy + Default + Send + Sync;
    /// What the stored bytes exceed the values by.
    const OFFSET: i32;
    /// Puts `row`'s block as row `j` of `panel`.
    fn place(&self, j: usize, panel: &mut Self::Panel);
    /// Row `j`'s stored (unsigned) values of the panel block, in column order.
    fn stored(panel: &Self::Panel, j: usize) -> [u8; QK];
    fn scale(panel: &Self::Panel, j: usize) -> f32;
    /// Row `j`'s 32 values of the panel block, widened to f32 (value · scale).
    fn widen(panel: &Self::Panel, j: usize, out: &mut [f32]);
}

impl Panelled for BlockQ8_0 {
    type Panel = PanelQ8_0;
    const OFFSET: i32 = 128;

    fn place(&self, j: usize, p: &mut PanelQ8_0) {
        p.d[j] = f16::from_le_bytes(self.d);
        for (c, &q) in self.qs.iter().enumerate() {
            p.qs[64 * (c / 4) + 4 * j + c % 4] = (q as i32 + 128) as u8;
        }
    }

    fn stored(p: &PanelQ8_0, j: usize) -> [u8; QK] {
        std::array::from_fn(|c| p.qs[64 * (c / 4) + 4 * j + c % 4])
    }

    fn scale(p: &PanelQ8_0, j: usize) -> f32 {
        p.d[j].to_f32()
    }

    fn widen(p: &PanelQ8_0, j: usize, out: &mut [f32]) {
        let d = p.d[j].to_f32();
        for (s, o) in out.chunks_exact_mut(4).enumerate() {
            let q = &p.qs[64 * s + 4 * j..64 * s + 4 * j + 4];
            for (v, &b) in o.iter_mut().zip(q) {
                *v = (b as i32 - 128) as f32 * d;
            }
        }
    }
}

impl Panelled for BlockQ4_0 {
    type Panel = PanelQ4_0;
    const OFFSET: i32 = 8;

    fn place(&self, j: usize, p: &mut PanelQ4_0) {
        p.d[j] = f16::from_le_bytes(self.d);
        // GGML's order: value c < 16 in the low nibble of qs[c], value 16 + c in its high one.
        let nib = |c: usize| {
            if c < 16 {
                self.qs[c] & 0x0F
            } else {
                self.qs[c - 16] >> 4
            }
        };
        for s in 0..QK / 8 {
            for i in 0..4 {
                p.qs[64 * s + 4 * j + i] = nib(8 * s + i) | (nib(8 * s + 4 + i) << 4);
            }
        }
    }

    fn stored(p: &PanelQ4_0, j: usize) -> [u8; QK] {
        std::array::from_fn(|c| {
            let (s, i) = (c / 8, c % 4);
            let b = p.qs[64 * s + 4 * j + i];
            if c % 8 < 4 {
                b & 0x0F
            } else {
                b >> 4
            }
        })
    }

    fn scale(p: &PanelQ4_0, j: usize) -> f32 {
        p.d[j].to_f32()
    }

    fn widen(p: &PanelQ4_0, j: usize, out: &mut [f32]) {
        let d = p.d[j].to_f32();
        for (s, o) in out.chunks_exact_mut(8).enumerate() {
            let q = &p.qs[64 * s + 4 * j..64 * s + 4 * j + 4];
            let (lo, hi) = o.split_at_mut(4);
            for i in 0..4 {
                lo[i] = ((q[i] & 0x0F) as i32 - 8) as f32 * d;
                hi[i] = ((q[i] >> 4) as i32 - 8) as f32 * d;
            }
        }
    }
}

/// Panel blocks a `[rows, cols]` matrix takes: `rows / 16` rounded up, times blocks a row.
pub fn panels_len(rows: usize, cols: usize) -> usize {
    rows.div_ceil(PANEL) * (cols / QK)
}

/// Row-major blocks of a `[rows, cols]` matrix into panels: panel p's blocks (rows
/// `16p..16p + 16`) one after the other, block by block along the row; missing rows are zeros.
pub fn pack<B: Panelled>(blocks: &[B], rows: usize, cols: usize, out: &mut [B::Panel]) {
    let nb = cols / QK;
    assert!(cols.is_multiple_of(QK) && blocks.len() == rows * nb);
    assert_eq!(out.len(), panels_len(rows, cols));
    out.par_chunks_mut(nb.max(1))
        .enumerate()
        .for_each(|(p, panel)| {
            for (b, dst) in panel.iter_mut().enumerate() {
                *dst = B::Panel::default();
                for j in 0..PANEL.min(rows.saturating_sub(p * PANEL)) {
                    blocks[(p * PANEL + j) * nb + b].place(j, dst);
                }
            }
        });
}

/// Columns `c0..c0 + out.len()` (whole blocks) of row `r` of panel-packed weights with `nb`
/// blocks a row, widened to f32 (as [`quant::dequantize_q8_0`] and [`quant::dequantize_q4_0`]
/// widen the row-major blocks).
pub fn range_f32<B: Panelled>(
    panels: &[B::Panel],
    nb: usize,
    r: usize,
    c0: usize,
    out: &mut [f32],
) {
    assert!(
        c0.is_multiple_of(QK) && out.len().is_multiple_of(QK),
        "quantized rows are read whole blocks at a time"
    );
    let (p, j) = (r / PANEL, r % PANEL);
    for (b, o) in out.chunks_exact_mut(QK).enumerate() {
        B::widen(&panels[p * nb + c0 / QK + b], j, o);
    }
}

/// Input rows quantized to Q8_0 for the panel kernels: the blocks, their scales widened and
/// their sums.
pub(crate) struct Inputs {
    pub q: Vec<BlockQ8_0>,
    pub d: Vec<f32>,
    pub sum: Vec<i32>,
}

impl Inputs {
    fn new(x: &[f32]) -> Inputs {
        let mut q = vec![BlockQ8_0::default(); x.len() / QK];
        quant::quantize_q8_0(x, &mut q);
        let d = q.iter().map(BlockQ8_0::scale).collect();
        let sum = q
            .iter()
            .map(|b| b.qs.iter().map(|&v| v as i32).sum())
            .collect();
        Inputs { q, d, sum }
    }
}

/// Input rows of a tile.
pub const TILE_ROWS: usize = 16;

/// `out[m][j] = Σ_b fma(dot, d_w·d_x, acc)` for the `m < rows` input rows from `t0` against one
/// panel's `nb` blocks: the reference the vector kernels match bit for bit.
fn tile_portable<B: Panelled>(
    w: &[B::Panel],
    x: &Inputs,
    nb: usize,
    t0: usize,
    rows: usize,
    out: &mut [[f32; PANEL]; TILE_ROWS],
) {
    for (m, o) in out.iter_mut().enumerate().take(rows) {
        for (j, oj) in o.iter_mut().enumerate() {
            let mut acc = 0f32;
            for (b, blk) in w.iter().enumerate().take(nb) {
                let i = (t0 + m) * nb + b;
                let dot: i32 = B::stored(blk, j)
                    .iter()
                    .zip(&x.q[i].qs)
                    .map(|(&s, &v)| s as i32 * v as i32)
                    .sum::<i32>()
                    - B::OFFSET * x.sum[i];
                acc = (dot as f32).mul_add(B::scale(blk, j) * x.d[i], acc);
            }
            *oj = acc;
        }
    }
}

/// The kernels for one format: per ISA, the tile of up to [`TILE_ROWS`] input rows against one
/// panel.
pub(crate) trait PanelKernel<B: Panelled>: Copy + Send + Sync {
    fn tile(
        self,
        w: &[B::Panel],
        x: &Inputs,
        nb: usize,
        t0: usize,
        rows: usize,
        out: &mut [[f32; PANEL]; TILE_ROWS],
    );
}

#[derive(Clone, Copy)]
struct Portable;

impl<B: Panelled> PanelKernel<B> for Portable {
    fn tile(
        self,
        w: &[B::Panel],
        x: &Inputs,
        nb: usize,
        t0: usize,
        rows: usize,
        out: &mut [[f32; PANEL]; TILE_ROWS],
    ) {
        tile_portable::<B>(w, x, nb, t0, rows, out)
    }
}

struct Out(*mut f32);
unsafe impl Sync for Out {}
unsafe impl Send for Out {}

/// `y[t, n] = x[t, k] · wᵀ` for panel-packed weights `w` of `n` rows: the inputs quantized to Q8_0
/// once, panels shared out among the threads, each running tiles of up to [`TILE_ROWS`] input
/// rows over its panel (the panel stays in cache for the tiles after the first).
fn run<B: Panelled, K: PanelKernel<B>>(
    kernel: K,
    x: &[f32],
    t: usize,
    w: &[B::Panel],
    n: usize,
    k: usize,
    y: &mut [f32],
) {
    let nb = k / QK;
    let inputs = Inputs::new(&x[..t * k]);
    let panels = n.div_ceil(PANEL);
    assert!(w.len() >= panels * nb && y.len() >= t * n);
    let out = Out(y.as_mut_ptr());
    // A few tasks a thread, so a thread slowed by a neighbour does not hold the rest up.
    let per_task = panels.div_ceil(4 * rayon::current_num_threads()).max(1);
    crate::par_tasks(panels.div_ceil(per_task), |task| {
        let out = &out;
        let mut tile = [[0f32; PANEL]; TILE_ROWS];
        for p in task * per_task..((task + 1) * per_task).min(panels) {
            let cols = PANEL.min(n - p * PANEL);
            for t0 in (0..t).step_by(TILE_ROWS) {
                let rows = TILE_ROWS.min(t - t0);
                kernel.tile(&w[p * nb..(p + 1) * nb], &inputs, nb, t0, rows, &mut tile);
                for (m, row) in tile.iter().enumerate().take(rows) {
                    // SAFETY: outputs of panel p's rows belong to this task only.
                    unsafe {
                        let dst = out.0.add((t0 + m) * n + p * PANEL);
                        if cols == PANEL {
                            // A whole panel's row as one fixed-size move, not a memcpy call.
                            dst.cast::<[f32; PANEL]>().write_unaligned(*row);
                        } else {
                            std::ptr::copy_nonoverlapping(row.as_ptr(), dst, cols);
                        }
                    }
                }
            }
        }
    });
}

/// `y = x · wᵀ` for Q8_0 weights in panels, on `isa` (the VNNI kernel where it has AVX-512 and
/// VNNI, else the portable one: the same results).
pub fn matmul_q8_0(
    isa: Isa,
    x: &[f32],
    t: usize,
    w: &[PanelQ8_0],
    n: usize,
    k: usize,
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(v) = crate::avx512::Int8Dot::for_isa(isa) {
        return run::<BlockQ8_0, _>(v, x, t, w, n, k, y);
    }
    let _ = isa;
    run::<BlockQ8_0, _>(Portable, x, t, w, n, k, y)
}

/// [`matmul_q8_0`] for Q4_0 weights in panels.
pub fn matmul_q4_0(
    isa: Isa,
    x: &[f32],
    t: usize,
    w: &[PanelQ4_0],
    n: usize,
    k: usize,
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(v) = crate::avx512::Int8Dot::for_isa(isa) {
        return run::<BlockQ4_0, _>(v, x, t, w, n, k, y);
    }
    let _ = isa;
    run::<BlockQ4_0, _>(Portable, x, t, w, n, k, y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isa::available;
    use crate::testing::Rng;

    /// A panel matrix product: (isa, x, t, panels, n, k, y).
    type PanelMatmul<P> = fn(Isa, &[f32], usize, &[P], usize, usize, &mut [f32]);

    fn case<B: Panelled + Default>(
        quantize: fn(&[f32], &mut [B]),
        dequantize: fn(&[B], &mut [f32]),
        mm: PanelMatmul<B::Panel>,
    ) {
        let mut rng = Rng::new(7);
        for (n, k, t) in [
            (1, 32, 1),
            (37, 96, 3),
            (16, 64, 8),
            (53, 160, 19),
            (33, 32, 9),
        ] {
            let wf = rng.normal_vec(n * k, 0.5);
            let mut wb = vec![B::default(); n * k / QK];
            quantize(&wf, &mut wb);
            let mut p = vec![B::Panel::default(); panels_len(n, k)];
            pack(&wb, n, k, &mut p);
            // The panels hold the same values.
            let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
            for r in 0..n {
                dequantize(&wb[r * k / QK..(r + 1) * k / QK], &mut a);
                range_f32::<B>(&p, k / QK, r, 0, &mut b);
                assert_eq!(a, b, "row {r} of [{n}, {k}]");
            }
            let x = rng.normal_vec(t * k, 1.0);
            // Reference: the dequantized weights times the Q8_0-rounded inputs, in f64.
            let inputs = Inputs::new(&x);
            let mut want = vec![0f64; t * n];
            for ti in 0..t {
                for r in 0..n {
                    dequantize(&wb[r * k / QK..(r + 1) * k / QK], &mut a);
                    want[ti * n + r] = (0..k)
                        .map(|c| {
                            let blk = &inputs.q[ti * k / QK + c / QK];
                            a[c] as f64 * blk.qs[c % QK] as f64 * blk.scale() as f64
                        })
                        .sum();
                }
            }
            let mut first: Option<Vec<f32>> = None;
            for isa in available() {
                let mut y = vec![f32::NAN; t * n];
                mm(isa, &x, t, &p, n, k, &mut y);
                for (i, (&g, &w)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{isa:?} [{n}, {k}] t={t} output {i}: {g} vs {w}"
                    );
                }
                // Every ISA, and every row alone, gives the same bits.
                match &first {
                    None => first = Some(y.clone()),
                    Some(f) => assert_eq!(f, &y, "{isa:?} differs from the first ISA"),
                }
                for ti in 0..t {
                    let mut y1 = vec![0f32; n];
                    mm(isa, &x[ti * k..(ti + 1) * k], 1, &p, n, k, &mut y1);
                    assert_eq!(y1, y[ti * n..(ti + 1) * n], "{isa:?} row {ti} alone");
                }
            }
        }
    }

    #[test]
    fn q8_0_panels_match_reference_on_every_isa() {
        case::<BlockQ8_0>(quant::quantize_q8_0, quant::dequantize_q8_0, matmul_q8_0);
    }

    #[test]
    fn q4_0_panels_match_reference_on_every_isa() {
        case::<BlockQ4_0>(quant::quantize_q4_0, quant::dequantize_q4_0, matmul_q4_0);
    }
}
