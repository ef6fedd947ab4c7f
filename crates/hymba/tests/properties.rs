//! Properties that must hold on any valid configuration, checked on random tiny ones written as
//! synthetic checkpoints: decoding token by token equals prefill, chunked prefill equals
//! one-shot prefill, and the precomputed meta-token state equals running the meta tokens with
//! the prompt (the official no-cache forward). Each holds with K/V cached in f32 and in bf16.

mod common;
use hymba::synthetic::write_checkpoint;
use hymba::tensor::{Dtype, Tensor, TensorStore};
use hymba::{Config, DecodeWindow, KvDtype, Logits, Model};
use hymba_kernels::testing::{assert_close, Rng};
use serde_json::json;

/// f32 engine against itself along different paths: only summation order differs.
const TOL: f32 = 1e-4;

/// The tolerance between two paths with K/V cached as `kv`, for logits `want`. With bf16, a K/V
/// element that two paths compute a few f32 ulps apart (summation order) can round to
/// neighbouring bf16 values, 2^-8 apart relatively; the logits then move by about that much of
/// their size, amplified a little by the softmax. So paths agree to a small multiple of
/// bf16's precision, relative to the logits' size, rather than to f32's.
fn tol(kv: KvDtype, want: &[f32]) -> f32 {
    match kv {
        KvDtype::F32 => TOL,
        KvDtype::BF16 => bf16_tol(want),
    }
}

/// Two paths that may round one value to neighbouring bf16 values (see [`tol`]).
fn bf16_tol(want: &[f32]) -> f32 {
    want.iter().fold(0f32, |m, v| m.max(v.abs())) / 64.0
}

struct Case {
    name: &'static str,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    hidden: usize,
    meta: usize,
    window: usize,
    global: Vec<usize>,
    groups: Vec<Vec<usize>>,
    rope: &'static str,
    dtype: Dtype,
}

fn cases() -> Vec<Case> {
    vec![
        // A three-layer reuse group, GQA ratio 2, ntk RoPE.
        Case {
            name: "group3-gqa2-ntk",
            layers: 5,
            heads: 4,
            kv_heads: 2,
            hidden: 32,
            meta: 4,
            window: 5,
            global: vec![0],
            groups: vec![vec![1, 2, 3]],
            rope: "ntk",
            dtype: Dtype::F32,
        },
        // No meta tokens, GQA ratio 1, default RoPE, two groups.
        Case {
            name: "nometa-mha-default",
            layers: 4,
            heads: 2,
            kv_heads: 2,
            hidden: 24,
            meta: 0,
            window: 3,
            global: vec![3],
            groups: vec![vec![0, 1], vec![2]],
            rope: "default",
            dtype: Dtype::F32,
        },
        // One meta token; a group whose consumer is a global layer (stored in full).
        Case {
            name: "meta1-mixed-group",
            layers: 3,
            heads: 4,
            kv_heads: 4,
            hidden: 32,
            meta: 1,
            window: 4,
            global: vec![1],
            groups: vec![vec![0, 1]],
            rope: "ntk",
            dtype: Dtype::F32,
        },
        // Many meta tokens (more than the window), bf16 weights.
        Case {
            name: "meta9-bf16",
            layers: 4,
            heads: 2,
            kv_heads: 1,
            hidden: 16,
            meta: 9,
            window: 2,
            global: vec![0, 3],
            groups: vec![vec![1, 2]],
            rope: "ntk",
            dtype: Dtype::BF16,
        },
        // f16 weights, default RoPE, GQA ratio 2 with a three-layer group and no global layer.
        Case {
            name: "f16-allwindow",
            layers: 3,
            heads: 4,
            kv_heads: 2,
            hidden: 16,
            meta: 3,
            window: 4,
            global: vec![],
            groups: vec![vec![0, 1, 2]],
            rope: "default",
            dtype: Dtype::F16,
        },
    ]
}

