//! The training loop: seeded batches, AdamW with warmup and cosine decay, clipping, periodic
//! validation, atomic resumable checkpoints, and the export in the official layout.

use crate::data::{sample_batch, windows, Corpus};
use crate::model::{Batch, TrainModel};
use crate::optim::{clip_grad_norm, AdamW, Schedule};
use crate::params::Params;
use hymba::config::Config;
use hymba::tensor::{write_safetensors, Dtype, TensorStore};
use hymba::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// Name of the training state file in the output directory.
pub const CHECKPOINT: &str = "checkpoint.safetensors";
const STATE_KEY: &str = "hymba_train";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainOptions {
    pub steps: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub lr: f32,
    pub min_lr_frac: f32,
    pub warmup: usize,
    pub weight_decay: f32,
    pub clip: f32,
    pub seed: u64,
    pub eval_every: usize,
    /// Validation windows: at most this many batches of `batch` windows.
    pub eval_batches: usize,
    pub save_every: usize,
    /// Where the starting weights came from when fine-tuning (recorded so a resumed run is the
    /// same training); None from scratch.
    #[serde(default)]
    pub init: Option<String>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            steps: 1000,
            batch: 8,
            seq_len: 256,
            lr: 3e-3,
            min_lr_frac: 0.1,
            warmup: 50,
            weight_decay: 0.1,
            clip: 1.0,
            seed: 0,
            eval_every: 100,
            eval_batches: 8,
            save_every: 100,
            init: None,
        }
    }
}

