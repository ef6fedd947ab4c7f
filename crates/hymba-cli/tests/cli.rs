//! The `hymba` command as users and other tools call it: the output contract of `generate`,
//! `logits` and `inspect`, and clear errors (never a panic) on bad input.

use std::path::{Path, PathBuf};

mod common;
use common::*;
use std::process::Command;

fn read_st(path: &Path) -> std::collections::HashMap<String, (Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}
fn i64s(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn expected() -> std::collections::HashMap<String, (Vec<usize>, Vec<u8>)> {
    read_st(&fixture().join("expected.safetensors"))
}

fn ids_arg(ids: &[i64]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn generate_dump_reproduces_official_generate() {
    let exp = expected();
    let ids = i64s(&exp["input_ids"].1);
    let want_ids = i64s(&exp["generated_ids"].1);
    let dir = temp_dir("gen");
    let dump = dir.join("dump.safetensors");
    let (code, out, err) = hymba(&[
        "generate",
        "--model",
        fixture().to_str().unwrap(),
        "--ids",
        &ids_arg(&ids),
        "--max-new-tokens",
        "24",
        "--ignore-eos",
        "--temperature",
        "0",
        "--official-decode-window",
        "--dump",
        dump.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let d = read_st(&dump);
    assert_eq!(i64s(&d["input_ids"].1), ids);
    assert_eq!(i64s(&d["generated_ids"].1), want_ids);
    assert_eq!(d["generate_logits"].0, vec![24, 32001]);
    assert!(
        max_diff(
            &f32s(&d["generate_logits"].1),
            &f32s(&exp["generate_logits"].1)
        ) < 1e-3
    );
    // Without a tokenizer the ids themselves are printed.
    assert_eq!(out.trim(), ids_arg(&want_ids));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn logits_with_partial_prefill_match_official_prefill() {
    let exp = expected();
    let ids = i64s(&exp["input_ids"].1);
    let l = fixture_logits("logits", &ids, &[]);
    assert_eq!(l["logits"].0, vec![ids.len(), 32001]);
    assert_eq!(i64s(&l["input_ids"].1), ids);
    assert!(max_diff(&f32s(&l["logits"].1), &f32s(&exp["prefill_logits"].1)) < 1e-3);
}

/// `hymba logits` on the fixture for `ids` (the first 20 in one prefill, then one at a time),
/// with `extra` arguments: the written tensors.
fn fixture_logits(
    tag: &str,
    ids: &[i64],
    extra: &[&str],
) -> std::collections::HashMap<String, (Vec<usize>, Vec<u8>)> {
    let dir = temp_dir(tag);
    let out = dir.join("l.safetensors");
    let (ids, model) = (ids_arg(ids), fixture());
    let mut args = vec![
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        &ids,
        "--prefill",
        "20",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (code, _, err) = hymba(&args);
    assert_eq!(code, 0, "{err}");
    let l = read_st(&out);
    std::fs::remove_dir_all(dir).unwrap();
    l
}

#[test]
fn generate_with_prompt_text_and_chat_template() {
    let tok = shared().join("hymba-1.5b/tokenizer.json");
    let (code, out, err) = hymba(&[
        "generate",
        "--model",
        fixture().to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--chat",
        "--system",
        "Be brief.",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0.8",
        "--top-k",
        "40",
        "--top-p",
        "0.95",
        "--min-p",
        "0.05",
        "--repeat-penalty",
        "1.1",
        "--seed",
        "7",
    ]);
    assert_eq!(code, 0, "{err}");
    // Same seed, same text.
    let (_, again, _) = hymba(&[
        "generate",
        "--model",
        fixture().to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--chat",
        "--system",
        "Be brief.",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0.8",
        "--top-k",
        "40",
        "--top-p",
        "0.95",
        "--min-p",
        "0.05",
        "--repeat-penalty",
        "1.1",
        "--seed",
        "7",
    ]);
    assert_eq!(out, again);
    assert!(!out.trim().is_empty());
}

#[test]
fn inspect_reports_a_bounded_cache() {
    let m = fixture();
    let json = |ctx: &str| -> serde_json::Value {
        let (code, out, err) = hymba(&[
            "inspect",
            "--model",
            m.to_str().unwrap(),
            "--context",
            ctx,
            "--json",
        ]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let (a, b) = (json("100"), json("1000"));
    let (ca, cb) = (&a["cache"]["bytes"], &b["cache"]["bytes"]);
    // Window rings stop growing at W; global K/V grows with the context; states are constant.
    assert_eq!(ca["window_kv"], cb["window_kv"]);
    assert_eq!(ca["ssm_state"], cb["ssm_state"]);
    let (ga, gb) = (
        ca["global_kv"].as_u64().unwrap(),
        cb["global_kv"].as_u64().unwrap(),
    );
    assert_eq!(gb, ga * 10);
    assert_eq!(a["parameters"]["total"].as_u64().unwrap(), 2_492_784);
    assert_eq!(a["layers"][2]["kv"], "reuses layer 1");
    // A bf16 K/V cache holds half the bytes.
    let (code, out, err) = hymba(&[
        "inspect",
        "--model",
        m.to_str().unwrap(),
        "--context",
        "1000",
        "--json",
        "--kv-cache",
        "bf16",
    ]);
    assert_eq!(code, 0, "{err}");
    let h: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(h["cache"]["element_bytes"], 2);
    assert_eq!(2 * h["cache"]["bytes"]["global_kv"].as_u64().unwrap(), gb);
}

/// With a bf16 K/V cache the fixture's prefill logits stay within bf16 precision of the
/// official ones (1/64 of their size), through a prefill and token-by-token steps.
#[test]
fn logits_with_a_bf16_kv_cache_stay_close() {
    let exp = expected();
    let l = fixture_logits(
        "logits-bf16",
        &i64s(&exp["input_ids"].1),
        &["--kv-cache", "bf16"],
    );
    let want = f32s(&exp["prefill_logits"].1);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = max_diff(&f32s(&l["logits"].1), &want);
    assert!(diff < scale / 64.0, "{diff} vs largest logit {scale}");
}

/// `bench --json` reports the fields the performance issue asks for, with sane values: speeds
/// positive, one decode entry per context, the fixture's weight bytes.
#[test]
fn bench_json_has_the_documented_fields() {
    let m = fixture();
    let (code, out, err) = hymba(&[
        "bench",
        "--model",
        m.to_str().unwrap(),
        "--json",
        "--prompt",
        "4",
        "--decode",
        "3",
        "--contexts",
        "8,20",
        "--batch",
        "1,3",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["read_bandwidth_gbs"].as_f64().unwrap() > 0.0);
    assert!(v["prefill_tok_s"].as_f64().unwrap() > 0.0);
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);
    // The fixture is f32, lm_head tied: every matrix once plus the embedding row.
    let wb = v["weight_bytes_per_token"].as_u64().unwrap();
    assert!(wb > 4 * 2_000_000 && wb < 4 * 2_492_784, "{wb}");
    let ctx: Vec<u64> = v["decode"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["context"].as_u64().unwrap())
        .collect();
    assert_eq!(ctx, vec![8, 20]);
    for d in v["decode"]
        .as_array()
        .unwrap()
        .iter()
        .chain(v["batched_decode"].as_array().unwrap())
    {
        assert!(d["tok_s"].as_f64().unwrap() > 0.0, "{d}");
    }
    let (code, _, err) = hymba(&["bench", "--model", m.to_str().unwrap(), "--decode", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("--decode"), "{err}");
}

/// A copy of the fixture with `edit` applied to its config.
fn with_config(tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = temp_dir(tag);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        fixture().join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    dir
}

fn gen_args(dir: &Path) -> Vec<String> {
    [
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--ids",
        "1,2,3",
        "--max-new-tokens",
        "2",
    ]
    .map(String::from)
    .to_vec()
}

fn fails_on(dir: &Path, needles: &[&str]) {
    let args = gen_args(dir);
    assert_fails(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        needles,
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_directory_and_files() {
    assert_fails(
        &["generate", "--model", "/no/such/model", "--ids", "1"],
        &["/no/such/model", "not found"],
    );
    let dir = temp_dir("nocfg");
    std::fs::copy(
        fixture().join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    fails_on(&dir, &["config.json"]);
    let dir = with_config("noweights", |_| {});
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    fails_on(&dir, &["model.safetensors"]);
    let dir = with_config("notok", |_| {});
    assert_fails(
        &[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        &["tokenizer.json"],
    );
}

#[test]
fn invalid_json() {
    let dir = with_config("badjson", |_| {});
    std::fs::write(dir.join("config.json"), "{\"hidden_size\": 64,").unwrap();
    fails_on(&dir, &["config.json", "invalid JSON"]);
}

#[test]
fn unsupported_config_values_name_the_key() {
    use serde_json::json;
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("rope_type", json!("yarn"), "rope_type"),
        ("num_experts", json!(2), "num_experts"),
        ("kq_norm", json!("rms"), "kq_norm"),
        (
            "memory_tokens_interspersed_every",
            json!(4),
            "memory_tokens_interspersed_every",
        ),
        (
            "layer_type",
            json!(["h", "h", "m", "h", "h", "h"]),
            "layer_type",
        ),
        ("mlp_hidden_act", json!("gelu"), "mlp_hidden_act"),
        ("num_attention_heads", json!(3), "num_attention_heads"),
        ("num_key_value_heads", json!(3), "num_key_value_heads"),
        ("kv_reuse_group", json!([[1, 2], [2, 4]]), "kv_reuse_group"),
        ("kv_reuse_group", json!([[1, 9]]), "kv_reuse_group"),
        ("global_attn_idx", json!([0, 6]), "global_attn_idx"),
        ("hidden_size", json!("64"), "hidden_size"),
        ("vocab_size", json!(1 << 25), "2^24"),
    ];
    for (key, value, needle) in cases {
        let v = value.clone();
        let dir = with_config(key, move |c| c[key] = v);
        fails_on(&dir, &[needle]);
    }
}

#[test]
fn broken_weights_name_the_file_or_tensor() {
    // Truncated file.
    let dir = with_config("trunc", |_| {});
    let w = dir.join("model.safetensors");
    let len = std::fs::metadata(&w).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&w)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    fails_on(&dir, &["model.safetensors"]);

    // Missing tensor and wrong shape: rewrite the file without / with a bad tensor.
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // `edit` maps a tensor's name and shape to its new shape, or None to drop it.
    type Edit<'a> = &'a dyn Fn(&str, Vec<usize>) -> Option<Vec<usize>>;
    let rewrite = |tag: &str, edit: Edit| {
        let dir = with_config(tag, |_| {});
        let mut keep = Vec::new();
        for (name, v) in st.tensors() {
            if let Some(shape) = edit(&name, v.shape().to_vec()) {
                let n: usize = shape.iter().product();
                keep.push((name, v.dtype(), shape, v.data()[..n * 4].to_vec()));
            }
        }
        let views: Vec<_> = keep
            .iter()
            .map(|(n, dt, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap(),
                )
            })
            .collect();
        std::fs::write(
            dir.join("model.safetensors"),
            safetensors::serialize(views, None).unwrap(),
        )
        .unwrap();
        dir
    };
    let missing = "model.layers.3.mamba.x_proj.0.weight";
    let dir = rewrite("missing", &|n, s| (n != missing).then_some(s));
    fails_on(&dir, &[missing, "missing"]);
    let bad = "model.layers.2.mamba.out_proj.weight";
    let dir = rewrite("shape", &|n, s| {
        Some(if n == bad { vec![s[0], s[1] - 1] } else { s })
    });
    fails_on(&dir, &[bad, "expected shape [64, 128]", "[64, 127]"]);
}

#[test]
fn bad_token_ids_and_arguments() {
    let m = fixture();
    assert_fails(
        &[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--ids",
            "1,32001",
        ],
        &["32001", "out of range"],
    );
    assert_fails(
        &["generate", "--model", m.to_str().unwrap(), "--ids", "1,x"],
        &["--ids", "`x`"],
    );
    assert_fails(
        &[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--ids",
            "1",
            "--top-p",
            "0",
        ],
        &["top_p"],
    );
    assert_fails(
        &[
            "logits",
            "--model",
            m.to_str().unwrap(),
            "--ids",
            "1,2",
            "--prefill",
            "3",
            "--out",
            "/tmp/x",
        ],
        &["--prefill"],
    );
    // The prompt cache copies sequence caches in the device's memory: CPU only for now, said
    // before any model loads.
    assert_fails(
        &["serve", "--device", "cuda", "--prompt-cache-mb", "64"],
        &["--prompt-cache-mb 64", "CPU only"],
    );
    // A bad flag value is a usage error (clap's exit code 2), naming the flag and the choices.
    let (code, _, err) = hymba(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--ids",
        "1",
        "--kv-cache",
        "f8",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--kv-cache") && err.contains("bf16"), "{err}");
}

/// A pre-quantized checkpoint loads to exactly the model that quantizing at load gives, and
/// Q8_0 stays close to the original.
#[test]
fn quantized_checkpoints_round_trip_and_keep_quality() {
    let exp = expected();
    let ids = ids_arg(&i64s(&exp["input_ids"].1));
    let m = fixture();
    let dir = temp_dir("quant");
    for q in ["q8_0", "q4_0"] {
        let qdir = dir.join(q);
        let (code, _, err) = hymba(&[
            "quantize",
            "--model",
            m.to_str().unwrap(),
            "--quant",
            q,
            "--out",
            qdir.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        let (a, b) = (dir.join(format!("{q}-a.st")), dir.join(format!("{q}-b.st")));
        let (c1, _, e1) = hymba(&[
            "logits",
            "--model",
            qdir.to_str().unwrap(),
            "--ids",
            &ids,
            "--out",
            a.to_str().unwrap(),
        ]);
        let (c2, _, e2) = hymba(&[
            "logits",
            "--model",
            m.to_str().unwrap(),
            "--quant",
            q,
            "--ids",
            &ids,
            "--out",
            b.to_str().unwrap(),
        ]);
        assert_eq!((c1, c2), (0, 0), "{e1} {e2}");
        assert_eq!(
            read_st(&a)["logits"].1,
            read_st(&b)["logits"].1,
            "{q}: saved vs at-load"
        );
        let size = std::fs::metadata(qdir.join("model.safetensors"))
            .unwrap()
            .len();
        let orig = std::fs::metadata(m.join("model.safetensors"))
            .unwrap()
            .len();
        assert!(size < orig / 3, "{q}: {size} bytes vs {orig} in f32");
    }
    let (code, out, err) = hymba(&[
        "quant-eval",
        "--model",
        m.to_str().unwrap(),
        "--quant",
        "q8_0",
        "--ids",
        &ids,
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["mean_kl"].as_f64().unwrap() < 0.05, "{v}");
    assert!(v["top1_agreement"].as_f64().unwrap() >= 0.8, "{v}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `hymba chat` with piped input: a conversation saved after one turn and loaded in a new
/// process continues exactly as the uninterrupted one.
#[test]
fn chat_session_save_and_load_resume_the_conversation() {
    use std::io::Write as _;
    let dir = temp_dir("chat");
    for (src, name) in [
        (fixture().join("config.json"), "config.json"),
        (fixture().join("model.safetensors"), "model.safetensors"),
        (shared().join("hymba-1.5b/tokenizer.json"), "tokenizer.json"),
        (
            shared().join("hymba-1.5b/tokenizer_config.json"),
            "tokenizer_config.json",
        ),
    ] {
        std::fs::copy(src, dir.join(name)).unwrap();
    }
    let chat = |input: &str| -> String {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hymba"))
            .args([
                "chat",
                "--model",
                dir.to_str().unwrap(),
                "--temperature",
                "0",
                "--max-new-tokens",
                "8",
                "--system",
                "Be brief.",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let session = dir.join("s.session");
    let whole = chat("Hello there\nHow are you\n");
    let first = chat(&format!("Hello there\n/save {}\n", session.display()));
    let rest = chat(&format!("/load {}\nHow are you\n", session.display()));
    assert_eq!(whole.lines().count(), 2, "{whole:?}");
    assert_eq!(format!("{first}{rest}"), whole);
    // A reset forgets the conversation: the second answer changes back to a first answer.
    let reset = chat("Hello there\n/reset\nHello there\n");
    let lines: Vec<&str> = reset.lines().collect();
    assert_eq!(lines[0], lines[1]);
    std::fs::remove_dir_all(dir).unwrap();
}

/// `hymba perplexity` on the built-in model: overlapping windows score every token but the
/// first, a real verse is likelier than its words reversed, and bad windows are refused. (That
/// the scores equal the training loss is tested in hymba-train's gradients tests.)
#[test]
fn perplexity_scores_text_with_the_built_in_model() {
    let verse = "And God said, Let there be light: and there was light. And God saw the light, that it was good.";
    let reversed: String = verse.split(' ').rev().collect::<Vec<_>>().join(" ");
    let score = |text: &str| -> serde_json::Value {
        let (code, out, err) = hymba(&[
            "perplexity",
            "--text",
            text,
            "--ctx",
            "16",
            "--stride",
            "8",
            "--json",
        ]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let (real, back) = (score(verse), score(&reversed));
    assert_eq!(
        real["tokens_scored"].as_u64().unwrap() + 1,
        real["text_tokens"].as_u64().unwrap(),
        "{real}"
    );
    assert!(real["windows"].as_u64().unwrap() > 1, "{real}");
    let nll = |v: &serde_json::Value| v["mean_nll"].as_f64().unwrap();
    assert!((real["perplexity"].as_f64().unwrap().ln() - nll(&real)).abs() < 1e-9);
    assert!(
        nll(&real) + 1.0 < nll(&back),
        "real {real} vs reversed {back}"
    );
    assert_fails(
        &["perplexity", "--text", verse, "--stride", "0"],
        &["stride"],
    );
    assert_fails(&["perplexity", "--text", verse, "--ctx", "1"], &["ctx"]);
    assert_fails(
        &["perplexity", "--text", verse, "--ctx", "100000"],
        &["--ctx", "max_position_embeddings"],
    );
    assert_fails(
        &["perplexity", "--file", "/nonexistent/text.txt"],
        &["/nonexistent/text.txt"],
    );
}

/// `--model ORG/NAME` resolves offline in a Hugging Face hub cache laid out as the hub writes it
/// (refs naming a commit, a snapshot of symlinks into blobs), on any command that takes
/// `--model`; a missing repo or revision is an error naming where it looked and how to fetch it.
#[cfg(unix)]
#[test]
fn repo_ids_resolve_in_the_hub_cache() {
    let cache = temp_dir("hub");
    let repo = cache.join("models--nvidia--Tiny-Hymba");
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for (i, name) in ["config.json", "model.safetensors"].iter().enumerate() {
        std::fs::copy(fixture().join(name), repo.join(format!("blobs/{i}"))).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{i}"), snap.join(name)).unwrap();
    }
    let run = |args: &[&str]| {
        // Offline: a missing repo is not looked for on the hub (`hub_download.rs` does that).
        let out = Command::new(env!("CARGO_BIN_EXE_hymba"))
            .args(args)
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, hub, err) = run(&[
        "inspect",
        "--model",
        "nvidia/Tiny-Hymba",
        "--context",
        "64",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let (_, direct, _) = run(&[
        "inspect",
        "--model",
        fixture().to_str().unwrap(),
        "--context",
        "64",
        "--json",
    ]);
    assert_eq!(hub, direct, "the cached snapshot is the fixture");
    let (code, _, _) = run(&[
        "inspect",
        "--model",
        "nvidia/Tiny-Hymba",
        "--revision",
        commit,
        "--context",
        "64",
    ]);
    assert_eq!(code, Some(0));
    let (code, _, err) = run(&[
        "inspect",
        "--model",
        "nvidia/Tiny-Hymba",
        "--revision",
        "v9",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("revision `v9`")
            && err.contains("huggingface-cli download nvidia/Tiny-Hymba --revision v9"),
        "{err}"
    );
    let (code, _, err) = run(&["generate", "--model", "nvidia/Missing", "--prompt", "x"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("models--nvidia--Missing")
            && err.contains("huggingface-cli download nvidia/Missing"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&cache);
}

/// `--kv-cache auto` (the default) keeps the checkpoint's precision: bf16 K/V for the built-in
/// model's bf16 weights, f32 for the fixture's f32 ones; a type given wins; an unknown one is
/// refused by name.
#[test]
fn kv_cache_auto_follows_the_checkpoint() {
    let built_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/default-model");
    let kv_of = |model: &Path, extra: &[&str]| {
        let m = model.to_str().unwrap();
        let mut args = vec!["inspect", "--model", m, "--context", "16"];
        args.extend_from_slice(extra);
        let (code, out, err) = hymba(&args);
        assert_eq!(code, 0, "{err}");
        out.lines()
            .find(|l| l.contains("K/V, from live buffers"))
            .unwrap_or_else(|| panic!("no K/V line: {out}"))
            .to_string()
    };
    assert!(kv_of(&built_in, &[]).contains("BF16 K/V"));
    assert!(kv_of(&fixture(), &[]).contains("F32 K/V"));
    assert!(kv_of(&built_in, &["--kv-cache", "f32"]).contains("F32 K/V"));
    assert!(kv_of(&fixture(), &["--kv-cache", "bf16"]).contains("BF16 K/V"));
    let (code, _, err) = hymba(&[
        "inspect",
        "--model",
        fixture().to_str().unwrap(),
        "--kv-cache",
        "f16",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("expected auto, f32 or bf16"), "{err}");
}
