//! `hymba`: the command-line front-end. It parses arguments and moves bytes; the engine is the
//! `hymba` library.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use hymba::tensor::Dtype;
use hymba::{DecodeWindow, GenerateOptions, KvDtype, Logits, Message, Model, SamplingParams};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod bench;
mod chat;
mod default_model;
mod download;
mod inspect;
mod perplexity;
mod train;

#[derive(Parser)]
#[command(
    name = "hymba",
    version,
    about = "Run NVIDIA Hymba hybrid-head language models on the CPU"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// With `--model ORG/NAME` (a Hugging Face repo id, found offline in the hub cache): the
    /// branch, tag or commit [default: main].
    #[arg(long, global = true)]
    revision: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text (or token ids) after a prompt, streamed to stdout.
    Generate(GenerateArgs),
    /// Write the logits of every input position to a safetensors file.
    Logits(LogitsArgs),
    /// Perplexity of a text: the model's mean negative log-likelihood per token, over windows.
    Perplexity(perplexity::PerplexityArgs),
    /// Multi-turn chat in the terminal with the checkpoint's chat template.
    Chat(chat::ChatArgs),
    /// OpenAI-compatible HTTP server with continuous batching.
    Serve(ServeArgs),
    /// Parameter counts, layer plan and cache size of a model.
    Inspect(inspect::InspectArgs),
    /// Prefill and decode speed beside the memory bandwidth measured in the same run.
    Bench(bench::BenchArgs),
    /// Write a pre-quantized copy of a checkpoint, which then loads without converting.
    Quantize(QuantizeArgs),
    /// Quality of a quantization: KL divergence and top-1 agreement against the original.
    QuantEval(bench::QuantEvalArgs),
    /// Write a checkpoint with random weights for a config (for tests and benchmarks).
    Synth(SynthArgs),
    /// Train a Hymba model from scratch on plain text (tokenizer included).
    Train(train::TrainArgs),
}

