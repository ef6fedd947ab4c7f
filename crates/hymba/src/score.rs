//! Scoring text: the model's negative log-likelihood of every token of a text, through windows
//! that each start a fresh sequence (meta tokens first, as every Hymba sequence does). Perplexity
//! is `exp` of the mean. Windows of `ctx` tokens step by `stride`; each scores only the tokens the
//! one before it did not, so with `stride < ctx` every token but the first is scored, each (but
//! those of the first window) with at least `ctx − stride` tokens of context. With
//! `stride = ctx` the windows do not overlap and the first token of each has no context, so it
//! is not scored (as when training on windows of `ctx` tokens).

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::mask::DecodeWindow;
use crate::model::{Logits, Model};

/// The result of [`score`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct Score {
    /// Tokens scored.
    pub tokens: usize,
    pub windows: usize,
    /// Sum of −ln p(token | context), in nats.
    pub nll: f64,
    /// Standard error of the mean NLL (tokens taken as independent), in nats.
    pub nll_stderr: f64,
}

impl Score {
    /// Mean NLL per token, in nats.
    pub fn mean_nll(&self) -> f64 {
        self.nll / self.tokens.max(1) as f64
    }

    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }
}

/// Scores `ids` (at least two tokens, the first not scored) through windows of `ctx` tokens
/// stepping by `stride` (1 ≤ stride ≤ ctx). `on_window(done, total)` reports progress.
pub fn score<B: Backend>(
    model: &Model<B>,
    ids: &[u32],
    ctx: usize,
    stride: usize,
    on_window: &mut dyn FnMut(usize, usize),
) -> Result<Score> {
    if ctx < 2 {
        return Err(Error::Input(format!(
            "the window (ctx) must hold at least 2 tokens, found {ctx}"
        )));
    }
    if stride == 0 || stride > ctx {
        return Err(Error::Input(format!(
            "the stride must be in 1..={ctx} (the window), found {stride}"
        )));
    }
    if ids.len() < 2 {
        return Err(Error::Input(format!(
            "scoring needs at least 2 tokens, found {}",
            ids.len()
        )));
    }
    let v = model.config.vocab_size;
    // Window starts: every `stride` tokens, until a window reaches the end.
    let mut starts = vec![0];
    while starts.last().expect("one start") + ctx < ids.len() {
        starts.push(starts.last().expect("one start") + stride);
    }
    let (mut sum, mut sum_sq, mut n) = (0f64, 0f64, 0usize);
    // The first target not yet scored.
    let mut next = 1;
    for (w, &begin) in starts.iter().enumerate() {
        let end = (begin + ctx).min(ids.len());
        let mut cache = model.new_cache();
        let logits = model.forward(
            &mut cache,
            &ids[begin..end],
            Logits::All,
            DecodeWindow::Trained,
        )?;
        // Row i predicts token begin + i + 1.
        for t in next.max(begin + 1)..end {
            let row = &logits[(t - begin - 1) * v..(t - begin) * v];
            let nll = -log_softmax_at(row, ids[t] as usize);
            sum += nll;
            sum_sq += nll * nll;
            n += 1;
        }
        next = end;
        on_window(w + 1, starts.len());
    }
    let mean = sum / n as f64;
    let var = (sum_sq / n as f64 - mean * mean).max(0.0);
    Ok(Score {
        tokens: n,
        windows: starts.len(),
        nll: sum,
        nll_stderr: (var / n as f64).sqrt(),
    })
}

/// `ln softmax(row)[i]`, in f64.
fn log_softmax_at(row: &[f32], i: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + row
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row[i] as f64 - lse
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_is_normalised() {
        let row = [1.0f32, -2.0, 0.5, 3.0];
        let total: f64 = (0..4).map(|i| log_softmax_at(&row, i).exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert!(log_softmax_at(&row, 3) > log_softmax_at(&row, 0));
    }
}
