//! The CUDA backend against the official outputs and against the CPU backend. The kernels
//! compile with NVRTC on any machine that has the library (CI installs it: no GPU needed); the
//! rest runs where a GPU is, and says why it is skipped elsewhere.

mod common;
use common::{fixture, Expected};
use hymba::backend::cuda::{compile_kernels, Cuda};
use hymba::tensor::Dtype;
use hymba::{Config, DecodeWindow, KvDtype, Logits, Model, Step};
use hymba_kernels::testing::assert_close;

/// The official outputs were computed in f32: an f32 engine lands within this (fixtures README).
const TOL: f32 = 1e-3;

/// Every kernel compiles, for the default target and for Hopper (with and without its
/// architecture-specific instructions), and defines every kernel the backend loads on such a
/// device (sm_70 for the default target). In CI (CI=true) a missing NVRTC is a failure;
/// elsewhere the test says it could not run.
#[test]
fn kernels_compile_with_nvrtc() {
    for (arch, major) in [(None, 7), (Some("compute_90"), 9), (Some("compute_90a"), 9)] {
        match compile_kernels(arch) {
            Ok(ptx) => {
                let src = ptx.to_src();
                let names = hymba::backend::cuda::kernel_names(major);
                assert!(names.len() >= 30, "only {} kernel names", names.len());
                for name in names {
                    // `.entry name(`: the whole name, not a prefix of another's.
                    assert!(
                        src.contains(&format!(".entry {name}(")),
                        "the backend loads kernel {name}, which kernels.cu does not define ({arch:?})"
                    );
                }
                if arch.is_some() {
                    assert!(
                        src.contains("mma.sync.aligned.m16n8k16"),
                        "no tensor-core attention for sm_90"
                    );
                }
                if arch == Some("compute_90a") {
                    assert!(
                        src.contains("wgmma.mma_async.sync.aligned.m64n64k16"),
                        "no warpgroup-MMA attention for sm_90a"
                    );
                }
            }
            Err(e) if std::env::var_os("CI").is_none() && e.to_string().contains("not found") => {
                skipped("kernels_compile_with_nvrtc", &e.to_string());
                return;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Says why a test did not run, on the real stderr (the harness captures `eprintln!`).
fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// The GPU, or None with the reason printed.
fn gpu(test: &str) -> Option<Cuda> {
    match Cuda::new(0) {
        Ok(c) => Some(c),
        Err(e) => {
            skipped(test, &format!("no usable GPU ({e})"));
            None
        }
    }
}

fn argmax(row: &[f32]) -> u32 {
    hymba::sample::argmax(row)
}

/// f32 weights and activations on the GPU against NVIDIA's official f32 outputs: prefill (cached
/// and no-cache paths), decode with the trained window, and the official decode path.
#[test]
fn cuda_matches_official_outputs() {
    let Some(gpu) = gpu("cuda_matches_official_outputs") else {
        return;
    };
    let model = Model::load_on(gpu, &fixture("tiny-a"), None).unwrap();
    model.ready().unwrap();
    let exp = Expected::load("tiny-a");
    let ids = exp.ids("input_ids");
    let gen = exp.ids("generated_ids");
    let v = model.config.vocab_size;
    let (_, want) = exp.f32("prefill_logits");
    let mut cache = model.new_cache();
    let got = model
        .forward(&mut cache, &ids, Logits::All, DecodeWindow::Trained)
        .unwrap();
    assert_close(&got, &want, TOL, "cuda prefill logits (cached path)");
    assert_close(
        &model.forward_uncached(&ids).unwrap(),
        &want,
        TOL,
        "cuda prefill logits (no-cache path)",
    );
    // In two chunks: the second's queries read the first's rows from the stores (a window ring
    // among them: the fixture's window is 16).
    let mut cache = model.new_cache();
    let mut got = model
        .forward(&mut cache, &ids[..17], Logits::All, DecodeWindow::Trained)
        .unwrap();
    got.extend(
        model
            .forward(&mut cache, &ids[17..], Logits::All, DecodeWindow::Trained)
            .unwrap(),
    );
    assert_close(&got, &want, TOL, "cuda prefill logits in two chunks");
    for (window, key) in [
        (DecodeWindow::Trained, "nocache_generate_logits"),
        (DecodeWindow::Official, "generate_logits"),
    ] {
        let (_, want) = exp.f32(key);
        let mut cache = model.new_cache();
        let mut got = model
            .forward(&mut cache, &ids, Logits::Last, window)
            .unwrap();
        for &g in &gen[..gen.len() - 1] {
            got.extend(
                model
                    .forward(&mut cache, &[g], Logits::Last, window)
                    .unwrap(),
            );
        }
        assert_close(&got, &want, TOL, &format!("cuda decode, {window:?} window"));
        if window == DecodeWindow::Official {
            let greedy: Vec<u32> = got.chunks_exact(v).map(argmax).collect();
            assert_eq!(greedy, gen, "cuda greedy ids vs the official generate");
        }
    }
}

/// The CPU's logits for the same model and ids, K/V cached as `kv`: every prompt row's, then
/// each decode step's.
fn cpu_logits(dir: &std::path::Path, ids: &[u32], kv: KvDtype, prefill: usize) -> Vec<f32> {
    let m = Model::load(dir).unwrap().with_kv_dtype(kv);
    prefill_then_decode(&m, ids, prefill, Logits::All)
}

/// bf16 K/V on the GPU equals the CPU engine's bf16 K/V to bf16's precision (both round the same
/// f32 values; a value two paths compute a few f32 ulps apart can round to neighbouring bf16
/// values, 2^-8 apart relatively, which moves the logits by about that much of their size).
#[test]
fn cuda_bf16_kv_matches_cpu() {
    let Some(gpu) = gpu("cuda_bf16_kv_matches_cpu") else {
        return;
    };
    let dir = fixture("tiny-a");
    let ids = Expected::load("tiny-a").ids("input_ids");
    let model = Model::load_on(gpu, &dir, None)
        .unwrap()
        .with_kv_dtype(KvDtype::BF16);
    let prefill = 20;
    let mut c = model.new_cache();
    let mut got = model
        .forward(&mut c, &ids[..prefill], Logits::All, DecodeWindow::Trained)
        .unwrap();
    for &id in &ids[prefill..] {
        got.extend(
            model
                .forward(&mut c, &[id], Logits::Last, DecodeWindow::Trained)
                .unwrap(),
        );
    }
    let want = cpu_logits(&dir, &ids, KvDtype::BF16, prefill);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert_close(&got, &want, scale / 256.0, "cuda vs cpu, bf16 K/V");
}

/// Sequences stepped together give what each gives alone (greedy ids identical, logits within
/// f32 rounding: cuBLAS may pick another algorithm for another batch size). Twenty sequences,
/// so that the batched decode steps take the kernels of large batches (`attention_gqa`, cuBLAS)
/// while each alone takes those of one row.
#[test]
fn cuda_batched_equals_alone() {
    let Some(gpu) = gpu("cuda_batched_equals_alone") else {
        return;
    };
    let model = Model::load_on(gpu, &fixture("tiny-a"), None).unwrap();
    let v = model.config.vocab_size;
    let mut prompts: Vec<Vec<u32>> = vec![
        (1..30).collect(),
        (100..104).collect(),
        (7..60).map(|x| x * 3).collect(),
    ];
    prompts
        .extend((0..17u32).map(|i| (0..2 + i % 7).map(|j| 3 + (i * 13 + j * 5) % 200).collect()));
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .map(|p| {
            let mut c = model.new_cache();
            let mut out = model
                .forward(&mut c, p, Logits::Last, DecodeWindow::Trained)
                .unwrap();
            for t in 0..5 {
                out.extend(
                    model
                        .forward(
                            &mut c,
                            &[(t * 11 + 5) as u32],
                            Logits::Last,
                            DecodeWindow::Trained,
                        )
                        .unwrap(),
                );
            }
            out
        })
        .collect();
    let tokens: Vec<u32> = (0..5).map(|t| t * 11 + 5).collect();
    let batched = decode_together(&model, &prompts, &tokens);
    for (i, (b, a)) in batched.iter().zip(&alone).enumerate() {
        assert_close(b, a, 1e-4, &format!("sequence {i}: batched vs alone"));
        let (ga, gb): (Vec<u32>, Vec<u32>) = (
            a.chunks_exact(v).map(argmax).collect(),
            b.chunks_exact(v).map(argmax).collect(),
        );
        assert_eq!(ga, gb, "sequence {i}: greedy ids");
    }
}

/// Tokens picked on the card (greedy and at temperatures), beside steps that copy their logits
/// out and in rounds where every step picks, over captured and replayed decode steps (the
/// pattern changes from round to round, the graph does not); and the pick kernel on rows with
/// ties, NaN and infinities.
#[test]
fn cuda_picks_match_logits() {
    use hymba::backend::Backend;
    use hymba::sample::{draw, Draw};
    let Some(gpu) = gpu("cuda_picks_match_logits") else {
        return;
    };
    let mut rng = hymba_kernels::testing::Rng::new(9);
    for width in [1usize, 7, 1023, 1025, 32001] {
        let mut x: Vec<f32> = (0..6 * width).map(|_| rng.normal()).collect();
        let row = |r: usize| r * width..(r + 1) * width;
        // Row 1: a tie for the largest value (the first wins); row 2: NaN first (index 0);
        // row 3: NaN elsewhere (never the largest); row 4: every value -inf; row 5: one +inf.
        let m = width - 1;
        x[row(1)][m / 2] = 9.0;
        x[row(1)][m] = 9.0;
        x[row(2)][0] = f32::NAN;
        x[row(3)][m] = f32::NAN;
        x[row(4)].fill(f32::NEG_INFINITY);
        x[row(5)][m / 3] = f32::INFINITY;
        let (mut rows, mut picks) = (gpu.rows(), gpu.rows());
        gpu.upload(&x, &mut rows);
        for temperature in [0.0, 1.0] {
            let draws: Vec<Draw> = (0..6)
                .map(|r| Draw {
                    temperature,
                    u: r as f32 / 6.0,
                    ..Draw::GREEDY
                })
                .collect();
            gpu.pick(&rows, width, &draws, &mut picks);
            let got = gpu.download(&picks);
            gpu.finish().unwrap();
            let want: Vec<f32> = x
                .chunks_exact(width)
                .zip(&draws)
                .map(|(r, d)| draw(r, d) as f32)
                .collect();
            // Draws at a temperature over random rows may differ by rounding (the model-level
            // check below bounds them); the special rows have one answer.
            let exact: Vec<usize> = if temperature == 0.0 {
                (0..6).collect()
            } else {
                vec![0, 4, 5]
            };
            for r in exact {
                assert_eq!(
                    got[r], want[r],
                    "row {r} of width {width} at temperature {temperature}"
                );
            }
        }
    }
    // Top-k and top-p over random rows (ties at the top-k boundary in the last rows).
    for width in [1025usize, 32001] {
        let mut x: Vec<f32> = (0..8 * width).map(|_| 2.0 * rng.normal()).collect();
        for r in 6..8 {
            let row = &mut x[r * width..(r + 1) * width];
            let mut order: Vec<usize> = (0..width).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            // The 3rd to 6th most likely tokens weigh the same.
            for &i in &order[3..6] {
                row[i] = row[order[2]];
            }
        }
        let (mut rows, mut picks) = (gpu.rows(), gpu.rows());
        gpu.upload(&x, &mut rows);
        for (temperature, top_k, top_p, min_p) in [
            (1.0f32, 40usize, 1.0f32, 0.0f32),
            (0.7, 0, 0.9, 0.0),
            (1.0, 4, 0.95, 0.0),
            (1.5, 0, 0.5, 0.05),
            (1.0, 1, 1.0, 0.0),
            (2.0, 100, 0.8, 0.2),
        ] {
            let draws: Vec<Draw> = (0..8)
                .map(|r| Draw {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    u: (r as f32 + 0.5) / 8.0,
                })
                .collect();
            gpu.pick(&rows, width, &draws, &mut picks);
            let got = gpu.download(&picks);
            gpu.finish().unwrap();
            for (r, (row, d)) in x.chunks_exact(width).zip(&draws).enumerate() {
                let what = format!("row {r} of width {width}");
                common::check_pick(row, d, got[r] as u32, &what);
            }
        }
    }
    let model = Model::load_on(gpu, &fixture("tiny-a"), None).unwrap();
    let prompts: Vec<Vec<u32>> = (0..20u32)
        .map(|i| (0..1 + i % 9).map(|j| 3 + (i * 17 + j * 7) % 200).collect())
        .collect();
    common::picks_match_logits(&model, &prompts, 5, false);
}

/// bf16 weights: the GPU rounds each matrix product's input to bf16 (as the official bf16 model
/// does), the CPU keeps it in f32 unless it has bf16 dot products (AVX-512 BF16, AMX; then both
/// round, and differ less). With bf16 K/V the GPU's prompt attention rounds its queries and
/// weights to bf16 too (as the official bf16 model's flash attention), the CPU's does not. Each
/// rounding errs by at most 2^-9 relatively; over the ~7 products of each of L layers, and the
/// attention's 2, the errors add up like a random walk, so the logits agree to about
/// 2^-9·sqrt(9L) of their norm; the bound allows twice that. 300 tokens: several key blocks of
/// the tensor-core attention, and blocks wholly outside the window skipped.
#[test]
fn cuda_bf16_weights_match_cpu_to_bf16_precision() {
    let Some(gpu) = gpu("cuda_bf16_weights_match_cpu_to_bf16_precision") else {
        return;
    };
    let cfg = Config::from_file(&fixture("tiny-a").join("config.json")).unwrap();
    let store = || hymba::synthetic::in_memory(&cfg, Dtype::BF16, 11, 1.0);
    let mut cpu = Some(Model::from_store(cfg.clone(), store()).unwrap());
    let mut dev = Some(Model::on(gpu, cfg.clone(), store()).unwrap());
    let ids: Vec<u32> = (0..300)
        .map(|i| (i * 7919 + 13) % cfg.vocab_size as u32)
        .collect();
    for kv in [KvDtype::F32, KvDtype::BF16] {
        let (c, d) = (
            cpu.take().unwrap().with_kv_dtype(kv),
            dev.take().unwrap().with_kv_dtype(kv),
        );
        let want = c
            .forward(&mut c.new_cache(), &ids, Logits::All, DecodeWindow::Trained)
            .unwrap();
        let got = d
            .forward(&mut d.new_cache(), &ids, Logits::All, DecodeWindow::Trained)
            .unwrap();
        within_bf16_bound(
            &got,
            &want,
            cfg.num_hidden_layers,
            &format!("bf16 weights, {kv:?} K/V, on the GPU vs the CPU"),
        );
        (cpu, dev) = (Some(c), Some(d));
    }
}

/// Q8_0 and Q4_0 weights (`--quant`) on the GPU against the CPU's f32 engine over the values they
/// stand for (each quantized matrix widened back to f32, so the reference is exact): a prompt
/// of 300 tokens, whose products widen the weights to bf16 and round their inputs (the bound of
/// `cuda_bf16_weights_match_cpu_to_bf16_precision`), then 12 decode steps, whose GEMV multiplies
/// the quantized weights in f32 (held to the same bound, alone). Every large matrix is
/// quantized, the tied embedding and logits included.
#[test]
fn cuda_quantized_weights_match_cpu_on_their_values() {
    use hymba::tensor::{Tensor, TensorStore};
    if gpu("cuda_quantized_weights_match_cpu_on_their_values").is_none() {
        return;
    }
    let cfg = Config::from_file(&fixture("tiny-a").join("config.json")).unwrap();
    let ids: Vec<u32> = (0..312)
        .map(|i| (i * 7919 + 13) % cfg.vocab_size as u32)
        .collect();
    for format in [Dtype::Q8_0, Dtype::Q4_0] {
        let mut quantized = hymba::synthetic::in_memory(&cfg, Dtype::BF16, 11, 1.0);
        quantized.quantize(format);
        let mut widened = std::collections::BTreeMap::new();
        let mut count = 0;
        for name in quantized.names() {
            let t = quantized.get(&name).unwrap();
            let t = if t.dtype == format {
                count += 1;
                Tensor::from_f32(t.shape.clone(), &t.to_f32())
            } else {
                t.clone()
            };
            widened.insert(name, t);
        }
        assert!(
            count > 5 * cfg.num_hidden_layers,
            "only {count} matrices quantized"
        );
        let cpu =
            Model::from_store(cfg.clone(), TensorStore::from_tensors("widened", widened)).unwrap();
        let dev = Model::on(Cuda::new(0).unwrap(), cfg.clone(), quantized).unwrap();
        let want = prefill_then_decode(&cpu, &ids, 300, Logits::All);
        let got = prefill_then_decode(&dev, &ids, 300, Logits::All);
        assert_eq!(got.len(), want.len());
        let prompt = 300 * cfg.vocab_size;
        for (range, what) in [
            (0..prompt, "the prompt"),
            (prompt..got.len(), "the decode steps"),
        ] {
            let (g, w) = (&got[range.clone()], &want[range]);
            within_bf16_bound(
                g,
                w,
                cfg.num_hidden_layers,
                &format!("{format:?} weights, {what}"),
            );
        }
    }
}

/// `got` within `cuda_bf16_weights_match_cpu_to_bf16_precision`'s bound of `want` (the norm of
/// the difference against 2·2^-9·sqrt(9·layers) of the norm of `want`).
fn within_bf16_bound(got: &[f32], want: &[f32], layers: usize, what: &str) {
    let norm = |x: &[f32]| x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    let diff: Vec<f32> = got.iter().zip(want).map(|(a, b)| a - b).collect();
    let rel = norm(&diff) / norm(want);
    let bound = 2.0 * 2f64.powi(-9) * (9.0 * layers as f64).sqrt();
    eprintln!("{what}: relative difference {rel:.2e} (bound {bound:.2e})");
    assert!(
        rel.is_finite() && rel < bound,
        "{what}: relative difference {rel:.3e} over {bound:.3e}"
    );
}

/// Prompts longer than the GPU's scan chunks and attention tiles, in one call and in two (the
/// second starting from the first's state), against the CPU's one-call prefill, with both K/V
/// types: the chunked scan and the tiled attention (the tensor-core kernel for bf16 K/V) over
/// window and global layers give the sequential results. Tolerances: f32 as the official
/// parity; bf16 K/V as `cuda_bf16_kv_matches_cpu` says.
#[test]
fn cuda_long_prompts_match_cpu() {
    let Some(gpu) = gpu("cuda_long_prompts_match_cpu") else {
        return;
    };
    let dir = fixture("tiny-a");
    let ids: Vec<u32> = (0..300u32).map(|i| (i * 7919 + 13) % 32000 + 1).collect();
    let gpu = Model::load_on(gpu, &dir, None).unwrap();
    let mut gpu = Some(gpu);
    for kv in [KvDtype::F32, KvDtype::BF16] {
        let want = cpu_logits(&dir, &ids, kv, ids.len());
        let tol = match kv {
            KvDtype::F32 => TOL,
            KvDtype::BF16 => want.iter().fold(0f32, |m, v| m.max(v.abs())) / 256.0,
        };
        let model = gpu.take().unwrap().with_kv_dtype(kv);
        let whole = model
            .forward(
                &mut model.new_cache(),
                &ids,
                Logits::All,
                DecodeWindow::Trained,
            )
            .unwrap();
        let worst = whole
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{kv:?} K/V, 300-token prefill: max difference {worst:.2e} (tolerance {tol:.2e})"
        );
        assert_close(
            &whole,
            &want,
            tol,
            &format!("one 300-token prefill, {kv:?} K/V, GPU vs CPU"),
        );
        let mut cache = model.new_cache();
        let mut parts = model
            .forward(&mut cache, &ids[..130], Logits::All, DecodeWindow::Trained)
            .unwrap();
        parts.extend(
            model
                .forward(&mut cache, &ids[130..], Logits::All, DecodeWindow::Trained)
                .unwrap(),
        );
        assert_close(
            &parts,
            &want,
            tol,
            &format!("130 + 170 tokens, {kv:?} K/V, GPU vs CPU"),
        );
        gpu = Some(model);
    }
}

/// A prompt's tensor-core attention at each head shape it is built for but the fixture's (dk 16,
/// dv 32): 64 / 64, 64 / 128 (Hymba-1.5B's) and 128 / 128, in synthetic models of the fixture's
/// layout, against the CPU with bf16 K/V: 300 tokens in one call and in two (130 + 170, so the
/// second reads the first's cache), window and global layers; and SSM states of 12, 16 and 32
/// (the scan's kernels of up to 16 and up to 32 states, in one pass over the 300 rows and in
/// chunks over the 130 and the 170). f32 weights: the f32 attention over
/// the bf16 cache, within `cuda_bf16_kv_matches_cpu`'s tolerance; bf16 weights: the queries and
/// weights rounded as well, within `cuda_bf16_weights_match_cpu_to_bf16_precision`'s bound.
#[test]
fn cuda_prompt_shapes_match_cpu() {
    let ids: Vec<u32> = (0..300u32).map(|i| (i * 7919 + 13) % 32000 + 1).collect();
    for (dk, dv, states) in [(64usize, 64usize, 12usize), (64, 128, 16), (128, 128, 32)] {
        let mut raw: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture("tiny-a").join("config.json")).unwrap(),
        )
        .unwrap();
        // Four heads of dk: hidden 4·dk; the SSM's width is the heads' values, 4·dv.
        raw["hidden_size"] = (4 * dk).into();
        raw["v_head_dim"] = dv.into();
        raw["mamba_expand"] = (dv / dk).into();
        raw["mamba_d_state"] = states.into();
        for w in raw["conv_dim"].as_object_mut().unwrap().values_mut() {
            *w = (4 * dv).into();
        }
        let cfg = Config::from_value(raw).unwrap();
        for dtype in [Dtype::F32, Dtype::BF16] {
            let Some(gpu) = gpu("cuda_prompt_shapes_match_cpu") else {
                return;
            };
            let store = || hymba::synthetic::in_memory(&cfg, dtype, 3, 1.0);
            let cpu = Model::from_store(cfg.clone(), store())
                .unwrap()
                .with_kv_dtype(KvDtype::BF16);
            let dev = Model::on(gpu, cfg.clone(), store())
                .unwrap()
                .with_kv_dtype(KvDtype::BF16);
            let want = cpu
                .forward(
                    &mut cpu.new_cache(),
                    &ids,
                    Logits::All,
                    DecodeWindow::Trained,
                )
                .unwrap();
            let whole = dev
                .forward(
                    &mut dev.new_cache(),
                    &ids,
                    Logits::All,
                    DecodeWindow::Trained,
                )
                .unwrap();
            let mut cache = dev.new_cache();
            let mut parts = dev
                .forward(&mut cache, &ids[..130], Logits::All, DecodeWindow::Trained)
                .unwrap();
            parts.extend(
                dev.forward(&mut cache, &ids[130..], Logits::All, DecodeWindow::Trained)
                    .unwrap(),
            );
            let what = format!("dk {dk}, dv {dv}, {states} states, {dtype:?} weights, bf16 K/V");
            for (got, how) in [(&whole, "one call"), (&parts, "130 + 170")] {
                if dtype == Dtype::F32 {
                    let tol = want.iter().fold(0f32, |m, v| m.max(v.abs())) / 256.0;
                    assert_close(got, &want, tol, &format!("{what}, {how}, GPU vs CPU"));
                } else {
                    within_bf16_bound(
                        got,
                        &want,
                        cfg.num_hidden_layers,
                        &format!("{what}, {how}, GPU vs CPU"),
                    );
                }
            }
        }
    }
}

/// The matrix products against an f64 reference on odd shapes, at row counts that reach every
/// kernel (the GEMV at 1 and 2 rows, the tensor-core kernel at 7 to 17 in both its sizes,
/// cuBLAS from 33; 1600 rows of weights: the one-row GEMV's 800 pairs with fewer warps a pair,
/// in one wave), bf16 weights: y = x·wᵀ, h += x·wᵀ, silu(x·gateᵀ) ⊙ (x·upᵀ). Each value
/// within 2^-8 of the sum of its products' magnitudes (the input is rounded to bf16 on the
/// tensor-core and cuBLAS paths: 2^-9 relative a term; cuBLAS's gate and up, prepared together,
/// come out rounded to bf16 too: 2^-9 of the product, at most of that sum), far below what a
/// misplaced k or row gives (a value off by the size of the product itself).
#[test]
fn cuda_products_match_reference() {
    let Some(b) = gpu("cuda_products_match_reference") else {
        return;
    };
    let shapes = [(37usize, 200usize), (129, 1608), (16, 8), (1600, 200)];
    products_match_reference(&b, Dtype::BF16, &shapes);
}

/// `cuda_products_match_reference` with Q8_0 and Q4_0 weights (rows of whole blocks of 32),
/// against the exact values they stand for: the GEMV (up to 3 rows) multiplies them in f32, the tensor-core
/// rows kernel (4 to 32) widens each quant it reads to bf16 (2^-9 relative a weight), more rows
/// widen the matrix to bf16 first for cuBLAS; both round the input too: within the same 2^-8 of
/// the sum of the terms' magnitudes.
#[test]
fn cuda_quantized_products_match_reference() {
    let Some(b) = gpu("cuda_quantized_products_match_reference") else {
        return;
    };
    let shapes = [(37usize, 224usize), (129, 1600), (16, 32), (1600, 96)];
    for q in [Dtype::Q8_0, Dtype::Q4_0] {
        products_match_reference(&b, q, &shapes);
    }
}

/// The body of the product tests: random `[n, k]` gate and up matrices of each shape stored as
/// `dtype` (bf16, or Q8_0 / Q4_0 quantized from f32), their reference the values stored.
fn products_match_reference(b: &Cuda, dtype: Dtype, shapes: &[(usize, usize)]) {
    use hymba::backend::Backend;
    use hymba::tensor::Tensor;
    use hymba_kernels::testing::Rng;
    let mut rng = Rng::new(7);
    for &(n, k) in shapes {
        let wg = rng.normal_vec(n * k, 1.0);
        let wu = rng.normal_vec(n * k, 1.0);
        let to_tensor = |v: &[f32]| match dtype {
            Dtype::BF16 => {
                let bytes: Vec<u8> = v
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
                    .collect();
                Tensor::from_bytes(Dtype::BF16, vec![n, k], &bytes)
            }
            q => Tensor::from_f32(vec![n, k], v).quantize(q),
        };
        let widen = |v: &[f32]| -> Vec<f64> {
            let t = to_tensor(v);
            assert_eq!(t.dtype, dtype);
            t.to_f32().into_iter().map(f64::from).collect()
        };
        let (g64, u64_) = (widen(&wg), widen(&wu));
        let (gm, um) = (
            b.matrix(to_tensor(&wg)).unwrap(),
            b.matrix(to_tensor(&wu)).unwrap(),
        );
        // Gate and up prepared together (one allocation: one product of both where rows allow).
        let (gj, uj) = b.glu_matrices(to_tensor(&wg), to_tensor(&wu)).unwrap();
        // 300 and 400 rows: one bucket of timed prompt products, the second reusing the first's pick.
        for &t in &[1usize, 2, 7, 9, 16, 17, 33, 64, 65, 300, 400] {
            let x = rng.normal_vec(t * k, 1.0);
            let h0 = rng.normal_vec(t * n, 1.0);
            // Per output: the exact product and the sum of its terms' magnitudes.
            let dot = |w: &[f64], r: usize, j: usize| -> (f64, f64) {
                (0..k).fold((0.0, 0.0), |(s, a), c| {
                    let p = x[r * k + c] as f64 * w[j * k + c];
                    (s + p, a + p.abs())
                })
            };
            let (mut xr, mut y, mut h, mut glu, mut glu_j) =
                (b.rows(), b.rows(), b.rows(), b.rows(), b.rows());
            b.upload(&x, &mut xr);
            b.upload(&h0, &mut h);
            b.matmul(&xr, &gm, &mut y);
            b.matmul_add(&xr, &gm, &mut h);
            b.glu(&xr, &gm, &um, &mut glu);
            b.glu(&xr, &gj, &uj, &mut glu_j);
            b.finish().unwrap();
            let (y, h) = (b.download(&y), b.download(&h));
            let (glu, glu_j) = (b.download(&glu), b.download(&glu_j));
            let silu = |v: f64| v / (1.0 + (-v).exp());
            for r in 0..t {
                for j in 0..n {
                    let i = r * n + j;
                    let ((g, ga), (u, ua)) = (dot(&g64, r, j), dot(&u64_, r, j));
                    let tol = |a: f64| a / 256.0 + 1e-5;
                    let what = format!("[{n}, {k}] at {t} rows, row {r} column {j}");
                    assert!(
                        (y[i] as f64 - g).abs() <= tol(ga),
                        "x·wᵀ {what}: {} vs {g}",
                        y[i]
                    );
                    let hv = h0[i] as f64 + g;
                    assert!(
                        (h[i] as f64 - hv).abs() <= tol(ga),
                        "h + x·wᵀ {what}: {} vs {hv}",
                        h[i]
                    );
                    let want = silu(g) * u;
                    let bound = tol(ga) * 1.1 * (u.abs() + tol(ua)) + silu(g).abs() * tol(ua);
                    for (v, how) in [(glu[i], "apart"), (glu_j[i], "together")] {
                        assert!(
                            (v as f64 - want).abs() <= bound,
                            "glu (gate and up prepared {how}) {what}: {v} vs {want}",
                        );
                    }
                }
            }
        }
    }
}

/// RMSNorm on the card against f64, at row counts and widths that take both kernels (a block a
/// row for few rows or odd widths, a warp a row for many rows of widths up to 2048 that are
/// multiples of 4): each value within 1e-5 of itself.
#[test]
fn cuda_rmsnorm_matches_reference() {
    use hymba::backend::Backend;
    use hymba_kernels::testing::Rng;
    let Some(b) = gpu("cuda_rmsnorm_matches_reference") else {
        return;
    };
    let mut rng = Rng::new(5);
    let eps = 1e-6f32;
    for &d in &[36usize, 38, 1600, 2052] {
        let w: Vec<f32> = (0..d).map(|j| 0.25 + (j % 11) as f32 * 0.125).collect();
        let wv = b.vector(w.clone()).unwrap();
        for &t in &[1usize, 255, 256, 300] {
            let x = rng.normal_vec(t * d, 2.0);
            let (mut xr, mut out) = (b.rows(), b.rows());
            b.upload(&x, &mut xr);
            b.rmsnorm(&xr, &wv, eps, &mut out);
            b.finish().unwrap();
            let got = b.download(&out);
            for r in 0..t {
                let row = &x[r * d..(r + 1) * d];
                let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
                let inv = 1.0 / (ms + eps as f64).sqrt();
                for j in 0..d {
                    let want = w[j] as f64 * row[j] as f64 * inv;
                    let g = got[r * d + j] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5 * want.abs() + 1e-7,
                        "width {d}, {t} rows, row {r} column {j}: {g} vs {want}"
                    );
                }
            }
        }
    }
}