/// Both K/V element types, for every property.
const KV: [KvDtype; 2] = [KvDtype::F32, KvDtype::BF16];

/// Every case (with its index, which seeds it) with each K/V type.
fn with_kv(cases: &[Case]) -> impl Iterator<Item = (usize, &Case, KvDtype)> {
    cases
        .iter()
        .enumerate()
        .flat_map(|(i, c)| KV.map(|kv| (i, c, kv)))
}

fn config(c: &Case) -> Config {
    let cfg = json!({
        "model_type": "hymba",
        "vocab_size": 97,
        "hidden_size": c.hidden,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads,
        "num_key_value_heads": c.kv_heads,
        "attn_hidden_size": -1,
        "kq_head_dim": -1,
        "v_head_dim": 2 * c.hidden / c.heads,
        "mamba_expand": 2,
        "mamba_d_state": 4,
        "mamba_d_conv": 4,
        "mamba_dt_rank": 5,
        "intermediate_size": 40,
        "num_memory_tokens": c.meta,
        "sliding_window": c.window,
        "global_attn_idx": c.global,
        "kv_reuse_group": c.groups,
        "rope": true,
        "rope_theta": 10000.0,
        "rope_type": c.rope,
        "max_position_embeddings": 128,
        "orig_max_position_embeddings": 32,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": true,
    });
    Config::from_value(cfg).unwrap()
}

fn build(c: &Case, seed: u64, kv: KvDtype) -> Model {
    let cfg = config(c);
    let dir = common::temp_dir(c.name);
    write_checkpoint(&cfg, &dir, c.dtype, seed, 1.5).unwrap();
    let m = Model::load(&dir).unwrap();
    // Weights stay in their stored precision.
    assert_eq!(m.weights.embed.dtype, c.dtype);
    assert!(m
        .weights
        .layers
        .iter()
        .all(|l| l.in_proj.dtype == c.dtype && l.down.dtype == c.dtype));
    std::fs::remove_dir_all(&dir).unwrap();
    m.with_kv_dtype(kv)
}

fn prompt(rng: &mut Rng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.below(97) as u32).collect()
}

/// `ids` prefilled in one call give the logits of the same ids decoded one at a time, within
/// [`tol`], or within [`bf16_tol`] where `rounded` (the paths' activations rounded to bf16).
fn assert_decode_equals_prefill(
    model: &Model,
    ids: &[u32],
    kv: KvDtype,
    rounded: bool,
    name: &str,
) {
    let mut cache = model.new_cache();
    let whole = model
        .forward(&mut cache, ids, Logits::All, DecodeWindow::Trained)
        .unwrap();
    let mut cache = model.new_cache();
    let mut steps = Vec::new();
    for &id in ids {
        steps.extend(
            model
                .forward(&mut cache, &[id], Logits::Last, DecodeWindow::Trained)
                .unwrap(),
        );
    }
    assert_close(
        &steps,
        &whole,
        if rounded {
            bf16_tol(&whole)
        } else {
            tol(kv, &whole)
        },
        &format!("{name} {kv:?}: decode vs a {}-token prefill", ids.len()),
    );
}

#[test]
fn token_by_token_decode_equals_prefill() {
    for (ci, c, kv) in with_kv(&cases()) {
        let model = build(c, 100 + ci as u64, kv);
        let mut rng = Rng::new(ci as u64);
        // Longer than meta + window, so rings wrap.
        let ids = prompt(&mut rng, c.meta + 3 * c.window + 5);
        assert_decode_equals_prefill(&model, &ids, kv, false, c.name);
    }
}

