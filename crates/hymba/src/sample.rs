//! Choosing the next token from logits: logit biases, then repetition, frequency and presence
//! penalties, then temperature, top-k, top-p and min-p filters, then a draw from a seeded RNG
//! (or the argmax when temperature is 0). The model never sees any of this.

use crate::error::{Error, Result};
use hymba_kernels::testing::Rng;
use serde::{Deserialize, Serialize};

/// Sampling options, named as in OpenAI's API where it has them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means off.
    pub top_k: usize,
    /// 1 means off.
    pub top_p: f32,
    /// 0 means off: drop tokens whose probability is below `min_p` × the top probability.
    pub min_p: f32,
    /// 1 means off; >1 discourages tokens already in the sequence (CTRL-style, as HF does).
    pub repetition_penalty: f32,
    /// OpenAI's: subtracted once from the logit of every token already generated (the prompt
    /// does not count); in [−2, 2], 0 off.
    pub presence_penalty: f32,
    /// OpenAI's: subtracted from a token's logit once per time it was generated; in [−2, 2].
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens (OpenAI's `logit_bias`, each in [−100, 100]).
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Whether the logits are taken as they are (no bias, no penalty).
    fn unmodified(&self) -> bool {
        self.logit_bias.is_empty()
            && self.repetition_penalty == 1.0
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
    }

    /// Whether every token is simply the argmax of the logits (no temperature, bias or
    /// penalty), so a backend can pick it without handing the logits over.
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature == 0.0 && self.unmodified()
    }

    /// Whether every token is a [`draw`] from the raw logits (temperature and the top-k, top-p
    /// and min-p filters; no bias or penalty), so a backend can make it where the logits are.
    pub fn is_plain_draw(&self) -> bool {
        self.temperature > 0.0 && self.unmodified()
    }

    /// Refuses values that have no meaning, naming the option.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &str, v: f32, want: &str| {
            Err(Error::Input(format!("{name} = {v}: expected {want}")))
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", self.temperature, "a number ≥ 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "a number in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "a number in [0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition_penalty",
                self.repetition_penalty,
                "a number > 0",
            );
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(name, v, "a number in [-2, 2]");
            }
        }
        if let Some(&(id, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return bad(
                &format!("logit_bias of token {id}"),
                b,
                "a number in [-100, 100]",
            );
        }
        Ok(())
    }
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.validate()?;
        let rng = Rng::new(params.seed);
        Ok(Sampler { params, rng })
    }

    /// Picks the next token; `history` is every token of the sequence so far (for the
    /// repetition penalty), `generated` the tokens generated so far (for the frequency and
    /// presence penalties).
    pub fn sample(&mut self, logits: &[f32], history: &[u32], generated: &[u32]) -> u32 {
        let p = &self.params;
        let mut logits = std::borrow::Cow::Borrowed(logits);
        for &(t, b) in &p.logit_bias {
            if let Some(v) = logits.to_mut().get_mut(t as usize) {
                *v += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            let l = logits.to_mut();
            let mut seen = std::collections::HashSet::new();
            for &t in history {
                if (t as usize) < l.len() && seen.insert(t) {
                    let v = &mut l[t as usize];
                    *v = if *v > 0.0 {
                        *v / p.repetition_penalty
                    } else {
                        *v * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let l = logits.to_mut();
            let mut counts = std::collections::HashMap::new();
            for &t in generated {
                *counts.entry(t).or_insert(0u32) += 1;
            }
            for (t, n) in counts {
                if let Some(v) = l.get_mut(t as usize) {
                    *v -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(&logits);
        }
        let u = self.next_uniform();
        draw(&logits, &Draw::of(&self.params, u))
    }
}

impl Sampler {
    /// The uniform variate of the next draw: one a sampled token, as [`Sampler::sample`] takes
    /// them (a caller making a [`Draw`] elsewhere keeps the seeded sequence).
    pub fn next_uniform(&mut self) -> f32 {
        self.rng.uniform() as f32
    }
}

/// A draw from one row of logits with the variate `u` (in [0, 1)): what a backend makes where
/// the logits are (`Logits::Sample`); temperature 0 means the argmax.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Draw {
    pub temperature: f32,
    /// 0 means off.
    pub top_k: usize,
    /// 1 means off.
    pub top_p: f32,
    /// 0 means off.
    pub min_p: f32,
    pub u: f32,
}

impl Draw {
    /// The argmax.
    pub const GREEDY: Draw = Draw {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        u: 0.0,
    };

    /// The draw `params` make (their temperature and filters) with the variate `u`.
    pub fn of(params: &SamplingParams, u: f32) -> Draw {
        Draw {
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            min_p: params.min_p,
            u,
        }
    }

    /// Whether top-k or top-p cut the tokens of a `vocab`-wide row.
    pub fn cuts(&self, vocab: usize) -> bool {
        (self.top_k > 0 && self.top_k < vocab) || self.top_p < 1.0
    }
}

thread_local! {
    /// The (token, weight) list top-k and top-p select from, kept between draws.
    static CAND: std::cell::RefCell<Vec<(u32, f32)>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The weights of the last draw's row, kept so a draw allocates nothing.
    static WEIGHTS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Into `cand`: the tokens top-k and top-p keep (most probable first, equal weights in token
/// order, as `keep_candidates` keeps them; then min-p) with their weights, in no set order.
fn cut_candidates(logits: &[f32], d: &Draw, cand: &mut Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    cand.clear();
    cand.extend(
        logits
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u32, ((v - max) / d.temperature).exp())),
    );
    keep_candidates(cand, d.top_k, d.top_p, d.min_p);
}

/// `cand`'s weights marked in `w` (−1 elsewhere), `n` wide; returns their total in token order.
fn mark(cand: &[(u32, f32)], n: usize, w: &mut Vec<f32>) -> f32 {
    w.clear();
    w.resize(n, -1.0);
    for &(i, p) in cand {
        w[i as usize] = p;
    }
    w.iter().filter(|&&p| p >= 0.0).sum()
}

/// The first (token, weight) whose running sum reaches `u` × `total`; past the end, the last.
fn walk(kept: impl Iterator<Item = (usize, f32)>, u: f32, total: f32) -> u32 {
    let mut r = u * total;
    let mut last = 0;
    for (i, p) in kept {
        last = i;
        r -= p;
        if r <= 0.0 {
            return i as u32;
        }
    }
    last as u32
}

/// Into `w`: the weights without top-k or top-p, exp((logit − max) / temperature), −1 where
/// min-p drops them; returns the kept weights' total, summed in token order.
fn floor_weights(logits: &[f32], d: &Draw, w: &mut Vec<f32>) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // The top weight is exp(0) = 1 unless no logit is finite (then none is above 0).
    let floor = d.min_p.max(0.0) * if max.is_finite() { 1.0 } else { 0.0 };
    let mut total = 0f32;
    w.clear();
    w.extend(logits.iter().map(|&v| {
        let p = ((v - max) / d.temperature).exp();
        if p >= floor {
            total += p;
            p
        } else {
            -1.0
        }
    }));
    total
}

/// The weights a [`Draw`] chooses among, in token order, into `w`: exp((logit − max) /
/// temperature) for the tokens its filters keep, −1 for those they drop; returns the kept
/// weights' total, summed in token order. Top-k and top-p keep the most probable tokens (equal
/// weights in token order) as `keep_candidates` does, min-p those at least `min_p` × the top
/// weight.
pub fn kept_weights(logits: &[f32], d: &Draw, w: &mut Vec<f32>) -> f32 {
    if !d.cuts(logits.len()) {
        return floor_weights(logits, d, w);
    }
    CAND.with_borrow_mut(|cand| {
        cut_candidates(logits, d, cand);
        mark(cand, logits.len(), w)
    })
}

/// The token a [`Draw`] picks: among the weights [`kept_weights`] keeps, the first token in id
/// order whose running sum reaches `u` × their total.
pub fn draw(logits: &[f32], d: &Draw) -> u32 {
    if d.temperature == 0.0 {
        return argmax(logits);
    }
    WEIGHTS.with_borrow_mut(|w| {
        if !d.cuts(logits.len()) {
            let total = floor_weights(logits, d, w);
            return walk(
                w.iter().copied().enumerate().filter(|&(_, p)| p >= 0.0),
                d.u,
                total,
            );
        }
        CAND.with_borrow_mut(|cand| {
            cut_candidates(logits, d, cand);
            // Few kept tokens (a peaked distribution, top-k) are put in token order; many are
            // marked in the row, which takes one pass where sorting them took more. Either way
            // a NaN weight (a NaN logit) is dropped, as `mark` drops it.
            if cand.len() <= 1024 {
                cand.retain(|c| c.1 >= 0.0);
                cand.sort_unstable_by_key(|c| c.0);
                let total = cand.iter().map(|c| c.1).sum();
                walk(cand.iter().map(|&(i, p)| (i as usize, p)), d.u, total)
            } else {
                let total = mark(cand, logits.len(), w);
                walk(
                    w.iter().copied().enumerate().filter(|&(_, p)| p >= 0.0),
                    d.u,
                    total,
                )
            }
        })
    })
}

/// Index of the largest logit (the first on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(f: impl FnOnce(&mut SamplingParams)) -> Sampler {
        let mut p = SamplingParams {
            temperature: 1.0,
            seed: 3,
            ..Default::default()
        };
        f(&mut p);
        Sampler::new(p).unwrap()
    }

    #[test]
    fn greedy_is_argmax_and_penalty_can_change_it() {
        let logits = [1.0, 3.0, 2.9, -1.0];
        let mut s = sampler(|p| p.temperature = 0.0);
        assert_eq!(s.sample(&logits, &[], &[]), 1);
        let mut s = sampler(|p| {
            p.temperature = 0.0;
            p.repetition_penalty = 1.5
        });
        assert_eq!(s.sample(&logits, &[1], &[]), 2);
    }

    /// OpenAI's penalties count generated tokens only, presence once and frequency per
    /// occurrence; biases add to the logits. Each checked through the greedy choice it flips.
    #[test]
    fn penalties_and_biases_shift_the_logits_as_openai_defines() {
        let logits = [1.0, 3.0, 2.5, -1.0];
        let greedy = |f: &dyn Fn(&mut SamplingParams)| {
            sampler(|p| {
                p.temperature = 0.0;
                f(p)
            })
        };
        // Token 1 generated twice: frequency 0.3 takes 0.6 off (3.0 -> 2.4 < 2.5).
        assert_eq!(
            greedy(&|p| p.frequency_penalty = 0.3).sample(&logits, &[1, 1], &[1, 1]),
            2
        );
        assert_eq!(
            greedy(&|p| p.frequency_penalty = 0.2).sample(&logits, &[1, 1], &[1, 1]),
            1
        );
        // Presence counts once however often: 0.6 flips it, 0.4 does not.
        assert_eq!(
            greedy(&|p| p.presence_penalty = 0.6).sample(&logits, &[1, 1], &[1, 1]),
            2
        );
        assert_eq!(
            greedy(&|p| p.presence_penalty = 0.4).sample(&logits, &[1, 1], &[1, 1]),
            1
        );
        // The prompt does not count.
        assert_eq!(
            greedy(&|p| p.presence_penalty = 2.0).sample(&logits, &[1, 1], &[]),
            1
        );
        // Negative penalties encourage repeats.
        assert_eq!(
            greedy(&|p| p.frequency_penalty = -1.0).sample(&logits, &[2], &[2]),
            2
        );
        assert_eq!(
            greedy(&|p| p.logit_bias = vec![(3, 4.5)]).sample(&logits, &[], &[]),
            3
        );
        assert_eq!(
            greedy(&|p| p.logit_bias = vec![(1, -100.0)]).sample(&logits, &[], &[]),
            2
        );
        for bad in [
            SamplingParams {
                presence_penalty: 2.5,
                ..Default::default()
            },
            SamplingParams {
                frequency_penalty: -3.0,
                ..Default::default()
            },
            SamplingParams {
                logit_bias: vec![(0, 101.0)],
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn filters_bound_the_support() {
        let logits = [0.0, 5.0, 4.0, 3.0, -2.0];
        let draws = |s: &mut Sampler| {
            (0..400)
                .map(|_| s.sample(&logits, &[], &[]))
                .collect::<std::collections::HashSet<_>>()
        };
        assert_eq!(draws(&mut sampler(|p| p.top_k = 2)), [1, 2].into());
        // p(1) ≈ 0.66, p(2) ≈ 0.24: top_p 0.8 keeps both, nothing else.
        assert_eq!(draws(&mut sampler(|p| p.top_p = 0.8)), [1, 2].into());
        // min_p 0.3: keeps tokens with p ≥ 0.3 · p(1): 1 and 2 (0.37 of top), not 3 (0.135).
        assert_eq!(draws(&mut sampler(|p| p.min_p = 0.3)), [1, 2].into());
        assert!(draws(&mut sampler(|_| {})).contains(&3));
    }

    /// The filters over every candidate sorted (the sum of the mass taken as `keep_candidates`
    /// takes it, after top-k, so that only the sorting differs): what the sampler did before.
    fn keep_by_full_sort(cand: &mut Vec<(u32, f32)>, top_k: usize, top_p: f32, min_p: f32) {
        if top_k > 0 && top_k < cand.len() {
            cand.select_nth_unstable_by_key(top_k - 1, by_probability);
            cand.truncate(top_k);
        }
        let total: f32 = cand.iter().map(|c| c.1).sum();
        cand.sort_unstable_by_key(by_probability);
        let mut keep = cand.len();
        if top_p < 1.0 {
            let mut acc = 0.0;
            for (i, c) in cand.iter().enumerate() {
                acc += c.1 / total;
                if acc >= top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if min_p > 0.0 {
            let floor = cand[0].1 * min_p;
            keep = keep.min(cand.iter().take_while(|c| c.1 >= floor).count().max(1));
        }
        cand.truncate(keep);
    }

    #[test]
    fn sorting_the_head_keeps_what_sorting_all_keeps() {
        let mut rng = Rng::new(3);
        for n in [1usize, 5, 63, 64, 65, 300, 5000, 32001] {
            for scale in [0.05f32, 1.0, 4.0, 12.0] {
                let mut logits = rng.normal_vec(n, scale);
                // Ties, which only the token id orders.
                for i in (0..n).step_by(7) {
                    logits[i] = logits[i / 2];
                }
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let cand: Vec<(u32, f32)> = logits
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| (i as u32, (v - max).exp()))
                    .collect();
                for (k, p, m) in [
                    (0, 1.0, 0.0),
                    (0, 0.9, 0.0),
                    (0, 0.999, 0.0),
                    (0, 1.0, 0.05),
                    (0, 1.0, 0.9),
                    (0, 0.95, 0.01),
                    (40, 0.9, 0.0),
                    (40, 1.0, 0.0),
                    (3, 0.5, 0.2),
                    (100, 1.0, 0.3),
                ] {
                    let (mut a, mut b) = (cand.clone(), cand.clone());
                    keep_candidates(&mut a, k, p, m);
                    keep_by_full_sort(&mut b, k, p, m);
                    if p >= 1.0 {
                        // Without top-p the kept candidates come in no particular order.
                        a.sort_unstable_by_key(by_probability);
                    }
                    assert_eq!(
                        a, b,
                        "{n} tokens, logits × {scale}, top-k {k}, top-p {p}, min-p {m}"
                    );
                }
            }
        }
    }

    /// (token, exp((logit − max) / temperature)) for every token.
    fn weighted(logits: &[f32], temperature: f32) -> Vec<(u32, f32)> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        logits
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u32, ((v - max) / temperature).exp()))
            .collect()
    }

    /// The sampler's old walk: the first candidate, in list order, whose running sum reaches
    /// u × the list's total; past the end, the last.
    fn candidate_walk(cand: &[(u32, f32)], u: f32) -> u32 {
        let total: f32 = cand.iter().map(|c| c.1).sum();
        let mut r = u * total;
        cand.iter()
            .find(|c| {
                r -= c.1;
                r <= 0.0
            })
            .unwrap_or(cand.last().unwrap())
            .0
    }

    /// `draw` is the candidate list's walk without top-k or top-p, token for token.
    #[test]
    fn draw_is_the_candidate_walk() {
        let mut rng = Rng::new(8);
        for n in [1usize, 2, 7, 300, 32001] {
            for scale in [0.05f32, 1.0, 12.0] {
                let mut logits = rng.normal_vec(n, scale);
                if n > 7 {
                    // Ties, a NaN, infinitely unlikely tokens.
                    logits[3] = logits[1];
                    logits[4] = f32::NAN;
                    logits[5] = f32::NEG_INFINITY;
                }
                for (temperature, min_p) in [(1.0f32, 0.0f32), (0.3, 0.0), (2.5, 0.05), (1.0, 0.9)]
                {
                    for u in [0.0f32, 0.25, 0.5, rng.uniform() as f32, 0.999_999] {
                        let mut cand = weighted(&logits, temperature);
                        keep_candidates(&mut cand, 0, 1.0, min_p);
                        let want = candidate_walk(&cand, u);
                        let d = Draw {
                            temperature,
                            min_p,
                            u,
                            ..Draw::GREEDY
                        };
                        assert_eq!(draw(&logits, &d), want, "{n} tokens × {scale}, {d:?}");
                    }
                }
            }
        }
    }

    /// With top-k or top-p, `draw` walks the tokens the filters keep (the full sort's) in id
    /// order, token for token.
    #[test]
    fn filtered_draw_walks_the_kept_tokens_in_id_order() {
        let mut rng = Rng::new(12);
        for n in [2usize, 7, 300, 32001] {
            for scale in [0.05f32, 1.0, 12.0] {
                let mut logits = rng.normal_vec(n, scale);
                if n > 7 {
                    // Ties, which only the token id orders.
                    logits[3] = logits[1];
                    logits[6] = logits[1];
                }
                for (temperature, k, p, m) in [
                    (1.0f32, 40usize, 1.0f32, 0.0f32),
                    (0.7, 0, 0.9, 0.0),
                    (1.3, 0, 0.5, 0.05),
                    (1.0, 3, 0.95, 0.0),
                    (2.0, 100, 0.8, 0.2),
                    (1.0, 1, 1.0, 0.0),
                ] {
                    for u in [0.0f32, 0.3, rng.uniform() as f32, 0.999_999] {
                        let mut cand = weighted(&logits, temperature);
                        keep_by_full_sort(&mut cand, k, p, m);
                        cand.sort_unstable_by_key(|c| c.0);
                        let want = candidate_walk(&cand, u);
                        let d = Draw {
                            temperature,
                            top_k: k,
                            top_p: p,
                            min_p: m,
                            u,
                        };
                        assert_eq!(draw(&logits, &d), want, "{n} tokens × {scale}, {d:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<u32> = {
            let mut s = sampler(|_| {});
            (0..20).map(|_| s.sample(&logits, &[], &[])).collect()
        };
        let b: Vec<u32> = {
            let mut s = sampler(|_| {});
            (0..20).map(|_| s.sample(&logits, &[], &[])).collect()
        };
        assert_eq!(a, b);
    }
}

/// The sort key of a candidate: most probable first, equal probabilities by token id, so that
/// any way of sorting agrees. The bits of a probability (never negative) order as its value.
fn by_probability(c: &(u32, f32)) -> u64 {
    ((!c.1.to_bits() as u64) << 32) | c.0 as u64
}

/// The top-k, top-p and min-p filters over `cand` (token, unnormalized probability): what stays
/// is the candidates kept, most probable first where top-p applies (in no particular order
/// otherwise: top-k and min-p only select). Top-p sorts only the head of the distribution: the
/// most probable 64, else 1024, else all, until their mass reaches top-p (a trained model's
/// nucleus is usually a few dozen tokens of 32K, whose full sort took ~1 ms a draw); the order
/// by [`by_probability`] makes the result the full sort's.
fn keep_candidates(cand: &mut Vec<(u32, f32)>, top_k: usize, top_p: f32, min_p: f32) {
    if top_k > 0 && top_k < cand.len() {
        cand.select_nth_unstable_by_key(top_k - 1, by_probability);
        cand.truncate(top_k);
    }
    // min-p keeps what is at least this probable (0: no floor).
    let floor = min_p.max(0.0) * cand.iter().map(|c| c.1).fold(0.0, f32::max);
    if top_p >= 1.0 {
        cand.retain(|c| c.1 >= floor);
        return;
    }
    let total: f32 = cand.iter().map(|c| c.1).sum();
    let mut head = 64.min(cand.len());
    let nucleus = loop {
        if head < cand.len() {
            cand.select_nth_unstable_by_key(head - 1, by_probability);
        }
        cand[..head].sort_unstable_by_key(by_probability);
        // The smallest prefix whose share of the mass reaches top-p, if it is in the head.
        let mut acc = 0.0;
        let nucleus = cand[..head].iter().position(|c| {
            acc += c.1 / total;
            acc >= top_p
        });
        if let Some(n) = nucleus {
            break n + 1;
        }
        if head == cand.len() {
            break head;
        }
        head = if head < 1024 {
            1024.min(cand.len())
        } else {
            cand.len()
        };
    };
    let above_floor = cand[..nucleus].iter().take_while(|c| c.1 >= floor).count();
    cand.truncate(above_floor.max(1));
}

/// Log-probability of a token under the model's distribution (raw logits, before any sampling
/// filter), with the `top` most likely tokens.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// (token, logprob), most likely first.
    pub top: Vec<(u32, f32)>,
}

pub fn token_logprob(logits: &[f32], id: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max
        + logits
            .iter()
            .map(|&v| ((v - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = top.min(idx.len());
    if k > 0 {
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize])
        });
        idx.truncate(k);
        idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    } else {
        idx.clear();
    }
    TokenLogprob {
        id,
        logprob: logits[id as usize] - lse,
        top: idx
            .into_iter()
            .map(|t| (t, logits[t as usize] - lse))
            .collect(),
    }
}
