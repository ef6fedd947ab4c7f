//! `hymba bench`: prefill and decode speed at several contexts, reported beside the memory read
//! bandwidth measured in the same run (decode reads every weight once per token, so bandwidth is
//! its ceiling).

use anyhow::{bail, Result};
use clap::Args;
use hymba::backend::{Backend, Cpu, Cuda};
use hymba::tensor::Dtype;
use hymba::{Config, DecodeWindow, Logits, Model, Step};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// Checkpoint directory.
    #[arg(
        long,
        conflicts_with = "synthetic",
        required_unless_present = "synthetic"
    )]
    pub(crate) model: Option<PathBuf>,
    /// Random weights with the shapes of a known model: `hymba-1.5b`.
    #[arg(long)]
    synthetic: Option<String>,
    /// Weight format: bf16 (as stored), q8_0 or q4_0 (quantized at load).
    #[arg(long, default_value = "bf16")]
    quant: String,
    /// Prompt tokens for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    /// Tokens decoded at each context (and steps of each batch size); speeds are from the median
    /// step time.
    #[arg(long, default_value_t = 8)]
    decode: usize,
    /// Contexts (tokens already in the cache) to decode at.
    #[arg(long, default_value = "128,1024,4096,8192", value_delimiter = ',')]
    contexts: Vec<usize>,
    /// Batch sizes for batched decode (sequences stepped together, each at --batch-context; the sizes
    /// take turns, a step each, `--decode` rounds).
    #[arg(long, value_delimiter = ',')]
    batch: Vec<usize>,
    /// Tokens already in each batched sequence's cache (the capacity a batch needs).
    #[arg(long, default_value_t = 128)]
    batch_context: usize,
    /// Element type of the K/V cache: auto (the checkpoint's precision: bf16 for bf16
    /// weights, f32 for f32), f32, or bf16 (half the memory and the bytes attention reads;
    /// logits within bf16 precision).
    #[arg(long, default_value = "auto")]
    kv_cache: crate::KvArg,
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Where to run: cpu, or cuda[:N] (a GPU; then the ceilings are the card's measured copy
    /// bandwidth and bf16 matrix rate).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Decode steps copy every sequence's logits to the host (as sampling with penalties,
    /// biases or log-probabilities does) instead of taking the token picked where the logits
    /// are (on a GPU, no logits leave the card).
    #[arg(long)]
    copy_logits: bool,
    /// The temperature of the picks (0: greedy); each sequence's variates from a seeded RNG.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// The picks' top-k filter (0: off), with a temperature above 0.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// The picks' top-p filter (1: off), with a temperature above 0.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
}

/// The real Hymba-1.5B config, compiled in so `--synthetic` needs no files.
const HYMBA_1_5B: &str = include_str!("../../../assets/hymba-1.5b-config.json");

/// The model of `--model` or `--synthetic`, quantized when asked.
fn load(
    model: Option<&std::path::Path>,
    synthetic: Option<&str>,
    quant: Option<Dtype>,
) -> Result<Model> {
    load_on(Cpu, model, synthetic, quant)
}

fn load_on<B: Backend>(
    b: B,
    model: Option<&std::path::Path>,
    synthetic: Option<&str>,
    quant: Option<Dtype>,
) -> Result<Model<B>> {
    Ok(match (model, synthetic) {
        (Some(dir), _) => Model::load_on(b, dir, quant)?,
        (None, Some("hymba-1.5b")) => {
            let cfg = Config::from_value(serde_json::from_str(HYMBA_1_5B)?)?;
            let mut store = hymba::synthetic::in_memory(&cfg, Dtype::BF16, 1, 1.0);
            if let Some(q) = quant {
                store.quantize(q);
            }
            Model::on(b, cfg, store)?
        }
        (None, Some(other)) => bail!("--synthetic {other}: known shapes are: hymba-1.5b"),
        (None, None) => bail!("give --model DIR or --synthetic hymba-1.5b"),
    })
}

