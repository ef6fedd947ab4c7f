//! Training data: plain text split into documents, a byte-level BPE trained on it (or an
//! existing tokenizer.json), the token streams for training and validation, and the n-gram
//! baselines a trained model must beat.

use hymba::kernels::testing::Rng;
use hymba::{Error, Result};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder,
};

/// Special tokens of a trained tokenizer, in id order: ids 0, 1, 2 are unk, BOS and EOS as in
/// Hymba's (Llama's) vocabulary; the two markers are the ones Hymba's chat template uses.
pub const SPECIAL_TOKENS: [&str; 5] = ["<unk>", "<s>", "</s>", "<extra_id_0>", "<extra_id_1>"];

/// Documents of the given text files: paragraphs separated by blank lines, trimmed.
pub fn read_documents(files: &[PathBuf]) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
        let mut cur = String::new();
        for line in text.lines() {
            if line.trim().is_empty() {
                if !cur.is_empty() {
                    docs.push(std::mem::take(&mut cur));
                }
            } else {
                if !cur.is_empty() {
                    cur.push('\n');
                }
                cur.push_str(line.trim_end());
            }
        }
        if !cur.is_empty() {
            docs.push(cur);
        }
    }
    if docs.is_empty() {
        return Err(Error::Input(format!(
            "the data files ({}) hold no text",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(docs)
}

/// Trains a byte-level BPE of `vocab_size` tokens (specials included) on `docs` and writes it
/// to `path` as tokenizer.json.
pub fn train_tokenizer(docs: &[String], vocab_size: usize, path: &Path) -> Result<()> {
    let tk_err = |e: tokenizers::Error| Error::Tokenizer(format!("training the tokenizer: {e}"));
    if vocab_size < 256 + SPECIAL_TOKENS.len() {
        return Err(Error::Input(format!(
            "--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {}",
            256 + SPECIAL_TOKENS.len()
        )));
    }
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tk = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, true, true,
    ))))
    .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())))
    .build()
    .map_err(tk_err)?;
    tk.train(&mut trainer, docs.iter()).map_err(tk_err)?;
    let bos = tk.token_to_id(SPECIAL_TOKENS[1]).ok_or_else(|| {
        Error::Tokenizer(format!(
            "the trained vocabulary has no {}",
            SPECIAL_TOKENS[1]
        ))
    })?;
    tk.with_post_processor(Some(bos_post_processor(bos)?));
    let json = tk.to_string(true).map_err(tk_err)?;
    hymba::error::write_atomic(path, json.as_bytes())
}

/// BOS before every sequence, as the official Hymba tokenizer's post-processor adds it: so Hugging
/// Face's tokenizer (what clients of the server tokenize with) encodes a prompt with
/// `add_special_tokens=True` into the ids the engine runs (`add_bos_token` in the config).
/// `id` is the BOS token's.
pub fn bos_post_processor(id: u32) -> Result<PostProcessorWrapper> {
    let bos = SPECIAL_TOKENS[1];
    let tp = tokenizers::processors::template::TemplateProcessing::builder()
        .try_single(format!("{bos} $A"))
        .and_then(|b| b.try_pair(format!("{bos} $A {bos}:1 $B:1")))
        .map_err(|e| Error::Tokenizer(format!("the BOS template: {e}")))?
        .special_tokens(vec![(bos, id)])
        .build()
        .map_err(|e| Error::Tokenizer(format!("the BOS template: {e}")))?;
    Ok(PostProcessorWrapper::Template(tp))
}

/// tokenizer_config.json for a trained tokenizer: BOS added to prompts, and a chat template in
/// Hymba's format (so `hymba chat` and the server's chat endpoint work with the model).
pub fn tokenizer_config() -> serde_json::Value {
    serde_json::json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "model_max_length": 8192,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}<extra_id_0>System\n{{ message['content'] }}\n\n{% else %}<extra_id_1>{{ message['role'] | capitalize }}\n{{ message['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}<extra_id_1>Assistant\n{% endif %}"
    })
}

/// Token streams: documents as `<s> text </s>`, one in every `holdout` documents kept apart for
/// validation (chosen by a seeded draw, so a re-run splits the same way).
pub struct Corpus {
    pub train: Vec<u32>,
    pub valid: Vec<u32>,
}

