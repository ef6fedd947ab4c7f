//! `hymba chat`: a multi-turn REPL with the checkpoint's chat template. The cache after each
//! prompt is kept, so a turn only feeds its new tokens; an answer is generated on a copy and
//! re-fed as the template renders it (an SSM state cannot be rewound, a copy can be dropped).

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use hymba::backend::{Backend, Cpu};
use hymba::{
    Cache, DecodeWindow, Decoder, GenerateOptions, Logits, Message, Model, SamplingParams,
    Tokenizer,
};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args)]
pub struct ChatArgs {
    /// Checkpoint directory [default: the built-in tiny model].
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// Where to run: cpu, or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
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
    /// Element type of the K/V cache: auto (the checkpoint's precision: bf16 for bf16
    /// weights, f32 for f32), f32, or bf16 (half the memory and the bytes attention reads;
    /// logits within bf16 precision).
    #[arg(long, default_value = "auto")]
    kv_cache: crate::KvArg,
}

/// The conversation and the engine state after its last prompt.
struct Conversation<B: Backend> {
    system: Option<String>,
    messages: Vec<Message>,
    /// Tokens the cache holds: the rendered conversation up to the last generation prompt.
    ids: Vec<u32>,
    cache: Cache<B>,
}

impl<B: Backend> Conversation<B> {
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
    tok.chat_template.as_ref().ok_or_else(|| {
        let path = a.tokenizer.clone().or_else(|| a.model.as_ref().map(|m| m.join("tokenizer.json"))).unwrap_or_default();
        anyhow!("{}: tokenizer_config.json beside it has no chat_template (give one with --chat-template)", path.display())
    })?;
    let (device, dir, quant) = (a.device.clone(), a.model.clone(), a.quant.clone());
    crate::default_model::with_model(&device, dir.as_deref(), quant.as_deref(), Chat { a, tok })
}

/// The REPL on a model of any backend.
struct Chat {
    a: ChatArgs,
    tok: Tokenizer,
}

impl crate::default_model::ModelFn<()> for Chat {
    fn call<B: Backend>(self, model: Model<B>) -> Result<()> {
        repl(self.a, self.tok, model)
    }
}

/// Sessions are saved from the CPU backend's cache (see `hymba::session`).
fn on_cpu<B: Backend>(model: &Model<B>) -> Result<&Model<Cpu>> {
    (model as &dyn std::any::Any)
        .downcast_ref::<Model<Cpu>>()
        .ok_or_else(|| anyhow!("/save and /load work with --device cpu only"))
}

fn repl<B: Backend>(a: ChatArgs, tok: Tokenizer, model: Model<B>) -> Result<()> {
    let tmpl = tok.chat_template.as_ref().expect("checked before loading");
    let model = a.kv_cache.apply(model);
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
                    let cache = (&conv.cache as &dyn std::any::Any).downcast_ref::<Cache<Cpu>>();
                    match on_cpu(&model).map(|m| (m, cache.expect("a CPU model's cache"))) {
                        Ok((m, c)) => {
                            hymba::session::save(m, c, &extra.to_string(), std::path::Path::new(arg))?;
                            eprintln!("[saved to {arg}]");
                        }
                        Err(e) => eprintln!("error: {e:#}"),
                    }
                }
                "load" if !arg.is_empty() => match on_cpu(&model).and_then(|m| load(m, arg)) {
                    Ok(c) => {
                        let c = (Box::new(c) as Box<dyn std::any::Any>).downcast::<Conversation<B>>();
                        conv = *c.expect("on_cpu found the model on the CPU");
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

fn load(model: &Model, path: &str) -> Result<Conversation<Cpu>> {
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