#[derive(Args)]
pub struct QuantEvalArgs {
    #[arg(
        long,
        conflicts_with = "synthetic",
        required_unless_present = "synthetic"
    )]
    pub(crate) model: Option<PathBuf>,
    #[arg(long)]
    synthetic: Option<String>,
    /// q8_0 or q4_0.
    #[arg(long)]
    quant: String,
    /// Token ids to score (all positions); default: 64 pseudo-random ids.
    #[arg(long, value_delimiter = ',')]
    ids: Option<Vec<u32>>,
    #[arg(long)]
    json: bool,
}

/// Mean KL(original ‖ quantized) of the next-token distributions and the fraction of positions
/// whose top-1 token agrees, over every position of the input.
pub fn quant_eval(a: QuantEvalArgs) -> Result<()> {
    let q = crate::parse_quant(Some(&a.quant))?
        .ok_or_else(|| anyhow::anyhow!("--quant: expected q8_0 or q4_0"))?;
    let base = load(a.model.as_deref(), a.synthetic.as_deref(), None)?;
    let quant = load(a.model.as_deref(), a.synthetic.as_deref(), Some(q))?;
    let v = base.config.vocab_size;
    let ids = a
        .ids
        .clone()
        .unwrap_or_else(|| (0..64u32).map(|i| (i * 7919 + 13) % v as u32).collect());
    let lp = |m: &Model| -> Result<Vec<f32>> {
        let mut c = m.new_cache();
        Ok(m.forward(&mut c, &ids, Logits::All, DecodeWindow::Trained)?)
    };
    let (p, r) = (lp(&base)?, lp(&quant)?);
    let (mut kl, mut agree) = (0f64, 0usize);
    for (pr, qr) in p.chunks_exact(v).zip(r.chunks_exact(v)) {
        let ls = |x: &[f32]| -> Vec<f64> {
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z = x.iter().map(|&y| (y as f64 - m).exp()).sum::<f64>().ln() + m;
            x.iter().map(|&y| y as f64 - z).collect()
        };
        let (lpr, lqr) = (ls(pr), ls(qr));
        kl += lpr
            .iter()
            .zip(&lqr)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>();
        agree += (hymba::sample::argmax(pr) == hymba::sample::argmax(qr)) as usize;
    }
    let n = ids.len();
    let out = serde_json::json!({"quant": a.quant, "positions": n, "mean_kl": kl / n as f64, "top1_agreement": agree as f64 / n as f64});
    if a.json {
        println!("{out}");
    } else {
        println!(
            "{}: mean KL {:.5} nats, top-1 agreement {:.1}% over {n} positions",
            a.quant,
            kl / n as f64,
            100.0 * agree as f64 / n as f64
        );
    }
    Ok(())
}

fn peak_rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The median of step times: the machines this runs on are shared, and a neighbour's burst
/// slows a few steps, which the median ignores and a mean does not.
fn median(times: &mut [f64]) -> f64 {
    times.sort_by(f64::total_cmp);
    let n = times.len();
    if n % 2 == 1 {
        times[n / 2]
    } else {
        (times[n / 2 - 1] + times[n / 2]) / 2.0
    }
}

/// The ceilings a run is measured against, measured in the same run.
struct Ceilings {
    /// Bytes a second the weights can stream at: the CPU's read bandwidth, or a GPU's
    /// device-to-device copy (bytes read + written).
    bandwidth: f64,
    /// A GPU's bf16 matrix rate, FLOP/s.
    gemm: Option<f64>,
    /// What the device is, for the report.
    device: String,
    /// The card's memory in use now, for the peak.
    gpu_used: Option<Box<dyn Fn() -> usize>>,
    /// The bandwidth measured again (a CPU's, which moves by a quarter from minute to minute on
    /// a shared machine): each decode context's fraction is of the mean of two measurements,
    /// just before its steps and just after.
    bandwidth_now: Option<Box<dyn Fn() -> f64>>,
}