/// A prompt longer than the parts (64 rows) the CPU backend splits a prompt's elementwise passes
/// into (RoPE, the conv, the gate, the fusion, the residual adds), and than two tiles of prefill
/// attention: the same logits as token-by-token decode. With bf16 weights every product's input
/// is rounded to bf16 (where the CPU has AVX-512 BF16), and a prompt's attention tiles sum a
/// score's products in another order than decode's kernels, so an activation the two paths
/// compute a few f32 ulps apart can round to neighbouring bf16 values: those models' paths
/// agree to bf16's precision, as with bf16 K/V (0.029 in one logit of the bf16 case here).
#[test]
fn long_prompt_prefill_equals_decode() {
    for (ci, c, kv) in with_kv(&cases()) {
        let model = build(c, 400 + ci as u64, kv);
        let mut rng = Rng::new(70 + ci as u64);
        // Within max_position_embeddings (128).
        let ids = prompt(&mut rng, 100);
        assert_decode_equals_prefill(&model, &ids, kv, c.dtype == Dtype::BF16, c.name);
    }
}

/// A prompt fed in parts (the CPU's micro-batches, here of 32 rows) gives the whole prompt's
/// logits, all rows in order, and its last row alone that row of all of them (the products of
/// one row and of four sum alike only to f32's tolerance).
#[test]
fn prompt_in_parts_equals_the_whole_prompt() {
    for (ci, c, kv) in with_kv(&cases()).filter(|(_, c, _)| c.dtype != Dtype::BF16) {
        let whole = build(c, 700 + ci as u64, kv).with_prompt_part(None);
        let parts = build(c, 700 + ci as u64, kv).with_prompt_part(Some(32));
        let ids = prompt(&mut Rng::new(90 + ci as u64), 100);
        let run = |m: &Model, kind: Logits| {
            let mut cache = m.new_cache();
            let out = m
                .forward(&mut cache, &ids, kind, DecodeWindow::Trained)
                .unwrap();
            (out, cache.len())
        };
        let (want, _) = run(&whole, Logits::All);
        let (got, held) = run(&parts, Logits::All);
        assert_eq!((got.len(), held), (want.len(), ids.len()));
        assert_close(
            &got,
            &want,
            tol(kv, &want),
            &format!("{} {kv:?}: parts of 32", c.name),
        );
        let (last, _) = run(&parts, Logits::Last);
        let row = &got[got.len() - last.len()..];
        assert_close(
            &last,
            row,
            tol(kv, row),
            &format!("{}: the last row", c.name),
        );
    }
}

#[test]
fn chunked_prefill_equals_one_shot() {
    for (ci, c, kv) in with_kv(&cases()) {
        let model = build(c, 200 + ci as u64, kv);
        let mut rng = Rng::new(50 + ci as u64);
        let ids = prompt(&mut rng, 2 * c.window + 11);
        let mut cache = model.new_cache();
        let whole = model
            .forward(&mut cache, &ids, Logits::All, DecodeWindow::Trained)
            .unwrap();
        for cuts in [
            vec![1, 4, 9],
            vec![c.window + 1, c.window + 2],
            vec![ids.len() - 1],
        ] {
            let mut cache = model.new_cache();
            let mut got = Vec::new();
            let mut start = 0;
            for end in cuts.iter().copied().chain([ids.len()]) {
                got.extend(
                    model
                        .forward(
                            &mut cache,
                            &ids[start..end],
                            Logits::All,
                            DecodeWindow::Trained,
                        )
                        .unwrap(),
                );
                start = end;
            }
            assert_close(
                &got,
                &whole,
                tol(kv, &whole),
                &format!("{} {kv:?}: chunks {cuts:?}", c.name),
            );
            assert_eq!(cache.len(), ids.len());
        }
    }
}

#[test]
fn meta_prefix_equals_meta_tokens_run_with_the_prompt() {
    for (ci, c, kv) in with_kv(&cases()) {
        let model = build(c, 300 + ci as u64, kv);
        let mut rng = Rng::new(70 + ci as u64);
        let ids = prompt(&mut rng, c.window + 7);
        let reference = model.forward_uncached(&ids).unwrap();
        let mut cache = model.new_cache();
        let got = model
            .forward(&mut cache, &ids, Logits::All, DecodeWindow::Trained)
            .unwrap();
        assert_close(
            &got,
            &reference,
            tol(kv, &reference),
            &format!("{} {kv:?}: prefix vs uncached", c.name),
        );
        // The prefix really matters: without meta tokens the logits would differ.
        if c.meta > 0 {
            assert!(hymba_kernels::testing::max_abs_diff(&got[..97], &reference[97..194]) > 1e-2);
        }
    }
}