/// Rows that only matrix products read (`product_rows`), which the CUDA backend keeps as their
/// bf16 copy alone when the products take that (many rows, bf16 matrices): the MLP's activation
/// and a norm's output so made give the next product bit for bit what rows kept in f32 give it,
/// and reading such rows as f32 is an error rather than stale values.
#[test]
fn cuda_product_rows_feed_products_alone() {
    use hymba::backend::Backend;
    use hymba::tensor::Tensor;
    use hymba_kernels::testing::Rng;
    let Some(b) = gpu("cuda_product_rows_feed_products_alone") else {
        return;
    };
    let mut rng = Rng::new(3);
    let (n, k, m) = (40usize, 72usize, 24usize);
    let bf16 = |v: &[f32], rows: usize, cols: usize| {
        let bytes: Vec<u8> = v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
            .collect();
        Tensor::from_bytes(Dtype::BF16, vec![rows, cols], &bytes)
    };
    let gm = b.matrix(bf16(&rng.normal_vec(n * k, 1.0), n, k)).unwrap();
    let um = b.matrix(bf16(&rng.normal_vec(n * k, 1.0), n, k)).unwrap();
    let dm = b.matrix(bf16(&rng.normal_vec(m * n, 1.0), m, n)).unwrap();
    let norm = b
        .vector((0..k).map(|j| 0.5 + j as f32 / k as f32).collect())
        .unwrap();
    for &t in &[3usize, 9, 100] {
        let mut xr = b.rows();
        b.upload(&rng.normal_vec(t * k, 1.0), &mut xr);
        // The MLP's activation, then down; a norm's output, then gate.
        let (mut act, mut act_p, mut nrm, mut nrm_p) =
            (b.rows(), b.product_rows(), b.rows(), b.product_rows());
        b.glu(&xr, &gm, &um, &mut act);
        b.glu(&xr, &gm, &um, &mut act_p);
        b.rmsnorm(&xr, &norm, 1e-6, &mut nrm);
        b.rmsnorm(&xr, &norm, 1e-6, &mut nrm_p);
        let mut outs: Vec<_> = (0..4).map(|_| b.rows()).collect();
        b.matmul(&act, &dm, &mut outs[0]);
        b.matmul(&act_p, &dm, &mut outs[1]);
        b.matmul(&nrm, &gm, &mut outs[2]);
        b.matmul(&nrm_p, &gm, &mut outs[3]);
        b.finish().unwrap();
        let got: Vec<Vec<f32>> = outs.iter().map(|o| b.download(o)).collect();
        assert!(
            got[0] == got[1],
            "down of the activation, {t} rows: product rows differ"
        );
        assert!(
            got[2] == got[3],
            "gate of the norm, {t} rows: product rows differ"
        );
        // Few rows keep f32 (the products take f32 there); more do not, and say so when read:
        // the norm's rows from 9 (its products then take bf16), the activation's from 33 (below,
        // `gemm_rows` makes it in its epilogue, in f32).
        let mut reads = vec![(&nrm_p, &nrm, t > 8)];
        if t == 100 {
            reads.push((&act_p, &act, true));
        }
        for (p, f32_rows, bf16_only) in reads {
            let read = b.download(p);
            match (bf16_only, b.finish()) {
                (false, Ok(())) => assert!(read == b.download(f32_rows), "{t} rows: f32 kept"),
                (true, Err(e)) => assert!(e.to_string().contains("bf16 copy alone"), "{e}"),
                (_, r) => panic!("{t} rows: reading product rows gave {r:?}"),
            }
        }
    }
}

