//! `y = x · Wᵀ` with f32 activations and weights in their stored precision.
//!
//! This is where nearly all the time of a forward pass goes. Work is split over output rows
//! (rows of `W`) on rayon's persistent pool; each weight row is widened to f32 once and used for
//! every input row, so the weights are streamed from memory once per call.

use crate::isa::{isa, Isa, Level};
use crate::qpanel::{self, PanelQ4_0, PanelQ8_0};
use crate::quant::{self, BlockQ4_0, BlockQ8_0, QK};
#[cfg(target_arch = "x86_64")]
use crate::x86;
use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

/// The elements of a weight matrix, in the precision they were stored in.
#[derive(Clone, Copy, Debug)]
pub enum WeightData<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
    /// GGML Q8_0 blocks of 32 along each row.
    Q8_0(&'a [BlockQ8_0]),
    /// GGML Q4_0 blocks of 32 along each row.
    Q4_0(&'a [BlockQ4_0]),
    /// bf16 rearranged into panels of [`PANEL`] rows (made by [`pack_bf16_panels`]): panel `p`
    /// holds rows `16p..16p + 16` column by column, the 16 values of a column side by side, so a
    /// matrix product reads one contiguous stream and each 32-byte load carries a column of 16
    /// rows. Within a column, row `j < 8` sits at `2j` and row `8 + j` at `2j + 1`: widening to
    /// f32 is then a shift (low halves) and a mask (high halves), no shuffles. The last panel is
    /// padded with zero rows, so the data holds `rows.next_multiple_of(16) · cols` values.
    BF16Panels(&'a [bf16]),
    /// bf16 in panels of [`PANEL`] rows for products over pairs of columns (made by
    /// [`pack_bf16_pairs`], where the CPU multiplies a pair of bf16 by a pair: AVX-512 BF16's
    /// `vdpbf16ps`, AMX-BF16's tiles): panel `p` is [`pair_words`]`(cols)` rows of 16 words,
    /// word `16q + j` holding row `16p + j`'s columns `2q` (low half) and `2q + 1` (high half).
    /// Columns past the last and the last panel's missing rows are zero; [`pairs_len`] words.
    BF16Pairs(&'a [u32]),
    /// Q8_0 in panels of 16 rows for integer products on 16 rows at once (see
    /// [`crate::qpanel`]); rows padded to a multiple of 16 like [`WeightData::BF16Panels`].
    Q8_0Panels(&'a [PanelQ8_0]),
    /// Q4_0 in panels of 16 rows (see [`crate::qpanel`]).
    Q4_0Panels(&'a [PanelQ4_0]),
}

/// Rows in a panel of [`WeightData::BF16Panels`].
pub const PANEL: usize = 16;

#[cfg(target_arch = "x86_64")]
const _: () = assert!(x86::NR == PANEL);

/// Whether bf16 matrices are worth packing on this machine (into pairs where [`pairs_pay`], else
/// panels): the AVX2 products read panels faster than row-major rows at every batch size (see
/// `panels_avx2`).
pub fn panels_pay() -> bool {
    isa().has_avx2()
}

/// Whether bf16 matrices are worth packing into pairs ([`WeightData::BF16Pairs`]) rather than
/// panels on this machine: where products of every size run on bf16 dot products.
pub fn pairs_pay() -> bool {
    isa().level() >= Level::Avx512Bf16
}

/// Pair-words (two columns each) a row of [`WeightData::BF16Pairs`] takes: whole AMX tile rows
/// of 16 words (32 columns), the padding zero.
pub fn pair_words(cols: usize) -> usize {
    cols.div_ceil(2).next_multiple_of(PAIR_ALIGN)
}

/// Words of a row of [`WeightData::BF16Pairs`] are padded to a multiple of this.
pub const PAIR_ALIGN: usize = 16;

/// Words a `[rows, cols]` matrix takes in pairs: whole panels, the last one padded.
pub fn pairs_len(rows: usize, cols: usize) -> usize {
    rows.next_multiple_of(PANEL) * pair_words(cols)
}

/// A row-major bf16 matrix `[rows, cols]` rearranged into pairs (see
/// [`WeightData::BF16Pairs`]) in `out` ([`pairs_len`] words): the same values, in the order the
/// bf16 dot products read them.
pub fn pack_bf16_pairs(w: &[bf16], rows: usize, cols: usize, out: &mut [u32]) {
    assert_eq!(
        w.len(),
        rows * cols,
        "pack_bf16_pairs: data does not match [{rows}, {cols}]"
    );
    assert_eq!(
        out.len(),
        pairs_len(rows, cols),
        "pack_bf16_pairs: output is not whole panels"
    );
    let pw = pair_words(cols);
    if pw == 0 {
        return;
    }
    out.par_chunks_mut(PANEL * pw).enumerate().for_each_init(
        || vec![bf16::ZERO; PANEL * cols],
        |panel, (p, dst)| {
            let (r0, nr) = (p * PANEL, PANEL.min(rows - p * PANEL));
            let src = &w[r0 * cols..(r0 + nr) * cols];
            #[cfg(target_arch = "x86_64")]
            if let Some(dot) = crate::avx512::Bf16Dot::detect() {
                // Through the panel layout, whose columns one permutation turns into pairs.
                if nr < PANEL {
                    panel.fill(bf16::ZERO);
                }
                pack_bf16_panels(src, nr, cols, panel);
                dot.pair_panel(panel, cols, dst);
                return;
            }
            let _ = panel;
            dst.fill(0);
            for (j, row) in src.chunks_exact(cols).enumerate() {
                for (c, v) in row.iter().enumerate() {
                    dst[16 * (c / 2) + j] |= (v.to_bits() as u32) << (16 * (c % 2));
                }
            }
        },
    );
}

/// Where element `(r, c)` of a `cols`-column matrix lives in its panel layout.
#[inline]
fn panel_index(r: usize, c: usize, cols: usize) -> usize {
    let j = r % PANEL;
    let slot = if j < PANEL / 2 {
        2 * j
    } else {
        2 * (j - PANEL / 2) + 1
    };
    ((r / PANEL) * cols + c) * PANEL + slot
}

/// Elements a `[rows, cols]` matrix takes in panels: whole panels, the last one padded.
pub fn panels_len(rows: usize, cols: usize) -> usize {
    rows.next_multiple_of(PANEL) * cols
}

/// A row-major bf16 matrix `[rows, cols]` rearranged into panels (see
/// [`WeightData::BF16Panels`]) in `out` ([`panels_len`] long, zeroed: padding rows are not
/// written): the same values, in the order the AVX2 matrix products read them.
pub fn pack_bf16_panels(w: &[bf16], rows: usize, cols: usize, out: &mut [bf16]) {
    assert_eq!(
        w.len(),
        rows * cols,
        "pack_bf16_panels: data does not match [{rows}, {cols}]"
    );
    assert_eq!(
        out.len(),
        panels_len(rows, cols),
        "pack_bf16_panels: output is not whole panels"
    );
    if cols == 0 {
        return;
    }
    out.par_chunks_mut(PANEL * cols)
        .enumerate()
        .for_each(|(p, panel)| {
            let src = &w[p * PANEL * cols..];
            let mut done = 0;
            #[cfg(target_arch = "x86_64")]
            if isa().has_avx2() && src.len() >= PANEL * cols {
                // SAFETY: Avx2 was detected; a whole panel of rows is there.
                done = unsafe { x86::pack_panel_pairs(src, cols, panel) };
            }
            for r in 0..PANEL.min(rows - p * PANEL) {
                let at = panel_index(r, 0, cols);
                for c in done..cols {
                    panel[at + c * PANEL] = src[r * cols + c];
                }
            }
        });
}

impl WeightData<'_> {
    pub fn len(&self) -> usize {
        match self {
            WeightData::F32(d) => d.len(),
            WeightData::BF16(d) => d.len(),
            WeightData::F16(d) => d.len(),
            WeightData::Q8_0(b) => b.len() * QK,
            WeightData::Q4_0(b) => b.len() * QK,
            WeightData::BF16Panels(d) => d.len(),
            WeightData::BF16Pairs(d) => 2 * d.len(),
            WeightData::Q8_0Panels(p) => p.len() * PANEL * QK,
            WeightData::Q4_0Panels(p) => p.len() * PANEL * QK,
        }
    }

    /// Whether the rows are stored in panels of [`PANEL`] (padded to a multiple of it).
    pub fn is_panels(&self) -> bool {
        matches!(
            self,
            WeightData::BF16Panels(_)
                | WeightData::BF16Pairs(_)
                | WeightData::Q8_0Panels(_)
                | WeightData::Q4_0Panels(_)
        )
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Widens elements `start..start + out.len()` of row-major data to f32 (panels are read by
    /// [`Mat::row_f32`], which knows the row length).
    pub fn to_f32(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            WeightData::F32(d) => out.copy_from_slice(&d[start..end]),
            WeightData::BF16(d) => {
                // bf16 is the top half of an f32: widening is a shift.
                for (o, v) in out.iter_mut().zip(&d[start..end]) {
                    *o = f32::from_bits((v.to_bits() as u32) << 16);
                }
            }
            WeightData::F16(d) => d[start..end].convert_to_f32_slice(out),
            WeightData::Q8_0(b) => {
                assert!(
                    start.is_multiple_of(QK) && out.len().is_multiple_of(QK),
                    "quantized rows are read whole blocks at a time"
                );
                quant::dequantize_q8_0(&b[start / QK..end / QK], out)
            }
            WeightData::Q4_0(b) => {
                assert!(
                    start.is_multiple_of(QK) && out.len().is_multiple_of(QK),
                    "quantized rows are read whole blocks at a time"
                );
                quant::dequantize_q4_0(&b[start / QK..end / QK], out)
            }
            WeightData::BF16Panels(_)
            | WeightData::BF16Pairs(_)
            | WeightData::Q8_0Panels(_)
            | WeightData::Q4_0Panels(_) => {
                panic!("panel-packed weights are read by rows (Mat::row_f32)")
            }
        }
    }
}

/// A row-major matrix `[rows, cols]` view.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    pub data: WeightData<'a>,
    pub rows: usize,
    pub cols: usize,
}

impl<'a> Mat<'a> {
    pub fn new(data: WeightData<'a>, rows: usize, cols: usize) -> Self {
        let stored = match data {
            WeightData::BF16Pairs(_) => 2 * pairs_len(rows, cols),
            d if d.is_panels() => rows.next_multiple_of(PANEL) * cols,
            _ => rows * cols,
        };
        assert_eq!(
            data.len(),
            stored,
            "matrix data does not match [{rows}, {cols}]"
        );
        Mat { data, rows, cols }
    }

    /// Rows `start..start + n` as a matrix of their own (a view, no copy). Panels are cut whole:
    /// `start` must then be a multiple of [`PANEL`].
    pub fn rows(&self, start: usize, n: usize) -> Mat<'a> {
        assert!(start + n <= self.rows);
        let (a, b) = (start * self.cols, (start + n) * self.cols);
        assert!(
            !self.data.is_panels() || start.is_multiple_of(PANEL),
            "a view of panel-packed rows starts on a panel"
        );
        // Panel blocks of the view, for the quantized panels.
        let nb = self.cols / QK;
        let (pa, pb) = (start / PANEL * nb, (start + n).div_ceil(PANEL) * nb);
        let data = match self.data {
            WeightData::BF16Panels(d) => {
                WeightData::BF16Panels(&d[a..(start + n).next_multiple_of(PANEL) * self.cols])
            }
            WeightData::BF16Pairs(d) => {
                let pw = pair_words(self.cols);
                WeightData::BF16Pairs(&d[start * pw..(start + n).next_multiple_of(PANEL) * pw])
            }
            WeightData::Q8_0Panels(p) => WeightData::Q8_0Panels(&p[pa..pb]),
            WeightData::Q4_0Panels(p) => WeightData::Q4_0Panels(&p[pa..pb]),
            WeightData::F32(d) => WeightData::F32(&d[a..b]),
            WeightData::BF16(d) => WeightData::BF16(&d[a..b]),
            WeightData::F16(d) => WeightData::F16(&d[a..b]),
            WeightData::Q8_0(d) => WeightData::Q8_0(&d[a / QK..b / QK]),
            WeightData::Q4_0(d) => WeightData::Q4_0(&d[a / QK..b / QK]),
        };
        Mat {
            data,
            rows: n,
            cols: self.cols,
        }
    }

    /// Row `r` widened to f32.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        assert!(out.len() == self.cols);
        self.range_f32(r, 0, out)
    }

    /// Columns `c0..c0 + out.len()` of row `r` widened to f32 (quantized rows: whole blocks).
    pub fn range_f32(&self, r: usize, c0: usize, out: &mut [f32]) {
        assert!(c0 + out.len() <= self.cols && r < self.rows);
        let nb = self.cols / QK;
        match self.data {
            WeightData::BF16Panels(d) => {
                let at = panel_index(r, c0, self.cols);
                for (c, o) in out.iter_mut().enumerate() {
                    *o = d[at + c * PANEL].to_f32();
                }
            }
            WeightData::BF16Pairs(d) => {
                let at = (r / PANEL * pair_words(self.cols)) * PANEL + r % PANEL;
                for (i, o) in out.iter_mut().enumerate() {
                    let c = c0 + i;
                    let half = d[at + c / 2 * PANEL] >> (16 * (c % 2));
                    *o = f32::from_bits(half << 16);
                }
            }
            WeightData::Q8_0Panels(p) => qpanel::range_f32::<BlockQ8_0>(p, nb, r, c0, out),
            WeightData::Q4_0Panels(p) => qpanel::range_f32::<BlockQ4_0>(p, nb, r, c0, out),
            data => data.to_f32(r * self.cols + c0, out),
        }
    }
}

/// Dot product with 16 independent accumulators so the compiler can vectorise it without
/// reassociating a single sum.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Σ a[i]·b[i] on the chosen instruction set.
#[inline]
pub fn dot_with(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an ISA with AVX2 (`has_avx2`) is only ever chosen after run-time detection.
        i if i.has_avx2() => unsafe { x86::dot_f32(a, b) },
        _ => dot(a, b),
    }
}

/// Σ w[start + i]·x[i] with the weights widened on the fly from their stored precision.
#[inline]
pub fn dot_weights(isa: Isa, w: WeightData, start: usize, x: &[f32]) -> f32 {
    let end = start + x.len();
    match (isa, w) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY (all three): an ISA with AVX2 (`has_avx2`) is only ever chosen after run-time detection.
        (i, WeightData::F32(d)) if i.has_avx2() => unsafe { x86::dot_f32(&d[start..end], x) },
        #[cfg(target_arch = "x86_64")]
        (i, WeightData::BF16(d)) if i.has_avx2() => unsafe { x86::dot_bf16(&d[start..end], x) },
        #[cfg(target_arch = "x86_64")]
        (i, WeightData::F16(d)) if i.has_avx2() => unsafe { x86::dot_f16(&d[start..end], x) },
        (_, WeightData::F32(d)) => dot(&d[start..end], x),
        _ => {
            // Widen a stack-sized chunk at a time.
            let mut buf = [0f32; 64];
            let mut s = 0.0;
            for (ci, xc) in x.chunks(64).enumerate() {
                let b = &mut buf[..xc.len()];
                w.to_f32(start + ci * 64, b);
                s += dot(b, xc);
            }
            s
        }
    }
}