/// Official-decode mode only changes single-token steps past the window, and then by a visible
/// amount; prompts themselves are unaffected.
#[test]
fn official_decode_mode_shrinks_the_window_of_decode_steps_only() {
    let c = &cases()[0];
    let model = build(c, 400, KvDtype::F32);
    let mut rng = Rng::new(9);
    let ids = prompt(&mut rng, c.meta + 2 * c.window);
    let (mut a, mut b) = (model.new_cache(), model.new_cache());
    let la = model
        .forward(&mut a, &ids, Logits::All, DecodeWindow::Trained)
        .unwrap();
    let lb = model
        .forward(&mut b, &ids, Logits::All, DecodeWindow::Official)
        .unwrap();
    assert_eq!(la, lb);
    let da = model
        .forward(&mut a, &[3], Logits::Last, DecodeWindow::Trained)
        .unwrap();
    let db = model
        .forward(&mut b, &[3], Logits::Last, DecodeWindow::Official)
        .unwrap();
    assert!(hymba_kernels::testing::max_abs_diff(&da, &db) > 1e-3);
}

/// Logits of four sequences (a prompt longer than the window, a chunk, a single token, one past
/// two windows) run alone, prompt then two decode steps each, and the same run side by side in
/// batches: (batched, alone), per sequence. The batches write into one kept `BatchLogits`, as a
/// serving loop does (every prompt row, then fewer: the buffer is reused at another shape).
fn batched_and_alone(model: &Model, seed: u64, window: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    use hymba::Step;
    let mut rng = Rng::new(seed);
    let prompts: Vec<Vec<u32>> = [window + 4, 3, 1, 2 * window + 1]
        .iter()
        .map(|&n| prompt(&mut rng, n))
        .collect();
    let mut alone = Vec::new();
    for p in &prompts {
        let mut cache = model.new_cache();
        let mut l = model
            .forward(&mut cache, p, Logits::All, DecodeWindow::Trained)
            .unwrap();
        for id in [5u32, 7] {
            l.extend(
                model
                    .forward(&mut cache, &[id], Logits::Last, DecodeWindow::Trained)
                    .unwrap(),
            );
        }
        alone.push(l);
    }
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut got: Vec<Vec<f32>> = vec![Vec::new(); prompts.len()];
    let mut steps: Vec<Step> = caches
        .iter_mut()
        .zip(&prompts)
        .map(|(cache, p)| Step {
            cache,
            ids: p,
            logits: Logits::All,
            window: DecodeWindow::Trained,
        })
        .collect();
    let mut kept = hymba::BatchLogits::default();
    model.forward_batch_into(&mut steps, &mut kept).unwrap();
    for (i, g) in got.iter_mut().enumerate() {
        g.extend_from_slice(kept.get(i));
    }
    for id in [5u32, 7] {
        decode_together_into(model, &mut caches, id, &mut kept);
        assert_eq!(kept.len(), prompts.len());
        for (i, g) in got.iter_mut().enumerate() {
            g.extend_from_slice(kept.get(i));
        }
    }
    (got, alone)
}

/// One decode step of token `id` for every cache, in one batch: each sequence's last logits.
fn decode_together(model: &Model, caches: &mut [hymba::Cache], id: u32) -> Vec<Vec<f32>> {
    let mut out = hymba::BatchLogits::default();
    decode_together_into(model, caches, id, &mut out);
    (0..out.len()).map(|i| out.get(i).to_vec()).collect()
}

