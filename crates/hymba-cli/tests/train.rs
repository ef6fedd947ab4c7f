//! `hymba train` end to end on a small text: the files it writes, that the engine loads the
//! result unchanged, resuming, and clear errors on bad input. Also the built-in default model.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// A small English-like text: paragraphs of sentences from a tiny grammar.
fn write_corpus(dir: &Path) -> PathBuf {
    let subjects = ["the cat", "a dog", "the old man", "my sister", "the king"];
    let verbs = ["saw", "found", "loved", "carried", "called"];
    let objects = [
        "the red ball",
        "a small house",
        "the river",
        "his friend",
        "the bread",
    ];
    let mut text = String::new();
    for p in 0..60 {
        for s in 0..4 {
            let i = p * 7 + s * 3;
            text += &format!(
                "{} {} {}.\n",
                subjects[i % 5],
                verbs[(i / 5) % 5],
                objects[(i / 3 + p) % 5]
            );
        }
        text += "\n";
    }
    let path = dir.join("data.txt");
    std::fs::write(&path, text).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn train_writes_a_checkpoint_the_engine_loads() {
    let dir = temp_dir("train");
    let data = write_corpus(&dir);
    let out = dir.join("out");
    let args = [
        "train",
        "--config",
        "micro",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--steps",
        "6",
        "--batch",
        "2",
        "--seq-len",
        "32",
        "--vocab-size",
        "300",
        "--eval-every",
        "3",
        "--save-every",
        "3",
        "--warmup",
        "2",
    ];
    let (code, _, err) = hymba(&args);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("unigram") && err.contains("bigram"), "{err}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "checkpoint.safetensors",
        "metrics.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    for k in [
        "valid_loss",
        "unigram_valid_loss",
        "bigram_valid_loss",
        "tokens_per_second",
    ] {
        assert!(
            m[k].as_f64().is_some_and(f64::is_finite),
            "metrics.json {k}: {}",
            m[k]
        );
    }
    // The figure beside the baselines covers every window of 33 held-out tokens; where those
    // are no more than the periodic evaluation's 8 batches of 2, the two are the same number.
    let held = m["held_out_tokens"].as_u64().unwrap();
    let windows = held / 33;
    assert!(windows > 0, "{m}");
    assert_eq!(m["held_out_tokens_scored"], windows * 32, "{m}");
    let full = m["held_out_loss"].as_f64().unwrap();
    if windows <= 16 {
        assert_eq!(full, m["valid_loss"].as_f64().unwrap(), "{m}");
    } else {
        assert!(full.is_finite(), "{m}");
    }
    // The official layout, bf16 as NVIDIA ships it, loaded by the engine unchanged.
    let st = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    for name in [
        "model.embed_tokens.weight",
        "model.memory_tokens",
        "model.layers.1.mamba.in_proj.weight",
        "model.layers.2.moe.experts.0.down_proj.weight",
    ] {
        assert_eq!(
            st.tensor(name).unwrap().dtype(),
            safetensors::Dtype::BF16,
            "{name}"
        );
    }
    let (code, text, err) = hymba(&[
        "generate",
        "--model",
        s(&out),
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(!text.is_empty());
    // Resuming a finished run is a no-op that rewrites the same model.
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    let mut resume = args.to_vec();
    resume.push("--resume");
    let (code, _, err) = hymba(&resume);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        before,
        std::fs::read(out.join("model.safetensors")).unwrap()
    );
    // Starting afresh over an existing training is refused: it would discard it.
    assert_fails(&args, &["checkpoint.safetensors", "--resume"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn train_rejects_bad_input() {
    let dir = temp_dir("train-bad");
    let data = write_corpus(&dir);
    let out = dir.join("out");
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--steps",
            "2",
            "--batch",
            "1",
            "--seq-len",
            "16",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let run = |v: Vec<String>, needles: &[&str]| {
        assert_fails(&v.iter().map(String::as_str).collect::<Vec<_>>(), needles)
    };
    run(
        base(&["--config", "enormous"]),
        &["enormous", "tiny", "micro"],
    );
    run(
        base(&["--config", "micro", "--vocab-size", "10"]),
        &["--vocab-size"],
    );
    run(
        base(&[
            "--config",
            "micro",
            "--vocab-size",
            "300",
            "--dtype",
            "q4_0",
        ]),
        &["--dtype"],
    );
    run(
        base(&["--config", "micro", "--vocab-size", "300", "--resume"]),
        &["--resume"],
    );
    let mut zero_batch = base(&["--config", "micro", "--vocab-size", "300"]);
    let at = zero_batch.iter().position(|a| a == "--batch").unwrap();
    zero_batch[at + 1] = "0".into();
    run(zero_batch, &["--batch"]);
    let missing = dir.join("missing.txt");
    assert_fails(
        &[
            "train",
            "--config",
            "micro",
            "--data",
            s(&missing),
            "--out",
            s(&out),
        ],
        &["missing.txt"],
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// The safetensors tensors of a file: name -> (dtype, shape, bytes).
fn tensors(path: &Path) -> std::collections::BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                (
                    format!("{:?}", v.dtype()),
                    v.shape().to_vec(),
                    v.data().to_vec(),
                ),
            )
        })
        .collect()
}

/// Fine-tuning starts from the given checkpoint: with a zero learning rate the exported model
/// is the starting one, tensor for tensor and byte for byte, with its config and tokenizer; with
/// a real one, a few steps from the built-in model reach a far lower held-out loss than the
/// same steps from scratch on the same config and tokenizer.
#[test]
fn fine_tuning_starts_from_the_checkpoint() {
    let dir = temp_dir("finetune");
    let data = write_corpus(&dir);
    let builtin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/default-model");
    let opts = [
        "--data",
        s(&data),
        "--batch",
        "2",
        "--seq-len",
        "32",
        "--warmup",
        "1",
        "--eval-every",
        "4",
        "--save-every",
        "4",
    ];
    let train = |out: &Path, start: &[&str], extra: &[&str]| {
        let mut args = vec!["train", "--out", s(out)];
        args.extend(start);
        args.extend(opts);
        args.extend(extra);
        let (code, _, err) = hymba(&args);
        assert_eq!(code, 0, "{err}");
        err
    };

    let same = dir.join("same");
    let err = train(
        &same,
        &["--init", "builtin"],
        &["--steps", "2", "--lr", "0"],
    );
    assert!(
        err.contains("starting from the weights of builtin"),
        "{err}"
    );
    let want = tensors(&builtin.join("model.safetensors"));
    assert_eq!(
        tensors(&same.join("model.safetensors")),
        want,
        "lr 0 must leave every weight as it was"
    );
    assert_eq!(
        std::fs::read(same.join("tokenizer.json")).unwrap(),
        std::fs::read(builtin.join("tokenizer.json")).unwrap()
    );
    let json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    assert_eq!(
        json(same.join("config.json")),
        json(builtin.join("config.json"))
    );

    // From a directory (the copy just written), against scratch with its config and tokenizer.
    let steps = ["--steps", "8", "--lr", "1e-3"];
    let (tuned, scratch) = (dir.join("tuned"), dir.join("scratch"));
    train(&tuned, &["--init", s(&same)], &steps);
    train(
        &scratch,
        &[
            "--config",
            s(&same.join("config.json")),
            "--tokenizer",
            s(&same.join("tokenizer.json")),
        ],
        &steps,
    );
    let valid = |out: &Path| {
        json(out.join("metrics.json"))["valid_loss"]
            .as_f64()
            .unwrap()
    };
    let (t, f) = (valid(&tuned), valid(&scratch));
    assert!(
        t < f - 1.0,
        "fine-tuned held-out loss {t} should be far below scratch {f}"
    );

    // --init replaces --config; a directory without a tokenizer needs --tokenizer.
    let (code, _, err) = hymba(&[
        "train",
        "--init",
        "builtin",
        "--config",
        "micro",
        "--data",
        s(&data),
        "--out",
        s(&dir.join("x")),
    ]);
    assert!(code == 2 && err.contains("--config"), "{code}: {err}");
    std::fs::remove_file(same.join("tokenizer.json")).unwrap();
    assert_fails(
        &[
            "train",
            "--init",
            s(&same),
            "--data",
            s(&data),
            "--out",
            s(&dir.join("y")),
        ],
        &["tokenizer.json", "--tokenizer"],
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn generate_chat_and_serve_default_to_the_built_in_model() {
    let (code, text, err) = hymba(&[
        "generate",
        "--prompt",
        "And God said",
        "--max-new-tokens",
        "8",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(!text.trim().is_empty(), "no text generated");
    let (code, text, err) = hymba(&["generate", "--ids", "1,5,9", "--max-new-tokens", "3"]);
    assert_eq!(code, 0, "{err}");
    assert!(!text.trim().is_empty());
}
