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

/// Peak f32 multiply-add rate in FLOP/s on all threads (2 FLOP per lane of a fused
/// multiply-add, registers only): the ceiling for matrix products. None without AVX2/FMA.
pub fn fma_peak() -> Option<f64> {
    if !crate::isa::isa().has_avx2() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let threads = rayon::current_num_threads();
        let iters = 2_000_000;
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t = Instant::now();
            // SAFETY: Avx2 (with FMA) was detected.
            let s: f32 = (0..threads)
                .into_par_iter()
                .map(|_| unsafe { crate::x86::fma_loop(iters) })
                .sum();
            std::hint::black_box(s);
            best = best.min(t.elapsed().as_secs_f64());
        }
        Some((threads * iters * 12 * 8 * 2) as f64 / best)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}
