//! The batching engine: one loop, on its own thread, steps every active sequence together (one
//! pass over the weights per step for the whole batch), each with its own cache. New requests
//! join at the next step; a prompt is prefilled in chunks beside the others' decode steps; a
//! request whose receiver is gone is dropped and its cache freed. A finished sequence's cache
//! goes to the [`PromptCache`], from which a later prompt that extends its tokens resumes.
//!
//! Front-ends hold an [`Engine`] (cheap to clone) and get [`Event`]s through a callback, so
//! the library needs no async runtime.

use crate::backend::Backend;
use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::generate::{Decoder, FinishReason, GenerateOptions};
use crate::mask::DecodeWindow;
use crate::model::{BatchLogits, Logits, Model, Step};
use crate::prompt_cache::PromptCache;
use crate::sample::{token_logprob, TokenLogprob};
use crate::tokenizer::Tokenizer;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

/// Prompt tokens one sequence feeds per step, so long prompts do not stall the others.
const PREFILL_CHUNK: usize = 256;

#[derive(Debug)]
pub enum Event {
    /// Log-probabilities of the prompt tokens (the first has none), when `echo` was asked.
    Prompt(Vec<Option<TokenLogprob>>),
    /// One generated token and the text it completed.
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        /// Of the prompt tokens, those resumed from the prompt cache rather than computed.
        cached_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

/// Receives a request's events; returns false when nobody listens any more (the request is
/// then cancelled).
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

pub struct Request {
    pub prompt: Vec<u32>,
    pub options: GenerateOptions,
    /// Top log-probabilities to report per token (None: no log-probabilities).
    pub logprobs: Option<usize>,
    /// Report the prompt tokens' log-probabilities.
    pub echo: bool,
    /// A prompt position (0 < it < the prompt's length) whose cache goes to the prompt cache
    /// too, where another prompt may diverge from this one: e.g. a chat's end of the
    /// conversation before its last message (the system prompt other users share). The prefill
    /// stops there once, so it costs a step.
    pub branch_point: Option<usize>,
    pub sink: Sink,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// Every batch slot and queue place is taken.
    Busy,
    /// The engine thread has stopped.
    Stopped,
}

/// What the engine has done since it started, for monitoring; counters only grow.
#[derive(Debug, Default)]
pub struct Stats {
    /// Sequences in the batch now.
    pub running: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    /// Requests that resumed from the prompt cache, and the prompt tokens they did not compute.
    pub prompt_cache_hits: AtomicU64,
    pub cached_prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Requests ended by a stop (end-of-sequence or stop string), by the token limit, by an
    /// error, and by their client leaving.
    pub finished_stop: AtomicU64,
    pub finished_length: AtomicU64,
    pub errors: AtomicU64,
    pub cancelled: AtomicU64,
    /// Batched forward passes, the time spent in them, and their sequences summed (the mean
    /// batch is `step_sequences / steps`).
    pub steps: AtomicU64,
    pub step_nanos: AtomicU64,
    pub step_sequences: AtomicU64,
}

impl Stats {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// How the engine runs.
#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    /// Sequences stepped together; as many more may wait.
    pub max_batch: usize,
    /// Bytes of finished sequences' caches kept for prompts that extend them ([`PromptCache`];
    /// 0, the default: none). The copies live where the backend keeps caches, e.g. a GPU's
    /// memory, and nothing checks that they fit there.
    pub prompt_cache_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_batch: 16,
            prompt_cache_bytes: 0,
        }
    }
}

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Request>,
    in_flight: Arc<AtomicUsize>,
    stats: Arc<Stats>,
    capacity: usize,
    pub max_batch: usize,
    /// The prompt cache's budget in bytes (0: none).
    pub prompt_cache_bytes: usize,
}