#[derive(Args)]
struct PromptArgs {
    /// Prompt text (tokenized with the model's tokenizer).
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, used as given.
    #[arg(long)]
    ids: Option<String>,
    /// tokenizer.json to use [default: MODEL/tokenizer.json].
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

#[derive(Args)]
struct GenerateArgs {
    /// Checkpoint directory (config.json + safetensors) [default: the built-in tiny model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where to run: cpu, or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    prompt: PromptArgs,
    /// Render the prompt as a user message with the checkpoint's chat template.
    #[arg(long)]
    chat: bool,
    /// A Jinja chat template file for --chat instead of the checkpoint's.
    #[arg(long, requires = "chat")]
    chat_template: Option<PathBuf>,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[command(flatten)]
    penalties: PenaltyArgs,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the output contains this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Do not stop at the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Decode steps see W−1 past tokens in window layers, like NVIDIA's `generate`.
    #[arg(long)]
    official_decode_window: bool,
    /// Write input_ids, generated_ids and generate_logits to this safetensors file.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Quantize the large matrices at load: q8_0 or q4_0.
    #[arg(long)]
    quant: Option<String>,
    /// Element type of the K/V cache: auto (the checkpoint's precision: bf16 for bf16
    /// weights, f32 for f32), f32, or bf16 (half the memory and the bytes attention reads;
    /// logits within bf16 precision).
    #[arg(long, default_value = "auto")]
    kv_cache: crate::KvArg,
}

#[derive(Args)]
struct LogitsArgs {
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    prompt: PromptArgs,
    /// How many ids go through one prefill; the rest are fed one at a time [default: all].
    #[arg(long)]
    prefill: Option<usize>,
    #[arg(long)]
    official_decode_window: bool,
    /// Output safetensors file (input_ids, logits).
    #[arg(long)]
    out: PathBuf,
    /// Quantize the large matrices at load: q8_0 or q4_0.
    #[arg(long)]
    quant: Option<String>,
    /// Element type of the K/V cache: auto (the checkpoint's precision: bf16 for bf16
    /// weights, f32 for f32), f32, or bf16 (half the memory and the bytes attention reads;
    /// logits within bf16 precision).
    #[arg(long, default_value = "auto")]
    kv_cache: crate::KvArg,
    /// Where to run: cpu, or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct ServeArgs {
    /// Checkpoint directory [default: the built-in tiny model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where to run: cpu, or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// tokenizer.json [default: MODEL/tokenizer.json].
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// A Jinja chat template file instead of the checkpoint's (e.g. for a base model).
    #[arg(long)]
    chat_template: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (printed on start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` (also from HYMBA_API_KEY, which keeps the key out
    /// of the process list).
    #[arg(long, env = "HYMBA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Read the API key from the first line of this file instead.
    #[arg(long, conflicts_with = "api_key")]
    api_key_file: Option<PathBuf>,
    /// Sequences stepped together; as many more may wait.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// MiB of finished requests' caches kept so that a prompt extending one (a conversation's
    /// next turn) prefills only its new tokens; 0 turns the prompt cache off. CPU only for now
    /// [default: 1024 on the CPU, 0 on a GPU].
    #[arg(long)]
    prompt_cache_mb: Option<usize>,
    /// `--prompt-cache-mb` in bytes, for this device (checked before the model loads).
    #[arg(skip)]
    prompt_cache_bytes: usize,
    /// Alternatives per token a request may ask for in `logprobs` / `top_logprobs`.
    #[arg(long, default_value_t = hymba_server::Limits::default().max_logprobs)]
    max_logprobs: usize,
    /// Prompts in one completion request.
    #[arg(long, default_value_t = hymba_server::Limits::default().max_prompts)]
    max_prompts: usize,
    /// Bytes of a request body (413 beyond).
    #[arg(long, default_value_t = hymba_server::Limits::default().max_body_bytes)]
    max_body_bytes: usize,
    /// Seconds running requests get to finish after SIGTERM or Ctrl-C (no new connections are
    /// taken meanwhile); then the server exits anyway.
    #[arg(long, default_value_t = 30.0)]
    shutdown_grace: f64,
    /// Prompt plus completion tokens per request, at most the model's max_position_embeddings
    /// [default: max_position_embeddings].
    #[arg(long)]
    max_context: Option<usize>,
    /// Name clients give as `model` [default: the directory name].
    #[arg(long)]
    served_model_name: Option<String>,
    /// Quantize the large matrices at load: q8_0 or q4_0.
    #[arg(long)]
    quant: Option<String>,
    /// Element type of the K/V cache: auto (the checkpoint's precision: bf16 for bf16
    /// weights, f32 for f32), f32, or bf16 (half the memory and the bytes attention reads;
    /// logits within bf16 precision).
    #[arg(long, default_value = "auto")]
    kv_cache: crate::KvArg,
}

#[derive(Args)]
struct QuantizeArgs {
    #[arg(long)]
    model: PathBuf,
    /// q8_0 or q4_0.
    #[arg(long)]
    quant: String,
    /// Output directory (config, weights and tokenizer files).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct SynthArgs {
    /// A Hymba config.json giving the shapes.
    #[arg(long)]
    config: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Copy this tokenizer.json (and the tokenizer_config.json beside it) into the checkpoint.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

/// Training steps and forward passes free and reallocate the same large activation buffers
/// every time; glibc returns each to the kernel and faults fresh zeroed pages back in (13% of a
/// training step, measured with perf). Keeping freed memory in the heap avoids that.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: mallopt only changes allocator tuning; 32 MiB is glibc's largest mmap threshold.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> ExitCode {
    keep_freed_memory();
    let mut cli = Cli::parse();
    if let Err(e) = resolve_model_arg(&mut cli.cmd, cli.revision.as_deref()) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let res = match cli.cmd {
        Cmd::Generate(a) => generate(a),
        Cmd::Logits(a) => logits(a),
        Cmd::Inspect(a) => inspect::run(a),
        Cmd::Synth(a) => synth(a),
        Cmd::Train(a) => train::run(a),
        Cmd::Perplexity(a) => perplexity::run(a),
        Cmd::Serve(a) => serve(a),
        Cmd::Chat(a) => chat::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Quantize(a) => quantize(a),
        Cmd::QuantEval(a) => bench::quant_eval(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--model` of a command as a directory: a repo id becomes its snapshot in the hub cache.
fn resolve_model_arg(cmd: &mut Cmd, revision: Option<&str>) -> Result<()> {
    let model: Option<&mut PathBuf> = match cmd {
        Cmd::Generate(a) => a.model.as_mut(),
        Cmd::Logits(a) => Some(&mut a.model),
        Cmd::Perplexity(a) => a.model.as_mut(),
        Cmd::Serve(a) => a.model.as_mut(),
        Cmd::Chat(a) => a.model.as_mut(),
        Cmd::Inspect(a) => Some(&mut a.model),
        Cmd::Bench(a) => a.model.as_mut(),
        Cmd::Quantize(a) => Some(&mut a.model),
        Cmd::QuantEval(a) => a.model.as_mut(),
        Cmd::Synth(_) | Cmd::Train(_) => None,
    };
    match model {
        Some(m) => *m = resolve_or_download(m, revision)?,
        None if revision.is_some() => bail!("--revision goes with --model ORG/NAME"),
        None => {}
    }
    Ok(())
}

/// `--kv-cache`: `auto` (the checkpoint's own precision, [`Model::checkpoint_kv_dtype`]), or
/// a type.
#[derive(Clone, Copy, Debug)]
pub enum KvArg {
    Auto,
    Is(KvDtype),
}

impl std::str::FromStr for KvArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(KvArg::Auto),
            _ => s
                .parse()
                .map(KvArg::Is)
                .map_err(|_| format!("unknown K/V cache type {s:?}: expected auto, f32 or bf16")),
        }
    }
}

