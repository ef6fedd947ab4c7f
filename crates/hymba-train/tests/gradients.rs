//! The training model against independent references on tiny random configurations: its
//! forward against the inference engine's (same weights), and its gradient against finite
//! differences of its own loss, tensor by tensor.

use hymba::kernels::testing::{assert_close, Rng};
use hymba::tensor::Dtype;
use hymba::{Config, Model};
use hymba_train::{Batch, Params, TrainModel};
use serde_json::json;

struct Case {
    layers: usize,
    heads: usize,
    kv_heads: usize,
    meta: usize,
    window: usize,
    global: Vec<usize>,
    groups: Vec<Vec<usize>>,
    inner_norms: bool,
    tied: bool,
}

fn cases() -> Vec<Case> {
    vec![
        // A three-layer reuse group with GQA, meta tokens, windows shorter than the sequence.
        Case {
            layers: 4,
            heads: 4,
            kv_heads: 2,
            meta: 3,
            window: 3,
            global: vec![0],
            groups: vec![vec![1, 2, 3]],
            inner_norms: true,
            tied: true,
        },
        // No meta tokens, no inner norms, untied head, two groups ending in a global layer.
        Case {
            layers: 3,
            heads: 2,
            kv_heads: 2,
            meta: 0,
            window: 2,
            global: vec![2],
            groups: vec![vec![0, 1]],
            inner_norms: false,
            tied: false,
        },
    ]
}

fn config(c: &Case) -> Config {
    Config::from_value(json!({
        "model_type": "hymba",
        "vocab_size": 23,
        "hidden_size": 16,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads,
        "num_key_value_heads": c.kv_heads,
        "attn_hidden_size": -1,
        "kq_head_dim": -1,
        "v_head_dim": 32 / c.heads,
        "mamba_expand": 2,
        "mamba_d_state": 3,
        "mamba_d_conv": 4,
        "mamba_dt_rank": 4,
        "intermediate_size": 20,
        "num_memory_tokens": c.meta,
        "sliding_window": c.window,
        "global_attn_idx": c.global,
        "kv_reuse_group": c.groups,
        "mamba_inner_layernorms": c.inner_norms,
        "rope": true,
        "rope_theta": 10000.0,
        "rope_type": "ntk",
        "max_position_embeddings": 64,
        "orig_max_position_embeddings": 32,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": c.tied,
    }))
    .unwrap()
}

/// Parameters far from their initial values, so every path carries signal.
fn random_params(cfg: &Config, seed: u64) -> Params {
    let mut p = Params::init(cfg, seed);
    let mut rng = Rng::new(seed + 1);
    for t in p.info.clone() {
        let v = &mut p.data[t.range.clone()];
        if t.name.contains("A_log") || t.name.contains("dt_proj.0.bias") {
            continue;
        }
        let std = if t.shape.len() >= 2 {
            0.3 / (*t.shape.last().unwrap() as f32).sqrt()
        } else {
            0.2
        };
        for x in v.iter_mut() {
            *x += rng.normal() * std;
        }
    }
    p
}

fn batch(cfg: &Config, b: usize, t: usize, seed: u64) -> Batch {
    let mut rng = Rng::new(seed);
    Batch {
        ids: (0..b * (t + 1))
            .map(|_| rng.below(cfg.vocab_size) as u32)
            .collect(),
        b,
        t,
    }
}

#[test]
fn training_forward_equals_engine_forward() {
    for (ci, c) in cases().iter().enumerate() {
        let cfg = config(c);
        let params = random_params(&cfg, 10 + ci as u64);
        let tm = TrainModel::new(cfg.clone(), &params);
        let (b, t) = (2, 9);
        let bt = batch(&cfg, b, t, 3);
        let (_, tape) = tm.forward(&params, &bt);
        let engine = Model::from_store(cfg.clone(), params.to_store(Dtype::F32)).unwrap();
        let v = cfg.vocab_size;
        for s in 0..b {
            let ids = &bt.ids[s * (t + 1)..s * (t + 1) + t];
            let want = engine.forward_uncached(ids).unwrap();
            assert_close(
                &tape.logits[s * t * v..(s + 1) * t * v],
                &want,
                1e-4,
                &format!("case {ci} sequence {s}"),
            );
        }
    }
}