/// `decode_together` into `out`.
fn decode_together_into(
    model: &Model,
    caches: &mut [hymba::Cache],
    id: u32,
    out: &mut hymba::BatchLogits,
) {
    let ids = [id];
    let mut steps: Vec<hymba::Step> = caches
        .iter_mut()
        .map(|cache| hymba::Step {
            cache,
            ids: &ids,
            logits: Logits::Last,
            window: DecodeWindow::Trained,
        })
        .collect();
    model.forward_batch_into(&mut steps, out).unwrap();
}

/// Sequences stepped together in one batch get the logits they get alone: a prompt, a chunk
/// of a prompt and single-token decodes side by side.
#[test]
fn batched_steps_equal_sequences_alone() {
    for (ci, c, kv) in with_kv(&cases()) {
        let model = build(c, 500 + ci as u64, kv);
        let (got, alone) = batched_and_alone(&model, 90 + ci as u64, c.window);
        for (i, (g, a)) in got.iter().zip(&alone).enumerate() {
            assert_close(
                g,
                a,
                tol(kv, a),
                &format!("{} {kv:?}: sequence {i} batched vs alone", c.name),
            );
        }
    }
}

/// A picked step's token is the host's draw (greedy or at a temperature) from the logits it
/// would have copied out, and steps beside picked ones get their logits unchanged (see
/// `common::picks_match_logits`).
#[test]
fn picked_steps_match_their_logits() {
    for (ci, c) in cases().iter().enumerate() {
        for kv in KV {
            let model = build(c, 700 + ci as u64, kv);
            let mut rng = Rng::new(40 + ci as u64);
            let prompts: Vec<Vec<u32>> = [c.window + 4, 3, 1, 6, 2]
                .iter()
                .map(|&n| prompt(&mut rng, n))
                .collect();
            common::picks_match_logits(&model, &prompts, 3, true);
        }
    }
}

/// With Q8_0 and Q4_0 weights in panels (where their integer kernel runs: AVX-512 VNNI), a
/// sequence's decode logits in a batch are bit for bit its logits alone: products of up to 16
/// rows run on int8 inputs with the same float operations for a row whatever the rows beside
/// it, and the matrices left unquantized (rows not whole blocks) stay bf16 panels, whose kernel
/// is the same for any number of rows. Row-major Q8_0/Q4_0 (CPUs without VNNI) sum tiles of
/// rows in another order than a row alone, so there the test says it does not apply.
#[test]
fn quantized_batched_decode_equals_alone_bit_for_bit() {
    if !hymba_kernels::matmul::quant_panels_pay() {
        eprintln!(
            "SKIPPED quantized_batched_decode_equals_alone_bit_for_bit: no AVX-512 VNNI here, \
             so Q8_0/Q4_0 stay row-major, whose batched dots sum in another order"
        );
        return;
    }
    let mut ran = 0;
    // The configurations whose hidden size is whole blocks (so the layers' matrices quantize).
    for (ci, c) in cases()
        .iter()
        .enumerate()
        .filter(|(_, c)| c.hidden % 32 == 0)
    {
        for q in [Dtype::Q8_0, Dtype::Q4_0] {
            let dir = common::temp_dir(c.name);
            write_checkpoint(&config(c), &dir, Dtype::BF16, 700 + ci as u64, 1.5).unwrap();
            let model = Model::load_quantized(&dir, Some(q)).unwrap();
            std::fs::remove_dir_all(&dir).unwrap();
            let quantized: Vec<_> = model
                .weights
                .layers
                .iter()
                .flat_map(|l| [&l.in_proj, &l.out_proj, &l.gate, &l.up, &l.down])
                .filter(|t| t.dtype == q)
                .collect();
            assert!(!quantized.is_empty(), "{}: nothing quantized", c.name);
            assert!(quantized.iter().all(|t| t.is_panels()));
            let mut rng = Rng::new(190 + ci as u64);
            let prompts: Vec<Vec<u32>> = [c.window + 4, 3, 1, 2 * c.window + 1]
                .iter()
                .map(|&n| prompt(&mut rng, n))
                .collect();
            let prefilled = || {
                prompts
                    .iter()
                    .map(|p| {
                        let mut cache = model.new_cache();
                        model
                            .forward(&mut cache, p, Logits::Last, DecodeWindow::Trained)
                            .unwrap();
                        cache
                    })
                    .collect::<Vec<_>>()
            };
            let (mut alone, mut together) = (prefilled(), prefilled());
            for id in [5u32, 7, 11] {
                let got = decode_together(&model, &mut together, id);
                for (i, (cache, g)) in alone.iter_mut().zip(&got).enumerate() {
                    let a = model
                        .forward(cache, &[id], Logits::Last, DecodeWindow::Trained)
                        .unwrap();
                    assert!(
                        g == &a,
                        "{} {q:?}: sequence {i} batched differs from alone by {}",
                        c.name,
                        hymba_kernels::testing::max_abs_diff(g, &a)
                    );
                }
            }
            ran += 1;
        }
    }
    assert_eq!(ran, 4, "two configurations, two formats");
}

