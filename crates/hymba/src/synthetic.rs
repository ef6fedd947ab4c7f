//! Synthetic checkpoints: every tensor of the official layout for a given config, with random
//! weights, written as safetensors. Used by tests (tiny random configurations) and to measure
//! load and speed at the real Hymba-1.5B shapes without downloading anything.

use crate::config::{Config, Dims};
use crate::error::{Error, Result};
use crate::tensor::{write_safetensors, Dtype, Tensor, TensorStore};
use hymba_kernels::testing::Rng;
use std::path::Path;

/// How a tensor is filled.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    /// Uniform with mean 0 and this standard deviation.
    Random(f32),
    Const(f32),
    /// `A_log` as Mamba initialises it: row c is `log(1..=N)`.
    ALog,
    /// A dt bias giving Δ between 1e-3 and 1e-1 (inverse softplus of a log-uniform draw).
    DtBias,
}

/// Name, shape and fill of every tensor a checkpoint for `cfg` holds, in the official names.
/// `gain` scales the random matrices (std = gain / sqrt(fan_in)).
pub fn tensor_specs(cfg: &Config, gain: f32) -> Vec<(String, Vec<usize>, Init)> {
    let Dims {
        v,
        d,
        e,
        n,
        k,
        r,
        f,
        m,
    } = cfg.dims();
    let lin = |fan_in: usize| Init::Random(gain / (fan_in as f32).sqrt());
    let mut t: Vec<(String, Vec<usize>, Init)> = vec![
        (
            "model.embed_tokens.weight".into(),
            vec![v, d],
            Init::Random(1.0),
        ),
        (
            "model.final_layernorm.weight".into(),
            vec![d],
            Init::Const(1.0),
        ),
    ];
    if m > 0 {
        t.push(("model.memory_tokens".into(), vec![m, d], Init::Random(1.0)));
    }
    if !cfg.tie_word_embeddings {
        t.push(("lm_head.weight".into(), vec![v, d], lin(d)));
    }
    let (plan, _) = cfg.plan();
    for (i, lp) in plan.iter().enumerate() {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        t.push((p("input_layernorm.weight"), vec![d], Init::Const(1.0)));
        t.push((
            p("mamba.in_proj.weight"),
            vec![cfg.in_proj_rows(lp.computes_kv), d],
            lin(d),
        ));
        t.push((p("mamba.conv1d.weight"), vec![e, 1, k], lin(k)));
        if cfg.mamba_conv_bias {
            t.push((p("mamba.conv1d.bias"), vec![e], Init::Random(0.1)));
        }
        t.push((p("mamba.x_proj.0.weight"), vec![r + 2 * n, e], lin(e)));
        t.push((p("mamba.dt_proj.0.weight"), vec![e, r], lin(r)));
        t.push((p("mamba.dt_proj.0.bias"), vec![e], Init::DtBias));
        t.push((p("mamba.A_log.0"), vec![e, n], Init::ALog));
        t.push((p("mamba.D.0"), vec![e], Init::Const(1.0)));
        if cfg.mamba_inner_layernorms {
            t.push((p("mamba.dt_layernorm.weight"), vec![r], Init::Const(1.0)));
            t.push((p("mamba.B_layernorm.weight"), vec![n], Init::Const(1.0)));
            t.push((p("mamba.C_layernorm.weight"), vec![n], Init::Const(1.0)));
        }
        t.push((
            p("mamba.pre_avg_layernorm1.weight"),
            vec![e],
            Init::Const(1.0),
        ));
        t.push((
            p("mamba.pre_avg_layernorm2.weight"),
            vec![e],
            Init::Const(1.0),
        ));
        t.push((p("mamba.out_proj.weight"), vec![d, e], lin(e)));
        t.push((p("pre_moe_layernorm.weight"), vec![d], Init::Const(1.0)));
        t.push((p("moe.experts.0.gate_proj.weight"), vec![f, d], lin(d)));
        t.push((p("moe.experts.0.up_proj.weight"), vec![f, d], lin(d)));
        t.push((p("moe.experts.0.down_proj.weight"), vec![d, f], lin(f)));
    }
    t
}

