//! The prompt cache: the caches of finished sequences, kept under the tokens they hold, so that a
//! later prompt that begins with those tokens prefills only the rest. The case it is for is the
//! next turn of a conversation, whose prompt is the last turn's prompt, its answer, then the new
//! message (vLLM's automatic prefix caching, llama.cpp's `cache_prompt`).
//!
//! Hymba's SSM state and window rings cannot be rolled back to an earlier position, so an entry
//! serves only prompts that extend all of its tokens: longer ones, or the same tokens where the
//! entry kept the logits of its last one (a prompt's own entry), which start the answer without
//! any forward (a regenerated answer). A resumed prompt is computed in other parts than a fresh
//! one, so its logits agree with a fresh prefill's to the engine's decode-equals-prefill
//! tolerance, not bit for bit.

use crate::backend::{Backend, Cpu};
use crate::cache::Cache;

/// Finished sequences' caches within a budget of bytes, the least recently used dropped first.
pub struct PromptCache<B: Backend = Cpu> {
    budget: usize,
    held: usize,
    entries: Vec<Entry<B>>,
    /// Counts lookups and insertions: an entry's `used` is the count at its last use.
    clock: u64,
}

struct Entry<B: Backend> {
    tokens: Vec<u32>,
    cache: Cache<B>,
    /// The logits of the last token, where kept.
    logits: Option<Vec<f32>>,
    bytes: usize,
    used: u64,
}

/// Where a prompt resumes: a copy of an entry's cache, the prompt tokens it holds, and when it
/// holds all of them, the logits of the last.
pub struct Resume<B: Backend> {
    pub cache: Cache<B>,
    pub tokens: usize,
    pub logits: Option<Vec<f32>>,
}

impl<B: Backend> PromptCache<B> {
    /// A cache that holds at most `budget` bytes of sequence caches (0: none).
    pub fn new(budget: usize) -> Self {
        PromptCache {
            budget,
            held: 0,
            entries: Vec::new(),
            clock: 0,
        }
    }

    /// Whether it keeps anything (a budget above 0).
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.held
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Where `prompt` resumes: from the longest entry whose tokens begin it and are fewer, or
    /// are all of them with their last logits kept (a copy; the entry stays for other prompts).
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<Resume<B>> {
        self.clock += 1;
        let best = self
            .entries
            .iter_mut()
            .filter(|e| {
                (e.tokens.len() < prompt.len() || e.logits.is_some())
                    && prompt.starts_with(&e.tokens)
            })
            .max_by_key(|e| e.tokens.len())?;
        best.used = self.clock;
        let whole = best.tokens.len() == prompt.len();
        Some(Resume {
            cache: best.cache.clone(),
            tokens: best.tokens.len(),
            logits: if whole { best.logits.clone() } else { None },
        })
    }

    /// Keeps `cache`, which holds `tokens` (its `len()` of them), with the logits of the last
    /// where given, dropping an entry of the same tokens (whose logits it keeps if it has none)
    /// and then the least recently used until the budget holds it. An entry larger than the
    /// whole budget is not kept.
    pub fn insert(&mut self, tokens: Vec<u32>, cache: Cache<B>, mut logits: Option<Vec<f32>>) {
        debug_assert_eq!(tokens.len(), cache.len());
        if let Some(i) = self.entries.iter().position(|e| e.tokens == tokens) {
            if logits.is_none() {
                logits = self.entries[i].logits.take();
            }
            self.remove(i);
        }
        let bytes = cache.bytes().per_sequence + logits.as_ref().map_or(0, |l| 4 * l.len());
        if tokens.is_empty() || bytes > self.budget {
            return;
        }
        while self.held + bytes > self.budget {
            let oldest = (0..self.entries.len())
                .min_by_key(|&i| self.entries[i].used)
                .expect("entries hold what the budget has given out");
            self.remove(oldest);
        }
        self.clock += 1;
        self.held += bytes;
        self.entries.push(Entry {
            tokens,
            cache,
            logits,
            bytes,
            used: self.clock,
        });
    }

