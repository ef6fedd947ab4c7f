//! Text to token ids and back, with the `tokenizers` crate reading the checkpoint's
//! `tokenizer.json`; BOS handling and the chat template come from `tokenizer_config.json`
//! beside it (spec §6).

use crate::chat::ChatTemplate;
use crate::error::{parse_json, read_to_string, Error, Result};
use std::path::Path;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `add_bos_token` of tokenizer_config.json (true when the file is absent, as for Llama).
    pub add_bos: bool,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// The checkpoint's chat template, when tokenizer_config.json has one.
    pub chat_template: Option<ChatTemplate>,
    /// tokenizer_config.json as read, when there is one.
    pub config: Option<serde_json::Value>,
}

impl Tokenizer {
    /// Loads `path` (a tokenizer.json) and, when present, `tokenizer_config.json` beside it.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        if !path.is_file() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer file not found"),
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let cfg_path = path.with_file_name("tokenizer_config.json");
        let cfg = if cfg_path.is_file() {
            Some(read_to_string(&cfg_path)?)
        } else {
            None
        };
        let cfg_name = cfg_path.display().to_string();
        Tokenizer::from_bytes(
            &bytes,
            &path.display().to_string(),
            cfg.as_deref().map(|c| (c, cfg_name.as_str())),
        )
    }

    /// A tokenizer from the contents of a tokenizer.json (named `source` in errors) and,
    /// optionally, of its tokenizer_config.json (text, name).
    pub fn from_bytes(
        tokenizer_json: &[u8],
        source: &str,
        config: Option<(&str, &str)>,
    ) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| Error::Tokenizer(format!("{source}: {e}")))?;
        let cfg_name = std::path::PathBuf::from(config.map_or("", |c| c.1));
        let cfg = match config {
            Some((text, _)) => Some(parse_json(&cfg_name, text)?),
            None => None,
        };
        let token_of = |key: &str| -> Option<String> {
            let v = cfg.as_ref()?.get(key)?;
            // Either a plain string or an AddedToken object with `content`.
            v.as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))
                .map(str::to_string)
        };
        let bos_token = token_of("bos_token").unwrap_or_else(|| "<s>".into());
        let eos_token = token_of("eos_token").unwrap_or_else(|| "</s>".into());
        let add_bos = cfg
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        let chat_template = match cfg.as_ref().and_then(|c| c.get("chat_template")) {
            None | Some(serde_json::Value::Null) => None,
            Some(t) => Some(ChatTemplate::from_json(t, &bos_token, &eos_token).map_err(
                |e| match e {
                    Error::Template(m) => Error::Template(format!("{}: {m}", cfg_name.display())),
                    other => other,
                },
            )?),
        };
        Ok(Tokenizer {
            bos_id: inner.token_to_id(&bos_token),
            eos_id: inner.token_to_id(&eos_token),
            inner,
            add_bos,
            chat_template,
            config: cfg,
        })
    }

    /// Replaces the checkpoint's chat template with the Jinja text `src` (from the file `name`,
    /// named in errors), e.g. for a base model that ships none.
    pub fn set_chat_template(&mut self, src: &str, name: &str) -> Result<()> {
        let token = |id: Option<u32>, default: &str| {
            id.and_then(|i| self.inner.id_to_token(i))
                .unwrap_or_else(|| default.into())
        };
        let (bos, eos) = (token(self.bos_id, "<s>"), token(self.eos_id, "</s>"));
        let tmpl = ChatTemplate::new(src, &bos, &eos).map_err(|e| match e {
            Error::Template(m) => Error::Template(format!("{name}: {m}")),
            other => other,
        })?;
        self.chat_template = Some(tmpl);
        Ok(())
    }

    /// Encodes `text`; BOS first when `add_bos` and the vocabulary has one.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// A plain prompt as the checkpoint expects it (BOS per `add_bos_token`).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text, self.add_bos)
    }

    /// Decodes ids to text, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The text token `id` adds after `context` (its last few ids suffice): what decoding the
    /// sequence shows for it, leading space included (a vocabulary entry such as "▁the" or
    /// "Ġthe" is not text). A token that ends inside a UTF-8 character shows as U+FFFD.
    pub fn token_text(&self, context: &[u32], id: u32) -> String {
        let ctx = &context[context.len().saturating_sub(4)..];
        let before = self.decode(ctx).unwrap_or_default();
        let mut all = ctx.to_vec();
        all.push(id);
        let after = self.decode(&all).unwrap_or_default();
        match after.strip_prefix(&before) {
            Some(t) if !before.ends_with('\u{fffd}') => t.to_string(),
            _ => self.decode(&[id]).unwrap_or_default(),
        }
    }

    /// The vocabulary entry of a token (e.g. "▁the"), distinct for every id.
    pub fn id_to_token(&self, id: u32) -> String {
        self.inner.id_to_token(id).unwrap_or_default()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns a stream of token ids into text pieces that never split a UTF-8 character: each new
/// piece is the difference between decoding a short window of recent ids with and without the
/// newest ones, emitted only once it no longer ends in an incomplete character.
#[derive(Clone, Debug)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

/// Prompt ids kept as left context, so the first generated piece gets its leading space right.
const CONTEXT_IDS: usize = 5;

impl Detokenizer {
    /// `context`: the ids before the first one pushed (the prompt); only its tail is used.
    pub fn new(context: &[u32]) -> Self {
        let ids = context[context.len().saturating_sub(CONTEXT_IDS)..].to_vec();
        let n = ids.len();
        Detokenizer {
            ids,
            prefix: 0,
            read: n,
        }
    }

    /// Adds one id; returns the text it completes, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            if let Some(piece) = now.get(before.len()..).filter(|_| now.starts_with(&before)) {
                let piece = piece.to_string();
                // Keep only the window the next decode needs.
                self.ids.drain(..self.read);
                self.prefix = 0;
                self.read = self.ids.len();
                return Ok(piece);
            }
        }
        Ok(String::new())
    }
}
