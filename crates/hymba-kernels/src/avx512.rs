//! AVX-512 BF16 kernels: the prefill GEMM on `vdpbf16ps`, which multiplies pairs of bf16 and adds
//! them into f32 lanes — twice the products of an f32 FMA of the same width, from half the bytes.
//! Its inputs are rounded to bf16 once (as the official bf16 model's activations are), so it runs
//! only where [`crate::matmul`] asks for it: many rows against bf16 weights. The driver
//! ([`gemm_pairs`]) is shared with the AMX tiles of [`crate::amx`].

use crate::matmul::{Mat, WeightData, PANEL};
use half::bf16;
use rayon::prelude::*;
use std::arch::x86_64::*;

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
    pub fn gemm(self, x: &[f32], t: usize, w: Mat, y: &mut [f32]) {
        gemm_pairs(self, self, x, t, w, y)
    }
}

/// A tile of a GEMM over bf16 pairs: input rows of `kp` pair-words (rounded bf16 inputs) against
/// two rearranged panels (see [`pair_columns`]), into 32 outputs a row.
pub(crate) trait PairTile: Copy + Send + Sync {
    /// Rows of a tile.
    const ROWS: usize;
    /// Pair-words a row and a panel's columns are padded to (with zeros).
    const K_ALIGN: usize;
    /// `c[i][j] = Σ_q x[i·kp + q] · w[..]` for the `m` rows of the tile (`ROWS` rows are there):
    /// `w` holds the first panel's `kp` pair-rows of 16 words, then the second's.
    ///
    /// # Safety
    /// `x` has `ROWS · kp` words, `w` `2 · 16 · kp`; `kp` is a multiple of `K_ALIGN`.
    unsafe fn tile(
        self,
        kp: usize,
        x: *const u32,
        m: usize,
        w: *const u32,
        c: &mut [[f32; 32]; 32],
    );
}

/// `y[t, n] = x[t, k] · wᵀ` by `tile`, `x` rounded to bf16, and the weights too unless they are
/// bf16 already (quantized ones are widened, then rounded: far less than their own quantization
/// error). Work goes out in pairs of panels of 16 weight rows (32 outputs); each task first
/// rearranges its rows so that a 32-bit word holds the weights of columns 2q and 2q + 1 of one
/// row (the pair a bf16 dot product multiplies with a pair of inputs), then runs the tiles down
/// the rows.
pub(crate) fn gemm_pairs<T: PairTile>(
    dot: Bf16Dot,
    tile: T,
    x: &[f32],
    t: usize,
    w: Mat,
    y: &mut [f32],
) {
    let (n, k) = (w.rows, w.cols);
    assert!(x.len() >= t * k && y.len() >= t * n);
    let kp = k.div_ceil(2).next_multiple_of(T::K_ALIGN);
    // Whole tiles of rows; the padding rows stay zero.
    let mut xb = vec![0u32; t.next_multiple_of(T::ROWS) * kp];
    xb.par_chunks_mut(kp)
        .zip(x.par_chunks(k))
        .for_each(|(dst, src)| unsafe { to_bf16_pairs(dot, src, dst) });
    let panels = n.div_ceil(PANEL);
    let out = Out(y.as_mut_ptr());
    (0..panels.div_ceil(2)).into_par_iter().for_each_init(
        || {
            (
                vec![0u32; 2 * PANEL * kp],
                vec![0f32; k],
                vec![0u32; k.div_ceil(2)],
            )
        },
        |(buf, row, pairs), task| {
            let out = &out;
            let (b0, b1) = buf.split_at_mut(PANEL * kp);
            for (i, b) in [b0, b1].into_iter().enumerate() {
                let p = 2 * task + i;
                match w.data {
                    WeightData::BF16Panels(d) if p < panels => {
                        let panel = &d[p * PANEL * k..(p + 1) * PANEL * k];
                        // SAFETY: the token proves the features; the panel has k columns of 16.
                        unsafe { pair_columns(dot, panel, k, b) }
                    }
                    _ => pair_rows(dot, w, p * PANEL, row, pairs, b),
                }
            }
            let r0 = 2 * PANEL * task;
            let cols = (n - r0).min(2 * PANEL);
            let mut c = [[0f32; 32]; 32];
            for t0 in (0..t).step_by(T::ROWS) {
                let m = T::ROWS.min(t - t0);
                // SAFETY: a whole tile of rows is in xb, two panels of kp pair-rows in buf.
                unsafe { tile.tile(kp, xb[t0 * kp..].as_ptr(), m, buf.as_ptr(), &mut c) };
                for (i, row) in c[..m].iter().enumerate() {
                    // SAFETY: outputs r0..r0 + cols of row t0 + i belong to this task only.
                    unsafe {
                        let dst = out.0.add((t0 + i) * n + r0);
                        std::ptr::copy_nonoverlapping(row.as_ptr(), dst, cols);
                    }
                }
            }
        },
    );
}

impl PairTile for Bf16Dot {
    // Registers: 2·12 accumulators, two weight vectors, one broadcast.
    const ROWS: usize = 12;
    const K_ALIGN: usize = 1;

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