/// A residual add and the norm after it (`matmul_add_norm`), then the products that take the
/// normed rows (one and two matrices: the GEMV folds the norm into both at decode rows) and the
/// normed rows read back (scaled then by `norm_settle`), against f64 on the same weights: f32
/// and bf16 matrices, odd and even widths, rows through every product path.
#[test]
fn cuda_folded_norm_matches_reference() {
    use hymba::backend::Backend;
    use hymba::tensor::Tensor;
    use hymba_kernels::testing::Rng;
    let Some(b) = gpu("cuda_folded_norm_matches_reference") else {
        return;
    };
    let mut rng = Rng::new(11);
    let eps = 1e-6f32;
    for dtype in [Dtype::F32, Dtype::BF16] {
        // (n: the residual's width, k: the add's input, m: the next product's rows)
        for &(n, k, m) in &[(37usize, 24usize, 20usize), (200, 64, 130)] {
            let stored = |v: Vec<f32>| -> Vec<f32> {
                match dtype {
                    Dtype::BF16 => v
                        .iter()
                        .map(|&x| half::bf16::from_f32(x).to_f32())
                        .collect(),
                    _ => v,
                }
            };
            let tensor = |v: &[f32], rows: usize, cols: usize| {
                let bytes: Vec<u8> = match dtype {
                    Dtype::BF16 => v
                        .iter()
                        .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
                        .collect(),
                    _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                };
                Tensor::from_bytes(dtype, vec![rows, cols], &bytes)
            };
            let (wa, wg, wu) = (
                stored(rng.normal_vec(n * k, 1.0)),
                stored(rng.normal_vec(m * n, 1.0)),
                stored(rng.normal_vec(m * n, 1.0)),
            );
            let norm: Vec<f32> = (0..n).map(|j| 0.5 + (j % 7) as f32 * 0.25).collect();
            let (am, gm, um) = (
                b.matrix(tensor(&wa, n, k)).unwrap(),
                b.matrix(tensor(&wg, m, n)).unwrap(),
                b.matrix(tensor(&wu, m, n)).unwrap(),
            );
            let nv = b.vector(norm.clone()).unwrap();
            for &t in &[1usize, 2, 3, 5, 9] {
                let x = rng.normal_vec(t * k, 1.0);
                let h0 = rng.normal_vec(t * n, 1.0);
                let (mut xr, mut hr, mut ur, mut y, mut glu, mut y2) =
                    (b.rows(), b.rows(), b.rows(), b.rows(), b.rows(), b.rows());
                b.upload(&x, &mut xr);
                b.upload(&h0, &mut hr);
                b.matmul_add_norm(&xr, &am, &mut hr, &nv, eps, &mut ur);
                b.matmul(&ur, &gm, &mut y);
                b.glu(&ur, &gm, &um, &mut glu);
                let ud = b.download(&ur);
                // After the read the rows are final: the same products again, unfolded.
                b.matmul(&ur, &gm, &mut y2);
                b.finish().unwrap();
                let (hd, y, glu, y2) = (
                    b.download(&hr),
                    b.download(&y),
                    b.download(&glu),
                    b.download(&y2),
                );
                let what = |r: usize, j: usize| {
                    format!("{dtype:?} n {n} k {k} m {m}, {t} rows, row {r} column {j}")
                };
                // A product's bound from the sum of its terms' magnitudes: bf16 products take
                // their input rounded to bf16 (2^-9 a term), f32 ones sum in f32.
                let tol = |a: f64| match dtype {
                    Dtype::BF16 => a / 256.0 + 1e-5,
                    _ => a * 1e-5 + 1e-6,
                };
                let silu = |v: f64| v / (1.0 + (-v).exp());
                for r in 0..t {
                    // h = h0 + x·waᵀ; then the norm and the next products from the card's own h,
                    // so that they are checked to their own precision.
                    for j in 0..n {
                        let i = r * n + j;
                        let (d, a) = (0..k).fold((0f64, 0f64), |(s, a), c| {
                            let p = x[r * k + c] as f64 * wa[j * k + c] as f64;
                            (s + p, a + p.abs())
                        });
                        let want = h0[i] as f64 + d;
                        assert!(
                            (hd[i] as f64 - want).abs() <= tol(a),
                            "h {}: {} vs {want}",
                            what(r, j),
                            hd[i]
                        );
                    }
                    let hr = &hd[r * n..(r + 1) * n];
                    let ms = hr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
                    let inv = 1.0 / (ms + eps as f64).sqrt();
                    let u: Vec<f64> = (0..n)
                        .map(|j| norm[j] as f64 * hr[j] as f64 * inv)
                        .collect();
                    for j in 0..n {
                        let got = ud[r * n + j] as f64;
                        assert!(
                            (got - u[j]).abs() <= 1e-5 * u[j].abs() + 1e-6,
                            "u {}: {got} vs {}",
                            what(r, j),
                            u[j]
                        );
                    }
                    for j in 0..m {
                        let i = r * m + j;
                        let dot = |w: &[f32]| -> (f64, f64) {
                            (0..n).fold((0.0, 0.0), |(s, a), c| {
                                let p = u[c] * w[j * n + c] as f64;
                                (s + p, a + p.abs())
                            })
                        };
                        let ((g, ga), (uu, ua)) = (dot(&wg), dot(&wu));
                        for (v, how) in [(y[i], "folded"), (y2[i], "settled")] {
                            assert!(
                                (v as f64 - g).abs() <= tol(ga),
                                "u·wᵀ ({how}) {}: {v} vs {g}",
                                what(r, j)
                            );
                        }
                        let want = silu(g) * uu;
                        let bound = tol(ga) * 1.1 * (uu.abs() + tol(ua)) + silu(g).abs() * tol(ua);
                        assert!(
                            (glu[i] as f64 - want).abs() <= bound,
                            "glu {}: {} vs {want}",
                            what(r, j),
                            glu[i]
                        );
                    }
                }
            }
        }
    }
}

