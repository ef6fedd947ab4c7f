//! `hymba chat`: a multi-turn REPL with the checkpoint's chat template. The cache after each
//! prompt is kept, so a turn only feeds its new tokens; an answer is generated on a copy and
//! re-fed as the template renders it (an SSM state cannot be rewound, a copy can be dropped).

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use hymba::{
    Cache, DecodeWindow, Decoder, GenerateOptions, KvDtype, Logits, Message, Model, SamplingParams,
};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args)]
pub struct ChatArgs {
    /// Checkpoint directory [default: the built-in tiny model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// tokenizer.json [default: MODEL/tokenizer.json].
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// A Jinja chat template file instead of the checkpoint's (e.g. for a base model).
    #[arg(long)]
    chat_template: Option<PathBuf>,
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[command(flatten)]
    penalties: crate::PenaltyArgs,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Quantize the large matrices at load: q8_0 or q4_0.
    #[arg(long)]
    quant: Option<String>,
    /// Element type of the K/V cache: f32, or bf16 (half the memory and the bytes attention
    /// reads; logits within bf16 precision).
    #[arg(long, default_value = "f32")]
    kv_cache: KvDtype,
}

/// The conversation and the engine state after its last prompt.
struct Conversation {
    system: Option<String>,
    messages: Vec<Message>,
    /// Tokens the cache holds: the rendered conversation up to the last generation prompt.
    ids: Vec<u32>,
    cache: Cache,
}

impl Conversation {
    fn all_messages(&self) -> Vec<Message> {
        self.system
            .iter()
            .map(|s| Message::new("system", s))
            .chain(self.messages.iter().cloned())
            .collect()
    }
}

/// Set by Ctrl-C; checked between tokens.
fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                f.store(true, Ordering::SeqCst);
            }
        });
    });
    flag
}

pub fn run(a: ChatArgs) -> Result<()> {
    let mut tok =
        crate::default_model::load_tokenizer(a.model.as_deref(), a.tokenizer.as_deref(), true)?
            .expect("required");
    crate::default_model::override_chat_template(&mut tok, a.chat_template.as_deref())?;
    let tmpl = tok.chat_template.as_ref().ok_or_else(|| {
        let path = a.tokenizer.clone().or_else(|| a.model.as_ref().map(|m| m.join("tokenizer.json"))).unwrap_or_default();
        anyhow!("{}: tokenizer_config.json beside it has no chat_template (give one with --chat-template)", path.display())
    })?;
    let model = crate::default_model::load_model(a.model.as_deref(), a.quant.as_deref())?
        .with_kv_dtype(a.kv_cache);
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repetition_penalty: a.repeat_penalty,
            seed: a.seed,
            ..a.penalties.sampling(model.config.vocab_size)?
        },
        // The template's turn marker, in case the model runs past its end-of-sequence token.
        stop: vec!["<extra_id_1>".into()],
        ignore_eos: false,
        eos_id: tok.eos_id.or(model.config.eos_token_id),
        window: DecodeWindow::Trained,
        keep_logits: false,
    };
    opts.sampling.validate()?;
    let interactive = std::io::stdin().is_terminal();
    let stop = interrupt_flag();
    let mut conv = Conversation {
        system: a.system.clone(),
        messages: Vec::new(),
        ids: Vec::new(),
        cache: model.new_cache(),
    };
    if interactive {
        eprintln!("hymba chat: /reset, /system TEXT, /save FILE, /load FILE, /quit. Ctrl-C stops an answer; Ctrl-D quits.");
    }
    let mut out = std::io::stdout();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            print!("> ");
            out.flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        if let Some(cmd) = text.strip_prefix('/') {
            let (name, arg) = cmd
                .split_once(' ')
                .map(|(n, r)| (n, r.trim()))
                .unwrap_or((cmd, ""));
            match name {
                "quit" | "exit" => break,
                "reset" => {
                    conv.messages.clear();
                    conv.ids.clear();
                    conv.cache = model.new_cache();
                    eprintln!("[conversation cleared]");
                }
                "system" => {
                    conv.system = (!arg.is_empty()).then(|| arg.to_string());
                    eprintln!("[system message {}]", if arg.is_empty() { "removed" } else { "set" });
                }
                "save" if !arg.is_empty() => {
                    let extra = serde_json::json!({"system": conv.system, "messages": conv.messages, "ids": conv.ids});
                    hymba::session::save(&model, &conv.cache, &extra.to_string(), std::path::Path::new(arg))?;
                    eprintln!("[saved to {arg}]");
                }
                "load" if !arg.is_empty() => match load(&model, arg) {
                    Ok(c) => {
                        conv = c;
                        eprintln!("[loaded {arg}: {} messages]", conv.messages.len());
                    }
                    Err(e) => eprintln!("error: {e:#}"),
                },
                _ => eprintln!("unknown command /{name} (try /reset, /system TEXT, /save FILE, /load FILE, /quit)"),
            }
            continue;
        }
        conv.messages.push(Message::new("user", text));
        let ids = tok.encode(&tmpl.render(&conv.all_messages(), None, true)?, false)?;
        if ids.len() <= conv.ids.len() || !ids.starts_with(&conv.ids) {
            // An earlier part changed (e.g. /system or /reset): start over.
            conv.cache = model.new_cache();
            conv.ids.clear();
        }
        let mut logits = model.forward(
            &mut conv.cache,
            &ids[conv.ids.len()..],
            Logits::Last,
            DecodeWindow::Trained,
        )?;
        conv.ids = ids;
        let mut live = conv.cache.clone();
        let mut dec = Decoder::new(&conv.ids, &opts)?;
        let mut answer = String::new();
        stop.store(false, Ordering::SeqCst);
        loop {
            if stop.swap(false, Ordering::SeqCst) {
                eprint!(" [stopped]");
                break;
            }
            let acc = dec.accept(&logits, Some(&tok))?;
            out.write_all(acc.text.as_bytes())?;
            out.flush()?;
            answer.push_str(&acc.text);
            if acc.finish.is_some() {
                break;
            }
            logits = model.forward(&mut live, &[acc.id], Logits::Last, DecodeWindow::Trained)?;
        }
        writeln!(out)?;
        conv.messages.push(Message::new("assistant", answer.trim()));
    }
    Ok(())
}

fn load(model: &Model, path: &str) -> Result<Conversation> {
    let (cache, extra) = hymba::session::load(model, std::path::Path::new(path))?;
    let v: serde_json::Value = serde_json::from_str(&extra).context("session metadata")?;
    let messages: Vec<Message> =
        serde_json::from_value(v["messages"].clone()).context("session messages")?;
    let ids: Vec<u32> = serde_json::from_value(v["ids"].clone()).context("session ids")?;
    if cache.len() != ids.len() {
        bail!("{path}: the saved state does not match its conversation");
    }
    Ok(Conversation {
        system: v["system"].as_str().map(str::to_string),
        messages,
        ids,
        cache,
    })
}
