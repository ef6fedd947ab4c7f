//! AVX-512 BF16 kernels: the GEMM on `vdpbf16ps`, which multiplies pairs of bf16 and adds them
//! into f32 lanes — twice the products of an f32 FMA of the same width, from half the bytes. Its
//! inputs are rounded to bf16 once (as the official bf16 model's activations are), so it runs
//! where [`crate::matmul`] asks for it: bf16 weights at every size (packed in pairs at load, the
//! order it reads), quantized ones from many rows. The driver ([`gemm_pairs`]) is shared with
//! the AMX tiles of [`crate::amx`]. Beside it, the integer
//! tiles of [`crate::qpanel`] on `vpdpbusd` (AVX-512 VNNI), for Q8_0/Q4_0 weights in panels,
//! and (`scan.rs`, AVX-512 F) the selective scan for states of 16, (`attention.rs`) prefill
//! attention's scores and values for many heads at once, (`act.rs`) SiLU·up and a softmax's
//! exponentials.

use crate::matmul::{pair_words, Mat, WeightData, PAIR_ALIGN, PANEL};
use crate::qpanel::{PanelQ4_0, PanelQ8_0};
use crate::quant::{BlockQ4_0, BlockQ8_0, QK};
use half::bf16;
use rayon::prelude::*;
use std::arch::x86_64::*;

mod act;
pub(crate) mod attention;
mod scan;
pub use scan::Avx512;

/// The mask of the first `n` lanes of 16 (all 16 from `n` = 16 on): a tail's loads and stores.
#[inline]
pub(crate) fn lanes(n: usize) -> __mmask16 {
    ((1u32 << n.min(16)) - 1) as __mmask16
}

/// Proof that this CPU has AVX-512 F, BW and BF16: made only by [`Bf16Dot::detect`], so the
/// kernels that take it cannot run anywhere else.
#[derive(Clone, Copy, Debug)]
pub struct Bf16Dot(());

impl Bf16Dot {
    pub fn detect() -> Option<Self> {
        let ok = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16");
        ok.then_some(Bf16Dot(()))
    }

    /// `y[t, n] = x[t, k] · wᵀ` (see [`gemm_pairs`]), 12 input rows by 32 outputs a tile.
    pub fn gemm(self, x: &[f32], t: usize, w: Mat, y: &mut [f32], epi: Epilogue) {
        gemm_pairs(self, self, x, t, w, y, epi)
    }

    /// One panel of [`WeightData::BF16Panels`] (`k` columns) as pairs, the layout of
    /// [`WeightData::BF16Pairs`] (`dst`: [`pair_words`]`(k)` rows of 16 words).
    pub(crate) fn pair_panel(self, panel: &[bf16], k: usize, dst: &mut [u32]) {
        assert!(panel.len() >= PANEL * k && dst.len() >= PANEL * k.div_ceil(2));
        // SAFETY: the token proves the features; the lengths were checked.
        unsafe { pair_columns(self, panel, k, dst) }
    }
}

/// A tile of a GEMM over bf16 pairs: input rows of `kp` pair-words (rounded bf16 inputs) against
/// two rearranged panels (see [`pair_columns`]), into 32 outputs a row.
pub(crate) trait PairTile: Copy + Send + Sync {
    /// Rows of a tile.
    const ROWS: usize;
    /// Pair-words a row and a panel's columns are padded to (with zeros).
    const K_ALIGN: usize;
    /// The tile reads `ROWS` input rows whatever `m` (AMX's tile loads), not `m`.
    const WHOLE_TILES: bool;
    /// `c[i][j] = Σ_q x[i·kp + q] · w[..]` for the `m` rows of the tile: `w` holds the first
    /// panel's `kp` pair-rows of 16 words, then the second's.
    ///
    /// # Safety
    /// `x` has `m · kp` words (`ROWS · kp` where `WHOLE_TILES`), `w` `2 · 16 · kp`; `kp` is a
    /// multiple of `K_ALIGN`; called inside [`PairTile::session`].
    unsafe fn tile(
        self,
        kp: usize,
        x: *const u32,
        m: usize,
        w: *const u32,
        c: &mut [[f32; 32]; 32],
    );
    /// Runs `f`, which calls `tile`, with whatever state the tiles need set up once around it
    /// (AMX: the tile configuration) rather than once a tile.
    fn session(self, f: impl FnOnce()) {
        f()
    }
}