/// One f32 weight row against four input rows.
#[inline]
fn dot_x4(isa: Isa, w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an ISA with AVX2 (`has_avx2`) is only ever chosen after run-time detection.
        i if i.has_avx2() => unsafe { x86::dot_f32_x4(w, x) },
        _ => x.map(|r| dot(w, r)),
    }
}

/// Output rows handled by one task: small enough to balance two to many cores, large enough
/// that scheduling costs nothing next to the arithmetic: at least 32 rows and 64 Ki weights, so
/// a narrow matrix (dt_proj's rows are 100 long) is a few tasks, not a hundred tiny ones.
fn rows_per_task(k: usize) -> usize {
    (65536 / k.max(1)).max(32).next_multiple_of(2)
}

/// Pointer to the output that tasks write disjoint elements of.
struct OutPtr(*mut f32);
unsafe impl Sync for OutPtr {}
unsafe impl Send for OutPtr {}

/// A cache line of floats: a `Vec` of these is a 64-byte aligned buffer.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// `x` copied to a 64-byte aligned buffer, each of its `t` rows of `k` starting a cache line,
/// and the row stride. Vector loads from the tiles then never straddle two lines (a split load
/// costs two), which they would from a heap buffer aligned to 16 bytes.
fn aligned_rows(x: &[f32], t: usize, k: usize) -> (Vec<Line>, usize) {
    let stride = k.next_multiple_of(16);
    let mut buf = vec![Line([0.0; 16]); t * stride / 16];
    // SAFETY: `Line` is 16 plain floats with no padding.
    let flat = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut f32, t * stride) };
    for (dst, src) in flat.chunks_exact_mut(stride).zip(x.chunks_exact(k)) {
        dst[..k].copy_from_slice(src);
    }
    (buf, stride)
}