impl TrainOptions {
    pub fn schedule(&self) -> Schedule {
        Schedule {
            lr: self.lr,
            min_lr_frac: self.min_lr_frac,
            warmup: self.warmup.min(self.steps),
            steps: self.steps,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct History {
    /// (step, training loss, learning rate)
    pub train: Vec<(usize, f32, f32)>,
    /// (step, validation loss)
    pub valid: Vec<(usize, f32)>,
    /// Seconds spent in steps, and tokens trained, over all runs of this training.
    pub seconds: f64,
    pub tokens: u64,
}

#[derive(Serialize, Deserialize)]
struct State {
    step: usize,
    options: TrainOptions,
    history: History,
}

/// What the loop reports as it goes.
pub enum Progress<'a> {
    Step {
        step: usize,
        steps: usize,
        loss: f32,
        lr: f32,
        grad_norm: f32,
        tokens_per_s: f64,
    },
    Eval {
        step: usize,
        loss: f32,
    },
    Saved {
        step: usize,
    },
    Resumed {
        step: usize,
        history: &'a History,
    },
}

/// Where a run's weights start.
#[derive(Clone, Copy)]
pub enum Start<'a> {
    /// Freshly initialised from the seed.
    Scratch,
    /// A trained checkpoint's weights (fine-tuning): every tensor of the config's layout, in
    /// any stored precision, widened to f32.
    From(&'a TensorStore),
    /// The run's own `checkpoint.safetensors` in the output directory, made with the same
    /// options: weights, both Adam moments, step and history.
    Resume,
}

pub struct Outcome {
    pub params: Params,
    pub history: History,
    /// Steps done when the loop stopped.
    pub step: usize,
}

/// Trains from `start` up to `options.steps`, saving every `save_every` steps to
/// `dir/checkpoint.safetensors`; `stop_after` ends the loop early after that step (as a kill
/// would, but cleanly), for tests and time-boxed runs.
pub fn train(
    dir: &Path,
    config: &Config,
    corpus: &Corpus,
    options: &TrainOptions,
    start: Start,
    stop_after: Option<usize>,
    on: &mut dyn FnMut(Progress),
) -> Result<Outcome> {
    let (b, t) = (options.batch, options.seq_len);
    for (name, v) in [
        ("--steps", options.steps),
        ("--batch", b),
        ("--seq-len", t),
        ("eval_every", options.eval_every),
        ("save_every", options.save_every),
    ] {
        if v == 0 {
            return Err(Error::Input(format!("{name} must be at least 1")));
        }
    }
    if corpus.train.len() < t + 2 {
        return Err(Error::Input(format!(
            "the training text has {} tokens, fewer than --seq-len {t} + 2",
            corpus.train.len()
        )));
    }
    if let Some(bad) = corpus
        .train
        .iter()
        .chain(&corpus.valid)
        .find(|&&id| id as usize >= config.vocab_size)
    {
        return Err(Error::Input(format!(
            "token id {bad} is outside the config's vocab_size {}",
            config.vocab_size
        )));
    }
    let mut params = Params::init(config, options.seed);
    let mut opt = AdamW::new(params.len(), options.weight_decay);
    let mut history = History::default();
    let mut first = 0;
    if let Start::From(store) = start {
        params.load_from(store, &store.source)?;
    }
    if let Start::Resume = start {
        let st = load_checkpoint(&dir.join(CHECKPOINT), &mut params, &mut opt)?;
        if st.options != *options {
            return Err(Error::Input(format!(
                "{}: the checkpoint was made with other training options ({}); resume with the same ones",
                dir.join(CHECKPOINT).display(),
                serde_json::to_string(&st.options).unwrap_or_default()
            )));
        }
        first = st.step;
        history = st.history;
        on(Progress::Resumed {
            step: first,
            history: &history,
        });
    }
    let model = TrainModel::new(config.clone(), &params);
    let schedule = options.schedule();
    // Validation windows; a short held-out text falls back to the end of the training text.
    let mut valid = windows(&corpus.valid, t, options.eval_batches * b);
    if valid.is_empty() {
        valid = windows(&corpus.train[corpus.train.len() - (t + 1)..], t, 1);
    }
    let mut step = first;
    while step < options.steps {
        let began = Instant::now();
        let batch = Batch {
            ids: sample_batch(&corpus.train, b, t, options.seed, step as u64),
            b,
            t,
        };
        let (loss, mut grad) = model.loss_and_grad(&params, &batch);
        if !loss.is_finite() {
            return Err(Error::Input(format!(
                "the training loss became {loss} at step {}; try a lower --lr",
                step + 1
            )));
        }
        let grad_norm = clip_grad_norm(&mut grad, options.clip);
        let lr = schedule.at(step);
        opt.step(&mut params, &grad, lr, step + 1);
        step += 1;
        let secs = began.elapsed().as_secs_f64();
        history.seconds += secs;
        history.tokens += (b * t) as u64;
        history.train.push((step, loss, lr));
        on(Progress::Step {
            step,
            steps: options.steps,
            loss,
            lr,
            grad_norm,
            tokens_per_s: (b * t) as f64 / secs,
        });
        if step % options.eval_every == 0 || step == options.steps {
            let vl = evaluate(&model, &params, &valid, b);
            history.valid.push((step, vl));
            on(Progress::Eval { step, loss: vl });
        }
        if step % options.save_every == 0 || step == options.steps {
            save_checkpoint(
                &dir.join(CHECKPOINT),
                &params,
                &opt,
                &State {
                    step,
                    options: options.clone(),
                    history: history.clone(),
                },
            )?;
            on(Progress::Saved { step });
        }
        if stop_after == Some(step) {
            break;
        }
    }
    Ok(Outcome {
        params,
        history,
        step,
    })
}

/// The mean next-token loss over the whole held-out stream `valid`, in consecutive windows of
/// `t + 1` tokens (the evaluations during training read only the first `eval_batches · b` of
/// them), and the tokens it scores: the figure to set beside baselines computed on all of it.
pub fn held_out_loss(
    config: &Config,
    params: &Params,
    valid: &[u32],
    t: usize,
    b: usize,
) -> Option<(f32, usize)> {
    let w = windows(valid, t, usize::MAX);
    if w.is_empty() {
        return None;
    }
    let model = TrainModel::new(config.clone(), params);
    Some((evaluate(&model, params, &w, b), w.len() * t))
}

/// Mean next-token loss over the windows, `b` at a time.
pub fn evaluate(model: &TrainModel, params: &Params, windows: &[Vec<u32>], b: usize) -> f32 {
    let t = windows[0].len() - 1;
    let (mut sum, mut n) = (0.0f64, 0usize);
    for chunk in windows.chunks(b) {
        let batch = Batch {
            ids: chunk.concat(),
            b: chunk.len(),
            t,
        };
        let (loss, _) = model.forward(params, &batch);
        sum += loss as f64 * chunk.len() as f64;
        n += chunk.len();
    }
    (sum / n as f64) as f32
}

fn f32_bytes(v: &[f32], out: &mut Vec<u8>) {
    out.extend(v.iter().flat_map(|x| x.to_le_bytes()));
}

/// Parameters and both Adam moments under `name`, `optimizer.m.name`, `optimizer.v.name`, with
/// the step, options and history as metadata; written atomically.
fn save_checkpoint(path: &Path, params: &Params, opt: &AdamW, state: &State) -> Result<()> {
    let mut headers = Vec::new();
    let mut slices: Vec<&[f32]> = Vec::new();
    for (prefix, data) in [
        ("", &params.data),
        ("optimizer.m.", &opt.m),
        ("optimizer.v.", &opt.v),
    ] {
        for p in &params.info {
            headers.push((
                format!("{prefix}{}", p.name),
                Dtype::F32.safetensors_name(),
                p.shape.clone(),
                p.range.len() * 4,
            ));
            slices.push(&data[p.range.clone()]);
        }
    }
    let meta = serde_json::to_string(state).expect("json");
    write_safetensors(path, &headers, Some((STATE_KEY, meta)), |i, out| {
        f32_bytes(slices[i], out)
    })
}

fn load_checkpoint(path: &Path, params: &mut Params, opt: &mut AdamW) -> Result<State> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::Checkpoint {
        file: path.display().to_string(),
        msg,
    };
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let state: State = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .ok_or_else(|| {
            bad(format!(
                "no `{STATE_KEY}` metadata: not a training checkpoint"
            ))
        })
        .and_then(|s| {
            serde_json::from_str(s).map_err(|e| bad(format!("metadata `{STATE_KEY}`: {e}")))
        })?;
    for (prefix, data) in [
        ("", &mut params.data),
        ("optimizer.m.", &mut opt.m),
        ("optimizer.v.", &mut opt.v),
    ] {
        for p in &params.info {
            let name = format!("{prefix}{}", p.name);
            let view = st
                .tensor(&name)
                .map_err(|_| bad(format!("tensor {name} is missing")))?;
            if view.dtype() != safetensors::Dtype::F32 || view.shape() != p.shape.as_slice() {
                return Err(bad(format!(
                    "tensor {name}: {:?} {:?}, expected F32 {:?}",
                    view.dtype(),
                    view.shape(),
                    p.shape
                )));
            }
            for (o, c) in data[p.range.clone()]
                .iter_mut()
                .zip(view.data().chunks_exact(4))
            {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
    Ok(state)
}

/// Writes `dir/config.json` and `dir/model.safetensors` (official names, `dtype`) atomically.
pub fn export(dir: &Path, config: &Config, params: &Params, dtype: Dtype) -> Result<()> {
    params
        .to_store(dtype)
        .save(&dir.join("model.safetensors"))?;
    let text = serde_json::to_string_pretty(&config.raw).expect("json");
    hymba::error::write_atomic(&dir.join("config.json"), text.as_bytes())
}