/// `y[t, n] = x[t, k] · wᵀ` by `tile`, `x` rounded to bf16, and the weights too unless they are
/// bf16 already (quantized ones are widened, then rounded: far less than their own quantization
/// error). Work goes out in pairs of panels of 16 weight rows (32 outputs); unless the weights
/// are packed in pairs at load ([`WeightData::BF16Pairs`], read in place), each task first
/// rearranges its rows so that a 32-bit word holds the weights of columns 2q and 2q + 1 of one
/// row (the pair a bf16 dot product multiplies with a pair of inputs). Then it runs the tiles
/// down the rows, in tiles of equal size (16 rows: two of 8, not 12 and 4).
pub(crate) fn gemm_pairs<T: PairTile>(
    dot: Bf16Dot,
    tile: T,
    x: &[f32],
    t: usize,
    w: Mat,
    y: &mut [f32],
    epi: Epilogue,
) {
    let (n, k) = (w.rows, w.cols);
    let width = match epi {
        Epilogue::Store => n,
        Epilogue::Glu(f) => {
            assert_eq!(
                n,
                2 * f.next_multiple_of(PANEL),
                "gate and up in pairs of panels"
            );
            f
        }
    };
    assert!(x.len() >= t * k && y.len() >= t * width);
    if t == 0 {
        return;
    }
    const { assert!(PAIR_ALIGN.is_multiple_of(T::K_ALIGN)) };
    let kp = match w.data {
        WeightData::BF16Pairs(_) => pair_words(k),
        _ => k.div_ceil(2).next_multiple_of(T::K_ALIGN),
    };
    // The padding rows of whole tiles stay zero (only a decode step's row where tiles are not
    // read whole: zeroing eleven more cost it ~1.5%).
    let rows = if T::WHOLE_TILES {
        t.next_multiple_of(T::ROWS)
    } else {
        t
    };
    // The input as bf16 pairs, in a buffer of this thread's kept between calls: allocated fresh
    // each call, the kernel zeroing its new pages took ~9% of a 512-token prefill (Zen 4, perf).
    // Only what the conversion does not write is zeroed: each row's words past its pairs (the
    // padding to kp, an odd last column's other half) and the padding rows of whole tiles.
    let mut lines = PAIRS.take();
    lines.resize((rows * kp).div_ceil(16), WordLine([0; 16]));
    let xb = &mut words_mut(&mut lines)[..rows * kp];
    xb[t * kp..].fill(0);
    xb[..t * kp]
        .par_chunks_mut(kp)
        .zip(x.par_chunks(k))
        .for_each(|(dst, src)| {
            dst[k / 2..].fill(0);
            // SAFETY: the token proves the features; dst has kp >= k / 2 words.
            unsafe { to_bf16_pairs(dot, src, dst) }
        });
    let out = Out(y.as_mut_ptr());
    // A long prompt's rows go in blocks, every task over one block before the next, so that
    // the block's inputs are still in cache for the next task's weights (prefill of 2048 tokens
    // on AMX 5% faster). Only where the weights are read in place: rearranged ones would be
    // rearranged again for every block.
    let block = match w.data {
        WeightData::BF16Pairs(_) if t >= 2 * ROW_BLOCK => ROW_BLOCK,
        _ => t,
    };
    for lo in (0..t).step_by(block) {
        let hi = (lo + block).min(t);
        rows_by_task(dot, tile, xb, lo..hi, kp, w, &out, epi);
    }
    if lines.capacity() * 16 <= PAIRS_KEEP {
        PAIRS.set(lines);
    }
}

