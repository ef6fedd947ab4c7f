//! Generation for one sequence: prefill the prompt, then sample and decode until EOS, a stop
//! string or the token budget. Text is streamed in pieces that never split a character, and
//! text that might be the start of a stop string is held back until it is known not to be.

use crate::backend::Backend;
use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::mask::DecodeWindow;
use crate::model::{BatchLogits, Logits, Model, Step};
use crate::sample::{Draw, Sampler, SamplingParams};
use crate::tokenizer::{Detokenizer, Tokenizer};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop when the generated text contains one of these (the text is cut before it).
    pub stop: Vec<String>,
    /// Keep going past the end-of-sequence token.
    pub ignore_eos: bool,
    pub eos_id: Option<u32>,
    pub window: DecodeWindow,
    /// Keep the logits every token was chosen from (for `--dump`).
    pub keep_logits: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The token budget ran out.
    Length,
    /// End-of-sequence token or a stop string.
    Stop,
}

#[derive(Debug)]
pub struct Generation {
    /// Every chosen token, EOS included when it ended the generation.
    pub ids: Vec<u32>,
    /// `[ids.len(), V]` when `keep_logits`.
    pub logits: Vec<f32>,
    /// The generated text, cut before a stop string (empty without a tokenizer).
    pub text: String,
    pub finish: FinishReason,
    /// Seconds spent in the prompt's forward and in the rest.
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

/// What happened when a sequence took one token.
#[derive(Debug)]
pub struct Accepted {
    pub id: u32,
    /// Text now final (may be empty while a character or a possible stop string is pending).
    pub text: String,
    /// Set when the sequence is finished.
    pub finish: Option<FinishReason>,
}

/// The per-sequence side of generation, shared by [`generate`] and the batching engine:
/// sampling, end-of-sequence, streaming detokenization and stop strings.
pub struct Decoder {
    sampler: Sampler,
    detok: Detokenizer,
    stops: StopMatcher,
    history: Vec<u32>,
    /// Generated ids so far.
    pub generated: Vec<u32>,
    max_new_tokens: usize,
    ignore_eos: bool,
    eos_id: Option<u32>,
}

impl Decoder {
    pub fn new(prompt: &[u32], opts: &GenerateOptions) -> Result<Decoder> {
        if opts.stop.iter().any(|s| s.is_empty()) {
            return Err(Error::Input("a stop string is empty".into()));
        }
        Ok(Decoder {
            sampler: Sampler::new(opts.sampling.clone())?,
            detok: Detokenizer::new(prompt),
            stops: StopMatcher::new(opts.stop.clone()),
            history: prompt.to_vec(),
            generated: Vec::new(),
            max_new_tokens: opts.max_new_tokens,
            ignore_eos: opts.ignore_eos,
            eos_id: opts.eos_id,
        })
    }

    /// What the step that makes this sequence's next token asks for: where the sampler takes
    /// the logits as they are, the backend's pick, [`Logits::Greedy`] or [`Logits::Sample`]
    /// with the sampler's next variate (give the token to [`Decoder::take`]); else the last
    /// row's logits (for [`Decoder::accept`]).
    pub fn next_logits(&mut self) -> Logits {
        let p = &self.sampler.params;
        if p.is_plain_greedy() {
            Logits::Greedy
        } else if p.is_plain_draw() {
            let u = self.sampler.next_uniform();
            Logits::Sample(Draw::of(&self.sampler.params, u))
        } else {
            Logits::Last
        }
    }

    /// Samples the next token from `logits` and applies every stopping rule. Text needs a
    /// tokenizer; without one only ids come out.
    pub fn accept(&mut self, logits: &[f32], tok: Option<&Tokenizer>) -> Result<Accepted> {
        let id = self.sampler.sample(logits, &self.history, &self.generated);
        self.take(id, tok)
    }

