//! The model built into the binary: a tiny Hymba trained by `hymba train` on the King James
//! Bible (`scripts/train-default-model.sh`; source and license in
//! `assets/default-model/CORPUS.md`). `generate`, `chat` and `serve` use it when `--model` is
//! not given, so the tool works offline out of the box.

use anyhow::{Context, Result};
use hymba::backend::{Backend, Cpu, Cuda};
use hymba::tensor::{Dtype, TensorStore};
use hymba::{Config, Model, Tokenizer};
use std::path::Path;

/// What messages and `/v1/models` call it.
pub const NAME: &str = "hymba-tiny-kjv";

pub const CONFIG: &str = include_str!("../../../assets/default-model/config.json");
/// Aligned so the tensors are read in place (safetensors keeps data offsets 8-byte aligned).
#[repr(C, align(64))]
struct Aligned<B: ?Sized>(B);
static WEIGHTS: &Aligned<[u8]> = &Aligned(*include_bytes!(
    "../../../assets/default-model/model.safetensors"
));
pub const TOKENIZER: &[u8] = include_bytes!("../../../assets/default-model/tokenizer.json");
pub const TOKENIZER_CONFIG: &str =
    include_str!("../../../assets/default-model/tokenizer_config.json");

fn model_on<B: Backend>(b: B, quant: Option<Dtype>) -> Result<Model<B>> {
    let what = format!("the built-in model {NAME}");
    let config = Config::from_value(serde_json::from_str(CONFIG).context("config.json")?)
        .with_context(|| what.clone())?;
    let mut store = store()?;
    if let Some(q) = quant {
        store.quantize(q);
    }
    Model::on(b, config, store).with_context(|| what)
}

/// The built-in model's tensors, read in place.
pub fn store() -> Result<TensorStore> {
    TensorStore::from_static(NAME, &WEIGHTS.0).with_context(|| format!("the built-in model {NAME}"))
}

pub fn tokenizer() -> Result<Tokenizer> {
    Ok(Tokenizer::from_bytes(
        TOKENIZER,
        NAME,
        Some((TOKENIZER_CONFIG, NAME)),
    )?)
}

/// The model of a command on backend `b`: the checkpoint directory when given, else the
/// built-in one; quantized as `quant` says.
pub fn load_model_on<B: Backend>(
    b: B,
    dir: Option<&Path>,
    quant: Option<&str>,
) -> Result<Model<B>> {
    let q = crate::parse_quant(quant)?;
    match dir {
        Some(d) => {
            let (bar, what) = loading_spinner(d, q.and(quant));
            let m = Model::load_on_reporting(b, d, q, &mut |done, total| {
                bar.set_message(format!("{what}: layer {done} of {total} ready"))
            })
            .and_then(|m| {
                // The meta tokens' K/V and states, once per model: a forward of its own.
                let n = m.config.num_memory_tokens;
                bar.set_message(format!("{what}: computing the prefix of {n} meta tokens"));
                m.ready().map(|()| m)
            })
            .with_context(|| format!("loading model from {}", d.display()));
            bar.finish_and_clear();
            m
        }
        None => model_on(b, q),
    }
}

/// A spinner with the time spent while a checkpoint loads (mapping, then packing, quantizing or
/// copying to the GPU the weights layer by layer, which its message counts: seconds for a 3 GB
/// model; then the meta-token prefix), and what it says of the checkpoint. Drawn on a terminal only: a redirected stderr
/// gets nothing.
fn loading_spinner(dir: &Path, quant: Option<&str>) -> (indicatif::ProgressBar, String) {
    let bytes: u64 = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let what = quant.map_or(String::new(), |q| format!(", quantizing to {q}"));
    let bar = indicatif::ProgressBar::new_spinner().with_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .expect("a valid template"),
    );
    let what = format!(
        "loading {} ({:.2} GB of weights{what})",
        dir.display(),
        bytes as f64 / 1e9
    );
    bar.set_message(what.clone());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    (bar, what)
}

/// Runs `f` with the model of a command on the device `--device` names (cpu, cuda, cuda:N).
pub fn with_model<R>(
    device: &str,
    dir: Option<&Path>,
    quant: Option<&str>,
    f: impl ModelFn<R>,
) -> Result<R> {
    match crate::parse_device(device)? {
        None => f.call(load_model_on(Cpu, dir, quant)?),
        Some(n) => {
            let model = load_model_on(Cuda::new(n)?, dir, quant)?;
            model.ready()?;
            f.call(model)
        }
    }
}

/// What runs on a model of any backend (a closure cannot be generic over it).
pub trait ModelFn<R> {
    fn call<B: Backend>(self, model: Model<B>) -> Result<R>;
}

/// Replaces `tok`'s chat template with the Jinja file `path` when given (`--chat-template`).
pub fn override_chat_template(tok: &mut Tokenizer, path: Option<&Path>) -> Result<()> {
    if let Some(p) = path {
        let src = std::fs::read_to_string(p)
            .with_context(|| format!("--chat-template: reading {}", p.display()))?;
        tok.set_chat_template(&src, &p.display().to_string())?;
    }
    Ok(())
}

/// The tokenizer of a command: `explicit` when given, else the checkpoint's
/// `tokenizer.json` (None when it has none and `required` is false), else the built-in one.
pub fn load_tokenizer(
    dir: Option<&Path>,
    explicit: Option<&Path>,
    required: bool,
) -> Result<Option<Tokenizer>> {
    match (explicit, dir) {
        (Some(p), _) => Ok(Some(Tokenizer::from_file(p)?)),
        (None, Some(d)) => {
            let p = d.join("tokenizer.json");
            if !p.exists() && !required {
                return Ok(None);
            }
            Ok(Some(Tokenizer::from_file(&p)?))
        }
        (None, None) => Ok(Some(tokenizer()?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mean negative log-likelihood per predicted token of `text` under the built-in model.
    fn nll(model: &Model, tok: &Tokenizer, text: &str) -> f64 {
        let ids = tok.encode(text, true).unwrap();
        let logits = model.forward_uncached(&ids).unwrap();
        let v = model.config.vocab_size;
        let mut sum = 0.0;
        for (i, &next) in ids[1..].iter().enumerate() {
            let row = &logits[i * v..(i + 1) * v];
            let mx = row.iter().fold(f32::MIN, |a, &b| a.max(b));
            let lse = mx as f64
                + row
                    .iter()
                    .map(|&x| ((x - mx) as f64).exp())
                    .sum::<f64>()
                    .ln();
            sum += lse - row[next as usize] as f64;
        }
        sum / (ids.len() - 1) as f64
    }

    /// The shipped model has learned English word order: famous verses (which it may have
    /// seen) and a new sentence in the same style are far more likely than the same words
    /// in reverse order.
    #[test]
    fn built_in_model_prefers_real_sentences_to_shuffled_words() {
        let model = load_model_on(Cpu, None, None).unwrap();
        let tok = tokenizer().unwrap();
        assert_eq!(tok.bos_id, Some(1));
        assert_eq!(tok.eos_id, Some(2));
        for text in [
            "In the beginning God created the heaven and the earth.",
            "And God said, Let there be light: and there was light.",
            "And the king sent his servants unto the city, and they spake unto the people.",
        ] {
            let words: Vec<&str> = text.split(' ').collect();
            let shuffled: Vec<&str> = words.iter().rev().copied().collect();
            let (real, mixed) = (
                nll(&model, &tok, text),
                nll(&model, &tok, &shuffled.join(" ")),
            );
            assert!(
                real + 1.0 < mixed,
                "{text:?}: {real:.3} nats/token, shuffled {mixed:.3}"
            );
        }
    }
}