/// Decode steps of one sequence and of two together (the GEMV kernels of one and two rows, f32
/// and bf16 weights), against the CPU's steps of each sequence alone. Tolerances: f32 as the
/// official parity; bf16 weights as `cuda_bf16_weights_match_cpu_to_bf16_precision` derives
/// them (relative, over all logits).
#[test]
fn cuda_decode_rows_match_cpu() {
    let cfg = Config::from_file(&fixture("tiny-a").join("config.json")).unwrap();
    let prompts: [Vec<u32>; 2] = [(5..22).collect(), (40..47).map(|x| x * 7).collect()];
    let steps: Vec<u32> = (0..6).map(|i| i * 13 + 9).collect();
    for dtype in [Dtype::F32, Dtype::BF16] {
        let Some(gpu) = gpu("cuda_decode_rows_match_cpu") else {
            return;
        };
        let store = || hymba::synthetic::in_memory(&cfg, dtype, 7, 1.0);
        let cpu = Model::from_store(cfg.clone(), store()).unwrap();
        let dev = Model::on(gpu, cfg.clone(), store()).unwrap();
        let want: Vec<Vec<f32>> = prompts
            .iter()
            .map(|p| {
                let ids: Vec<u32> = p.iter().chain(&steps).copied().collect();
                prefill_then_decode(&cpu, &ids, p.len(), Logits::Last)
            })
            .collect();
        // Alone: one row a step.
        let alone: Vec<Vec<f32>> = prompts
            .iter()
            .map(|p| {
                let ids: Vec<u32> = p.iter().chain(&steps).copied().collect();
                prefill_then_decode(&dev, &ids, p.len(), Logits::Last)
            })
            .collect();
        // Together: two rows a step.
        let together = decode_together(&dev, &prompts, &steps);
        for (i, w) in want.iter().enumerate() {
            for (got, how) in [(&alone[i], "alone"), (&together[i], "two together")] {
                let what = format!("{dtype:?} weights, sequence {i}, {how}: GPU vs CPU");
                match dtype {
                    Dtype::BF16 => {
                        let norm =
                            |x: &[f32]| x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
                        let diff: Vec<f32> = got.iter().zip(w).map(|(a, b)| a - b).collect();
                        let rel = norm(&diff) / norm(w);
                        let bound =
                            2.0 * 2f64.powi(-9) * (7.0 * cfg.num_hidden_layers as f64).sqrt();
                        assert!(
                            rel.is_finite() && rel < bound,
                            "{what}: {rel:.3e} over {bound:.3e}"
                        );
                    }
                    _ => assert_close(got, w, TOL, &what),
                }
            }
        }
    }
}