/// Rows of a long product that [`gemm_pairs`] runs through every task at once.
const ROW_BLOCK: usize = 512;

/// What [`gemm_pairs`] writes of a task's 32 sums a row.
#[derive(Clone, Copy, Debug)]
pub enum Epilogue {
    /// The sums: `y[t, n]`.
    Store,
    /// `silu(gate) ⊙ up` of a gated MLP whose gate and up matrices (`f` rows each) alternate
    /// panel by panel (`matmul::pack_glu_pairs`): a task's first 16 sums are gate's rows, its
    /// last 16 up's same rows; `y[t, f]`.
    Glu(usize),
}

/// [`gemm_pairs`] for rows `rows` of the converted input `xb`: every pair of panels a task.
#[allow(clippy::too_many_arguments)]
fn rows_by_task<T: PairTile>(
    dot: Bf16Dot,
    tile: T,
    xb: &[u32],
    rows: std::ops::Range<usize>,
    kp: usize,
    w: Mat,
    out: &Out,
    epi: Epilogue,
) {
    let (n, k) = (w.rows, w.cols);
    let panels = n.div_ceil(PANEL);
    // Scratch for rearranging weights, made only where a task needs it: weights packed in pairs
    // need none, and zeroing it for every rayon job cost a decode step 5% (bf16, Zen 4).
    (0..panels.div_ceil(2)).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new(), Vec::new()),
        |(lines, row, pairs): &mut (Vec<WordLine>, Vec<f32>, Vec<u32>), task| {
            let out = &out;
            let in_place = match w.data {
                // Both panels there (not an odd last one).
                WeightData::BF16Pairs(d) => {
                    d.get(2 * task * PANEL * kp..(2 * task + 2) * PANEL * kp)
                }
                _ => None,
            };
            let wp = match in_place {
                Some(d) => d.as_ptr(),
                None => {
                    // Aligned as the input (see `WordLine`): two panels are whole lines.
                    lines.resize(2 * PANEL * kp / 16, WordLine([0; 16]));
                    let buf = words_mut(lines);
                    row.resize(k, 0.0);
                    pairs.resize(k.div_ceil(2), 0);
                    let (b0, b1) = buf.split_at_mut(PANEL * kp);
                    for (i, b) in [b0, b1].into_iter().enumerate() {
                        let p = 2 * task + i;
                        match w.data {
                            WeightData::BF16Pairs(d) if p < panels => {
                                b.copy_from_slice(&d[p * PANEL * kp..(p + 1) * PANEL * kp])
                            }
                            WeightData::BF16Panels(d) if p < panels => {
                                let panel = &d[p * PANEL * k..(p + 1) * PANEL * k];
                                // SAFETY: the token proves the features; the panel has k columns of 16.
                                unsafe { pair_columns(dot, panel, k, b) }
                            }
                            // SAFETY (both): as above; a panel of k / 32 blocks, k / 2 pair-rows.
                            WeightData::Q8_0Panels(d) if p < panels => unsafe {
                                pair_q8_0(dot, &d[p * (k / QK)..(p + 1) * (k / QK)], b)
                            },
                            WeightData::Q4_0Panels(d) if p < panels => unsafe {
                                pair_q4_0(dot, &d[p * (k / QK)..(p + 1) * (k / QK)], b)
                            },
                            _ => pair_rows(dot, w, p * PANEL, row, pairs, b),
                        }
                    }
                    buf.as_ptr()
                }
            };
            let r0 = 2 * PANEL * task;
            let cols = (n - r0).min(2 * PANEL);
            let mut c = [[0f32; 32]; 32];
            let t = rows.len();
            let per = t.div_ceil(t.div_ceil(T::ROWS));
            tile.session(|| {
                for t0 in rows.clone().step_by(per) {
                    let m = per.min(rows.end - t0);
                    // SAFETY: a whole tile of rows is in xb, two panels of kp pair-rows at wp.
                    unsafe { tile.tile(kp, xb[t0 * kp..].as_ptr(), m, wp, &mut c) };
                    if let Epilogue::Glu(f) = epi {
                        let (j0, cols) = (PANEL * task, (f - PANEL * task).min(PANEL));
                        for (i, row) in c[..m].iter_mut().enumerate() {
                            crate::matmul::glu_sums(row, cols);
                            let g = &row[..PANEL];
                            // SAFETY: outputs j0..j0 + cols of row t0 + i belong to this task only.
                            unsafe {
                                let dst = out.0.add((t0 + i) * f + j0);
                                if cols == PANEL {
                                    // One fixed-size move, not a memcpy call.
                                    dst.cast::<[f32; PANEL]>()
                                        .write_unaligned(*g.as_ptr().cast::<[f32; PANEL]>());
                                } else {
                                    std::ptr::copy_nonoverlapping(g.as_ptr(), dst, cols);
                                }
                            };
                        }
                        continue;
                    }
                    for (i, row) in c[..m].iter().enumerate() {
                        // SAFETY: outputs r0..r0 + cols of row t0 + i belong to this task only.
                        unsafe {
                            let dst = out.0.add((t0 + i) * n + r0);
                            if cols == 2 * PANEL {
                                // One fixed-size move, not a memcpy call (as the int8 panels).
                                dst.cast::<[f32; 32]>().write_unaligned(*row);
                            } else {
                                std::ptr::copy_nonoverlapping(row.as_ptr(), dst, cols);
                            }
                        }
                    }
                }
            });
        },
    );
}

