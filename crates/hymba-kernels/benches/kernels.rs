//! `cargo bench -p hymba-kernels`: the hot kernels at Hymba-1.5B's shapes, each reported as a
//! fraction of a ceiling measured in the same run (read bandwidth, or the peak of the arithmetic
//! the kernel runs on: f32 FMA, bf16 dots, int8 dots).
//!
//! Set `HYMBA_ISA=portable` to measure the portable path. An argument keeps only the lines whose
//! label contains it (`cargo bench -p hymba-kernels -- "bf16 t=16"`). For experiments, the
//! environment changes the shapes: `K` and `N` (matrix columns and rows), `KVH` (K/V heads, five
//! query heads each), `LAYERS` (caches rotated through, so they come from memory), `DV` (the
//! value heads' width: 64 unless set; Hymba-1.5B's is 128), `REPS` (attention repetitions, best
//! taken).

use half::bf16;
use hymba_kernels::attention::{attention, AttnShape, KeyPos, KvBlock, KvElem, Layout, Visibility};
use hymba_kernels::isa::{isa, Level};
use hymba_kernels::quant::{self, BlockQ4_0, BlockQ8_0, QK};
use hymba_kernels::testing::Rng;
use hymba_kernels::{matmul, probe, qpanel, scan, Mat, WeightData};
use std::time::Instant;

/// Best seconds of `reps` runs of `f`.
/// A cache line of words, for aligned weight buffers.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Words([u32; 16]);

fn words(v: &[Words]) -> &[u32] {
    // SAFETY: `Words` is 16 plain words with no padding.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), 16 * v.len()) }
}

fn words_mut(v: &mut [Words]) -> &mut [u32] {
    // SAFETY: as `words`.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), 16 * v.len()) }
}

fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let on = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let bw = probe::read_bandwidth(1 << 30, 5);
    let peak = probe::fma_peak().unwrap_or(f64::NAN);
    let (bf16_peak, int8_peak) = (probe::bf16_dot_peak(), probe::int8_dot_peak());
    // The products with bf16 inputs run on AMX tiles where the dispatch picked AMX.
    let amx_peak = probe::amx_peak().filter(|_| isa().level() == Level::Amx);
    let shown = |p: Option<f64>| p.map_or("none".into(), |p| format!("{:.0} G", p / 1e9));
    println!(
        "read bandwidth {:.1} GB/s, peaks: f32 FMA {:.0} GFLOP/s, bf16 dot {}FLOP/s, AMX bf16 {}FLOP/s, int8 dot {}OP/s; {} threads",
        bw / 1e9,
        peak / 1e9,
        shown(bf16_peak),
        shown(amx_peak),
        shown(int8_peak),
        rayon::current_num_threads()
    );
    let mut rng = Rng::new(1);
    // [5504, 1600] matrices (the MLP's shape), as many copies of each format as make 256 MB, eight
    // times the last-level cache, so every pass streams from memory as decode does.
    let k: usize = env_or("K", 1600);
    let n: usize = env_or("N", 5504 * 1600 / k);
    // Input rows of the products: decode, batched decode and a prompt part by default; `TS`
    // takes a list (`TS=512` for a 512-token prompt part).
    let rows: Vec<usize> = std::env::var("TS")
        .ok()
        .map(|v| v.split(',').filter_map(|t| t.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 16, 128]);
    let any = [
        "bf16",
        "bf16 panels",
        "bf16 pairs",
        "q8_0",
        "q4_0",
        "q8_0 panels",
        "q4_0 panels",
    ]
    .iter()
    .any(|q| rows.iter().any(|t| on(&format!("matmul {q} t={t}"))));
    let wf: Vec<f32> = if any {
        rng.normal_vec(n * k, 0.02)
    } else {
        Vec::new()
    };
    let copies = |bytes: usize| {
        if any {
            (256usize << 20).div_ceil(bytes)
        } else {
            0
        }
    };
    let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut wq8 = vec![BlockQ8_0::default(); wf.len() / QK];
    quant::quantize_q8_0(&wf, &mut wq8);
    let mut wq4 = vec![BlockQ4_0::default(); wf.len() / QK];
    quant::quantize_q4_0(&wf, &mut wq4);
    drop(wf);
    // No matrix when no matmul bench is asked for (a filter for another kernel).
    let n = if any { n } else { 0 };
    let mut wp = vec![bf16::ZERO; matmul::panels_len(n, k)];
    matmul::pack_bf16_panels(&wb, n, k, &mut wp);
    let mut wq = vec![0u32; matmul::pairs_len(n, k)];
    matmul::pack_bf16_pairs(&wb, n, k, &mut wq);
    let wb = vec![wb; copies(n * k * 2)];
    let wp = vec![wp; copies(n * k * 2)];
    // Page-aligned, as the engine's packed weights are (each in a mapping of its own): the AMX
    // tiles read whole cache lines.
    let wq: Vec<Vec<Words>> = (0..copies(n * k * 2))
        .map(|_| {
            let mut v = vec![Words([0; 16]); wq.len().div_ceil(16)];
            words_mut(&mut v)[..wq.len()].copy_from_slice(&wq);
            v
        })
        .collect();
    let mut pq8 = vec![qpanel::PanelQ8_0::default(); qpanel::panels_len(n, k)];
    qpanel::pack(&wq8, n, k, &mut pq8);
    let mut pq4 = vec![qpanel::PanelQ4_0::default(); qpanel::panels_len(n, k)];
    qpanel::pack(&wq4, n, k, &mut pq4);
    let wq8 = vec![wq8; copies(n * k / QK * std::mem::size_of::<BlockQ8_0>())];
    let wq4 = vec![wq4; copies(n * k / QK * std::mem::size_of::<BlockQ4_0>())];
    let pq8 = vec![pq8; copies(n * k / QK * std::mem::size_of::<BlockQ8_0>())];
    let pq4 = vec![pq4; copies(n * k / QK * std::mem::size_of::<BlockQ4_0>())];
    for (name, mats) in [
        (
            "bf16",
            wb.iter().map(|w| WeightData::BF16(w)).collect::<Vec<_>>(),
        ),
        (
            "bf16 panels",
            wp.iter().map(|w| WeightData::BF16Panels(w)).collect(),
        ),
        // The engine's layout where the CPU has AVX-512 BF16 (`matmul::pairs_pay`).
        (
            "bf16 pairs",
            wq.iter()
                .map(|w| WeightData::BF16Pairs(&words(w)[..matmul::pairs_len(n, k)]))
                .collect(),
        ),
        ("q8_0", wq8.iter().map(|w| WeightData::Q8_0(w)).collect()),
        ("q4_0", wq4.iter().map(|w| WeightData::Q4_0(w)).collect()),
        (
            "q8_0 panels",
            pq8.iter().map(|w| WeightData::Q8_0Panels(w)).collect(),
        ),
        (
            "q4_0 panels",
            pq4.iter().map(|w| WeightData::Q4_0Panels(w)).collect(),
        ),
    ] {
        let bytes: usize = match mats.first().copied().unwrap_or(WeightData::F32(&[])) {
            WeightData::BF16(_) | WeightData::BF16Panels(_) | WeightData::BF16Pairs(_) => n * k * 2,
            WeightData::Q8_0(_) | WeightData::Q8_0Panels(_) => {
                n * k / QK * std::mem::size_of::<BlockQ8_0>()
            }
            _ => n * k / QK * std::mem::size_of::<BlockQ4_0>(),
        };
        for &t in &rows {
            let label = format!("matmul {name} t={t}");
            if !on(&label) || mats.is_empty() {
                continue;
            }
            let x = rng.normal_vec(t * k, 1.0);
            let mut y = vec![0f32; t * n];
            let s = best(5, || {
                for w in &mats {
                    matmul(&x, Mat::new(*w, n, k), &mut y);
                }
            }) / mats.len() as f64;
            let gbs = bytes as f64 / s / 1e9;
            // The ceiling of the arithmetic `matmul` picks for these weights and rows.
            let w = mats[0];
            let int8 = t <= matmul::QUANT_DOT_MAX_ROWS
                && matches!(
                    w,
                    WeightData::Q8_0(_)
                        | WeightData::Q4_0(_)
                        | WeightData::Q8_0Panels(_)
                        | WeightData::Q4_0Panels(_)
                );
            let (ceiling, unit) = match (int8, matmul::rounds_inputs(isa(), &w, t)) {
                (true, _) if int8_peak.is_some() => (int8_peak, "int8 dot"),
                (false, true) if amx_peak.is_some() => (amx_peak, "AMX bf16"),
                (false, true) if bf16_peak.is_some() => (bf16_peak, "bf16 dot"),
                _ => (Some(peak), "f32 FMA"),
            };
            let rate = 2.0 * (t * n * k) as f64 / s;
            println!(
                "{label:<22} {:>7.1} µs  {gbs:>5.1} GB/s ({:>3.0}% of read bandwidth)  {:>6.1} G/s ({:>3.0}% of the {unit} peak)",
                s * 1e6,
                100.0 * gbs * 1e9 / bw,
                rate / 1e9,
                100.0 * rate / ceiling.unwrap_or(f64::NAN)
            );
        }
    }
    // Decode attention: one query of 25 heads over 5 K/V heads of 64, against the meta prefix
    // (128 rows) and a sliding-window ring (1024) or a global context (8192), K/V in f32 rows,
    // f32 heads or bf16 heads.
    let reps: usize = env_or("REPS", 5);
    let kvh: usize = env_or("KVH", 5);
    // Eight layers' worth of K/V so the caches come from memory, as in a real step.
    let nl: usize = env_or("LAYERS", 8);
    for ctx in [1024usize, 8192] {
        for (layout, name) in [
            (Layout::RowMajor, "rows"),
            (Layout::HeadMajor { cap: 128 + ctx }, "heads"),
        ] {
            let label = format!("attention decode @{ctx} {name}");
            if on(&label) {
                bench_attention::<f32>(&label, &mut rng, ctx, layout, kvh, nl, reps, bw, |v| v);
            }
        }
        let label = format!("attention decode @{ctx} heads bf16");
        if on(&label) {
            bench_attention::<bf16>(
                &label,
                &mut rng,
                ctx,
                Layout::HeadMajor { cap: 128 + ctx },
                kvh,
                nl,
                reps,
                bw,
                bf16::from_f32,
            );
        }
    }
    // Prefill attention: a 512-token prompt part after the meta prefix (128 rows), causal,
    // bf16 K/V by heads: the prompt tiles' kernels (AMX tiles where the CPU has them).
    let label = "attention prefill 512 heads bf16";
    if on(label) {
        let sh = attn_shape(kvh);
        let (t, n) = (512, 128 + 512);
        let mut vec = |n: usize| -> Vec<bf16> {
            rng.normal_vec(n, 1.0)
                .into_iter()
                .map(bf16::from_f32)
                .collect()
        };
        let (k, v) = (vec(n * sh.kv_heads * sh.dk), vec(n * sh.kv_heads * sh.dv));
        let q = rng.normal_vec(t * sh.heads * sh.dk, 1.0);
        let pos: Vec<usize> = (128..n).collect();
        let mut out = vec![0f32; t * sh.heads * sh.dv];
        let vis = Visibility {
            window: None,
            sinks: 0,
        };
        let s = best(reps, || {
            hymba_kernels::on_busy_pool(|| {
                let blocks = [KvBlock {
                    k: &k,
                    v: &v,
                    rows: n,
                    layout: Layout::HeadMajor { cap: n },
                    pos: KeyPos::Contiguous(0),
                }];
                attention(&q, &pos, &blocks, sh, 0.125, vis, &mut out);
            })
        });
        // Each query against the keys up to its own position.
        let pairs: usize = pos.iter().map(|p| p + 1).sum();
        let flops = 2.0 * (pairs * sh.heads * (sh.dk + sh.dv)) as f64;
        println!(
            "{label:<33} {:>7.1} µs  {:>6.1} GFLOP/s",
            s * 1e6,
            flops / s / 1e9
        );
    }
    // Element-wise activations over a 512-token prompt part: Δ's softplus (3200 channels) and
    // the MLP's SiLU·up (5504), one thread (`HYMBA_ISA=avx2` for the AVX2 kernels).
    for (label, width) in [("act softplus", 3200), ("act silu_mul", 5504)] {
        if !on(label) {
            continue;
        }
        let len = 512 * width;
        let (x, b) = (rng.normal_vec(len, 3.0), rng.normal_vec(len, 1.0));
        let mut a = x.clone();
        let s = best(10, || {
            a.copy_from_slice(&x);
            if label == "act softplus" {
                hymba_kernels::act::softplus_bias(&mut a, &b);
            } else {
                hymba_kernels::act::silu_mul(&mut a, &b);
            }
        });
        println!(
            "{label} 512x{width}    {:>9.1} µs  {:>5.2} ns an element (the copy included)",
            s * 1e6,
            s * 1e9 / len as f64
        );
    }
    // The selective scan of 3200 channels of 16 states (Hymba-1.5B): a decode step (t = 1) and
    // a 512-row prompt chunk.
    for (label, t) in [("scan decode", 1), ("scan prefill", 512)] {
        if !on(label) {
            continue;
        }
        let (e, n) = (3200, 16);
        let x = rng.normal_vec(t * e, 1.0);
        let delta: Vec<f32> = rng.normal_vec(t * e, 0.5).iter().map(|v| v.abs()).collect();
        let a: Vec<f32> = rng
            .normal_vec(e * n, 1.0)
            .iter()
            .map(|v| -v.exp())
            .collect();
        let (b, c, d) = (
            rng.normal_vec(t * n, 1.0),
            rng.normal_vec(t * n, 1.0),
            rng.normal_vec(e, 1.0),
        );
        let mut state = vec![0f32; e * n];
        let mut y = vec![0f32; t * e];
        let inp = scan::ScanInput {
            x: &x,
            delta: &delta,
            a: &a,
            b: &b,
            c: &c,
            d: &d,
        };
        let s = best(if t == 1 { 50 } else { 5 }, || {
            scan::selective_scan(&inp, &mut state, &mut y)
        });
        println!(
            "{label} {t}x{e}x{n}    {:>9.1} µs  {:>5.1} ns a channel-step",
            s * 1e6,
            s * 1e9 / (t * e) as f64
        );
    }
}