/// Decode attention with value heads of 128, four times the keys' (the 1.5B model's shapes; the
/// fixture's are 32, the keys' size), synthetic f32 weights on the fixture's other shapes (the
/// SSM widened to match): a prompt, then decode steps past the 16-key window (the ring wraps),
/// GPU against CPU with both K/V types. Tolerances as the tests above: f32 as the official
/// parity, bf16 K/V 1/256 of the logits' size.
#[test]
fn cuda_decode_with_wide_value_heads_matches_cpu() {
    let Some(gpu) = gpu("cuda_decode_with_wide_value_heads_matches_cpu") else {
        return;
    };
    let mut raw: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-a").join("config.json")).unwrap(),
    )
    .unwrap();
    raw["v_head_dim"] = 128.into();
    // v_head_dim × heads is the SSM's width (mamba_expand × hidden_size): 128 × 4 = 8 × 64.
    raw["mamba_expand"] = 8.into();
    for w in raw["conv_dim"].as_object_mut().unwrap().values_mut() {
        *w = 512.into();
    }
    let cfg = Config::from_value(raw).unwrap();
    let store = || hymba::synthetic::in_memory(&cfg, Dtype::F32, 5, 1.0);
    let ids: Vec<u32> = (0..50)
        .map(|i| (i * 7919 + 13) % cfg.vocab_size as u32)
        .collect();
    let prefill = 12;
    let mut gpu = Some(Model::on(gpu, cfg.clone(), store()).unwrap());
    for kv in [KvDtype::F32, KvDtype::BF16] {
        let cpu = Model::from_store(cfg.clone(), store())
            .unwrap()
            .with_kv_dtype(kv);
        let want = prefill_then_decode(&cpu, &ids, prefill, Logits::Last);
        let dev = gpu.take().unwrap().with_kv_dtype(kv);
        let got = prefill_then_decode(&dev, &ids, prefill, Logits::Last);
        let tol = match kv {
            KvDtype::F32 => TOL,
            KvDtype::BF16 => want.iter().fold(0f32, |m, v| m.max(v.abs())) / 256.0,
        };
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "dv 128, {kv:?} K/V, 38 decode steps: max difference {worst:.2e} (tolerance {tol:.2e})"
        );
        assert_close(
            &got,
            &want,
            tol,
            &format!("dv 128 decode, {kv:?} K/V, GPU vs CPU"),
        );
        gpu = Some(dev);
    }
}

