//! `hymba train`: tokenizer, config and corpus set-up around the `hymba-train` loop, with a
//! progress bar, the loss-curve PNG and a metrics file at the end.

use anyhow::{bail, Context, Result};
use clap::Args;
use hymba::tensor::Dtype;
use hymba::tensor::TensorStore;
use hymba::{Config, Tokenizer};
use hymba_train::data::{self, Corpus};
use hymba_train::train::{export, History, Start, TrainOptions, CHECKPOINT};
use hymba_train::{plot, presets, Progress};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct TrainArgs {
    /// A preset (tiny, micro) or a config.json file.
    #[arg(long, required_unless_present = "init", conflicts_with = "init")]
    config: Option<String>,
    /// Fine-tune: start from this checkpoint directory's weights, with its config.json and
    /// tokenizer (`builtin`: the model built into the binary).
    #[arg(long, conflicts_with = "vocab_size")]
    init: Option<String>,
    /// Plain-text files; paragraphs (blank-line separated) are documents.
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// Output directory: config.json, model.safetensors, tokenizer files, checkpoint, loss.png.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per sequence (the meta tokens come on top).
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Peak learning rate (after warmup; cosine decay to a tenth of it).
    #[arg(long, default_value_t = 3e-3)]
    lr: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from OUT/checkpoint.safetensors with the same options.
    #[arg(long)]
    resume: bool,
    /// Use this tokenizer.json instead of training a byte-level BPE (or instead of --init's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Size of the trained BPE vocabulary (special tokens included).
    #[arg(long, default_value_t = 4096)]
    vocab_size: usize,
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f32,
    /// Global gradient-norm clip.
    #[arg(long, default_value_t = 1.0)]
    clip: f32,
    /// Validation loss every N steps.
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    /// Validation set size, in batches.
    #[arg(long, default_value_t = 8)]
    eval_batches: usize,
    /// Checkpoint every N steps.
    #[arg(long, default_value_t = 100)]
    save_every: usize,
    /// Stop cleanly after this step (continue later with --resume).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Precision of the exported model.safetensors: bf16 (as NVIDIA ships) or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let dtype = match a.dtype.as_str() {
        "bf16" => Dtype::BF16,
        "f32" => Dtype::F32,
        other => bail!("--dtype {other}: expected bf16 or f32"),
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    // Resuming takes the weights from the run's own checkpoint.
    let init = if a.resume {
        None
    } else {
        a.init.as_deref().map(Init::open).transpose()?
    };
    let docs = data::read_documents(&a.data)?;
    let tok_path = a.out.join("tokenizer.json");
    let cfg_path = a.out.join("config.json");
    if a.resume {
        for p in [&tok_path, &cfg_path, &a.out.join(CHECKPOINT)] {
            if !p.is_file() {
                bail!(
                    "--resume: {} not found (was training started in this directory?)",
                    p.display()
                );
            }
        }
    } else {
        let ckpt = a.out.join(CHECKPOINT);
        if ckpt.exists() {
            bail!("{} already exists: pass --resume to continue that training, or choose another --out", ckpt.display());
        }
        match (&a.tokenizer, &init) {
            (Some(t), _) => {
                std::fs::copy(t, &tok_path).with_context(|| {
                    format!("copying {} to {}", t.display(), tok_path.display())
                })?;
                let cfg = t.with_file_name("tokenizer_config.json");
                if cfg.is_file() {
                    std::fs::copy(&cfg, a.out.join("tokenizer_config.json"))?;
                } else {
                    write_json(
                        &a.out.join("tokenizer_config.json"),
                        &data::tokenizer_config(),
                    )?;
                }
            }
            (None, Some(init)) => {
                let Some(tok) = &init.tokenizer else {
                    bail!(
                        "--init {}: no tokenizer.json there; give one with --tokenizer",
                        init.source
                    );
                };
                hymba::error::write_atomic(&tok_path, tok)?;
                let cfg = init.tokenizer_config.clone().unwrap_or_else(|| {
                    serde_json::to_string_pretty(&data::tokenizer_config()).expect("json")
                });
                hymba::error::write_atomic(&a.out.join("tokenizer_config.json"), cfg.as_bytes())?;
            }
            (None, None) => {
                eprintln!(
                    "training a byte-level BPE of {} tokens on {} documents",
                    a.vocab_size,
                    docs.len()
                );
                data::train_tokenizer(&docs, a.vocab_size, &tok_path)?;
                write_json(
                    &a.out.join("tokenizer_config.json"),
                    &data::tokenizer_config(),
                )?;
            }
        }
    }
    let tok = Tokenizer::from_file(&tok_path)?;
    let config = if a.resume {
        Config::from_file(&cfg_path)?
    } else {
        let vocab = tok.vocab_size();
        let (raw, what) = match (&init, a.config.as_deref()) {
            (Some(init), _) => (init.config.clone(), format!("--init {}", init.source)),
            (None, Some(name)) => {
                let raw = match presets::preset(name, vocab) {
                    Some(v) => v,
                    None if Path::new(name).is_file() => {
                        let p = Path::new(name);
                        serde_json::from_str(&std::fs::read_to_string(p)?)
                            .with_context(|| format!("{}: not valid JSON", p.display()))?
                    }
                    None => bail!(
                        "--config {name}: neither a preset ({}) nor a file",
                        presets::NAMES.join(", ")
                    ),
                };
                (raw, format!("--config {name}"))
            }
            (None, None) => unreachable!("clap requires --config or --init"),
        };
        let config = Config::from_value(raw).with_context(|| what.clone())?;
        if config.vocab_size < vocab {
            bail!(
                "{what}: vocab_size {} is smaller than the tokenizer's {vocab} tokens",
                config.vocab_size
            );
        }
        write_json(&cfg_path, &config.raw)?;
        config
    };
    let corpus = Corpus::build(&docs, &tok, a.seed, 20)?;
    let (unigram, bigram) = data::ngram_baselines(&corpus.train, &corpus.valid, config.vocab_size);
    let opts = TrainOptions {
        steps: a.steps,
        batch: a.batch,
        seq_len: a.seq_len,
        lr: a.lr,
        min_lr_frac: 0.1,
        warmup: a.warmup,
        weight_decay: a.weight_decay,
        clip: a.clip,
        seed: a.seed,
        eval_every: a.eval_every,
        eval_batches: a.eval_batches,
        save_every: a.save_every,
        init: a.init.clone(),
    };
    let n_params = hymba_train::Params::init(&config, 0).len();
    eprintln!(
        "{} parameters; {} training tokens, {} held-out tokens; held-out baselines: unigram {unigram:.3}, bigram {bigram:.3} nats/token",
        n_params,
        corpus.train.len(),
        corpus.valid.len()
    );
    let bar = ProgressBar::new(a.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("template"),
    );
    // Without a terminal the bar is hidden: log the milestones as plain lines instead.
    let say = |bar: &ProgressBar, line: String| {
        if bar.is_hidden() {
            eprintln!("{line}")
        } else {
            bar.println(line)
        }
    };
    let mut last_val = None;
    let mut on = |p: Progress| match p {
        Progress::Step {
            step,
            steps,
            loss,
            lr,
            grad_norm,
            tokens_per_s,
        } => {
            bar.set_position(step as u64);
            if bar.is_hidden() && (step % 10 == 0 || step == steps) {
                eprintln!("step {step}/{steps}: loss {loss:.4} lr {lr:.2e} |g| {grad_norm:.2} {tokens_per_s:.0} tok/s");
            }
            let val = last_val
                .map(|v: f32| format!(" val {v:.3}"))
                .unwrap_or_default();
            bar.set_message(format!(
                "loss {loss:.3}{val} lr {lr:.2e} |g| {grad_norm:.2} {tokens_per_s:.0} tok/s"
            ));
        }
        Progress::Eval { step, loss } => {
            last_val = Some(loss);
            say(&bar, format!("step {step}: validation loss {loss:.4}"));
        }
        Progress::Saved { .. } => {}
        Progress::Resumed { step, .. } => {
            bar.set_position(step as u64);
            say(&bar, format!("resumed at step {step}"));
        }
    };
    let start = match &init {
        _ if a.resume => Start::Resume,
        Some(init) => {
            say(
                &bar,
                format!("starting from the weights of {}", init.source),
            );
            Start::From(&init.store)
        }
        None => Start::Scratch,
    };
    let outcome = hymba_train::train(
        &a.out,
        &config,
        &corpus,
        &opts,
        start,
        a.stop_after,
        &mut on,
    )?;
    bar.finish();
    export(&a.out, &config, &outcome.params, dtype)?;
    let h: &History = &outcome.history;
    plot::loss_png(h, &[unigram as f32, bigram as f32], &a.out.join("loss.png"))?;
    let held = hymba_train::train::held_out_loss(
        &config,
        &outcome.params,
        &corpus.valid,
        opts.seq_len,
        opts.batch,
    );
    let tail = &h.train[h.train.len().saturating_sub(20)..];
    let train_loss = tail.iter().map(|s| s.1).sum::<f32>() / tail.len().max(1) as f32;
    let metrics = serde_json::json!({
        "steps": outcome.step,
        "parameters": n_params,
        "train_loss_last20": train_loss,
        "valid_loss": h.valid.last().map(|v| v.1),
        "held_out_loss": held.map(|h| h.0),
        "held_out_tokens_scored": held.map(|h| h.1),
        "held_out_tokens": corpus.valid.len(),
        "unigram_valid_loss": unigram,
        "bigram_valid_loss": bigram,
        "tokens_trained": h.tokens,
        "train_seconds": h.seconds,
        "tokens_per_second": h.tokens as f64 / h.seconds.max(1e-9),
        "options": opts,
    });
    write_json(&a.out.join("metrics.json"), &metrics)?;
    eprintln!(
        "done: step {} of {}, train loss {train_loss:.3}, validation {}, all held-out text {} (unigram {unigram:.3}, bigram {bigram:.3}), {:.0} tok/s; wrote {}",
        outcome.step,
        a.steps,
        h.valid.last().map_or("-".into(), |v| format!("{:.3}", v.1)),
        held.map_or("-".into(), |h| format!("{:.3} over {} tokens", h.0, h.1)),
        h.tokens as f64 / h.seconds.max(1e-9),
        a.out.display()
    );
    Ok(())
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    hymba::error::write_atomic(path, serde_json::to_string_pretty(v)?.as_bytes())?;
    Ok(())
}