pub fn run(a: BenchArgs) -> Result<()> {
    if let Some(n) = a.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()?;
    }
    let quant = crate::parse_quant(Some(&a.quant))?;
    if a.prompt == 0 || a.decode == 0 {
        bail!("--prompt and --decode must be at least 1");
    }
    match crate::parse_device(&a.device)? {
        None => {
            let t = Instant::now();
            let model = a
                .kv_cache
                .apply(load(a.model.as_deref(), a.synthetic.as_deref(), quant)?);
            // The meta prefix is part of loading (computed on first use otherwise).
            model.ready()?;
            let load_s = t.elapsed().as_secs_f64();
            let bw = hymba::kernels::probe::read_bandwidth(1 << 30, 5);
            let device = format!("cpu, {} threads", rayon::current_num_threads());
            bench(
                &model,
                &a,
                load_s,
                Ceilings {
                    bandwidth: bw,
                    gemm: None,
                    device,
                    gpu_used: None,
                    bandwidth_now: Some(Box::new(|| {
                        hymba::kernels::probe::read_bandwidth(1 << 30, 5)
                    })),
                },
                &|_| {},
            )
        }
        Some(ordinal) => {
            let t = Instant::now();
            let cuda = Cuda::new(ordinal)?;
            let (bandwidth, gemm) = (cuda.copy_bandwidth()?, cuda.bf16_gemm_rate()?);
            let device = cuda.name.clone();
            let ctx = cuda.context();
            let gpu_used =
                Box::new(move || ctx.mem_get_info().map_or(0, |(free, total)| total - free));
            let model = a.kv_cache.apply(load_on(
                cuda,
                a.model.as_deref(),
                a.synthetic.as_deref(),
                quant,
            )?);
            model.ready()?;
            let load_s = t.elapsed().as_secs_f64();
            bench(
                &model,
                &a,
                load_s,
                Ceilings {
                    bandwidth,
                    gemm: Some(gemm),
                    device,
                    gpu_used: Some(gpu_used),
                    bandwidth_now: None,
                },
                &|phase| {
                    if let Some(p) = model.backend().take_profile() {
                        eprintln!("kernel time, {phase} (HYMBA_CUDA_PROFILE: each launch between two events, on one stream, no graphs):\n{p}");
                    }
                },
            )
        }
    }
}