impl KvArg {
    /// `model` with its K/V caches in the chosen type.
    pub fn apply<B: hymba::backend::Backend>(self, model: Model<B>) -> Model<B> {
        let dtype = match self {
            KvArg::Auto => model.checkpoint_kv_dtype(),
            KvArg::Is(d) => d,
        };
        model.with_kv_dtype(dtype)
    }
}

/// A `--model` as a directory ([`hymba::hub::resolve`]); a repo id missing from the hub cache
/// is downloaded into it first, unless `HF_HUB_OFFLINE` is set.
fn resolve_or_download(m: &Path, revision: Option<&str>) -> Result<PathBuf> {
    let missing = match hymba::hub::resolve(m, revision) {
        Ok(dir) => return Ok(dir),
        Err(e) => e,
    };
    let repo = m.to_string_lossy();
    let root = hymba::hub::cache_dir();
    match root {
        Some(root) if hymba::hub::is_repo_id(&repo) && !download::offline() => {
            download::download(&repo, revision, &root)
                .map_err(|e| anyhow!("{missing}; downloading it failed: {e:#}"))?;
            Ok(hymba::hub::resolve(m, revision)?)
        }
        _ => Err(missing.into()),
    }
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .map_err(|_| anyhow!("--ids: `{t}` is not a token id"))
        })
        .collect::<Result<Vec<_>>>()
        .and_then(|v| {
            if v.is_empty() {
                bail!("--ids: no token ids given")
            } else {
                Ok(v)
            }
        })
}