/// Rows from which a product with quantized weights runs on bf16 dot products where the CPU
/// has them ([`Level::Avx512Bf16`], [`Level::Amx`]), its inputs and widened weights rounded to
/// bf16: prefill, not decode or batched decode (whose integer dots stay the same batched or
/// alone). Products with bf16 weights run on them at every size.
pub const BF16_DOT_FROM_ROWS: usize = 64;

/// Whether [`matmul_with`] rounds the inputs (and widened quantized weights) of a `t`-row
/// product with `w` to bf16: with bf16 weights, whatever their layout, at every size (the
/// official bf16 model's activations are bf16), where the CPU multiplies bf16 pairs.
pub fn rounds_inputs(isa: Isa, w: &WeightData, t: usize) -> bool {
    isa.level() >= Level::Avx512Bf16
        && match w {
            WeightData::BF16(_) | WeightData::BF16Panels(_) | WeightData::BF16Pairs(_) => true,
            WeightData::Q8_0(_)
            | WeightData::Q4_0(_)
            | WeightData::Q8_0Panels(_)
            | WeightData::Q4_0Panels(_) => t >= BF16_DOT_FROM_ROWS,
            _ => false,
        }
}

/// Whether Q8_0/Q4_0 matrices are worth packing into panels ([`crate::qpanel`]) on this
/// machine: where its integer kernel runs (AVX-512 VNNI). Products of up to
/// [`QUANT_DOT_MAX_ROWS`] rows (decode, batched decode) run on int8 inputs there, as with
/// row-major blocks; prompts keep f32 or bf16 inputs (int8 ones measured faster, 106 against 89
/// tok/s for a 512-token prompt on a Zen 4, but doubled the Q8_0 fixture's KL divergence).
pub fn quant_panels_pay() -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::avx512::Int8Dot::for_isa(isa()).is_some();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `y[t, n] = Σ_k x[t, k] · w[n, k]` for `t` input rows; `y` is `[t, w.rows]`.
pub fn matmul(x: &[f32], w: Mat, y: &mut [f32]) {
    matmul_with(isa(), x, w, y)
}