impl Engine {
    /// Starts the engine thread: up to `max_batch` sequences step together and as many more
    /// wait in the queue.
    pub fn start<B: Backend>(
        model: Arc<Model<B>>,
        tokenizer: Option<Arc<Tokenizer>>,
        options: EngineOptions,
    ) -> Engine {
        // The shared meta prefix now, not on the first request.
        model.meta_prefix();
        let max_batch = options.max_batch.max(1);
        let cache = options.prompt_cache_bytes;
        let (tx, rx) = mpsc::channel();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Stats::default());
        let (count, st) = (in_flight.clone(), stats.clone());
        std::thread::Builder::new()
            .name("hymba-engine".into())
            .spawn(move || {
                let prompts = PromptCache::new(cache);
                run(
                    &model,
                    tokenizer.as_deref(),
                    rx,
                    &count,
                    &st,
                    max_batch,
                    prompts,
                )
            })
            .expect("spawning the engine thread");
        Engine {
            tx,
            in_flight,
            stats,
            capacity: 2 * max_batch,
            max_batch,
            prompt_cache_bytes: cache,
        }
    }

    /// Queues a request, or refuses it when the engine is full.
    pub fn submit(&self, req: Request) -> std::result::Result<(), SubmitError> {
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst);
        if n >= self.capacity {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Busy);
        }
        self.tx.send(req).map_err(|_| {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Stopped
        })
    }

    /// Requests running or queued.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

/// One request being served.
struct Seq<B: Backend> {
    req: Request,
    cache: Cache<B>,
    /// Prompt tokens already fed (or resumed from the prompt cache).
    fed: usize,
    /// Prompt tokens resumed from the prompt cache.
    cached: usize,
    /// The prompt's last logits, where the prompt cache held all of it: the first token is
    /// drawn from them, with no forward.
    ready: Option<Vec<f32>>,
    decoder: Decoder,
    /// The token to feed next, once the prompt is in.
    next: Option<u32>,
    prompt_logprobs: Vec<Option<TokenLogprob>>,
    done: bool,
    /// Ended by a failed step.
    failed: bool,
    /// Counted here before the events that report them go out, so a client that reads the
    /// counters after its answer sees its own request in them.
    stats: Arc<Stats>,
}

impl<B: Backend> Seq<B> {
    /// Checks the request; a refused one comes back with the reason. A prompt that extends an
    /// entry of `prompts` resumes from it, but for an echo (which reports every prompt token's
    /// log-probability) and the official decode window (whose decode steps see fewer keys than
    /// a prompt's rows, so an answer's cache is not its tokens' prefill).
    fn new(
        model: &Model<B>,
        req: Request,
        stats: &Arc<Stats>,
        prompts: &mut PromptCache<B>,
    ) -> std::result::Result<Seq<B>, Box<(Request, Error)>> {
        let problem = if req.prompt.is_empty() {
            Some(Error::Input("the prompt is empty".into()))
        } else {
            req.prompt
                .iter()
                .find(|&&id| id as usize >= model.config.vocab_size)
                .map(|id| {
                    Error::Input(format!(
                        "token id {id} is out of range (vocabulary of {})",
                        model.config.vocab_size
                    ))
                })
        };
        if let Some(e) = problem {
            return Err(Box::new((req, e)));
        }
        match Decoder::new(&req.prompt, &req.options) {
            Ok(decoder) => {
                Stats::add(&stats.prompt_tokens, req.prompt.len() as u64);
                let resumed = if may_resume(&req) {
                    prompts.lookup(&req.prompt)
                } else {
                    None
                };
                let (cache, cached, ready) = match resumed {
                    Some(r) => {
                        Stats::add(&stats.prompt_cache_hits, 1);
                        Stats::add(&stats.cached_prompt_tokens, r.tokens as u64);
                        (r.cache, r.tokens, r.logits)
                    }
                    None => (model.new_cache(), 0, None),
                };
                Ok(Seq {
                    cache,
                    fed: cached,
                    cached,
                    ready,
                    decoder,
                    next: None,
                    prompt_logprobs: vec![None],
                    done: false,
                    failed: false,
                    stats: stats.clone(),
                    req,
                })
            }
            Err(e) => Err(Box::new((req, e))),
        }
    }