    fn remove(&mut self, i: usize) {
        self.held -= self.entries.swap_remove(i).bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::write_checkpoint;
    use crate::{Config, DecodeWindow, Logits, Model};

    fn model() -> Model {
        let cfg = Config::from_value(serde_json::json!({
            "model_type": "hymba", "vocab_size": 50, "hidden_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "attn_hidden_size": -1, "kq_head_dim": -1, "v_head_dim": 16,
            "mamba_expand": 2, "mamba_d_state": 4, "mamba_d_conv": 4, "mamba_dt_rank": 2,
            "intermediate_size": 24, "num_memory_tokens": 2, "sliding_window": 4,
            "global_attn_idx": [0], "kv_reuse_group": [], "rope": true, "rope_theta": 10000.0,
            "rope_type": "default", "max_position_embeddings": 64,
            "orig_max_position_embeddings": 64, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": true,
        }))
        .unwrap();
        // A directory a call: the tests run side by side.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("hymba-prompt-cache-{}-{n}", std::process::id()));
        write_checkpoint(&cfg, &dir, crate::tensor::Dtype::F32, 7, 1.0).unwrap();
        let m = Model::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        m
    }

    fn fed(model: &Model, ids: &[u32]) -> Cache {
        let mut c = model.new_cache();
        model
            .forward(&mut c, ids, Logits::Last, DecodeWindow::Trained)
            .unwrap();
        c
    }

    #[test]
    fn serves_the_longest_entry_that_begins_the_prompt_and_leaves_a_token() {
        let model = model();
        let mut pc = PromptCache::new(usize::MAX);
        pc.insert(vec![1, 2], fed(&model, &[1, 2]), None);
        pc.insert(vec![1, 2, 3, 4], fed(&model, &[1, 2, 3, 4]), None);
        pc.insert(vec![1, 5, 6], fed(&model, &[1, 5, 6]), None);
        let r = pc.lookup(&[1, 2, 3, 4, 9]).unwrap();
        assert_eq!((r.tokens, r.cache.len(), r.logits.is_none()), (4, 4, true));
        // The whole prompt held without its logits: the shorter entry, so a token is left to
        // feed.
        assert_eq!(pc.lookup(&[1, 2, 3, 4]).unwrap().tokens, 2);
        assert_eq!(pc.lookup(&[1, 2, 3]).unwrap().tokens, 2);
        assert!(pc.lookup(&[1, 2]).is_none());
        assert!(pc.lookup(&[2, 1, 5, 6, 7]).is_none());
        // With its logits, the whole prompt resumes with nothing to feed; a longer prompt
        // resumes from it without them (its next token's logits are to be computed).
        pc.insert(vec![1, 2], fed(&model, &[1, 2]), Some(vec![0.5; 50]));
        let r = pc.lookup(&[1, 2]).unwrap();
        assert_eq!((r.tokens, r.logits), (2, Some(vec![0.5; 50])));
        assert_eq!(pc.lookup(&[1, 2, 3]).unwrap().logits, None);
        // The same tokens again without logits keep the ones the entry had.
        pc.insert(vec![1, 2], fed(&model, &[1, 2]), None);
        assert_eq!(pc.lookup(&[1, 2]).unwrap().logits, Some(vec![0.5; 50]));
        // The copy continues as the sequence it was cut from would.
        let mut c = pc.lookup(&[1, 5, 6, 7]).unwrap().cache;
        let resumed = model
            .forward(&mut c, &[7], Logits::Last, DecodeWindow::Trained)
            .unwrap();
        let mut whole = model.new_cache();
        let fresh = model
            .forward(
                &mut whole,
                &[1, 5, 6, 7],
                Logits::Last,
                DecodeWindow::Trained,
            )
            .unwrap();
        hymba_kernels::testing::assert_close(&resumed, &fresh, 1e-4, "resumed vs fresh");
    }

    #[test]
    fn keeps_to_its_budget_dropping_the_least_recently_used() {
        let model = model();
        let one = fed(&model, &[1, 2, 3]).bytes().per_sequence;
        let mut pc = PromptCache::new(2 * one);
        pc.insert(vec![1, 2, 3], fed(&model, &[1, 2, 3]), None);
        pc.insert(vec![4, 5, 6], fed(&model, &[4, 5, 6]), None);
        assert_eq!((pc.len(), pc.bytes()), (2, 2 * one));
        // [1, 2, 3] used last, so [4, 5, 6] goes for the third.
        assert!(pc.lookup(&[1, 2, 3, 0]).is_some());
        pc.insert(vec![7, 8, 9], fed(&model, &[7, 8, 9]), None);
        assert_eq!((pc.len(), pc.bytes()), (2, 2 * one));
        assert!(pc.lookup(&[4, 5, 6, 0]).is_none());
        assert!(pc.lookup(&[1, 2, 3, 0]).is_some());
        assert!(pc.lookup(&[7, 8, 9, 0]).is_some());
        // The same tokens again replace their entry rather than taking a second place.
        pc.insert(vec![7, 8, 9], fed(&model, &[7, 8, 9]), None);
        assert_eq!((pc.len(), pc.bytes()), (2, 2 * one));
        // Nothing fits a budget smaller than one cache, or none.
        for budget in [one - 1, 0] {
            let mut small = PromptCache::new(budget);
            small.insert(vec![1, 2, 3], fed(&model, &[1, 2, 3]), None);
            assert!(small.is_empty() && small.bytes() == 0);
        }
    }
}
