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
        sink += buf.par_chunks(1 << 16).map(|c| {
            let mut acc = [0f32; 16];
            for ch in c.chunks_exact(16) {
                for i in 0..16 {
                    acc[i] += ch[i];
                }
            }
            acc.iter().sum::<f32>()
        }).sum::<f32>();
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (n * 4) as f64 / best
}