/// `--quant` value: None keeps the stored precision.
/// OpenAI's penalties and logit biases, for generate and chat.
#[derive(Args)]
pub struct PenaltyArgs {
    /// OpenAI's: taken once off the logit of every token already generated (−2..2).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    presence_penalty: f32,
    /// OpenAI's: taken off a token's logit once per time it was generated (−2..2).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    frequency_penalty: f32,
    /// ID=BIAS added to that token's logit (−100..100; repeatable).
    #[arg(long, allow_hyphen_values = true)]
    logit_bias: Vec<String>,
}

impl PenaltyArgs {
    /// Default sampling with these penalties and biases, each bias's id inside the vocabulary.
    pub fn sampling(&self, vocab: usize) -> Result<SamplingParams> {
        Ok(SamplingParams {
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: parse_logit_bias(&self.logit_bias, vocab)?,
            ..Default::default()
        })
    }
}

/// `--logit-bias ID=BIAS` values, each id inside the vocabulary.
fn parse_logit_bias(items: &[String], vocab: usize) -> Result<Vec<(u32, f32)>> {
    items
        .iter()
        .map(|s| {
            let parsed = s.split_once('=').and_then(|(id, b)| {
                Some((
                    id.trim().parse::<u32>().ok()?,
                    b.trim().parse::<f32>().ok()?,
                ))
            });
            match parsed {
                Some((id, b)) if (id as usize) < vocab => Ok((id, b)),
                Some((id, _)) => {
                    bail!("--logit-bias {s}: token {id} is outside the vocabulary of {vocab}")
                }
                None => bail!("--logit-bias {s}: expected TOKEN_ID=BIAS, e.g. 13=-5"),
            }
        })
        .collect()
}

/// `--device`: None for the CPU, Some(ordinal) for a CUDA device.
pub fn parse_device(s: &str) -> Result<Option<usize>> {
    match s {
        "cpu" => Ok(None),
        _ => hymba::backend::cuda::parse_device(s)
            .map(Some)
            .ok_or_else(|| anyhow!("--device: `{s}` is not one of cpu, cuda, cuda:N")),
    }
}

pub fn parse_quant(q: Option<&str>) -> Result<Option<Dtype>> {
    match q {
        None | Some("none") | Some("bf16") => Ok(None),
        Some(s) => Dtype::parse_quant(s)
            .map(Some)
            .ok_or_else(|| anyhow!("--quant: `{s}` is not one of q8_0, q4_0")),
    }
}

/// The server's API key: `--api-key` or HYMBA_API_KEY, or the first line of `--api-key-file`.
fn api_key(a: &ServeArgs) -> Result<Option<String>> {
    let key = match &a.api_key_file {
        None => a.api_key.clone(),
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading the API key file {}", f.display()))?;
            Some(text.lines().next().unwrap_or("").trim().to_string())
        }
    };
    if key.as_deref() == Some("") {
        bail!(
            "the API key is empty (from {}): give a key, or no key option to serve without one",
            a.api_key_file
                .as_ref()
                .map_or("--api-key / HYMBA_API_KEY".into(), |f| f
                    .display()
                    .to_string())
        );
    }
    Ok(key)
}

/// `--prompt-cache-mb` in bytes: 1 GiB by default on the CPU; on a GPU none, and a size is
/// refused (a copy of a sequence's cache there would take device memory that nothing checks).
fn prompt_cache_bytes(asked: Option<usize>, device: &str) -> Result<usize> {
    let on_cpu = parse_device(device)?.is_none();
    let mb = match asked {
        None if on_cpu => 1024,
        None | Some(0) => 0,
        Some(n) if on_cpu => n,
        Some(n) => bail!(
            "--prompt-cache-mb {n}: the prompt cache runs on the CPU only for now; leave it out (or give 0) with --device {device}"
        ),
    };
    mb.checked_mul(1 << 20)
        .ok_or_else(|| anyhow!("--prompt-cache-mb {mb}: too large"))
}