/// `phase_done` is called after each phase (a GPU backend prints its kernel profile there).
fn bench<B: Backend>(
    model: &Model<B>,
    a: &BenchArgs,
    load_s: f64,
    ceil: Ceilings,
    phase_done: &dyn Fn(&str),
) -> Result<()> {
    let bw = ceil.bandwidth;
    let mut gpu_peak = 0usize;
    let mut gpu_mark = || {
        if let Some(f) = &ceil.gpu_used {
            gpu_peak = gpu_peak.max(f());
        }
    };
    gpu_mark();
    let v = model.config.vocab_size as u32;
    let ids: Vec<u32> = (0..a.prompt as u32).map(|i| (i * 7919 + 13) % v).collect();

    // On a GPU a first prompt also pays for loading the kernels cuBLAS picks for its shapes (CUDA
    // loads them lazily, tens of ms) and for timing cuBLASLt's candidates for each new shape:
    // one untimed prefill of the same length goes first, its profile apart from the timed one's.
    if ceil.gemm.is_some() {
        model.forward(
            &mut model.new_cache(),
            &ids,
            Logits::Last,
            DecodeWindow::Trained,
        )?;
        phase_done(&format!(
            "first prefill of {} tokens (untimed: its products include the timing of cuBLASLt's candidates)",
            a.prompt
        ));
    }
    let mut cache = model.new_cache();
    let t = Instant::now();
    model.forward(&mut cache, &ids, Logits::Last, DecodeWindow::Trained)?;
    let prefill_tok_s = a.prompt as f64 / t.elapsed().as_secs_f64();
    gpu_mark();
    drop(cache);
    phase_done(&format!("prefill of {} tokens (timed)", a.prompt));

    let wbytes = model.weight_bytes_per_token();
    let sampling = hymba::sample::SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        ..Default::default()
    };
    sampling.validate()?;
    let mut rng = hymba::kernels::testing::Rng::new(5);
    let mut pick = || {
        if a.copy_logits {
            Logits::Last
        } else {
            Logits::Sample(hymba::sample::Draw::of(&sampling, rng.uniform() as f32))
        }
    };
    let mut decode = Vec::new();
    for &ctx in &a.contexts {
        let before = ceil.bandwidth_now.as_ref().map(|f| f());
        let mut cache = model.cache_with_placeholder_tokens(ctx);
        // One untimed step warms caches and the thread pool.
        model.forward(&mut cache, &[5], Logits::Last, DecodeWindow::Trained)?;
        let mut times = Vec::with_capacity(a.decode);
        for i in 0..a.decode {
            let t = Instant::now();
            model.forward(
                &mut cache,
                &[(i as u32 * 31 + 7) % v],
                pick(),
                DecodeWindow::Trained,
            )?;
            times.push(t.elapsed().as_secs_f64());
        }
        gpu_mark();
        phase_done(&format!("decode @ {ctx}, {} steps", a.decode + 1));
        let tok_s = 1.0 / median(&mut times);
        let beside = match (before, &ceil.bandwidth_now) {
            (Some(b), Some(f)) => (b + f()) / 2.0,
            _ => bw,
        };
        decode.push(serde_json::json!({
            "context": ctx,
            "tok_s": tok_s,
            "bandwidth_gbs": beside / 1e9,
            "bandwidth_fraction": tok_s * wbytes as f64 / beside,
        }));
    }
    // Batch sizes are stepped in turn, round after round, so each sees the same conditions: on a
    // shared machine a neighbour's load drifts over seconds, and sizes measured one after the
    // other would compare different machines.
    if a.batch.contains(&0) {
        bail!("--batch: sizes must be at least 1");
    }
    type Set<B> = (Vec<hymba::Cache<B>>, Vec<[u32; 1]>);
    let mut sets: Vec<Set<B>> = a
        .batch
        .iter()
        .map(|&b| {
            (
                (0..b)
                    .map(|_| model.cache_with_placeholder_tokens(a.batch_context))
                    .collect(),
                (0..b as u32).map(|i| [(i * 31 + 7) % v]).collect(),
            )
        })
        .collect();
    // As a serving loop does: one logits buffer kept across steps.
    let mut logits = hymba::BatchLogits::default();
    let mut step = |(caches, ids): &mut Set<B>| -> Result<f64> {
        let mut steps: Vec<Step<B>> = caches
            .iter_mut()
            .zip(ids.iter())
            .map(|(cache, id)| Step {
                cache,
                ids: id,
                logits: pick(),
                window: DecodeWindow::Trained,
            })
            .collect();
        let t = Instant::now();
        model.forward_batch_into(&mut steps, &mut logits)?;
        Ok(t.elapsed().as_secs_f64())
    };
    for set in sets.iter_mut() {
        step(set)?;
    }
    phase_done("caches of the batches and their first steps");
    let mut times = vec![Vec::with_capacity(a.decode); sets.len()];
    for _ in 0..a.decode {
        for (set, ts) in sets.iter_mut().zip(times.iter_mut()) {
            ts.push(step(set)?);
        }
    }
    gpu_mark();
    phase_done(&format!("batch decode, {} steps of each batch", a.decode));
    let batched: Vec<_> =
        a.batch.iter().zip(times.iter_mut()).map(|(&b, ts)| serde_json::json!({"batch": b, "context": a.batch_context, "tok_s": b as f64 / median(ts)})).collect();
    let params = model.parameter_counts().total;
    let prefill_flop_s = prefill_tok_s * 2.0 * params as f64;
    let mut out = serde_json::json!({
        "model": a.model.as_ref().map(|p| p.display().to_string()).or(a.synthetic.clone()),
        "device": ceil.device,
        "quant": a.quant,
        "kv_cache": model.kv_dtype(),
        "threads": rayon::current_num_threads(),
        "load_s": load_s,
        "parameters": params,
        "read_bandwidth_gbs": bw / 1e9,
        "weight_bytes_per_token": wbytes,
        "prompt_tokens": a.prompt,
        "prefill_tok_s": prefill_tok_s,
        "prefill_gflop_s": prefill_flop_s / 1e9,
        "decode_pick": if a.copy_logits { "logits copied out".to_string() } else { format!("picked at temperature {}, top-k {}, top-p {}", a.temperature, a.top_k, a.top_p) },
        "decode": decode,
        "batched_decode": batched,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    if let Some(g) = ceil.gemm {
        // On a GPU the weights stream at the card's copy bandwidth (bytes read + written) and
        // prefill is bounded by its bf16 matrix rate.
        out["copy_bandwidth_gbs"] = (bw / 1e9).into();
        out["bf16_gemm_tflops"] = (g / 1e12).into();
        out["prefill_gemm_fraction"] = (prefill_flop_s / g).into();
        out["gpu_peak_memory_bytes"] = gpu_peak.into();
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "model {} ({} params, {} weights, {:?} K/V cache, {}, loaded in {load_s:.1} s)",
        out["model"].as_str().unwrap_or(""),
        params,
        a.quant,
        model.kv_dtype(),
        ceil.device
    );
    match ceil.gemm {
        None => println!("read bandwidth      {:>8.1} GB/s (measured now)", bw / 1e9),
        Some(g) => {
            println!(
                "copy bandwidth      {:>8.1} GB/s (device to device, read + write, measured now)",
                bw / 1e9
            );
            println!(
                "bf16 matrix rate    {:>8.1} TFLOP/s (cuBLAS, 8192³, measured now)",
                g / 1e12
            );
        }
    }
    println!("weights per token   {:>8.1} MB", wbytes as f64 / 1e6);
    println!(
        "decode steps end in {}",
        if a.copy_logits {
            "every logit copied to the host (--copy-logits)".to_string()
        } else {
            format!(
                "a token picked where the logits are, at temperature {} (top-k {}, top-p {})",
                a.temperature, a.top_k, a.top_p
            )
        }
    );
    let of_gemm = ceil.gemm.map_or(String::new(), |g| {
        format!(", {:.1}% of the matrix rate", 100.0 * prefill_flop_s / g)
    });
    println!(
        "prefill {:>5} tok   {:>8.1} tok/s ({:.0} GFLOP/s at 2·params a token{of_gemm})",
        a.prompt,
        prefill_tok_s,
        prefill_flop_s / 1e9
    );
    for d in &decode {
        println!(
            "decode @ {:>6}     {:>8.2} tok/s ({:.0}% of the bandwidth, {:.1} GB/s beside)",
            d["context"],
            d["tok_s"].as_f64().unwrap_or(0.0),
            100.0 * d["bandwidth_fraction"].as_f64().unwrap_or(0.0),
            d["bandwidth_gbs"].as_f64().unwrap_or(0.0)
        );
    }
    // Throughput relative to one sequence, when it was measured in this run.
    let single = batched
        .iter()
        .find(|d| d["batch"] == 1)
        .and_then(|d| d["tok_s"].as_f64());
    for d in &batched {
        let tok_s = d["tok_s"].as_f64().unwrap_or(0.0);
        let ratio = match single {
            Some(s) if d["batch"] != 1 => format!(" ({:.2}x batch 1)", tok_s / s),
            _ => String::new(),
        };
        println!(
            "batch {:>3} decode    {tok_s:>8.2} tok/s in all{ratio} @ {}",
            d["batch"], a.batch_context
        );
    }
    println!(
        "peak RSS            {:>8.1} MB",
        peak_rss_bytes() as f64 / 1e6
    );
    if ceil.gemm.is_some() {
        println!(
            "peak GPU memory     {:>8.1} MB (in use on the card, sampled after each phase)",
            gpu_peak as f64 / 1e6
        );
    }
    Ok(())
}