/// Words of converted input a thread keeps between products (64 MB): longer prompts' buffers are
/// freed after use, as the CPU backend's are.
const PAIRS_KEEP: usize = 16 << 20;

thread_local! {
    /// `gemm_pairs`' input buffer (a nested call on the same thread, made while this one is out,
    /// takes a new one; the last returned is kept).
    static PAIRS: std::cell::Cell<Vec<WordLine>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A cache line of words: the input pairs start a line, and with whole rows of 16 words (AMX)
/// every row does, so no tile row straddles two lines (which cost a 128-row AMX product 9%, and
/// unaligned weights as well 36%).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct WordLine([u32; 16]);

fn words_mut(lines: &mut [WordLine]) -> &mut [u32] {
    // SAFETY: `WordLine` is 16 plain words with no padding.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast(), 16 * lines.len()) }
}

impl PairTile for Bf16Dot {
    // Registers: 2·12 accumulators, two weight vectors, one broadcast.
    const ROWS: usize = 12;
    const K_ALIGN: usize = 1;
    const WHOLE_TILES: bool = false;

    unsafe fn tile(
        self,
        kp: usize,
        x: *const u32,
        m: usize,
        w: *const u32,
        c: &mut [[f32; 32]; 32],
    ) {
        macro_rules! run {
            ($($m:literal)*) => {
                match m {
                    $($m => kernel::<$m>(self, kp, x, w, c),)*
                    _ => unreachable!("1 <= m <= ROWS"),
                }
            };
        }
        run!(1 2 3 4 5 6 7 8 9 10 11 12);
    }
}

struct Out(*mut f32);
unsafe impl Sync for Out {}
unsafe impl Send for Out {}

/// A row of f32 as bf16 pairs (round to nearest even); what `dst` has beyond stays zero.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn to_bf16_pairs(_: Bf16Dot, src: &[f32], dst: &mut [u32]) {
    let k = src.len();
    let mut j = 0;
    while j + 32 <= k {
        let lo = _mm512_loadu_ps(src.as_ptr().add(j));
        let hi = _mm512_loadu_ps(src.as_ptr().add(j + 16));
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst.as_mut_ptr().add(j / 2) as *mut _, v);
        j += 32;
    }
    let tail = dst[j / 2..].as_mut_ptr() as *mut u16;
    for (i, &v) in src[j..].iter().enumerate() {
        *tail.add(i) = bf16::from_f32(v).to_bits();
    }
}