fn serve(mut a: ServeArgs) -> Result<()> {
    a.prompt_cache_bytes = prompt_cache_bytes(a.prompt_cache_mb, &a.device)?;
    struct Run(ServeArgs);
    impl default_model::ModelFn<()> for Run {
        fn call<B: hymba::backend::Backend>(self, model: Model<B>) -> Result<()> {
            serve_on(self.0, model)
        }
    }
    let (device, dir, quant) = (a.device.clone(), a.model.clone(), a.quant.clone());
    default_model::with_model(&device, dir.as_deref(), quant.as_deref(), Run(a))
}

fn serve_on<B: hymba::backend::Backend>(a: ServeArgs, model: Model<B>) -> Result<()> {
    let mut tokenizer =
        default_model::load_tokenizer(a.model.as_deref(), a.tokenizer.as_deref(), true)?
            .expect("required");
    default_model::override_chat_template(&mut tokenizer, a.chat_template.as_deref())?;
    let tokenizer = std::sync::Arc::new(tokenizer);
    let model = std::sync::Arc::new(a.kv_cache.apply(model));
    let max_pos = model.config.max_position_embeddings;
    let max_context = a.max_context.unwrap_or(max_pos);
    if max_context == 0 || max_context > max_pos {
        bail!("--max-context {max_context}: expected 1..={max_pos} (the model's max_position_embeddings, the positions it was made for)");
    }
    if a.max_batch == 0 {
        bail!("--max-batch 0: at least one sequence must run");
    }
    let eos_id = tokenizer.eos_id.or(model.config.eos_token_id);
    let name = a
        .served_model_name
        .clone()
        .unwrap_or_else(|| match &a.model {
            None => default_model::NAME.into(),
            Some(m) => {
                let canon = m.canonicalize().unwrap_or_else(|_| m.clone());
                canon
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "hymba".into())
            }
        });
    let engine = hymba::Engine::start(
        model,
        Some(tokenizer.clone()),
        hymba::EngineOptions {
            max_batch: a.max_batch,
            prompt_cache_bytes: a.prompt_cache_bytes,
        },
    );
    let key = api_key(&a)?;
    let state_has_no_key = key.is_none();
    let state = std::sync::Arc::new(hymba_server::AppState {
        engine,
        tokenizer,
        model_name: name.clone(),
        max_context,
        api_key: key,
        eos_id,
        limits: hymba_server::Limits {
            max_logprobs: a.max_logprobs,
            max_prompts: a.max_prompts,
            max_body_bytes: a.max_body_bytes,
        },
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("binding {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        eprintln!("serving `{name}` on http://{addr}");
        if !addr.ip().is_loopback() && state_has_no_key {
            eprintln!("warning: serving on {} without an API key: anyone who can reach it can use it (set --api-key, HYMBA_API_KEY or --api-key-file)", addr.ip());
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let grace = std::time::Duration::from_secs_f64(a.shutdown_grace.max(0.0));
        let drain = hymba_server::serve(listener, state, {
            let rx = stop_rx.clone();
            async move {
                stopped(rx).await;
                eprintln!(
                    "stopping: no new connections; running requests have {grace:?} to finish"
                );
            }
        });
        tokio::select! {
            r = drain => r?,
            _ = async { stopped(stop_rx).await; tokio::time::sleep(grace).await } => {
                eprintln!("stopping: the grace period is over, running requests are cancelled");
            }
        }
        Ok(())
    })
}

/// SIGTERM (what service managers send) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn quantize(a: QuantizeArgs) -> Result<()> {
    let q =
        parse_quant(Some(&a.quant))?.ok_or_else(|| anyhow!("--quant: expected q8_0 or q4_0"))?;
    // Validate the whole checkpoint first: a broken input never produces an output.
    Model::load(&a.model).with_context(|| format!("loading model from {}", a.model.display()))?;
    let mut store = hymba::tensor::TensorStore::open(&a.model)?;
    store.quantize(q);
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    store.save(&a.out.join("model.safetensors"))?;
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        let src = a.model.join(name);
        if src.exists() {
            let bytes =
                std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
            hymba::error::write_atomic(&a.out.join(name), &bytes)?;
        }
    }
    eprintln!("wrote {} ({})", a.out.display(), a.quant);
    Ok(())
}

