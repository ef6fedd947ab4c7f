//! AVX-512 BF16 kernels: the prefill GEMM on `vdpbf16ps`, which multiplies pairs of bf16 and adds
//! them into f32 lanes — twice the products of an f32 FMA of the same width, from half the bytes.
//! Its inputs are rounded to bf16 once (as the official bf16 model's activations are), so it runs
//! only where [`crate::matmul`] asks for it: many rows against bf16 weights.

use crate::matmul::PANEL;
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

    /// `y[t, n] = x[t, k] · wᵀ`, `w` in bf16 panels (see [`crate::matmul::WeightData::BF16Panels`]),
    /// `x` rounded to bf16. Work goes out in pairs of panels (32 outputs); each task first
    /// rearranges its panels so that a 32-bit lane holds the weights of columns 2q and 2q + 1 of
    /// one row, the pair `vdpbf16ps` multiplies with a broadcast pair of inputs.
    pub fn gemm_panels(self, x: &[f32], t: usize, k: usize, w: &[bf16], n: usize, y: &mut [f32]) {
        assert!(x.len() >= t * k && y.len() >= t * n && w.len() >= n.next_multiple_of(PANEL) * k);
        let kp = k.div_ceil(2);
        let mut xb = vec![0u32; t * kp];
        xb.par_chunks_mut(kp)
            .zip(x.par_chunks(k))
            .for_each(|(dst, src)| unsafe { to_bf16_pairs(self, src, dst) });
        let panels = n.div_ceil(PANEL);
        let out = Out(y.as_mut_ptr());
        (0..panels.div_ceil(2)).into_par_iter().for_each_init(
            || vec![0u32; 2 * PANEL * kp],
            |buf, task| {
                let out = &out;
                let (b0, b1) = buf.split_at_mut(PANEL * kp);
                for (i, b) in [b0, b1].into_iter().enumerate() {
                    let p = 2 * task + i;
                    if p < panels {
                        // SAFETY: the token proves the features; the panel has k columns of 16.
                        unsafe { pair_columns(self, &w[p * PANEL * k..(p + 1) * PANEL * k], k, b) };
                    } else {
                        b.fill(0);
                    }
                }
                let r0 = 2 * PANEL * task;
                let cols = (n - r0).min(2 * PANEL);
                let mut t0 = 0;
                while t0 < t {
                    let m = MR.min(t - t0);
                    let mut c = [[0f32; 2 * PANEL]; MR];
                    let xs: [*const u32; MR] =
                        std::array::from_fn(|i| xb[(t0 + i.min(m - 1)) * kp..].as_ptr());
                    macro_rules! run {
                        ($($m:literal)*) => {
                            match m {
                                // SAFETY: the token proves the features; each input row has kp
                                // pairs and each rearranged panel kp columns of 16 pairs.
                                $($m => unsafe { kernel::<$m>(self, kp, &xs, buf.as_ptr(), &mut c) },)*
                                _ => unreachable!("1 <= m <= MR"),
                            }
                        };
                    }
                    run!(1 2 3 4 5 6 7 8 9 10 11 12);
                    for (i, row) in c[..m].iter().enumerate() {
                        // SAFETY: outputs r0..r0 + cols of row t0 + i belong to this task only.
                        unsafe {
                            let dst = out.0.add((t0 + i) * n + r0);
                            std::ptr::copy_nonoverlapping(row.as_ptr(), dst, cols);
                        }
                    }
                    t0 += m;
                }
            },
        );
    }
}

/// Input rows of a tile (registers: 2·MR accumulators, two weight vectors, one broadcast).
const MR: usize = 12;

struct Out(*mut f32);
unsafe impl Sync for Out {}
unsafe impl Send for Out {}

/// A row of f32 as bf16 pairs (round to nearest even), the last pair zero-padded.
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
    if k % 2 == 1 {
        *tail.add(k - j) = 0;
    }
}

/// One panel (columns of 16 rows, rows interleaved as in `BF16Panels`) into pairs: word
/// `16q + j` holds row j's columns 2q (low half) and 2q + 1 (high half); a missing last
/// column is zero.
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
}

/// `c[i][j] += Σ_q x_i[q] · w[q][j]` over pairs: `w` holds two rearranged panels one after
/// the other (`kp` columns of 16 pair-words each), so `j < 16` is the first, `16 + j` the second.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn kernel<const M: usize>(
    _: Bf16Dot,
    kp: usize,
    xs: &[*const u32; MR],
    w: *const u32,
    c: &mut [[f32; 2 * PANEL]; MR],
) {
    let mut a0 = [_mm512_setzero_ps(); M];
    let mut a1 = [_mm512_setzero_ps(); M];
    let w1 = w.add(PANEL * kp);
    for q in 0..kp {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(w.add(16 * q) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(w1.add(16 * q) as *const _));
        for i in 0..M {
            let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(*xs[i].add(q) as i32));
            a0[i] = _mm512_dpbf16_ps(a0[i], a, b0);
            a1[i] = _mm512_dpbf16_ps(a1[i], a, b1);
        }
    }
    for i in 0..M {
        _mm512_storeu_ps(c[i].as_mut_ptr(), a0[i]);
        _mm512_storeu_ps(c[i].as_mut_ptr().add(PANEL), a1[i]);
    }
}