/// Weight rows `r0..r0 + 16` (zeros past the last) widened and rounded to bf16, as pairs (see
/// [`pair_columns`]); `row` and `pairs` are scratch of one row.
fn pair_rows(dot: Bf16Dot, w: Mat, r0: usize, row: &mut [f32], pairs: &mut [u32], dst: &mut [u32]) {
    dst.fill(0);
    for j in 0..PANEL.min(w.rows.saturating_sub(r0)) {
        w.row_f32(r0 + j, row);
        pairs.fill(0);
        // SAFETY: the token proves the features.
        unsafe { to_bf16_pairs(dot, row, pairs) };
        for (q, &p) in pairs.iter().enumerate() {
            dst[16 * q + j] = p;
        }
    }
}

/// Pair-rows `q` of the 16 rows from two columns' values (16 lanes each, rounded to bf16 here):
/// word j = (column a of row j, column b of row j).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn store_pair(dst: *mut u32, a: __m512, b: __m512) {
    // cvtne2ps puts a's 16 values below b's; the permutation interleaves them a row a word.
    const IDX: [u16; 32] = {
        let mut idx = [0u16; 32];
        let mut j = 0;
        while j < 16 {
            idx[2 * j] = j as u16;
            idx[2 * j + 1] = 16 + j as u16;
            j += 1;
        }
        idx
    };
    let idx = _mm512_loadu_si512(IDX.as_ptr() as *const _);
    let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
    _mm512_storeu_si512(dst as *mut _, _mm512_permutexvar_epi16(idx, v));
}

/// A panel of Q8_0 blocks (16 rows, see [`crate::qpanel`]) as pairs (see [`pair_columns`]),
/// each value widened as [`crate::qpanel::Panelled::widen`] does (`(stored − 128) · d`, one
/// rounding: `stored · d − 128 · d` with `128 · d` exact), then rounded to bf16.
///
/// # Safety
/// `dst` holds `16 · QK / 2` words a block.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pair_q8_0(_: Bf16Dot, blocks: &[PanelQ8_0], dst: &mut [u32]) {
    assert!(dst.len() >= blocks.len() * PANEL * QK / 2);
    let byte = _mm512_set1_epi32(0xFF);
    for (b, blk) in blocks.iter().enumerate() {
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.d.as_ptr() as *const _));
        let off = _mm512_mul_ps(d, _mm512_set1_ps(128.0));
        let out = dst.as_mut_ptr().add(b * PANEL * QK / 2);
        // Vector s: columns 4s..4s + 4 of each row, a byte each.
        for s in 0..QK / 4 {
            let v = _mm512_loadu_si512(blk.qs.as_ptr().add(64 * s) as *const _);
            let col = |i: u32| {
                let q =
                    _mm512_and_si512(_mm512_srlv_epi32(v, _mm512_set1_epi32(8 * i as i32)), byte);
                _mm512_fmsub_ps(_mm512_cvtepi32_ps(q), d, off)
            };
            store_pair(out.add(16 * 2 * s), col(0), col(1));
            store_pair(out.add(16 * (2 * s + 1)), col(2), col(3));
        }
    }
}

/// [`pair_q8_0`] for Q4_0: vector s holds columns `8s..8s + 4` in its low nibbles and
/// `8s + 4..8s + 8` in its high ones; values `(stored − 8) · d`.
///
/// # Safety
/// As [`pair_q8_0`].
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pair_q4_0(_: Bf16Dot, blocks: &[PanelQ4_0], dst: &mut [u32]) {
    assert!(dst.len() >= blocks.len() * PANEL * QK / 2);
    let nib = _mm512_set1_epi32(0x0F);
    for (b, blk) in blocks.iter().enumerate() {
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.d.as_ptr() as *const _));
        let off = _mm512_mul_ps(d, _mm512_set1_ps(8.0));
        let out = dst.as_mut_ptr().add(b * PANEL * QK / 2);
        for s in 0..QK / 8 {
            let v = _mm512_loadu_si512(blk.qs.as_ptr().add(64 * s) as *const _);
            // Column 8s + c: byte c % 4, its low nibble for c < 4, else its high one.
            let col = |c: u32| {
                let shift = _mm512_set1_epi32((8 * (c % 4) + 4 * (c / 4)) as i32);
                let q = _mm512_and_si512(_mm512_srlv_epi32(v, shift), nib);
                _mm512_fmsub_ps(_mm512_cvtepi32_ps(q), d, off)
            };
            for pr in 0..4 {
                store_pair(
                    out.add(16 * (4 * s + pr as usize)),
                    col(2 * pr),
                    col(2 * pr + 1),
                );
            }
        }
    }
}