/// Every prompt's prefill in one batched call, then a step of each token of `tokens` for every
/// sequence together: each sequence's logits (the last row of each call).
fn decode_together<B: hymba::backend::Backend>(
    m: &Model<B>,
    prompts: &[Vec<u32>],
    tokens: &[u32],
) -> Vec<Vec<f32>> {
    let mut caches: Vec<_> = prompts.iter().map(|_| m.new_cache()).collect();
    let mut out = vec![Vec::new(); prompts.len()];
    for round in 0..=tokens.len() {
        let mut steps: Vec<Step<_>> = caches
            .iter_mut()
            .zip(prompts)
            .map(|(cache, p)| Step {
                cache,
                ids: if round == 0 {
                    &p[..]
                } else {
                    &tokens[round - 1..round]
                },
                logits: Logits::Last,
                window: DecodeWindow::Trained,
            })
            .collect();
        for (o, logits) in out.iter_mut().zip(m.forward_batch(&mut steps).unwrap()) {
            o.extend(logits);
        }
    }
    out
}

/// The logits of a prefill of ids[..prefill] (`rows`: every row's or the last's), then of each
/// decode step after it.
fn prefill_then_decode<B: hymba::backend::Backend>(
    m: &Model<B>,
    ids: &[u32],
    prefill: usize,
    rows: Logits,
) -> Vec<f32> {
    let mut c = m.new_cache();
    let mut out = m
        .forward(&mut c, &ids[..prefill], rows, DecodeWindow::Trained)
        .unwrap();
    for &id in &ids[prefill..] {
        out.extend(
            m.forward(&mut c, &[id], Logits::Last, DecodeWindow::Trained)
                .unwrap(),
        );
    }
    out
}