fn fill(init: Init, shape: &[usize], rng: &mut Rng, out: &mut Vec<f32>) {
    let numel: usize = shape.iter().product();
    out.clear();
    match init {
        Init::Random(std) => {
            // Uniform on [-a, a] has std a / sqrt(3); two draws per u64 keep this fast at 1.5B.
            let a = std * 3f32.sqrt();
            while out.len() < numel {
                let x = rng.next_u64();
                for half in [x as u32, (x >> 32) as u32] {
                    if out.len() < numel {
                        out.push(((half as f32 / u32::MAX as f32) * 2.0 - 1.0) * a);
                    }
                }
            }
        }
        Init::Const(c) => out.resize(numel, c),
        Init::ALog => {
            let n = shape[1];
            for _ in 0..shape[0] {
                out.extend((1..=n).map(|j| (j as f32).ln()));
            }
        }
        Init::DtBias => {
            for _ in 0..numel {
                let dt = (1e-3f64.ln() + rng.uniform() * (1e-1f64.ln() - 1e-3f64.ln())).exp();
                out.push((dt + (-(-dt).exp_m1()).ln()) as f32);
            }
        }
    }
}

fn encode(v: &[f32], dtype: Dtype, out: &mut Vec<u8>) {
    out.clear();
    match dtype {
        Dtype::Q8_0 | Dtype::Q4_0 => unreachable!("refused by the callers"),
        Dtype::F32 => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        Dtype::BF16 => out.extend(
            v.iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()),
        ),
        Dtype::F16 => out.extend(v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes())),
    }
}

/// Writes `dir/config.json` (the config's own JSON) and `dir/model.safetensors` with random
/// weights in `dtype`, one tensor at a time so memory stays small. Files appear atomically.
pub fn write_checkpoint(
    cfg: &Config,
    dir: &Path,
    dtype: Dtype,
    seed: u64,
    gain: f32,
) -> Result<()> {
    if dtype.quant_name().is_some() {
        return Err(Error::Input(
            "synthetic checkpoints are written in f32, bf16 or f16; quantize them afterwards"
                .into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let specs = tensor_specs(cfg, gain);
    let headers: Vec<_> = specs
        .iter()
        .map(|(n, s, _)| {
            (
                n.clone(),
                dtype.safetensors_name(),
                s.clone(),
                dtype.nbytes(s.iter().product()),
            )
        })
        .collect();
    let mut rng = Rng::new(seed);
    let mut vals = Vec::new();
    write_safetensors(&dir.join("model.safetensors"), &headers, None, |i, out| {
        fill(specs[i].2, &specs[i].1, &mut rng, &mut vals);
        encode(&vals, dtype, out);
    })?;
    let cfg_text = serde_json::to_string_pretty(&cfg.raw).expect("json");
    crate::error::write_atomic(&dir.join("config.json"), cfg_text.as_bytes())
}

/// The same random checkpoint as [`write_checkpoint`], built in memory (no file): for
/// benchmarks at real shapes in seconds.
pub fn in_memory(cfg: &Config, dtype: Dtype, seed: u64, gain: f32) -> TensorStore {
    assert!(
        dtype.quant_name().is_none(),
        "quantize the store afterwards"
    );
    let mut rng = Rng::new(seed);
    let (mut vals, mut bytes) = (Vec::new(), Vec::new());
    let mut tensors = std::collections::BTreeMap::new();
    for (name, shape, init) in tensor_specs(cfg, gain) {
        fill(init, &shape, &mut rng, &mut vals);
        encode(&vals, dtype, &mut bytes);
        tensors.insert(name, Tensor::from_bytes(dtype, shape, &bytes));
    }
    TensorStore::from_tensors("(synthetic)", tensors)
}