/// One panel (columns of 16 rows, rows interleaved as in `BF16Panels`) into pairs: word
/// `16q + j` holds row j's columns 2q (low half) and 2q + 1 (high half); a missing last column,
/// and the pair-rows past the columns, are zero.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pair_columns(_: Bf16Dot, panel: &[bf16], k: usize, dst: &mut [u32]) {
    // Where row j of a column sits in the panel: j < 8 at 2j, 8 + j at 2j + 1.
    let slot = |j: usize| if j < 8 { 2 * j } else { 2 * (j - 8) + 1 };
    let idx: [u16; 32] = std::array::from_fn(|o| (slot(o / 2) + 16 * (o % 2)) as u16);
    let idx = _mm512_loadu_si512(idx.as_ptr() as *const _);
    let src = panel.as_ptr() as *const u16;
    for q in 0..k / 2 {
        let v = _mm512_loadu_si512(src.add(32 * q) as *const _);
        _mm512_storeu_si512(
            dst.as_mut_ptr().add(16 * q) as *mut _,
            _mm512_permutexvar_epi16(idx, v),
        );
    }
    if k % 2 == 1 {
        let q = k / 2;
        for j in 0..PANEL {
            dst[16 * q + j] = *src.add(32 * q + slot(j)) as u32;
        }
    }
    dst[16 * k.div_ceil(2)..].fill(0);
}

/// `c[i][j] = Σ_q x_i[q] · w[q][j]` over pairs for `M` rows of `kp` pair-words from `x`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn kernel<const M: usize>(
    _: Bf16Dot,
    kp: usize,
    x: *const u32,
    w: *const u32,
    c: &mut [[f32; 32]; 32],
) {
    let mut a0 = [_mm512_setzero_ps(); M];
    let mut a1 = [_mm512_setzero_ps(); M];
    let w1 = w.add(PANEL * kp);
    for q in 0..kp {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(w.add(16 * q) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(w1.add(16 * q) as *const _));
        for i in 0..M {
            let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(*x.add(i * kp + q) as i32));
            a0[i] = _mm512_dpbf16_ps(a0[i], a, b0);
            a1[i] = _mm512_dpbf16_ps(a1[i], a, b1);
        }
    }
    for i in 0..M {
        _mm512_storeu_ps(c[i].as_mut_ptr(), a0[i]);
        _mm512_storeu_ps(c[i].as_mut_ptr().add(PANEL), a1[i]);
    }
}

/// `iters` rounds of 12 independent `vdpbf16ps` on registers (16 lanes, two products each): the
/// bf16 dot units' peak, no memory.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn dpbf16_loop(_: Bf16Dot, iters: usize) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 12];
    let bh = |v: i16| std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi16(v));
    let (a, b) = (bh(0x3f80), bh(0x3a80));
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_dpbf16_ps(*v, a, b);
        }
    }
    _mm512_reduce_add_ps(
        acc.into_iter()
            .fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, v)),
    )
}

/// `iters` rounds of 12 independent `vpdpbusd` on registers (16 lanes, four products each): the
/// integer dot units' peak, no memory.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn dpbusd_loop(_: Int8Dot, iters: usize) -> i32 {
    let mut acc = [_mm512_setzero_si512(); 12];
    let (a, b) = (_mm512_set1_epi8(3), _mm512_set1_epi8(-5));
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_dpbusd_epi32(*v, a, b);
        }
    }
    _mm512_reduce_add_epi32(
        acc.into_iter()
            .fold(_mm512_setzero_si512(), |s, v| _mm512_add_epi32(s, v)),
    )
}