    /// Takes `id` as the next token (the backend's pick for what [`Decoder::next_logits`]
    /// asked) and applies every stopping rule.
    pub fn take(&mut self, id: u32, tok: Option<&Tokenizer>) -> Result<Accepted> {
        self.history.push(id);
        self.generated.push(id);
        if !self.ignore_eos && Some(id) == self.eos_id {
            return Ok(Accepted {
                id,
                text: String::new(),
                finish: Some(FinishReason::Stop),
            });
        }
        let mut text = String::new();
        if let Some(t) = tok {
            let piece = self.detok.push(t, id)?;
            let (ready, stopped) = self.stops.push(&piece);
            text = ready;
            if stopped {
                return Ok(Accepted {
                    id,
                    text,
                    finish: Some(FinishReason::Stop),
                });
            }
        }
        if self.generated.len() >= self.max_new_tokens {
            text.push_str(&self.stops.flush());
            return Ok(Accepted {
                id,
                text,
                finish: Some(FinishReason::Length),
            });
        }
        Ok(Accepted {
            id,
            text,
            finish: None,
        })
    }
}

/// Generates after `prompt`. `on_text` receives text pieces as they become final; without a
/// tokenizer there is no text and stop strings are refused.
pub fn generate<B: Backend>(
    model: &Model<B>,
    tokenizer: Option<&Tokenizer>,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    if !opts.stop.is_empty() && tokenizer.is_none() {
        return Err(Error::Input("stop strings need a tokenizer".into()));
    }
    let mut dec = Decoder::new(prompt, opts)?;
    let mut cache = model.new_cache();
    let mut out = BatchLogits::default();
    // The backend's pick where the decoder can take one (no logits copied out), unless the
    // logits are kept.
    let step = |cache: &mut Cache<B>, ids: &[u32], dec: &mut Decoder, out: &mut BatchLogits| {
        let logits = if opts.keep_logits {
            Logits::Last
        } else {
            dec.next_logits()
        };
        let mut s = [Step {
            cache,
            ids,
            logits,
            window: opts.window,
        }];
        model.forward_batch_into(&mut s, out)
    };
    let t0 = std::time::Instant::now();
    step(&mut cache, prompt, &mut dec, &mut out)?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let mut gen = Generation {
        ids: Vec::new(),
        logits: Vec::new(),
        text: String::new(),
        finish: FinishReason::Length,
        prefill_secs,
        decode_secs: 0.0,
    };
    // The decoder ends the loop: at a stop, or after max_new_tokens (none when it is 0).
    if opts.max_new_tokens > 0 {
        loop {
            let acc = match out.pick(0) {
                Some(id) => dec.take(id, tokenizer)?,
                None => {
                    if opts.keep_logits {
                        gen.logits.extend_from_slice(out.get(0));
                    }
                    dec.accept(out.get(0), tokenizer)?
                }
            };
            gen.text.push_str(&acc.text);
            on_text(&acc.text);
            if let Some(f) = acc.finish {
                gen.finish = f;
                break;
            }
            step(&mut cache, &[acc.id], &mut dec, &mut out)?;
        }
    }
    gen.ids = dec.generated;
    gen.decode_secs = t1.elapsed().as_secs_f64();
    Ok(gen)
}

/// Finds stop strings across piece boundaries, holding back only text that could still begin
/// one.
struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops,
            held: String::new(),
        }
    }

    /// Adds a piece; returns the text now safe to emit and whether a stop string was found
    /// (the text is then cut before it).
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Hold back the longest tail that is a prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in self.held.char_indices() {
                let tail = &self.held[i..];
                if s.starts_with(tail) {
                    keep = keep.max(tail.len());
                    break;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_across_pieces_and_cut() {
        let stops = vec!["\nUser".to_string(), "END".to_string()];
        let mut m = StopMatcher::new(stops.clone());
        let mut out = String::new();
        let mut stopped = false;
        for p in ["Hello", " wor", "ld\n", "Us", "er: more"] {
            let (t, s) = m.push(p);
            out.push_str(&t);
            if s {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        assert_eq!(out, "Hello world");
        let mut m = StopMatcher::new(stops.clone());
        assert_eq!(m.push("EN"), (String::new(), false));
        assert_eq!(m.push("x"), ("ENx".to_string(), false));
    }
}
