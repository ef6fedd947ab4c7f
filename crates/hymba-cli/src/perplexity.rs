//! `hymba perplexity`: how well a model predicts a text, as llama.cpp's `llama-perplexity` and
//! lm-eval's word-perplexity tasks measure it; the windows are [`hymba::score`]'s.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct PerplexityArgs {
    /// Checkpoint directory [default: the built-in tiny model].
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// Where to run: cpu, or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// tokenizer.json [default: MODEL/tokenizer.json].
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Text file to score.
    #[arg(long, conflicts_with = "text", required_unless_present = "text")]
    file: Option<PathBuf>,
    /// Text to score.
    #[arg(long)]
    text: Option<String>,
    /// Tokens per window; each window is a fresh sequence (meta tokens first).
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Tokens between window starts: windows overlap by ctx − stride tokens of context, and
    /// each scores only its last `stride` tokens [default: ctx / 2].
    #[arg(long)]
    stride: Option<usize>,
    /// Quantize the large matrices at load: q8_0 or q4_0.
    #[arg(long)]
    quant: Option<String>,
    /// Element type of the K/V cache: auto (the checkpoint's precision: bf16 for bf16
    /// weights, f32 for f32), f32, or bf16 (half the memory and the bytes attention reads;
    /// logits within bf16 precision).
    #[arg(long, default_value = "auto")]
    kv_cache: crate::KvArg,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(a: PerplexityArgs) -> Result<()> {
    struct Run(PerplexityArgs);
    impl crate::default_model::ModelFn<()> for Run {
        fn call<B: hymba::backend::Backend>(self, model: hymba::Model<B>) -> Result<()> {
            run_on(self.0, model)
        }
    }
    let (device, dir, quant) = (a.device.clone(), a.model.clone(), a.quant.clone());
    crate::default_model::with_model(&device, dir.as_deref(), quant.as_deref(), Run(a))
}

fn run_on<B: hymba::backend::Backend>(a: PerplexityArgs, model: hymba::Model<B>) -> Result<()> {
    let text = match (&a.file, &a.text) {
        (Some(f), _) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, Some(t)) => t.clone(),
        (None, None) => unreachable!("clap requires one"),
    };
    let tok =
        crate::default_model::load_tokenizer(a.model.as_deref(), a.tokenizer.as_deref(), true)?
            .expect("required");
    let model = a.kv_cache.apply(model);
    let max = model.config.max_position_embeddings;
    if a.ctx > max {
        bail!("--ctx {}: longer than the model's max_position_embeddings ({max}), the positions it was made for", a.ctx);
    }
    let ids = tok.encode_prompt(&text)?;
    if ids.len() < 2 {
        bail!(
            "the text is {} token(s) long: perplexity needs at least 2",
            ids.len()
        );
    }
    let stride = a.stride.unwrap_or((a.ctx / 2).max(1));
    let t = Instant::now();
    // Drawn on a terminal only: a redirected stderr gets no progress lines.
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("window {pos}/{len} {wide_bar} {eta}")
            .expect("a valid template"),
    );
    if a.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let s = hymba::score::score(&model, &ids, a.ctx, stride, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        let out = serde_json::json!({
            "perplexity": s.perplexity(),
            "mean_nll": s.mean_nll(),
            "nll_stderr": s.nll_stderr,
            "tokens_scored": s.tokens,
            "text_tokens": ids.len(),
            "windows": s.windows,
            "ctx": a.ctx,
            "stride": stride,
            "seconds": secs,
        });
        println!("{out}");
    } else {
        println!(
            "perplexity {:.4} (mean NLL {:.4} ± {:.4} nats/token) over {} tokens in {} windows of {} (stride {stride}); {:.1} s",
            s.perplexity(),
            s.mean_nll(),
            s.nll_stderr,
            s.tokens,
            s.windows,
            a.ctx,
            secs
        );
    }
    Ok(())
}