/// Proof that this CPU has AVX-512 F, BW and VNNI (`vpdpbusd` on 512-bit registers): made only
/// by [`Int8Dot::for_isa`], for an ISA at the AVX-512 level, so its kernels run nowhere else.
#[derive(Clone, Copy, Debug)]
pub struct Int8Dot(());

impl Int8Dot {
    pub fn for_isa(isa: crate::isa::Isa) -> Option<Self> {
        let ok = isa.level() >= crate::isa::Level::Avx512Bf16
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni");
        ok.then_some(Int8Dot(()))
    }
}

/// How far ahead a lone input row's panel tile asks for its weights (bytes; see the tile).
const LONE_ROW_AHEAD: usize = 8 << 10;

/// The panel tiles (see [`crate::qpanel`]) on `vpdpbusd`: each weight vector (four columns of
/// 16 rows) loaded (Q4_0: unpacked) once for the tile's input rows, up to 16, each of which
/// broadcasts its four bytes. Up to 8 rows keep two integer sums a row (even and odd vectors),
/// twice the products in flight; from 9 rows one sum a row, which the registers still hold
/// beside the float sums, so 16 rows take one tile rather than two of 8. Integer sums are
/// exact, so the order is free. The block's end is the reference's float operations.
macro_rules! int8_panel_tile {
    ($blk:ty, $name:ident, $pair:expr) => {
        impl crate::qpanel::PanelKernel<$blk> for Int8Dot {
            fn tile(
                self,
                w: &[<$blk as crate::qpanel::Panelled>::Panel],
                x: &crate::qpanel::Inputs,
                nb: usize,
                t0: usize,
                rows: usize,
                out: &mut [[f32; PANEL]; crate::qpanel::TILE_ROWS],
            ) {
                assert!(w.len() >= nb && x.q.len() >= (t0 + rows) * nb);
                // SAFETY: the token proves the features; the assert the lengths.
                unsafe {
                    match rows {
                        1 => self.$name::<1>(w, x, nb, t0, out),
                        2 => self.$name::<2>(w, x, nb, t0, out),
                        3 => self.$name::<3>(w, x, nb, t0, out),
                        4 => self.$name::<4>(w, x, nb, t0, out),
                        5 => self.$name::<5>(w, x, nb, t0, out),
                        6 => self.$name::<6>(w, x, nb, t0, out),
                        7 => self.$name::<7>(w, x, nb, t0, out),
                        8 => self.$name::<8>(w, x, nb, t0, out),
                        9 => self.$name::<9>(w, x, nb, t0, out),
                        10 => self.$name::<10>(w, x, nb, t0, out),
                        11 => self.$name::<11>(w, x, nb, t0, out),
                        12 => self.$name::<12>(w, x, nb, t0, out),
                        13 => self.$name::<13>(w, x, nb, t0, out),
                        14 => self.$name::<14>(w, x, nb, t0, out),
                        15 => self.$name::<15>(w, x, nb, t0, out),
                        16 => self.$name::<16>(w, x, nb, t0, out),
                        _ => unreachable!("1 <= rows <= TILE_ROWS"),
                    }
                }
            }
        }

        impl Int8Dot {
            #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
            unsafe fn $name<const M: usize>(
                self,
                w: &[<$blk as crate::qpanel::Panelled>::Panel],
                x: &crate::qpanel::Inputs,
                nb: usize,
                t0: usize,
                out: &mut [[f32; PANEL]; crate::qpanel::TILE_ROWS],
            ) {
                let mut acc = [_mm512_setzero_ps(); M];
                let size = std::mem::size_of::<<$blk as crate::qpanel::Panelled>::Panel>();
                let ahead_by = if M == 1 { LONE_ROW_AHEAD } else { 4 * size };
                for (b, blk) in w.iter().enumerate().take(nb) {
                    // The offset's correction starts the even sums (integers: exact anywhere).
                    let mut even: [__m512i; M] = std::array::from_fn(|m| {
                        let s = *x.sum.get_unchecked((t0 + m) * nb + b);
                        _mm512_set1_epi32(-<$blk as crate::qpanel::Panelled>::OFFSET * s)
                    });
                    let mut odd = [_mm512_setzero_si512(); M];
                    // The weights ahead are asked for. Tiles of several rows run slower than the
                    // memory: the block four ahead, so the first tile's stream from memory
                    // overlaps its arithmetic (t = 16: 1.2-1.6x). A lone row keeps pace with the
                    // memory only when asked for far ahead (LONE_ROW_AHEAD; a 2-core Sapphire
                    // Rapids Xeon, alternating runs: Q4_0 decode 69-72% of the read bandwidth
                    // with four blocks ahead, 71-85% with 8 KB; Q8_0, not prefetched alone
                    // before, 11.2-11.8 tok/s against 12.3-12.8), and into L2 only: a line
                    // asked for into L1 holds one of the core's few L1 miss buffers until it
                    // arrives, and the prefetches stalled on them (Q4_0 decode 29.1-29.6 tok/s
                    // against 26.4-27.8; a batch of 16 slower into L2, so its tiles keep L1).
                    let ahead = (blk as *const _ as *const u8).wrapping_add(ahead_by);
                    for l in (0..size).step_by(64) {
                        let line = ahead.wrapping_add(l) as *const i8;
                        if M == 1 {
                            _mm_prefetch::<_MM_HINT_T1>(line);
                        } else {
                            _mm_prefetch::<_MM_HINT_T0>(line);
                        }
                    }
                    // Pair v: the weights of input words 2v and 2v + 1.
                    for v in 0..QK / 8 {
                        let (w0, w1): (__m512i, __m512i) = $pair(blk.qs.as_ptr(), v);
                        for m in 0..M {
                            // Blocks are 34 bytes: their words are read unaligned.
                            let xq = x.q.get_unchecked((t0 + m) * nb + b).qs.as_ptr() as *const i32;
                            let (i0, i1) = (2 * v, 2 * v + 1);
                            even[m] = _mm512_dpbusd_epi32(
                                even[m],
                                w0,
                                _mm512_set1_epi32(xq.add(i0).read_unaligned()),
                            );
                            let x1 = _mm512_set1_epi32(xq.add(i1).read_unaligned());
                            if M <= 8 {
                                odd[m] = _mm512_dpbusd_epi32(odd[m], w1, x1);
                            } else {
                                even[m] = _mm512_dpbusd_epi32(even[m], w1, x1);
                            }
                        }
                    }
                    let wd = _mm512_cvtph_ps(_mm256_loadu_si256(blk.d.as_ptr() as *const _));
                    for m in 0..M {
                        let i = (t0 + m) * nb + b;
                        let dot = _mm512_add_epi32(even[m], odd[m]);
                        let s = _mm512_mul_ps(wd, _mm512_set1_ps(*x.d.get_unchecked(i)));
                        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[m]);
                    }
                }
                for m in 0..M {
                    _mm512_storeu_ps(out[m].as_mut_ptr(), acc[m]);
                }
            }
        }
    };
}

// Q8_0: vectors 2v and 2v + 1 as they are.
int8_panel_tile!(BlockQ8_0, tile_q8_0, |qs: *const u8, v: usize| {
    (
        _mm512_loadu_si512(qs.add(128 * v) as *const _),
        _mm512_loadu_si512(qs.add(128 * v + 64) as *const _),
    )
});
// Q4_0: vector v's low nibbles, then its high ones.
int8_panel_tile!(BlockQ4_0, tile_q4_0, |qs: *const u8, v: usize| {
    let raw = _mm512_loadu_si512(qs.add(64 * v) as *const _);
    let low = _mm512_set1_epi8(0x0F);
    (
        _mm512_and_si512(raw, low),
        _mm512_and_si512(_mm512_srli_epi16(raw, 4), low),
    )
});