impl Corpus {
    pub fn build(
        docs: &[String],
        tok: &hymba::Tokenizer,
        seed: u64,
        holdout: usize,
    ) -> Result<Corpus> {
        let bos = tok
            .bos_id
            .ok_or_else(|| Error::Input("the tokenizer has no <s> token".into()))?;
        let eos = tok
            .eos_id
            .ok_or_else(|| Error::Input("the tokenizer has no </s> token".into()))?;
        let mut rng = Rng::new(seed ^ 0xD0C5);
        let (mut train, mut valid) = (Vec::new(), Vec::new());
        for d in docs {
            let out = if rng.below(holdout.max(2)) == 0 {
                &mut valid
            } else {
                &mut train
            };
            out.push(bos);
            out.extend(tok.encode(d, false)?);
            out.push(eos);
        }
        Ok(Corpus { train, valid })
    }
}

/// `b` random windows of `t + 1` tokens from `stream`, drawn by a generator seeded from
/// `(seed, step)`: the batch of a step does not depend on what ran before it, which makes a
/// resumed run see exactly the batches an uninterrupted one would.
pub fn sample_batch(stream: &[u32], b: usize, t: usize, seed: u64, step: u64) -> Vec<u32> {
    let mut rng = Rng::new(
        seed.wrapping_mul(0x9E37_79B9)
            .wrapping_add(step.wrapping_mul(0xA24B_AED4_963E_E407)),
    );
    let span = stream.len() - (t + 1);
    (0..b)
        .flat_map(|_| {
            let at = rng.below(span + 1);
            stream[at..at + t + 1].to_vec()
        })
        .collect()
}

/// Consecutive windows of `t + 1` tokens covering `stream` (at most `max` of them): the fixed
/// validation set.
pub fn windows(stream: &[u32], t: usize, max: usize) -> Vec<Vec<u32>> {
    stream
        .chunks_exact(t + 1)
        .take(max)
        .map(<[u32]>::to_vec)
        .collect()
}

/// Cross-entropy (nats per token) on `valid` of a unigram model and of a bigram model
/// interpolated with it, both estimated on `train`. The interpolation weight is the best of a
/// small grid on `valid` itself, which favours the baseline.
pub fn ngram_baselines(train: &[u32], valid: &[u32], vocab: usize) -> (f64, f64) {
    let mut uni = vec![1.0f64; vocab]; // add-one
    for &t in train {
        uni[t as usize] += 1.0;
    }
    let total: f64 = uni.iter().sum();
    let p_uni = |t: u32| uni[t as usize] / total;
    let mut bi: std::collections::HashMap<(u32, u32), f64> = std::collections::HashMap::new();
    let mut ctx = vec![0.0f64; vocab];
    for w in train.windows(2) {
        *bi.entry((w[0], w[1])).or_default() += 1.0;
        ctx[w[0] as usize] += 1.0;
    }
    let n = (valid.len() - 1) as f64;
    let unigram = -valid[1..].iter().map(|&t| p_uni(t).ln()).sum::<f64>() / n;
    let bigram = [0.3, 0.5, 0.7, 0.8, 0.9, 0.95]
        .iter()
        .map(|&lam| {
            -valid
                .windows(2)
                .map(|w| {
                    let c = ctx[w[0] as usize];
                    let pb = if c > 0.0 {
                        bi.get(&(w[0], w[1])).copied().unwrap_or(0.0) / c
                    } else {
                        0.0
                    };
                    (lam * pb + (1.0 - lam) * p_uni(w[1])).ln()
                })
                .sum::<f64>()
                / n
        })
        .fold(f64::INFINITY, f64::min);
    (unigram, bigram)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trained tokenizer adds BOS when asked for special tokens, and the built-in model's
    /// tokenizer (trained before the post-processor existed, rebuilt since) carries the same one.
    #[test]
    fn trained_tokenizers_add_bos_as_the_built_in_one() {
        let docs: Vec<String> = (0..50)
            .map(|i| {
                format!(
                    "In the beginning {i} was the word and the word was {}.",
                    i * 7
                )
            })
            .collect();
        let path = std::env::temp_dir().join(format!("hymba-bos-{}.json", std::process::id()));
        train_tokenizer(&docs, 300, &path).unwrap();
        let tk = tokenizers::Tokenizer::from_file(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let bos = tk.token_to_id("<s>").unwrap();
        let plain = tk.encode("the word", false).unwrap().get_ids().to_vec();
        let with = tk.encode("the word", true).unwrap().get_ids().to_vec();
        assert_eq!(with, [vec![bos], plain].concat());
        let asset = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../assets/default-model/tokenizer.json");
        let shipped: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(asset).unwrap()).unwrap();
        assert_eq!(
            shipped["post_processor"],
            serde_json::to_value(bos_post_processor(1).unwrap()).unwrap()
        );
    }
}
