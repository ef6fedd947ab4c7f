//! Machine ceilings measured in the same run as a benchmark, so speeds can be reported as
//! fractions of what this machine can do right now.

use rayon::prelude::*;
use std::time::Instant;

/// Streaming read bandwidth in bytes/s: the best of `reps` parallel sums over a buffer of
/// `bytes` (make it several times the last-level cache).
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let n = bytes / 4;
    let buf: Vec<f32> = (0..n).into_par_iter().map(|i| (i % 7) as f32).collect();
    let mut best = f64::INFINITY;
    let mut sink = 0f32;
    for _ in 0..reps {
        let t = Instant::now();
        sink += buf
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0f32; 16];
                for ch in c.chunks_exact(16) {
                    for i in 0..16 {
                        acc[i] += ch[i];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum::<f32>();
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (n * 4) as f64 / best
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