/// [`matmul`] on a given instruction set (one of [`crate::isa::available`]).
pub fn matmul_with(isa: Isa, x: &[f32], w: Mat, y: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(
        x.len() % k.max(1),
        0,
        "matmul: input width does not match weight columns"
    );
    let t = x.len().checked_div(k).unwrap_or(0);
    assert_eq!(y.len(), t * n, "matmul: output is not [{t}, {n}]");
    match w.data {
        WeightData::Q8_0Panels(p) if t <= QUANT_DOT_MAX_ROWS => {
            return qpanel::matmul_q8_0(isa, x, t, p, n, k, y)
        }
        WeightData::Q4_0Panels(p) if t <= QUANT_DOT_MAX_ROWS => {
            return qpanel::matmul_q4_0(isa, x, t, p, n, k, y)
        }
        _ => {}
    }
    if t <= QUANT_DOT_MAX_ROWS && matches!(w.data, WeightData::Q8_0(_) | WeightData::Q4_0(_)) {
        matvec_quant(isa, x, t, w, y);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if rounds_inputs(isa, &w.data, t) && pairs_gemm(isa, x, t, w, y, crate::avx512::Epilogue::Store)
    {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let (true, WeightData::BF16Panels(d)) = (isa.has_avx2(), w.data) {
        panels_avx2(x, t, w, d, y);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if t >= 4 && isa.has_avx2() && !matches!(w.data, WeightData::BF16Panels(_)) {
        if t <= SMALL_BATCH_ROWS && !matches!(w.data, WeightData::BF16Pairs(_)) {
            rows_avx2(x, t, w, y);
        } else {
            gemm_avx2(x, t, w, y);
        }
        return;
    }
    let out = OutPtr(y.as_mut_ptr());
    let per_task = rows_per_task(k);
    let tasks = n.div_ceil(per_task);
    let xr = |ti: usize| &x[ti * k..(ti + 1) * k];
    (0..tasks).into_par_iter().for_each_init(
        || vec![0f32; k],
        |wrow, task| {
            let out = &out;
            // SAFETY: element (ti, r) is written by exactly one task: r belongs to this task.
            let put = |ti: usize, r: usize, v: f32| unsafe { *out.0.add(ti * n + r) = v };
            for r in task * per_task..((task + 1) * per_task).min(n) {
                if t < 4 && !w.data.is_panels() {
                    // Decode: widen as we go, each weight read once.
                    for ti in 0..t {
                        put(ti, r, dot_weights(isa, w.data, r * k, xr(ti)));
                    }
                    continue;
                }
                // Several rows: widen the weight row once, use it for four input rows at a time.
                w.row_f32(r, wrow);
                let mut ti = 0;
                while ti + 4 <= t {
                    let v = dot_x4(isa, wrow, [xr(ti), xr(ti + 1), xr(ti + 2), xr(ti + 3)]);
                    for (j, vj) in v.into_iter().enumerate() {
                        put(ti + j, r, vj);
                    }
                    ti += 4;
                }
                for ti in ti..t {
                    put(ti, r, dot_with(isa, wrow, xr(ti)));
                }
            }
        },
    );
}

/// The product on the bf16 pair kernels, if this CPU has them: AMX at every size, so that a
/// row's sums do not depend on the rows beside it, else AVX-512 BF16. Whether it ran.
#[cfg(target_arch = "x86_64")]
fn pairs_gemm(
    isa: Isa,
    x: &[f32],
    t: usize,
    w: Mat,
    y: &mut [f32],
    epi: crate::avx512::Epilogue,
) -> bool {
    if isa.level() == Level::Amx {
        if let Some(amx) = crate::amx::Amx::detect() {
            amx.gemm(x, t, w, y, epi);
            return true;
        }
    }
    if let Some(dot) = crate::avx512::Bf16Dot::detect() {
        dot.gemm(x, t, w, y, epi);
        return true;
    }
    false
}

/// `silu(gate) ⊙ up` of one task's 32 sums of [`matmul_glu`] (16 gate rows, then the same 16
/// up rows) into the first `cols`. Over the real columns only: a short last panel's tail takes
/// the scalar path, as the end of a whole row does in the unfused product.
pub(crate) fn glu_sums(pair: &mut [f32], cols: usize) {
    let (g, u) = pair.split_at_mut(PANEL);
    crate::act::silu_mul(&mut g[..cols], &u[..cols]);
}

/// A gated MLP's gate and up matrices, each packed in panels of 16 rows (bf16 pairs,
/// [`pack_bf16_pairs`], or Q8_0/Q4_0 panels, [`crate::qpanel::pack`]; `panel` elements a
/// panel), as one matrix of their panels in turn, gate's first: the weights [`matmul_glu`]
/// takes, so that a task's 32 outputs are 16 gate rows and the same 16 up rows.
pub fn pack_glu<T: Copy + Send + Sync>(gate: &[T], up: &[T], panel: usize, out: &mut [T]) {
    assert!(gate.len() == up.len() && out.len() == 2 * gate.len());
    if panel == 0 {
        return;
    }
    out.par_chunks_mut(2 * panel)
        .zip(gate.par_chunks(panel).zip(up.par_chunks(panel)))
        .for_each(|(o, (g, u))| {
            o[..panel].copy_from_slice(g);
            o[panel..].copy_from_slice(u);
        });
}

/// `y[t, f] = silu(x · gateᵀ) ⊙ (x · upᵀ)` with gate and up laid out by [`pack_glu`]
/// (`w`: `[2 · f rounded up to panels, k]`): one product, the activation applied to each
/// task's sums where the bf16 pair kernels run (no `[t, f]` up product written and read
/// back); elsewhere the whole product (in `scratch`, which keeps its storage for the next
/// call), then the activation. The same outputs either way.
pub fn matmul_glu(x: &[f32], w: Mat, f: usize, y: &mut [f32], scratch: &mut Vec<f32>) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(
        n,
        2 * f.next_multiple_of(PANEL),
        "matmul_glu: gate and up panels"
    );
    assert!(
        matches!(
            w.data,
            WeightData::BF16Pairs(_) | WeightData::Q8_0Panels(_) | WeightData::Q4_0Panels(_)
        ),
        "matmul_glu: weights in panels"
    );
    let t = x.len().checked_div(k).unwrap_or(0);
    assert_eq!(y.len(), t * f, "matmul_glu: output is not [{t}, {f}]");
    #[cfg(target_arch = "x86_64")]
    if rounds_inputs(isa(), &w.data, t)
        && pairs_gemm(isa(), x, t, w, y, crate::avx512::Epilogue::Glu(f))
    {
        return;
    }
    scratch.resize(t * n, 0.0);
    let both = &mut scratch[..t * n];
    matmul(x, w, both);
    for (row, out) in both.chunks_exact_mut(n).zip(y.chunks_exact_mut(f)) {
        for (j, pair) in row.chunks_exact_mut(2 * PANEL).enumerate() {
            let cols = (f - PANEL * j).min(PANEL);
            glu_sums(pair, cols);
            out[PANEL * j..PANEL * j + cols].copy_from_slice(&pair[..cols]);
        }
    }
}

/// Up to this many input rows (decode, batched decode) use integer dots on quantized weights;
/// more (prefill) dequantize the weights into the f32 GEMM.
pub const QUANT_DOT_MAX_ROWS: usize = 16;

/// Few rows against quantized weights: the input rows are quantized to Q8_0 once, then every
/// weight row is an integer dot product per block. Several input rows go in register tiles of
/// two weight rows by up to four inputs, so each weight block is unpacked once per tile.
fn matvec_quant(isa: Isa, x: &[f32], t: usize, w: Mat, y: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(k % QK, 0, "quantized matrices have rows of whole blocks");
    let nb = k / QK;
    let mut xq = vec![BlockQ8_0::default(); t * nb];
    quant::quantize_q8_0(x, &mut xq);
    let xd: Vec<f32> = xq.iter().map(BlockQ8_0::scale).collect();
    // Block sums of the inputs, for the Q4_0 kernel.
    let xs: Vec<i32> = match w.data {
        WeightData::Q4_0(_) => xq
            .iter()
            .map(|b| b.qs.iter().map(|&v| v as i32).sum())
            .collect(),
        _ => Vec::new(),
    };
    let out = OutPtr(y.as_mut_ptr());
    let per_task = rows_per_task(k);
    // The byte products in one VNNI instruction where the CPU has it (the same integers).
    #[cfg(target_arch = "x86_64")]
    let vnni = isa.level() >= Level::Avx512Bf16 && x86::Vnni::detect().is_some();
    (0..n.div_ceil(per_task)).into_par_iter().for_each(|task| {
        let out = &out;
        // SAFETY (both writers): rows of this task belong to it only.
        let put = |ti: usize, r: usize, v: f32| unsafe { *out.0.add(ti * n + r) = v };
        let end = ((task + 1) * per_task).min(n);
        #[cfg(target_arch = "x86_64")]
        if isa.has_avx2() && t > 1 {
            walk_tiles(
                task * per_task..end,
                t,
                (4, 4),
                &put,
                |r, pair, t0, m, res| {
                    macro_rules! tile {
                        ($f:ident, $b:expr, $r:literal, $m:literal) => {{
                            let mut o = [[0f32; $m]; $r];
                            // SAFETY: Avx2 (with FMA and F16C) was detected, and VNNI for the _vnni
                            // kernels; every row has nb blocks.
                            unsafe {
                                x86::$f::<$r, $m>(
                                    std::array::from_fn(|j| &$b[(r + j) * nb..(r + j + 1) * nb]),
                                    std::array::from_fn(|i| &xq[(t0 + i) * nb..(t0 + i + 1) * nb]),
                                    std::array::from_fn(|i| &xd[(t0 + i) * nb..(t0 + i + 1) * nb]),
                                    &mut o,
                                )
                            };
                            for j in 0..$r {
                                res[j][..$m].copy_from_slice(&o[j]);
                            }
                        }};
                    }
                    macro_rules! call {
                        ($f:ident, $b:expr) => {
                            match (pair, m) {
                                (true, 1) => tile!($f, $b, 2, 1),
                                (true, 2) => tile!($f, $b, 2, 2),
                                (true, 3) => tile!($f, $b, 2, 3),
                                (true, _) => tile!($f, $b, 2, 4),
                                (false, 1) => tile!($f, $b, 1, 1),
                                (false, 2) => tile!($f, $b, 1, 2),
                                (false, 3) => tile!($f, $b, 1, 3),
                                (false, _) => tile!($f, $b, 1, 4),
                            }
                        };
                    }
                    match (w.data, vnni) {
                        (WeightData::Q8_0(b), true) => call!(dot_tile_q8_0_vnni, b),
                        (WeightData::Q8_0(b), false) => call!(dot_tile_q8_0, b),
                        (WeightData::Q4_0(b), true) => call!(dot_tile_q4_0_vnni, b),
                        (WeightData::Q4_0(b), false) => call!(dot_tile_q4_0, b),
                        _ => unreachable!("only called for quantized weights"),
                    }
                },
            );
            return;
        }
        for r in task * per_task..end {
            for ti in 0..t {
                let xb = &xq[ti * nb..(ti + 1) * nb];
                let v = match (isa, w.data) {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY (both): VNNI, with AVX2, FMA and F16C, was detected.
                    (_, WeightData::Q8_0(b)) if vnni => unsafe {
                        x86::dot_q8_0_vnni(
                            &b[r * nb..(r + 1) * nb],
                            xb,
                            &xd[ti * nb..(ti + 1) * nb],
                        )
                    },
                    #[cfg(target_arch = "x86_64")]
                    (_, WeightData::Q4_0(b)) if vnni => unsafe {
                        let xr = ti * nb..(ti + 1) * nb;
                        x86::dot_q4_0_vnni(&b[r * nb..(r + 1) * nb], xb, &xd[xr.clone()], &xs[xr])
                    },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: an ISA with AVX2 (`has_avx2`) is only ever chosen after run-time detection.
                    (i, WeightData::Q8_0(b)) if i.has_avx2() => unsafe {
                        x86::dot_q8_0(&b[r * nb..(r + 1) * nb], xb, &xd[ti * nb..(ti + 1) * nb])
                    },
                    #[cfg(target_arch = "x86_64")]
                    (i, WeightData::Q4_0(b)) if i.has_avx2() => unsafe {
                        let xr = ti * nb..(ti + 1) * nb;
                        x86::dot_q4_0(&b[r * nb..(r + 1) * nb], xb, &xd[xr.clone()], &xs[xr])
                    },
                    (_, WeightData::Q8_0(b)) => quant::dot_q8_0(&b[r * nb..(r + 1) * nb], xb),
                    (_, WeightData::Q4_0(b)) => quant::dot_q4_0(&b[r * nb..(r + 1) * nb], xb),
                    _ => unreachable!("only called for quantized weights"),
                };
                put(ti, r, v);
            }
        }
    });
}

/// Up to this many input rows (batched decode) go through [`rows_avx2`]: packing panels for the
/// GEMM would cost more than it saves.
const SMALL_BATCH_ROWS: usize = 16;

/// A few input rows on AVX2, without packing: weight rows are taken two at a time, widened in
/// registers, against up to 6 input rows at a time (a 2×6 tile of accumulators), so every input
/// load feeds two FMAs; the weights are streamed from memory once.
#[cfg(target_arch = "x86_64")]
fn rows_avx2(x: &[f32], t: usize, w: Mat, y: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    let (xa, stride) = aligned_rows(x, t, k);
    // SAFETY: as in `aligned_rows`.
    let x = unsafe { std::slice::from_raw_parts(xa.as_ptr() as *const f32, t * stride) };
    let out = OutPtr(y.as_mut_ptr());
    let per_task = rows_per_task(k);
    (0..n.div_ceil(per_task)).into_par_iter().for_each(|task| {
        let out = &out;
        let end = ((task + 1) * per_task).min(n);
        // SAFETY: rows of this task belong to it only.
        let put = |ti: usize, r: usize, v: f32| unsafe { *out.0.add(ti * n + r) = v };
        walk_tiles(
            task * per_task..end,
            t,
            (6, 8),
            &put,
            |r, pair, t0, m, res| {
                let xp = |i: usize| x[(t0 + i) * stride..].as_ptr();
                // SAFETY: Avx2 was detected; each pointer has k readable floats, like the rows.
                unsafe {
                    macro_rules! tile {
                        ($f:ident, $d:expr, $r:literal, $m:literal) => {{
                            let mut o = [[0f32; $m]; $r];
                            x86::$f::<$r, $m>(
                                std::array::from_fn(|j| &$d[(r + j) * k..(r + j + 1) * k]),
                                &std::array::from_fn(xp),
                                &mut o,
                                t0 == 0,
                            );
                            for j in 0..$r {
                                res[j][..$m].copy_from_slice(&o[j]);
                            }
                        }};
                    }
                    macro_rules! call {
                        ($f:ident, $d:expr) => {
                            match (pair, m) {
                                (true, 1) => tile!($f, $d, 2, 1),
                                (true, 2) => tile!($f, $d, 2, 2),
                                (true, 3) => tile!($f, $d, 2, 3),
                                (true, 4) => tile!($f, $d, 2, 4),
                                (true, 5) => tile!($f, $d, 2, 5),
                                (true, _) => tile!($f, $d, 2, 6),
                                (false, 1) => tile!($f, $d, 1, 1),
                                (false, 2) => tile!($f, $d, 1, 2),
                                (false, 3) => tile!($f, $d, 1, 3),
                                (false, 4) => tile!($f, $d, 1, 4),
                                (false, 5) => tile!($f, $d, 1, 5),
                                (false, 6) => tile!($f, $d, 1, 6),
                                (false, 7) => tile!($f, $d, 1, 7),
                                (false, _) => tile!($f, $d, 1, 8),
                            }
                        };
                    }
                    match w.data {
                        WeightData::F32(d) => call!(dot_tile_f32, d),
                        WeightData::BF16(d) => call!(dot_tile_bf16, d),
                        WeightData::F16(d) => call!(dot_tile_f16, d),
                        WeightData::Q8_0(_) | WeightData::Q4_0(_) => {
                            unreachable!("quantized rows take matvec_quant")
                        }
                        WeightData::BF16Panels(_) => unreachable!("panels take panels_avx2"),
                        WeightData::BF16Pairs(_) => unreachable!("pairs take gemm_avx2"),
                        WeightData::Q8_0Panels(_) | WeightData::Q4_0Panels(_) => {
                            unreachable!("quantized panels take qpanel")
                        }
                    }
                }
            },
        );
    });
}

/// Walks weight rows `rows` two at a time (the last one alone when odd) against groups of input
/// rows (`groups`: the group size for a pair, for a lone row). `tile(r, pair, t0, m, res)` fills
/// `res[j][i]`, the dot product of weight row r + j with input row t0 + i; `put(ti, r, v)` stores
/// each result.
#[cfg(target_arch = "x86_64")]
fn walk_tiles(
    rows: std::ops::Range<usize>,
    t: usize,
    groups: (usize, usize),
    put: &impl Fn(usize, usize, f32),
    mut tile: impl FnMut(usize, bool, usize, usize, &mut [[f32; 8]; 2]),
) {
    let mut r = rows.start;
    while r < rows.end {
        let pair = r + 1 < rows.end;
        let group = if pair { groups.0 } else { groups.1 };
        for t0 in (0..t).step_by(group) {
            let m = group.min(t - t0);
            let mut res = [[0f32; 8]; 2];
            tile(r, pair, t0, m, &mut res);
            for (j, rj) in res.iter().enumerate().take(1 + pair as usize) {
                for (i, v) in rj.iter().enumerate().take(m) {
                    put(t0 + i, r + j, *v);
                }
            }
        }
        r += 1 + pair as usize;
    }
}

/// Any number of input rows against bf16 panels on AVX2, a panel (16 output columns) at a
/// time: groups of up to 6 input rows run the M×16 kernel over the whole panel in turn. The
/// first group streams the panel from memory, prefetching ahead (panels follow each other in
/// memory, so a thread's weights are one linear stream); the later groups find it in L2 and
/// prefetch the next panel between them, so with several groups the memory stream overlaps
/// the arithmetic instead of preceding it (16 rows: 9-16% faster, alternating runs). Nothing
/// is packed at run time, and each broadcast input feeds 16 weight rows, so the inputs cost
/// little from L2.
#[cfg(target_arch = "x86_64")]
fn panels_avx2(x: &[f32], t: usize, w: Mat, d: &[bf16], y: &mut [f32]) {
    /// Input rows per pass over the weights: every panel reads all of a pass's inputs, so a long
    /// prompt goes in blocks whose inputs stay in the last-level cache.
    const TB: usize = 512;
    let (n, k) = (w.rows, w.cols);
    for tb in (0..t).step_by(TB) {
        panels_pass(&x[tb * k..], TB.min(t - tb), k, d, n, &mut y[tb * n..]);
    }
}

#[cfg(target_arch = "x86_64")]
fn panels_pass(x: &[f32], t: usize, k: usize, d: &[bf16], n: usize, y: &mut [f32]) {
    use x86::MR;
    let out = OutPtr(y.as_mut_ptr());
    // The tile's results, made once per rayon job (zeroing it per group was a memset call).
    (0..n.div_ceil(PANEL)).into_par_iter().for_each_init(
        || [[0f32; PANEL]; MR],
        |c, p| {
            let out = &out;
            let (r0, nr) = (p * PANEL, PANEL.min(n - p * PANEL));
            let panel = d[p * k * PANEL..].as_ptr();
            let groups = t.div_ceil(MR);
            let mut group = 0;
            let mut t0 = 0;
            while t0 < t {
                // Groups as even as they come: 8 rows go as 4 + 4, not 6 + 2.
                let m = (t - t0).div_ceil((t - t0).div_ceil(MR));
                macro_rules! kernel {
                    ($m:literal) => {{
                        let xs: [*const f32; $m] =
                            std::array::from_fn(|i| x[(t0 + i) * k..].as_ptr());
                        let c: &mut [[f32; PANEL]; $m] = (&mut c[..$m]).try_into().expect("m rows");
                        // SAFETY: Avx2 was detected; each input pointer has k readable floats and
                        // the panel k columns of 16.
                        unsafe {
                            if group == 0 {
                                // Ahead of itself: the first group reads the panel from memory.
                                x86::kernel_panel_bf16::<$m>(
                                    k,
                                    &xs,
                                    panel,
                                    c,
                                    panel.wrapping_add(x86::PF_COLUMNS * PANEL),
                                    PANEL,
                                )
                            } else {
                                // The next panel, a share for each later group at the pace that
                                // covers it, so it streams in while this one is computed.
                                let later = groups - 1;
                                let share =
                                    panel.wrapping_add(k * PANEL + (group - 1) * k * PANEL / later);
                                x86::kernel_panel_bf16::<$m>(
                                    k,
                                    &xs,
                                    panel,
                                    c,
                                    share,
                                    PANEL.div_ceil(later),
                                )
                            }
                        }
                    }};
                }
                match m {
                    1 => kernel!(1),
                    2 => kernel!(2),
                    3 => kernel!(3),
                    4 => kernel!(4),
                    5 => kernel!(5),
                    _ => kernel!(6),
                }
                for (i, ci) in c.iter().enumerate().take(m) {
                    // SAFETY: output columns r0..r0 + nr belong to this panel only.
                    unsafe {
                        std::ptr::copy_nonoverlapping(ci.as_ptr(), out.0.add((t0 + i) * n + r0), nr)
                    };
                }
                t0 += m;
                group += 1;
            }
        },
    );
}

/// Several input rows on AVX2, blocked as in BLIS: a task owns `PANELS` panels of 16 weight
/// rows; for each slice of `KC` columns it widens and packs them k-major (`[KC][16]` each, in
/// L2 together), then every group of 6 input rows (its slice in L1) runs the 6×16
/// register-blocked kernel against each panel in turn, adding into the output. The inputs are
/// read from outer caches once per slice and task rather than once per panel.
#[cfg(target_arch = "x86_64")]
fn gemm_avx2(x: &[f32], t: usize, w: Mat, y: &mut [f32]) {
    use x86::{MR, NR};
    /// Depth of one slice: 16 KiB of each panel.
    const KC: usize = 256;
    /// Panels per task: 64 KiB packed, and enough tasks to balance two cores on narrow outputs.
    const PANELS: usize = 4;
    let (n, k) = (w.rows, w.cols);
    let out = OutPtr(y.as_mut_ptr());
    (0..n.div_ceil(NR * PANELS)).into_par_iter().for_each_init(
        || (vec![0f32; PANELS * KC * NR], vec![0f32; NR * KC]),
        |(packed, rows), task| {
            let out = &out;
            let r_first = task * NR * PANELS;
            let np = PANELS.min((n - r_first).div_ceil(NR));
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                for p in 0..np {
                    let r0 = r_first + p * NR;
                    let nr = NR.min(n - r0);
                    let panel = &mut packed[p * KC * NR..];
                    // panel[kk][j] = w[r0 + j][k0 + kk], widened.
                    // SAFETY: Avx2 was detected; the pack functions check their bounds.
                    match w.data {
                        WeightData::BF16(d) => unsafe {
                            x86::pack_panel_bf16(&d[r0 * k + k0..], k, kc, nr, panel)
                        },
                        WeightData::F32(d) => unsafe {
                            x86::pack_panel(&d[r0 * k + k0..], k, kc, nr, panel)
                        },
                        _ => {
                            for j in 0..nr {
                                w.range_f32(r0 + j, k0, &mut rows[j * kc..(j + 1) * kc]);
                            }
                            unsafe { x86::pack_panel(rows, kc, kc, nr, panel) }
                        }
                    }
                }
                for t0 in (0..t).step_by(MR) {
                    let mr = MR.min(t - t0);
                    // Rows past the end repeat the last one; their results are dropped.
                    let xs: [*const f32; MR] =
                        std::array::from_fn(|i| x[(t0 + i.min(mr - 1)) * k + k0..].as_ptr());
                    for p in 0..np {
                        let r0 = r_first + p * NR;
                        let nr = NR.min(n - r0);
                        let mut c = [[0f32; NR]; MR];
                        // SAFETY (both copies): output columns r0..r0 + nr of these rows belong to
                        // this task only. A whole panel's row (all but a matrix's last panel)
                        // moves as one fixed-size array, two vector moves, where a copy of a
                        // run-time length calls memmove, a call per 64 bytes.
                        let at = |i: usize| unsafe { out.0.add((t0 + i) * n + r0) };
                        if k0 > 0 {
                            for (i, ci) in c.iter_mut().enumerate().take(mr) {
                                match nr {
                                    NR => {
                                        *ci = unsafe {
                                            std::ptr::read_unaligned(at(i) as *const [f32; NR])
                                        }
                                    }
                                    _ => unsafe {
                                        std::ptr::copy_nonoverlapping(at(i), ci.as_mut_ptr(), nr)
                                    },
                                }
                            }
                        }
                        // The next tile's rows of the output, read after this kernel: from L2 or
                        // further, they would stall it.
                        if k0 > 0 {
                            let (t1, r1) = if p + 1 < np {
                                (t0, r0 + NR)
                            } else {
                                (t0 + MR, r_first)
                            };
                            for i in 0..MR.min(t.saturating_sub(t1)) {
                                x86::prefetch(out.0.wrapping_add((t1 + i) * n + r1));
                            }
                        }
                        // SAFETY: Avx2 was detected; each pointer has kc readable floats; the
                        // panel has kc·NR.
                        unsafe { x86::kernel_6x16(kc, xs, packed[p * KC * NR..].as_ptr(), &mut c) };
                        for (i, ci) in c.iter().enumerate().take(mr) {
                            match nr {
                                NR => unsafe {
                                    std::ptr::write_unaligned(at(i) as *mut [f32; NR], *ci)
                                },
                                _ => unsafe {
                                    std::ptr::copy_nonoverlapping(ci.as_ptr(), at(i), nr)
                                },
                            }
                        }
                    }
                }
            }
        },
    );
}

/// Scalar reference for [`matmul`]: each weight row widened (or dequantized) on its own, then a
/// plain loop.
pub fn matmul_ref(x: &[f32], w: Mat, y: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    let t = x.len() / k;
    let mut row = vec![0f32; k];
    for r in 0..n {
        w.row_f32(r, &mut row);
        for ti in 0..t {
            let mut s = 0f32;
            for j in 0..k {
                s += x[ti * k + j] * row[j];
            }
            y[ti * n + r] = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, Rng};

    #[test]
    fn matmul_matches_reference_all_dtypes_odd_sizes() {
        let mut rng = Rng::new(7);
        for &(t, n, k) in &[
            (1, 1, 1),
            (3, 37, 17),
            (5, 70, 33),
            (1, 129, 100),
            (7, 33, 161),
            (9, 65, 1003),
            (2, 3, 40),
            (16, 20, 40),
            (17, 21, 50),
            (30, 35, 7),
            (13, 33, 9),
            (11, 3, 24),
            (4, 1, 8),
            (15, 67, 250),
            (40, 150, 600),
            (1030, 19, 9),
            (100, 70, 75),
            (67, 33, 64),
        ] {
            let x = rng.normal_vec(t * k, 1.0);
            let wf = rng.normal_vec(n * k, 1.0);
            let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
            let mut wp = vec![bf16::ZERO; panels_len(n, k)];
            pack_bf16_panels(&wb, n, k, &mut wp);
            let mut wq = vec![0u32; pairs_len(n, k)];
            pack_bf16_pairs(&wb, n, k, &mut wq);
            for data in [
                WeightData::F32(&wf),
                WeightData::BF16(&wb),
                WeightData::F16(&wh),
                WeightData::BF16Panels(&wp),
                WeightData::BF16Pairs(&wq),
            ] {
                let w = Mat::new(data, n, k);
                let (mut y, mut yr) = (vec![0.0; t * n], vec![0.0; t * n]);
                matmul_ref(&x, w, &mut yr);
                for isa in crate::isa::available() {
                    matmul_with(isa, &x, w, &mut y);
                    // Where the kernel rounds its inputs to bf16, so does the reference: the
                    // products are then exact and only the order of the sums differs.
                    let mut yb = vec![0.0; t * n];
                    if rounds_inputs(isa, &data, t) {
                        let xb: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
                        matmul_ref(&xb, w, &mut yb);
                    }
                    assert_close(
                        &y,
                        if rounds_inputs(isa, &data, t) {
                            &yb
                        } else {
                            &yr
                        },
                        1e-4 * (k as f32).sqrt(),
                        &format!("matmul {isa:?} t={t} n={n} k={k}"),
                    );
                }
            }
        }
    }

    /// The fused gated product gives bit for bit what the engine computed unfused: the gate
    /// and up products, then silu(gate) ⊙ up over each row. Odd sizes: a last panel of fewer
    /// than 16 rows, columns not a whole pair, 1-40 rows and a long prompt's row blocks.
    #[test]
    fn glu_product_matches_gate_and_up() {
        let mut rng = Rng::new(23);
        for (t, f, k) in [
            (1, 21, 64),
            (5, 16, 64),
            (40, 37, 160),
            (70, 48, 96),
            (17, 33, 32),
            (1030, 19, 64),
        ] {
            let x = rng.normal_vec(t * k, 1.0);
            let (gf, uf) = (rng.normal_vec(f * k, 0.5), rng.normal_vec(f * k, 0.5));
            let bf = |w: &[f32]| -> Vec<u32> {
                let w: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
                let mut p = vec![0u32; pairs_len(f, k)];
                pack_bf16_pairs(&w, f, k, &mut p);
                p
            };
            let q8 = |w: &[f32]| {
                let mut b = vec![crate::quant::BlockQ8_0::default(); w.len() / QK];
                crate::quant::quantize_q8_0(w, &mut b);
                let mut p = vec![Default::default(); crate::qpanel::panels_len(f, k)];
                crate::qpanel::pack(&b, f, k, &mut p);
                p
            };
            let q4 = |w: &[f32]| {
                let mut b = vec![crate::quant::BlockQ4_0::default(); w.len() / QK];
                crate::quant::quantize_q4_0(w, &mut b);
                let mut p = vec![Default::default(); crate::qpanel::panels_len(f, k)];
                crate::qpanel::pack(&b, f, k, &mut p);
                p
            };
            fn both<T: Copy + Default + Send + Sync>(g: &[T], u: &[T], panel: usize) -> Vec<T> {
                let mut o = vec![T::default(); 2 * g.len()];
                pack_glu(g, u, panel, &mut o);
                o
            }
            let (gb, ub) = (bf(&gf), bf(&uf));
            let (g8, u8): (Vec<crate::qpanel::PanelQ8_0>, _) = (q8(&gf), q8(&uf));
            let (g4, u4): (Vec<crate::qpanel::PanelQ4_0>, _) = (q4(&gf), q4(&uf));
            let (bb, b8, b4) = (
                both(&gb, &ub, PANEL * pair_words(k)),
                both(&g8, &u8, k / QK),
                both(&g4, &u4, k / QK),
            );
            for (name, gate, up, merged) in [
                (
                    "bf16",
                    WeightData::BF16Pairs(&gb),
                    WeightData::BF16Pairs(&ub),
                    WeightData::BF16Pairs(&bb),
                ),
                (
                    "q8_0",
                    WeightData::Q8_0Panels(&g8),
                    WeightData::Q8_0Panels(&u8),
                    WeightData::Q8_0Panels(&b8),
                ),
                (
                    "q4_0",
                    WeightData::Q4_0Panels(&g4),
                    WeightData::Q4_0Panels(&u4),
                    WeightData::Q4_0Panels(&b4),
                ),
            ] {
                let (mut g, mut u) = (vec![0.0; t * f], vec![0.0; t * f]);
                matmul(&x, Mat::new(gate, f, k), &mut g);
                matmul(&x, Mat::new(up, f, k), &mut u);
                for (gr, ur) in g.chunks_exact_mut(f).zip(u.chunks_exact(f)) {
                    crate::act::silu_mul(gr, ur);
                }
                let mut y = vec![f32::NAN; t * f];
                let w = Mat::new(merged, 2 * f.next_multiple_of(PANEL), k);
                matmul_glu(&x, w, f, &mut y, &mut Vec::new());
                let same = y.iter().zip(&g).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{name} t={t} f={f} k={k}: fused {:?} unfused {:?}",
                    &y[..4],
                    &g[..4]
                );
            }
        }
    }

    /// Where products with bf16 weights run on bf16 dots (AVX-512 BF16, AMX: tiles of 16 and of
    /// 32 rows), a row's outputs are bit for bit the same whatever rows are beside it: a
    /// sequence's decode step batched is the step alone.
    #[test]
    fn bf16_dot_rows_do_not_depend_on_their_neighbours() {
        let mut rng = Rng::new(9);
        let (n, k) = (70, 600);
        let wb: Vec<bf16> = rng
            .normal_vec(n * k, 1.0)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let mut wq = vec![0u32; pairs_len(n, k)];
        pack_bf16_pairs(&wb, n, k, &mut wq);
        let w = Mat::new(WeightData::BF16Pairs(&wq), n, k);
        for isa in crate::isa::available() {
            if !rounds_inputs(isa, &w.data, 1) {
                continue;
            }
            for t in [2, 5, 16, 17, 40] {
                let x = rng.normal_vec(t * k, 1.0);
                let mut y = vec![0.0; t * n];
                matmul_with(isa, &x, w, &mut y);
                for r in 0..t {
                    let mut alone = vec![0.0; n];
                    matmul_with(isa, &x[r * k..(r + 1) * k], w, &mut alone);
                    let same = y[r * n..(r + 1) * n]
                        .iter()
                        .zip(&alone)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{isa:?}: row {r} of {t} differs from the row alone");
                }
            }
        }
    }

    /// Quantized weights, row-major and in panels: few rows use integer dots on Q8_0
    /// activations, many rows the f32 path on dequantized weights (or bf16 dot products of the
    /// rounded ones); each against the reference over the dequantized matrix.
    #[test]
    fn quantized_matmul_matches_reference() {
        let mut rng = Rng::new(8);
        for &(t, n, k) in &[
            (1, 37, 64),
            (1, 9, 1600),
            (1, 7, 384),
            (1, 5, 160),
            (2, 70, 160),
            (3, 5, 32),
            (5, 33, 96),
            (9, 17, 1600),
            (21, 19, 64),
            (20, 70, 320),
            (70, 37, 96),
            (65, 70, 352),
        ] {
            let x = rng.normal_vec(t * k, 1.0);
            let wf = rng.normal_vec(n * k, 1.0);
            let mut q8 = vec![BlockQ8_0::default(); n * k / QK];
            let mut q4 = vec![BlockQ4_0::default(); n * k / QK];
            quant::quantize_q8_0(&wf, &mut q8);
            quant::quantize_q4_0(&wf, &mut q4);
            let mut p8 = vec![PanelQ8_0::default(); qpanel::panels_len(n, k)];
            let mut p4 = vec![PanelQ4_0::default(); qpanel::panels_len(n, k)];
            qpanel::pack(&q8, n, k, &mut p8);
            qpanel::pack(&q4, n, k, &mut p4);
            for data in [
                WeightData::Q8_0(&q8),
                WeightData::Q4_0(&q4),
                WeightData::Q8_0Panels(&p8),
                WeightData::Q4_0Panels(&p4),
            ] {
                let w = Mat::new(data, n, k);
                let (mut y, mut yr) = (vec![0.0; t * n], vec![0.0; t * n]);
                matmul_ref(&x, w, &mut yr);
                for isa in crate::isa::available() {
                    matmul_with(isa, &x, w, &mut y);
                    // Rows quantized to int8 add up to half a step (|x|max/254) per element.
                    let tol = if t <= QUANT_DOT_MAX_ROWS {
                        0.02 * (k as f32).sqrt()
                    } else {
                        1e-4 * (k as f32).sqrt()
                    };
                    // On bf16 dot products, against the reference of the same rounded inputs
                    // and widened weights.
                    let mut yb = vec![0.0; t * n];
                    if rounds_inputs(isa, &data, t) {
                        let round = |v: &f32| bf16::from_f32(*v).to_f32();
                        let mut wd = vec![0.0; n * k];
                        for (r, row) in wd.chunks_exact_mut(k).enumerate() {
                            w.row_f32(r, row);
                        }
                        let wd: Vec<f32> = wd.iter().map(round).collect();
                        let xb: Vec<f32> = x.iter().map(round).collect();
                        matmul_ref(&xb, Mat::new(WeightData::F32(&wd), n, k), &mut yb);
                    }
                    assert_close(
                        &y,
                        if rounds_inputs(isa, &data, t) {
                            &yb
                        } else {
                            &yr
                        },
                        tol,
                        &format!("{data:?} {isa:?} t={t} n={n} k={k}")
                            .chars()
                            .take(60)
                            .collect::<String>(),
                    );
                }
            }
        }
    }

    /// Every quantized path (one row, register tiles of several) against the portable integer
    /// dot of the same Q8_0-quantized inputs: they differ only in the order of float sums.
    #[test]
    fn quantized_tiles_equal_integer_dots() {
        let mut rng = Rng::new(9);
        for &(t, n, k) in &[
            (1, 5, 64),
            (2, 7, 96),
            (4, 9, 160),
            (5, 3, 32),
            (7, 11, 1600),
            (16, 13, 256),
        ] {
            let x = rng.normal_vec(t * k, 1.0);
            let wf = rng.normal_vec(n * k, 1.0);
            let mut q8 = vec![BlockQ8_0::default(); n * k / QK];
            let mut q4 = vec![BlockQ4_0::default(); n * k / QK];
            quant::quantize_q8_0(&wf, &mut q8);
            quant::quantize_q4_0(&wf, &mut q4);
            let mut xq = vec![BlockQ8_0::default(); t * k / QK];
            quant::quantize_q8_0(&x, &mut xq);
            let nb = k / QK;
            for data in [WeightData::Q8_0(&q8), WeightData::Q4_0(&q4)] {
                let mut want = vec![0.0; t * n];
                for ti in 0..t {
                    let xb = &xq[ti * nb..(ti + 1) * nb];
                    for r in 0..n {
                        want[ti * n + r] = match data {
                            WeightData::Q8_0(b) => quant::dot_q8_0(&b[r * nb..(r + 1) * nb], xb),
                            WeightData::Q4_0(b) => quant::dot_q4_0(&b[r * nb..(r + 1) * nb], xb),
                            _ => unreachable!(),
                        };
                    }
                }
                for isa in crate::isa::available() {
                    let mut y = vec![0.0; t * n];
                    matmul_with(isa, &x, Mat::new(data, n, k), &mut y);
                    assert_close(
                        &y,
                        &want,
                        1e-6 * k as f32,
                        &format!("{isa:?} t={t} n={n} k={k}"),
                    );
                }
            }
        }
    }

    /// Panels and pairs hold the same values as the row-major matrix: every row read back, whole
    /// matrices and views from a panel boundary; padding is zero.
    #[test]
    fn panels_hold_the_rows() {
        let mut rng = Rng::new(10);
        for &(n, k) in &[
            (1, 1),
            (16, 3),
            (17, 5),
            (40, 33),
            (3, 0),
            (32, 17),
            (48, 64),
        ] {
            let wb: Vec<bf16> = rng
                .normal_vec(n * k, 1.0)
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect();
            let mut wp = vec![bf16::ZERO; panels_len(n, k)];
            pack_bf16_panels(&wb, n, k, &mut wp);
            let mut wq = vec![u32::MAX; pairs_len(n, k)];
            pack_bf16_pairs(&wb, n, k, &mut wq);
            let rm = Mat::new(WeightData::BF16(&wb), n, k);
            let pairs: Vec<bf16> = wq
                .iter()
                .flat_map(|w| [*w as u16, (*w >> 16) as u16].map(bf16::from_bits))
                .collect();
            for (pm, stored) in [
                (Mat::new(WeightData::BF16Panels(&wp), n, k), &wp),
                (Mat::new(WeightData::BF16Pairs(&wq), n, k), &pairs),
            ] {
                let (mut a, mut b) = (vec![0.0; k], vec![0.0; k]);
                for r in 0..n {
                    rm.row_f32(r, &mut a);
                    pm.row_f32(r, &mut b);
                    assert_eq!(a, b, "row {r} of [{n}, {k}]");
                }
                for start in (0..n).step_by(PANEL) {
                    let len = (n - start).min(PANEL + 1);
                    let v = pm.rows(start, len);
                    for r in 0..len {
                        rm.row_f32(start + r, &mut a);
                        v.row_f32(r, &mut b);
                        assert_eq!(a, b, "row {r} of the view from {start}");
                    }
                }
                let padding = stored.len() - n * k;
                assert_eq!(
                    stored.iter().filter(|v| v.to_bits() == 0).count()
                        - wb.iter().filter(|v| v.to_bits() == 0).count(),
                    padding,
                    "{:?} [{n}, {k}]: padding",
                    pm.data.len()
                );
            }
        }
    }

    #[test]
    fn row_views_select_the_right_rows() {
        let w: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let m = Mat::new(WeightData::F32(&w), 4, 3).rows(1, 2);
        let mut r = vec![0.0; 3];
        m.row_f32(1, &mut r);
        assert_eq!(r, vec![6.0, 7.0, 8.0]);
    }
}