fn window(official: bool) -> DecodeWindow {
    if official {
        DecodeWindow::Official
    } else {
        DecodeWindow::Trained
    }
}

fn generate(a: GenerateArgs) -> Result<()> {
    struct Run(GenerateArgs);
    impl default_model::ModelFn<()> for Run {
        fn call<B: hymba::backend::Backend>(self, model: Model<B>) -> Result<()> {
            generate_on(self.0, model)
        }
    }
    let (device, dir, quant) = (a.device.clone(), a.model.clone(), a.quant.clone());
    default_model::with_model(&device, dir.as_deref(), quant.as_deref(), Run(a))
}

fn generate_on<B: hymba::backend::Backend>(a: GenerateArgs, model: Model<B>) -> Result<()> {
    let required = a.prompt.prompt.is_some() || a.chat || !a.stop.is_empty();
    let mut tok =
        default_model::load_tokenizer(a.model.as_deref(), a.prompt.tokenizer.as_deref(), required)?;
    if let Some(t) = tok.as_mut() {
        default_model::override_chat_template(t, a.chat_template.as_deref())?;
    }
    let model = a.kv_cache.apply(model);
    let prompt = match (&a.prompt.ids, &a.prompt.prompt) {
        (Some(ids), _) => parse_ids(ids)?,
        (None, Some(text)) => {
            let tok = tok.as_ref().expect("required with --prompt");
            if a.chat {
                let tmpl = tok.chat_template.as_ref().ok_or_else(|| {
                    anyhow!("--chat: tokenizer_config.json beside the tokenizer has no chat_template (give one with --chat-template)")
                })?;
                let mut msgs = Vec::new();
                if let Some(s) = &a.system {
                    msgs.push(Message::new("system", s));
                }
                msgs.push(Message::new("user", text));
                // HF's apply_chat_template: the rendered text, tokenized without an added BOS.
                tok.encode(&tmpl.render(&msgs, None, true)?, false)?
            } else {
                tok.encode_prompt(text)?
            }
        }
        (None, None) => unreachable!("clap requires one"),
    };
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repetition_penalty: a.repeat_penalty,
            seed: a.seed,
            ..a.penalties.sampling(model.config.vocab_size)?
        },
        stop: a.stop.clone(),
        ignore_eos: a.ignore_eos,
        eos_id: tok
            .as_ref()
            .and_then(|t| t.eos_id)
            .or(model.config.eos_token_id),
        window: window(a.official_decode_window),
        keep_logits: a.dump.is_some(),
    };
    let mut out = std::io::stdout().lock();
    let gen = hymba::generate(&model, tok.as_ref(), &prompt, &opts, &mut |piece| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    })?;
    if tok.is_none() {
        let ids: Vec<String> = gen.ids.iter().map(u32::to_string).collect();
        write!(out, "{}", ids.join(","))?;
    }
    writeln!(out)?;
    let n = gen.ids.len();
    eprintln!(
        "[prompt {} tokens: {:.1} tok/s; generated {} tokens: {:.1} tok/s; {:?}]",
        prompt.len(),
        prompt.len() as f64 / gen.prefill_secs.max(1e-9),
        n,
        n.saturating_sub(1) as f64 / gen.decode_secs.max(1e-9),
        gen.finish
    );
    if let Some(path) = &a.dump {
        let v = model.config.vocab_size;
        write_safetensors(
            path,
            &[
                ("input_ids", I64(&prompt), vec![prompt.len()]),
                ("generated_ids", I64(&gen.ids), vec![n]),
                ("generate_logits", F32(&gen.logits), vec![n, v]),
            ],
        )?;
    }
    Ok(())
}