    fn prefilling(&self) -> bool {
        self.fed < self.req.prompt.len()
    }

    /// The branch point still ahead of the prefill, where the prompt cache keeps anything.
    fn branch_point_ahead(&self, prompts: &PromptCache<B>) -> Option<usize> {
        self.req
            .branch_point
            .filter(|&c| c > self.fed && c < self.req.prompt.len())
            .filter(|_| prompts.enabled() && self.cacheable())
    }

    /// The tokens it feeds this step: the next one, or its prompt's next chunk within `room`
    /// prompt rows (none when there is no room).
    fn step_ids(&self, prompts: &PromptCache<B>, room: usize) -> Vec<u32> {
        if self.prefilling() {
            let mut end = (self.fed + PREFILL_CHUNK.min(room)).min(self.req.prompt.len());
            if let Some(c) = self.branch_point_ahead(prompts) {
                end = end.min(c);
            }
            self.req.prompt[self.fed..end].to_vec()
        } else {
            vec![self.next.expect("a decoding sequence has a next token")]
        }
    }

    fn send(&mut self, ev: Event) {
        if !(self.req.sink)(ev) && !self.done {
            // Nobody listens: the client left.
            Stats::add(&self.stats.cancelled, 1);
            self.done = true;
        }
    }

    /// Takes this sequence's logits from a step that fed it `fed` tokens: one row, a row per
    /// token when echoing the prompt, or none beside the token the backend picked (`pick`).
    fn advance(
        &mut self,
        logits: &[f32],
        pick: Option<u32>,
        fed: usize,
        v: usize,
        tok: Option<&Tokenizer>,
    ) -> Result<()> {
        if self.prefilling() {
            if self.req.echo {
                for r in 0..logits.len() / v {
                    if let Some(&next) = self.req.prompt.get(self.fed + r + 1) {
                        let top = self.req.logprobs.unwrap_or(0);
                        self.prompt_logprobs.push(Some(token_logprob(
                            &logits[r * v..(r + 1) * v],
                            next,
                            top,
                        )));
                    }
                }
            }
            self.fed += fed;
            if self.prefilling() {
                return Ok(());
            }
            if self.req.echo {
                let lp = std::mem::take(&mut self.prompt_logprobs);
                self.send(Event::Prompt(lp));
                if self.done {
                    return Ok(());
                }
            }
            if self.req.options.max_new_tokens == 0 {
                self.finish(FinishReason::Length);
                return Ok(());
            }
        }
        let last = &logits[logits.len().saturating_sub(v)..];
        let acc = match pick {
            Some(id) => self.decoder.take(id, tok)?,
            None => self.decoder.accept(last, tok)?,
        };
        Stats::add(&self.stats.generated_tokens, 1);
        let logprob = self.req.logprobs.map(|n| token_logprob(last, acc.id, n));
        self.send(Event::Token {
            id: acc.id,
            text: acc.text,
            logprob,
        });
        match acc.finish {
            Some(f) => self.finish(f),
            None => self.next = Some(acc.id),
        }
        Ok(())
    }

    /// Starts the answer of a prompt the prompt cache held whole, from its last logits.
    fn answer_from(&mut self, logits: &[f32], v: usize, tok: Option<&Tokenizer>) -> Result<()> {
        if self.req.options.max_new_tokens == 0 {
            self.finish(FinishReason::Length);
            return Ok(());
        }
        self.advance(logits, None, 0, v, tok)
    }

    fn finish(&mut self, finish: FinishReason) {
        if self.done {
            return;
        }
        let (p, c) = (self.req.prompt.len(), self.decoder.generated.len());
        Stats::add(
            if finish == FinishReason::Stop {
                &self.stats.finished_stop
            } else {
                &self.stats.finished_length
            },
            1,
        );
        self.done = true;
        self.send(Event::Done {
            finish,
            prompt_tokens: p,
            cached_tokens: self.cached,
            completion_tokens: c,
        });
    }