/// `key` from the environment as a number, else `default`.
fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Hymba-1.5B's attention with `kvh` K/V heads of five query heads each, dk 64, and the value
/// heads `DV` wide (the 1.5B model's are 128; 64 unless set).
fn attn_shape(kvh: usize) -> AttnShape {
    AttnShape {
        heads: 5 * kvh,
        kv_heads: kvh,
        dk: 64,
        dv: env_or("DV", 64),
    }
}

/// One decode query against `ctx` + 128 keys held as `T`, over `nl` layers' caches in turn.
#[allow(clippy::too_many_arguments)]
fn bench_attention<T: KvElem>(
    label: &str,
    rng: &mut Rng,
    ctx: usize,
    layout: Layout,
    kvh: usize,
    nl: usize,
    reps: usize,
    bw: f64,
    to: fn(f32) -> T,
) {
    let sh = attn_shape(kvh);
    let (kw, vw) = (sh.kv_heads * sh.dk, sh.kv_heads * sh.dv);
    let mut vec = |n: usize| -> Vec<T> { rng.normal_vec(n, 1.0).into_iter().map(to).collect() };
    let layers: Vec<(Vec<T>, Vec<T>)> = (0..nl)
        .map(|_| (vec((128 + ctx) * kw), vec((128 + ctx) * vw)))
        .collect();
    let q = rng.normal_vec(sh.heads * sh.dk, 1.0);
    let mut out = vec![0f32; sh.heads * sh.dv];
    let pos = 128 + ctx;
    let vis = Visibility {
        window: None,
        sinks: 0,
    };
    // On the pool with its threads kept busy, as the model runs it: called from outside, each
    // of the kernel's three parallel loops would also time two thread wake-ups.
    let s = best(reps, || {
        hymba_kernels::on_busy_pool(|| {
            for (k, v) in &layers {
                let blocks = [KvBlock {
                    k,
                    v,
                    rows: 128 + ctx,
                    layout,
                    pos: KeyPos::Contiguous(0),
                }];
                attention(&q, &[pos], &blocks, sh, 0.125, vis, &mut out);
            }
        })
    }) / layers.len() as f64;
    let bytes = (128 + ctx) * (kw + vw) * std::mem::size_of::<T>();
    let gbs = bytes as f64 / s / 1e9;
    println!(
        "{label:<33} {:>7.1} µs  {gbs:>5.1} GB/s ({:>3.0}% of read bandwidth)",
        s * 1e6,
        100.0 * gbs * 1e9 / bw
    );
}
