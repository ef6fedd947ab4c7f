//! Time of one draw of the sampler over Hymba's 32001 logits, per setting: what a serving step
//! spends on the host for each sequence of the batch. `cargo bench -p hymba --bench sample`.
//! Logits are random normal at two spreads (a flat distribution, and a more peaked one, as a
//! trained model's usually is); each line gives the median of 201 draws.

use hymba::kernels::testing::Rng;
use hymba::{Sampler, SamplingParams};
use std::time::Instant;

fn main() {
    let mut rng = Rng::new(1);
    for spread in [1.0f32, 4.0] {
        let logits = rng.normal_vec(32001, spread);
        for (name, f) in [
            (
                "temperature 1",
                (|p: &mut SamplingParams| p.temperature = 1.0) as fn(&mut SamplingParams),
            ),
            ("temperature 0.8, top-p 0.95", |p| {
                p.temperature = 0.8;
                p.top_p = 0.95
            }),
            ("temperature 0.7, top-k 40", |p| {
                p.temperature = 0.7;
                p.top_k = 40
            }),
            ("temperature 1, min-p 0.05", |p| {
                p.temperature = 1.0;
                p.min_p = 0.05
            }),
            ("greedy", |p| p.temperature = 0.0),
        ] {
            let mut params = SamplingParams::default();
            f(&mut params);
            let mut s = Sampler::new(params).expect("valid settings");
            let mut times: Vec<f64> = (0..201)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(s.sample(&logits, &[], &[]));
                    t.elapsed().as_secs_f64()
                })
                .collect();
            times.sort_by(f64::total_cmp);
            println!(
                "logits × {spread:<4} {name:<30} {:>8.1} µs a draw",
                times[100] * 1e6
            );
        }
    }
    // A serving step's draws: 64 sequences, each its own sampler and logits (temperature 0.8,
    // top-p 0.95, the peaked spread), one after another and on the thread pool (as the engine).
    use rayon::prelude::*;
    let logits: Vec<Vec<f32>> = (0..64).map(|_| rng.normal_vec(32001, 4.0)).collect();
    let mut samplers: Vec<Sampler> = (0..64)
        .map(|i| {
            Sampler::new(SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                seed: i,
                ..Default::default()
            })
            .expect("valid settings")
        })
        .collect();
    for pool in [false, true] {
        let mut times: Vec<f64> = (0..21)
            .map(|_| {
                let t = Instant::now();
                if pool {
                    samplers.par_iter_mut().zip(&logits).for_each(|(s, l)| {
                        std::hint::black_box(s.sample(l, &[], &[]));
                    });
                } else {
                    for (s, l) in samplers.iter_mut().zip(&logits) {
                        std::hint::black_box(s.sample(l, &[], &[]));
                    }
                }
                t.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!(
            "64 sequences' draws {:<33} {:>8.2} ms ({} threads)",
            if pool {
                "on the thread pool"
            } else {
                "one after another"
            },
            times[10] * 1e3,
            if pool {
                rayon::current_num_threads()
            } else {
                1
            }
        );
    }
}