/// The checkpoint a fine-tuning run starts from: its tensors, config.json and tokenizer files.
struct Init {
    /// As given to --init, for messages and the recorded options.
    source: String,
    store: TensorStore,
    config: serde_json::Value,
    /// None when the directory has no tokenizer.json (then --tokenizer must give one).
    tokenizer: Option<Vec<u8>>,
    tokenizer_config: Option<String>,
}

impl Init {
    fn open(source: &str) -> Result<Init> {
        use crate::default_model as builtin;
        if source == "builtin" {
            return Ok(Init {
                source: source.into(),
                store: builtin::store()?,
                config: serde_json::from_str(builtin::CONFIG)?,
                tokenizer: Some(builtin::TOKENIZER.to_vec()),
                tokenizer_config: Some(builtin::TOKENIZER_CONFIG.into()),
            });
        }
        let dir = Path::new(source);
        let store = TensorStore::open(dir).with_context(|| format!("--init {source}"))?;
        let read = |name: &str| {
            std::fs::read(dir.join(name))
                .with_context(|| format!("--init {source}: reading {name}"))
        };
        let config = serde_json::from_slice(&read("config.json")?)
            .with_context(|| format!("--init {source}: config.json is not valid JSON"))?;
        let optional = |name: &str| dir.join(name).is_file().then(|| read(name)).transpose();
        let tokenizer_config = optional("tokenizer_config.json")?;
        Ok(Init {
            source: source.into(),
            store,
            config,
            tokenizer: optional("tokenizer.json")?,
            tokenizer_config: tokenizer_config.map(|b| String::from_utf8_lossy(&b).into_owned()),
        })
    }
}