/// bf16 K/V: half the cache bytes, logits near the f32 cache's (bf16 keeps 8 bits of
/// mantissa), and not equal to them (the rounding really happens).
#[test]
fn bf16_kv_halves_the_cache_and_stays_close() {
    for (ci, c) in cases().iter().enumerate() {
        let (a, b) = (
            build(c, 600 + ci as u64, KvDtype::F32),
            build(c, 600 + ci as u64, KvDtype::BF16),
        );
        let mut rng = Rng::new(110 + ci as u64);
        let ids = prompt(&mut rng, 2 * c.window + 3);
        let (mut ca, mut cb) = (a.new_cache(), b.new_cache());
        let la = a
            .forward(&mut ca, &ids, Logits::All, DecodeWindow::Trained)
            .unwrap();
        let lb = b
            .forward(&mut cb, &ids, Logits::All, DecodeWindow::Trained)
            .unwrap();
        let scale = la.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = hymba_kernels::testing::max_abs_diff(&la, &lb);
        assert!(
            diff > 0.0 && diff < 0.02 * scale,
            "{}: bf16 K/V moved logits by {diff} (largest {scale})",
            c.name
        );
        // Window stores also count their ring's positions, the same for both.
        let rings = a
            .groups
            .iter()
            .filter(|g| g.attn == hymba::config::AttnKind::Window)
            .count();
        let pos = rings * ids.len().min(c.window) * std::mem::size_of::<usize>();
        let (ba, bb) = (ca.bytes(), cb.bytes());
        assert_eq!(
            (ba.global_kv, ba.window_kv - pos),
            (2 * bb.global_kv, 2 * (bb.window_kv - pos)),
            "{}",
            c.name
        );
        // A cache of one type is refused by a model of the other, with a clear error.
        let err = a
            .forward(&mut cb, &[1], Logits::Last, DecodeWindow::Trained)
            .unwrap_err()
            .to_string();
        assert!(err.contains("K/V"), "{err}");
    }
}