/// `hymba::score` (the engine's perplexity) over non-overlapping windows equals the training
/// loss over the same windows, computed by the independent training forward; overlapping
/// windows score every token but the first exactly once.
#[test]
fn scoring_equals_the_training_loss() {
    for (ci, c) in cases().iter().enumerate() {
        let cfg = config(c);
        let params = random_params(&cfg, 30 + ci as u64);
        let tm = TrainModel::new(cfg.clone(), &params);
        let (k, t) = (3, 9);
        let bt = batch(&cfg, k, t, 5);
        let (loss, _) = tm.forward(&params, &bt);
        let engine = Model::from_store(cfg.clone(), params.to_store(Dtype::F32)).unwrap();
        let s = hymba::score::score(&engine, &bt.ids, t + 1, t + 1, &mut |_, _| {}).unwrap();
        assert_eq!((s.windows, s.tokens), (k, k * t), "case {ci}");
        assert!(
            (s.mean_nll() - loss as f64).abs() < 1e-4 * (loss as f64).max(1.0),
            "case {ci}: scored {} vs training loss {loss}",
            s.mean_nll()
        );
        let overlapping = hymba::score::score(&engine, &bt.ids, 7, 3, &mut |_, _| {}).unwrap();
        assert_eq!(overlapping.tokens, bt.ids.len() - 1, "case {ci}");
    }
}

#[test]
fn gradients_match_finite_differences() {
    for (ci, c) in cases().iter().enumerate() {
        let cfg = config(c);
        let mut params = random_params(&cfg, 20 + ci as u64);
        let tm = TrainModel::new(cfg.clone(), &params);
        let bt = batch(&cfg, 2, 8, 4);
        let (_, grad) = tm.loss_and_grad(&params, &bt);
        let mut rng = Rng::new(7);
        for t in params.info.clone() {
            // Directional derivative along a random direction over the whole tensor, by central
            // differences at h and h/2 combined to cancel the h² term (Richardson).
            let dir = rng.normal_vec(t.range.len(), 1.0);
            let analytic: f64 = grad[t.range.clone()]
                .iter()
                .zip(&dir)
                .map(|(g, r)| (*g as f64) * (*r as f64))
                .sum();
            let orig = params.data[t.range.clone()].to_vec();
            let mut loss_at = |step: f32| {
                for ((p, o), r) in params.data[t.range.clone()].iter_mut().zip(&orig).zip(&dir) {
                    *p = o + step * r;
                }
                tm.forward(&params, &bt).0 as f64
            };
            let h = 4e-3f32;
            let d1 = (loss_at(h) - loss_at(-h)) / (2.0 * h as f64);
            let d2 = (loss_at(h / 2.0) - loss_at(-h / 2.0)) / (h as f64);
            let fd = (4.0 * d2 - d1) / 3.0;
            params.data[t.range.clone()].copy_from_slice(&orig);
            let tol = 1e-2 * fd.abs().max(analytic.abs()) + 5e-4;
            assert!(
                (fd - analytic).abs() <= tol,
                "case {ci}, {}: analytic {analytic:.6}, finite difference {fd:.6}",
                t.name
            );
            let norm = grad[t.range.clone()]
                .iter()
                .map(|g| g * g)
                .sum::<f32>()
                .sqrt();
            assert!(
                norm > 1e-6,
                "case {ci}, {}: no gradient reaches it (norm {norm})",
                t.name
            );
        }
    }
}

/// On the official fixture, the training forward gives NVIDIA's prefill logits.
#[test]
fn training_forward_matches_official_prefill_on_the_fixture() {
    let dir = std::env::var_os("HYMBA_SHARED")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
        })
        .join("fixtures/tiny-a");
    let cfg = Config::from_file(&dir.join("config.json")).unwrap();
    let mut params = Params::init(&cfg, 0);
    params
        .load_from(&hymba::tensor::TensorStore::open(&dir).unwrap(), "tiny-a")
        .unwrap();
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<u32> = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    let want: Vec<f32> = st
        .tensor("prefill_logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let tm = TrainModel::new(cfg, &params);
    // The batch format wants one more id as the last target; it does not affect the logits.
    let mut window = ids.clone();
    window.push(0);
    let (_, tape) = tm.forward(
        &params,
        &Batch {
            ids: window,
            b: 1,
            t: ids.len(),
        },
    );
    assert_close(
        &tape.logits,
        &want,
        1e-3,
        "training forward vs official prefill",
    );
}
