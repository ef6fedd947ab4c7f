//! Generation for one sequence: prefill the prompt, then sample and decode until EOS, a stop
//! string or the token budget. Text is streamed in pieces that never split a character, and
//! text that might be the start of a stop string is held back until it is known not to be.

use crate::error::{Error, Result};
use crate::mask::DecodeWindow;
use crate::model::{Logits, Model};
use crate::sample::{Sampler, SamplingParams};
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

/// Generates after `prompt`. `on_text` receives text pieces as they become final; without a
/// tokenizer there is no text and stop strings are refused.
pub fn generate(
    model: &Model,
    tokenizer: Option<&Tokenizer>,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    if !opts.stop.is_empty() && tokenizer.is_none() {
        return Err(Error::Input("stop strings need a tokenizer".into()));
    }
    if opts.stop.iter().any(|s| s.is_empty()) {
        return Err(Error::Input("a stop string is empty".into()));
    }
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let mut detok = tokenizer.map(|t| Detokenizer::new(t, prompt));
    let mut stops = StopMatcher::new(&opts.stop);
    let mut cache = model.new_cache();
    let t0 = std::time::Instant::now();
    let mut logits = model.forward(&mut cache, prompt, Logits::Last, opts.window)?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let mut history = prompt.to_vec();
    let mut gen = Generation { ids: Vec::new(), logits: Vec::new(), text: String::new(), finish: FinishReason::Length, prefill_secs, decode_secs: 0.0 };
    while gen.ids.len() < opts.max_new_tokens {
        let next = sampler.sample(&logits, &history);
        gen.ids.push(next);
        history.push(next);
        if opts.keep_logits {
            gen.logits.extend_from_slice(&logits);
        }
        if !opts.ignore_eos && Some(next) == opts.eos_id {
            gen.finish = FinishReason::Stop;
            break;
        }
        if let Some(d) = detok.as_mut() {
            let piece = d.push(next)?;
            let (ready, stopped) = stops.push(&piece);
            gen.text.push_str(&ready);
            on_text(&ready);
            if stopped {
                gen.finish = FinishReason::Stop;
                break;
            }
        }
        if gen.ids.len() == opts.max_new_tokens {
            break;
        }
        logits = model.forward(&mut cache, &[next], Logits::Last, opts.window)?;
    }
    if gen.finish == FinishReason::Length {
        let rest = stops.flush();
        gen.text.push_str(&rest);
        on_text(&rest);
    }
    gen.decode_secs = t1.elapsed().as_secs_f64();
    Ok(gen)
}

/// Finds stop strings across piece boundaries, holding back only text that could still begin
/// one.
struct StopMatcher<'a> {
    stops: &'a [String],
    held: String,
}

impl<'a> StopMatcher<'a> {
    fn new(stops: &'a [String]) -> Self {
        StopMatcher { stops, held: String::new() }
    }

    /// Adds a piece; returns the text now safe to emit and whether a stop string was found
    /// (the text is then cut before it).
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Hold back the longest tail that is a prefix of some stop string.
        let mut keep = 0;
        for s in self.stops {
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
        let mut m = StopMatcher::new(&stops);
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
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("EN"), (String::new(), false));
        assert_eq!(m.push("x"), ("ENx".to_string(), false));
    }
}