/// A sequence saved to a session file and restored continues exactly as if never saved: every
/// part of its state (K/V stores, rings, SSM and conv states, position) round-trips bit for bit,
/// bf16 K/V stored as bf16. A state is refused by a model caching K/V in the other type.
#[test]
fn saved_sessions_resume_exactly() {
    for (ci, c, kv) in with_kv(&cases()) {
        let model = build(c, 300 + ci as u64, kv);
        let mut rng = Rng::new(ci as u64 + 7);
        // Long enough that windows wrap before the save.
        let ids = prompt(&mut rng, c.meta + 2 * c.window + 3);
        let more = prompt(&mut rng, 6);
        let mut cache = model.new_cache();
        model
            .forward(&mut cache, &ids, Logits::Last, DecodeWindow::Trained)
            .unwrap();
        let dir = common::temp_dir(&format!("session-{}", c.name));
        let path = dir.join("s.safetensors");
        hymba::session::save(&model, &cache, "{\"turns\":1}", &path).unwrap();
        let (mut restored, extra) = hymba::session::load(&model, &path).unwrap();
        assert_eq!(extra, "{\"turns\":1}");
        assert_eq!(restored.len(), cache.len(), "{} {kv:?}", c.name);
        let go = |cache: &mut hymba::Cache| -> Vec<f32> {
            more.iter()
                .flat_map(|&id| {
                    model
                        .forward(cache, &[id], Logits::Last, DecodeWindow::Trained)
                        .unwrap()
                })
                .collect()
        };
        assert_eq!(
            go(&mut restored),
            go(&mut cache),
            "{} {kv:?}: resumed vs never saved",
            c.name
        );

        // K/V are stored in the cache's own type.
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let want = match kv {
            KvDtype::F32 => safetensors::Dtype::F32,
            KvDtype::BF16 => safetensors::Dtype::BF16,
        };
        assert_eq!(st.tensor("kv.0.k").unwrap().dtype(), want, "{}", c.name);
        let other = if kv == KvDtype::F32 {
            KvDtype::BF16
        } else {
            KvDtype::F32
        };
        let err = hymba::session::load(&build(c, 300 + ci as u64, other), &path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("--kv-cache {kv}")),
            "{}: {err}",
            c.name
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// bf16 matrices packed into panels (on AVX2) give the logits of the same values held as f32 in
/// rows: the panels change only the order of the sums. Every matrix is packed where panels pay.
/// Where the CPU has AVX-512 BF16 they are packed in pairs, and every product with bf16 weights
/// rounds its inputs to bf16; there the reference is the same values in AVX2's panels, which
/// round theirs too: again only the order of the sums differs (and gate and up run as one
/// product with the activation in its tasks, against two products and the activation after).
#[test]
fn panel_packed_bf16_weights_equal_their_f32_values() {
    let pairs = hymba_kernels::matmul::pairs_pay();
    for (ci, c) in cases().iter().enumerate() {
        let cfg = config(c);
        let store = hymba::synthetic::in_memory(&cfg, Dtype::BF16, 700 + ci as u64, 1.5);
        let reference = store.names().into_iter().map(|n| {
            let t = store.get(&n).unwrap();
            let r = if !pairs {
                Tensor::from_f32(t.shape.clone(), &t.to_f32())
            } else if t.shape.len() == 2 {
                t.to_panels_with(false)
            } else {
                t.clone()
            };
            (n, r)
        });
        let reference = TensorStore::from_tensors("reference", reference.collect());
        let packed = Model::from_store(cfg.clone(), store).unwrap();
        let rows = Model::from_store(cfg, reference).unwrap();
        let pays = hymba_kernels::matmul::panels_pay();
        let w = &packed.weights;
        assert!(
            w.embed.is_panels() == pays
                && w.layers.iter().all(|l| [
                    &l.in_proj,
                    &l.x_proj,
                    &l.dt_proj,
                    &l.out_proj,
                    &l.gate,
                    &l.up,
                    &l.down
                ]
                .iter()
                .all(|t| t.is_panels() == pays || t.numel() == 0))
                // In pairs, gate and up are one matrix held by `gate` (`glu_matrices`).
                && w.layers.iter().all(|l| (l.up.numel() == 0) == pairs)
        );
        let mut rng = Rng::new(120 + ci as u64);
        let ids = prompt(&mut rng, 2 * c.window + 3);
        let a = packed
            .forward(
                &mut packed.new_cache(),
                &ids,
                Logits::All,
                DecodeWindow::Trained,
            )
            .unwrap();
        let b = rows
            .forward(
                &mut rows.new_cache(),
                &ids,
                Logits::All,
                DecodeWindow::Trained,
            )
            .unwrap();
        let what = if pairs {
            "pairs vs panels"
        } else {
            "panels vs f32 rows"
        };
        assert_close(&a, &b, TOL, &format!("{}: {what}", c.name));
    }
}