    fn fail(&mut self, e: &Error) {
        if self.done {
            return;
        }
        Stats::add(&self.stats.errors, 1);
        self.failed = true;
        self.done = true;
        self.send(Event::Error(e.to_string()));
    }

    /// Whether its cache may go to the prompt cache: not after a failed step (the cache may be
    /// part-written), nor with the official decode window (see [`Seq::new`]).
    fn cacheable(&self) -> bool {
        !self.failed && self.req.options.window == DecodeWindow::Trained
    }

    /// Its cache for the prompt cache, under the tokens it holds: the prompt and the answer but
    /// its last token (never fed).
    fn into_prompt_entry(self) -> Option<(Vec<u32>, Cache<B>)> {
        if !self.cacheable() {
            return None;
        }
        let mut tokens = self.req.prompt;
        tokens.extend(self.decoder.generated);
        tokens.truncate(self.cache.len());
        (tokens.len() == self.cache.len()).then_some((tokens, self.cache))
    }
}

/// Whether a request may resume from the prompt cache (see [`Seq::new`]).
fn may_resume(req: &Request) -> bool {
    !req.echo && req.options.window == DecodeWindow::Trained
}

fn run<B: Backend>(
    model: &Model<B>,
    tok: Option<&Tokenizer>,
    rx: mpsc::Receiver<Request>,
    in_flight: &AtomicUsize,
    stats: &Arc<Stats>,
    max_batch: usize,
    mut prompts: PromptCache<B>,
) {
    let mut active: Vec<Seq<B>> = Vec::new();
    let mut waiting: VecDeque<Request> = VecDeque::new();
    // Kept from step to step (see `BatchLogits`).
    let mut logits = BatchLogits::default();
    let v = model.config.vocab_size;
    loop {
        if active.is_empty() && waiting.is_empty() {
            match rx.recv() {
                Ok(r) => waiting.push_back(r),
                Err(_) => return,
            }
        }
        while let Ok(r) = rx.try_recv() {
            waiting.push_back(r);
        }
        // Requests whose prompt a running sequence is computing now wait for it: its prompt and
        // last logits will then be in the prompt cache (`n` answers to one prompt compute it once).
        let mut behind = Vec::new();
        while active.len() < max_batch {
            let Some(r) = waiting.pop_front() else { break };
            let computing =
                |s: &Seq<B>| s.prefilling() && s.cacheable() && s.req.prompt == r.prompt;
            if prompts.enabled() && may_resume(&r) && active.iter().any(computing) {
                behind.push(r);
                continue;
            }
            match Seq::new(model, r, stats, &mut prompts) {
                Ok(s) => active.push(s),
                Err(refused) => {
                    let (mut r, e) = *refused;
                    (r.sink)(Event::Error(e.to_string()));
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    Stats::add(&stats.errors, 1);
                }
            }
        }
        for r in behind.into_iter().rev() {
            waiting.push_front(r);
        }
        for s in active.iter_mut() {
            if let Some(l) = s.ready.take() {
                if let Err(e) = s.answer_from(&l, v, tok) {
                    s.fail(&e);
                }
            }
        }
        retire(&mut active, &mut prompts, in_flight);
        stats.running.store(active.len(), Ordering::Relaxed);
        if active.is_empty() {
            continue;
        }
        let began = std::time::Instant::now();
        // Prompt rows a step takes, across sequences, as many as the backend takes at once
        // (`Model::prompt_part`: more run slower on the CPU); the earliest admitted first.
        let mut room = model.prompt_part().unwrap_or(usize::MAX);
        let ids: Vec<Vec<u32>> = active
            .iter()
            .map(|s| {
                let ids = s.step_ids(&prompts, room);
                if s.prefilling() {
                    room -= ids.len();
                }
                ids
            })
            .collect();
        // Each sequence's place in the step: a prefilling one left no room waits.
        let mut n_steps = 0;
        let slot: Vec<Option<usize>> = ids
            .iter()
            .map(|ids| {
                (!ids.is_empty()).then(|| {
                    n_steps += 1;
                    n_steps - 1
                })
            })
            .collect();
        let prefilling: Vec<bool> = active.iter().map(Seq::prefilling).collect();
        let branch_points: Vec<Option<usize>> = active
            .iter()
            .map(|s| s.branch_point_ahead(&prompts))
            .collect();
        let result = {
            let mut steps: Vec<Step<B>> = active
                .iter_mut()
                .zip(&ids)
                .filter(|(_, ids)| !ids.is_empty())
                .map(|(s, ids)| {
                    let logits = if s.prefilling() && s.req.echo {
                        Logits::All
                    } else if s.req.logprobs.is_some() {
                        Logits::Last
                    } else if s.fed + ids.len() < s.req.prompt.len() {
                        // A chunk before the prompt's last: its pick is not used.
                        Logits::Greedy
                    } else if s.prefilling() && prompts.enabled() && s.cacheable() {
                        // The prompt's last chunk: its logits go to the prompt cache with it.
                        Logits::Last
                    } else {
                        s.decoder.next_logits()
                    };
                    Step {
                        cache: &mut s.cache,
                        ids,
                        logits,
                        window: s.req.options.window,
                    }
                })
                .collect();
            model.forward_batch_into(&mut steps, &mut logits)
        };
        Stats::add(&stats.steps, 1);
        Stats::add(&stats.step_nanos, began.elapsed().as_nanos() as u64);
        Stats::add(&stats.step_sequences, n_steps as u64);
        match result {
            Ok(()) => {
                // Each sequence's draw (sampling, log-probabilities, detokenizing, its events)
                // on the thread pool: one after another, a large batch's draws take longer
                // than a GPU's step (`cargo bench -p hymba --bench sample`).
                use rayon::prelude::*;
                let logits = &logits;
                active
                    .par_iter_mut()
                    .zip(&ids)
                    .zip(&slot)
                    .filter_map(|((s, ids), k)| k.map(|k| (s, ids, k)))
                    .for_each(|(s, ids, k)| {
                        if let Err(e) = s.advance(logits.get(k), logits.pick(k), ids.len(), v, tok)
                        {
                            s.fail(&e);
                        }
                    });
            }
            Err(e) => {
                for (s, _) in active.iter_mut().zip(&slot).filter(|(_, k)| k.is_some()) {
                    s.fail(&e);
                }
            }
        }
        // A prompt just computed goes to the prompt cache as it is, with its last logits, beside
        // what its answer will leave: the same prompt again (a regenerated answer) starts with
        // no forward, and a conversation's next turn begins with it even where the answer's
        // text encodes to other tokens than were generated.
        if prompts.enabled() {
            for (i, s) in active.iter().enumerate() {
                if branch_points[i].is_some_and(|c| c == s.fed) && s.cacheable() {
                    let c = s.fed;
                    prompts.insert(s.req.prompt[..c].to_vec(), s.cache.clone(), None);
                }
                if let (true, false, true, Some(k)) =
                    (prefilling[i], s.prefilling(), s.cacheable(), slot[i])
                {
                    let rows = logits.get(k);
                    let last = rows[rows.len().saturating_sub(v)..].to_vec();
                    let last = (last.len() == v).then_some(last);
                    prompts.insert(s.req.prompt.clone(), s.cache.clone(), last);
                }
            }
        }
        retire(&mut active, &mut prompts, in_flight);
        stats.running.store(active.len(), Ordering::Relaxed);
    }
}

/// Takes the finished sequences out of the batch, their caches into the prompt cache.
fn retire<B: Backend>(
    active: &mut Vec<Seq<B>>,
    prompts: &mut PromptCache<B>,
    in_flight: &AtomicUsize,
) {
    let before = active.len();
    let (done, running): (Vec<_>, Vec<_>) =
        std::mem::take(active).into_iter().partition(|s| s.done);
    *active = running;
    for (tokens, cache) in done.into_iter().filter_map(Seq::into_prompt_entry) {
        prompts.insert(tokens, cache, None);
    }
    in_flight.fetch_sub(before - active.len(), Ordering::SeqCst);
}