fn logits(a: LogitsArgs) -> Result<()> {
    let quant = parse_quant(a.quant.as_deref())?;
    let load = |what: &str| format!("loading model from {} onto {what}", a.model.display());
    match parse_device(&a.device)? {
        None => logits_on(
            &a,
            Model::load_on(hymba::backend::Cpu, &a.model, quant)
                .with_context(|| load("the CPU"))?,
        ),
        Some(n) => logits_on(
            &a,
            Model::load_on(hymba::backend::Cuda::new(n)?, &a.model, quant)
                .with_context(|| load(&a.device))?,
        ),
    }
}

fn logits_on<B: hymba::backend::Backend>(a: &LogitsArgs, model: Model<B>) -> Result<()> {
    let tok = default_model::load_tokenizer(
        Some(&a.model),
        a.prompt.tokenizer.as_deref(),
        a.prompt.prompt.is_some(),
    )?;
    let model = a.kv_cache.apply(model);
    let ids = match (&a.prompt.ids, &a.prompt.prompt) {
        (Some(ids), _) => parse_ids(ids)?,
        (None, Some(text)) => tok
            .as_ref()
            .expect("required with --prompt")
            .encode_prompt(text)?,
        (None, None) => unreachable!("clap requires one"),
    };
    let n = a.prefill.unwrap_or(ids.len());
    if n > ids.len() {
        bail!("--prefill {n}: only {} input ids", ids.len());
    }
    let win = window(a.official_decode_window);
    let mut cache = model.new_cache();
    let mut out = Vec::with_capacity(ids.len() * model.config.vocab_size);
    if n > 0 {
        out.extend(model.forward(&mut cache, &ids[..n], Logits::All, win)?);
    }
    for &id in &ids[n..] {
        out.extend(model.forward(&mut cache, &[id], Logits::Last, win)?);
    }
    write_safetensors(
        &a.out,
        &[
            ("input_ids", I64(&ids), vec![ids.len()]),
            (
                "logits",
                F32(&out),
                vec![ids.len(), model.config.vocab_size],
            ),
        ],
    )
}

fn synth(a: SynthArgs) -> Result<()> {
    let dtype = match a.dtype.as_str() {
        "f32" => Dtype::F32,
        "bf16" => Dtype::BF16,
        "f16" => Dtype::F16,
        other => bail!("--dtype: `{other}` is not one of f32, bf16, f16"),
    };
    let cfg = hymba::Config::from_file(&a.config)?;
    let t = std::time::Instant::now();
    hymba::synthetic::write_checkpoint(&cfg, &a.out, dtype, a.seed, 1.0)?;
    if let Some(tok) = &a.tokenizer {
        for (src, name) in [
            (tok.clone(), "tokenizer.json"),
            (
                tok.with_file_name("tokenizer_config.json"),
                "tokenizer_config.json",
            ),
        ] {
            if src.exists() {
                std::fs::copy(&src, a.out.join(name))
                    .with_context(|| format!("copying {}", src.display()))?;
            }
        }
    }
    eprintln!(
        "wrote {} in {:.1} s",
        a.out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

enum Data<'a> {
    I64(&'a [u32]),
    F32(&'a [f32]),
}
use Data::{F32, I64};

/// Writes tensors to a safetensors file atomically.
fn write_safetensors(path: &Path, tensors: &[(&str, Data, Vec<usize>)]) -> Result<()> {
    let bytes: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, data, shape)| {
            let (dt, b) = match data {
                I64(v) => (
                    safetensors::Dtype::I64,
                    v.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect(),
                ),
                F32(v) => (
                    safetensors::Dtype::F32,
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ),
            };
            (name.to_string(), dt, shape.clone(), b)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, dt, s, b)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, s.clone(), b)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let out = safetensors::serialize(views, None)?;
    hymba::error::write_atomic(path, &out)?;
    Ok(())
}
