//! Machine ceilings measured in the same run as a benchmark, so speeds can be reported as
//! fractions of what this machine can do right now.

use rayon::prelude::*;
use std::time::Instant;

/// Streaming read bandwidth in bytes/s: the best of `reps` parallel sums over a buffer of
/// `bytes` (make it several times the last-level cache), read as it comes and, on x86-64, with
/// software prefetches [`PREFETCH_AHEAD`] bytes ahead, as the decode kernels read their weights
/// (a 2-core Sapphire Rapids Xeon read 18-22 GB/s without them, 28-30 with them 8-16 KB ahead):
/// the best of every way.
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let n = bytes / 4;
    let buf: Vec<f32> = (0..n).into_par_iter().map(|i| (i % 7) as f32).collect();
    let mut best = f64::INFINITY;
    let mut sink = 0f32;
    for ahead in PREFETCH_AHEAD {
        for _ in 0..reps {
            let t = Instant::now();
            sink += buf
                .par_chunks(1 << 16)
                .map(|c| sum_ahead(c, ahead / 4))
                .sum::<f32>();
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    std::hint::black_box(sink);
    (n * 4) as f64 / best
}

/// How far ahead `read_bandwidth` prefetches, in bytes (0: no prefetch; x86-64 only).
#[cfg(target_arch = "x86_64")]
pub const PREFETCH_AHEAD: [usize; 3] = [0, 4 << 10, 16 << 10];
#[cfg(not(target_arch = "x86_64"))]
pub const PREFETCH_AHEAD: [usize; 1] = [0];

/// The sum of `c` in 16 lanes, each 64-byte line asked for `ahead` floats before it is read.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn sum_ahead(c: &[f32], ahead: usize) -> f32 {
    let mut acc = [0f32; 16];
    for (k, ch) in c.chunks_exact(16).enumerate() {
        #[cfg(target_arch = "x86_64")]
        if ahead > 0 {
            crate::x86::prefetch(c.as_ptr().wrapping_add(16 * k + ahead));
        }
        for i in 0..16 {
            acc[i] += ch[i];
        }
    }
    acc.iter().sum::<f32>()
}

/// Instructions a second of `lane_loop(iters)` (12 a round) on every thread at once, best of 3.
#[cfg(target_arch = "x86_64")]
fn loop_rate(lane_loop: impl Fn(usize) -> f64 + Sync) -> f64 {
    rounds_rate(2_000_000, lane_loop)
}

/// [`loop_rate`] over `iters` rounds.
#[cfg(target_arch = "x86_64")]
fn rounds_rate(iters: usize, lane_loop: impl Fn(usize) -> f64 + Sync) -> f64 {
    let threads = rayon::current_num_threads();
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        let s: f64 = (0..threads).into_par_iter().map(|_| lane_loop(iters)).sum();
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (threads * iters * 12) as f64 / best
}

/// Peak f32 multiply-add rate in FLOP/s on all threads (2 FLOP per lane of a fused
/// multiply-add, registers only): the ceiling for matrix products. None without AVX2/FMA.
pub fn fma_peak() -> Option<f64> {
    if !crate::isa::isa().has_avx2() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: Avx2 (with FMA) was detected.
    return Some(16.0 * loop_rate(|n| unsafe { crate::x86::fma_loop(n) } as f64));
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Peak bf16 dot-product rate in FLOP/s on all threads (`vdpbf16ps`: 16 lanes of two products
/// and their sums, 64 FLOP an instruction): the ceiling of the products that round their inputs
/// to bf16. None where the CPU has no AVX-512 BF16.
pub fn bf16_dot_peak() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = crate::avx512::Bf16Dot::detect() {
        // SAFETY: the token proves the features.
        return Some(64.0 * loop_rate(|n| unsafe { crate::avx512::dpbf16_loop(k, n) } as f64));
    }
    None
}

/// Peak int8 dot-product rate in OP/s on all threads (`vpdpbusd`: 16 lanes of four products and
/// their sums, 128 OP an instruction): the ceiling of the quantized kernels' integer dots. None
/// where the CPU has no AVX-512 VNNI.
pub fn int8_dot_peak() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = crate::avx512::Int8Dot::for_isa(crate::isa::isa()) {
        // SAFETY: the token proves the features.
        return Some(128.0 * loop_rate(|n| unsafe { crate::avx512::dpbusd_loop(k, n) } as f64));
    }
    None
}

/// Peak AMX bf16 rate in FLOP/s on all threads (`tdpbf16ps`: a 16 × 16 tile of sums of 32
/// products, 16384 FLOP an instruction, on tile registers only): the ceiling of the products
/// that run on AMX tiles. None where the CPU or the OS gives no AMX.
pub fn amx_peak() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if let Some(amx) = crate::amx::Amx::detect() {
        // An instruction takes 16 cycles: 1/16 of the vector loops' rounds.
        return Some(16384.0 * rounds_rate(125_000, |n| amx.peak_loop(n) as f64));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prefetch changes no value read: every distance gives the plain sum, bit for bit, and
    /// the plain sum is the f64 one within f32 rounding.
    #[test]
    fn prefetched_sum_is_the_plain_sum() {
        let mut rng = crate::testing::Rng::new(5);
        let c = rng.normal_vec(16 * 1001, 1.0);
        let plain = sum_ahead(&c, 0);
        for ahead in PREFETCH_AHEAD {
            assert_eq!(
                sum_ahead(&c, ahead / 4).to_bits(),
                plain.to_bits(),
                "{ahead} bytes ahead"
            );
        }
        let exact: f64 = c.iter().map(|&x| x as f64).sum();
        let size: f64 = c.iter().map(|&x| x.abs() as f64).sum();
        assert!(
            (plain as f64 - exact).abs() <= 1e-5 * size,
            "{plain} against {exact}"
        );
    }
}
