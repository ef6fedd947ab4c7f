//! An OpenAI-compatible HTTP API over the hymba batching engine (axum + tokio; the engine runs
//! on its own thread and is reached through [`hymba::Engine`]).
//!
//! Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions` (both with SSE streaming), and vLLM's `POST /tokenize` and
//! `POST /detokenize`. Errors use OpenAI's JSON shape.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hymba::engine::{Event, Request, SubmitError};
use hymba::sample::TokenLogprob;
use hymba::{
    DecodeWindow, Engine, FinishReason, GenerateOptions, Message, SamplingParams, Tokenizer,
};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

/// Server-sent events from `Value`s, several per engine event where the protocol needs it.
fn sse_events(
    values: Vec<Value>,
) -> impl tokio_stream::Stream<Item = Result<SseEvent, Infallible>> {
    tokio_stream::iter(
        values
            .into_iter()
            .map(|v| Ok(SseEvent::default().data(v.to_string()))),
    )
}

/// What the handlers share.
pub struct AppState {
    pub engine: Engine,
    pub tokenizer: Arc<Tokenizer>,
    /// The name clients use in `model`.
    pub model_name: String,
    /// Prompt plus completion tokens allowed for one request.
    pub max_context: usize,
    pub api_key: Option<String>,
    pub eos_id: Option<u32>,
    /// Limits on what one request may ask for (see [`Limits`]).
    pub limits: Limits,
}

/// The most one request may multiply its work by; beyond them it is refused by name. `n` is
/// bounded by the engine's batch and `max_tokens` by the context.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Alternatives per token in `logprobs` / `top_logprobs` (vLLM's --max-logprobs).
    pub max_logprobs: usize,
    /// Prompts in one completion request.
    pub max_prompts: usize,
    /// Bytes of a request body.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_logprobs: 20,
            max_prompts: 256,
            max_body_bytes: 8 << 20,
        }
    }
}

/// Stop strings in a request, and bytes in one.
const MAX_STOPS: usize = 16;
const MAX_STOP_BYTES: usize = 256;

/// The 400 for a request field over its limit.
fn over_limit(field: &'static str, got: usize, max: usize, option: Option<&str>) -> ApiError {
    let how = option.map(|o| format!(" ({o})")).unwrap_or_default();
    error(
        StatusCode::BAD_REQUEST,
        format!("`{field}` is at most {max}{how}, found {got}."),
        Some(field),
    )
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/tokenizer_info", get(tokenizer_info))
        .layer(axum::extract::DefaultBodyLimit::max(
            state.limits.max_body_bytes,
        ))
        .with_state(state)
}

/// Serves until `shutdown` completes, then takes no new connections and returns once the open
/// ones (running requests, streams included) are done.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// A request's failure: answered as an error in OpenAI's shape.
struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        let body = json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status.as_u16()}});
        (self.status, Json(body)).into_response()
    }
}

fn error(status: StatusCode, message: impl Into<String>, param: Option<&'static str>) -> ApiError {
    ApiError {
        status,
        message: message.into(),
        param,
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{:x}{:04x}",
        now(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether two secrets are equal, in a time that does not depend on where they first differ
/// (so a client cannot find the key a byte at a time by timing refusals).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let diff = (0..a.len().max(b.len())).fold(0u8, |d, i| {
        d | (a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0))
    });
    diff == 0 && a.len() == b.len()
}

fn check_key(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &st.api_key else {
        return Ok(());
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| same_secret(g.as_bytes(), key.as_bytes())) {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            "Incorrect or missing API key.",
            None,
        ))
    }
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("Invalid request body: {e}"),
            None,
        )
    })
}

fn check_model(st: &AppState, model: &Option<String>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != &st.model_name => Err(error(
            StatusCode::NOT_FOUND,
            format!(
                "The model `{m}` does not exist. This server serves `{}`.",
                st.model_name
            ),
            Some("model"),
        )),
        _ => Ok(()),
    }
}

/// Liveness, and how many requests are running or queued.
async fn health(State(st): State<Arc<AppState>>) -> Response {
    Json(json!({"status": "ok", "requests_in_flight": st.engine.in_flight()})).into_response()
}

/// The engine's counters in Prometheus' text format (as vLLM's `/metrics`, under `hymba_`).
/// Like `/health`, open without the API key: it holds counts, no request content.
async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    use hymba::engine::Stats;
    let s = st.engine.stats();
    let running = s.running.load(std::sync::atomic::Ordering::Relaxed);
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        out += &format!("# HELP hymba_{name} {help}\n# TYPE hymba_{name} {kind}\n");
        for (labels, v) in samples {
            out += &format!("hymba_{name}{labels} {v}\n");
        }
    };
    put(
        "requests_running",
        "gauge",
        "Sequences in the running batch.",
        &[("", running as f64)],
    );
    put(
        "requests_waiting",
        "gauge",
        "Requests queued for a batch slot.",
        &[("", st.engine.in_flight().saturating_sub(running) as f64)],
    );
    put(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens admitted.",
        &[("", Stats::get(&s.prompt_tokens) as f64)],
    );
    put(
        "prompt_cache_hits_total",
        "counter",
        "Requests whose prompt resumed from the prompt cache.",
        &[("", Stats::get(&s.prompt_cache_hits) as f64)],
    );
    put(
        "prompt_cache_tokens_total",
        "counter",
        "Prompt tokens resumed from the prompt cache rather than computed.",
        &[("", Stats::get(&s.cached_prompt_tokens) as f64)],
    );
    put(
        "generation_tokens_total",
        "counter",
        "Tokens generated.",
        &[("", Stats::get(&s.generated_tokens) as f64)],
    );
    put(
        "requests_finished_total",
        "counter",
        "Requests ended, by how: a stop (end of sequence or stop string), the token limit, an error, or the client leaving.",
        &[
            ("{reason=\"stop\"}", Stats::get(&s.finished_stop) as f64),
            ("{reason=\"length\"}", Stats::get(&s.finished_length) as f64),
            ("{reason=\"error\"}", Stats::get(&s.errors) as f64),
            ("{reason=\"cancelled\"}", Stats::get(&s.cancelled) as f64),
        ],
    );
    put(
        "engine_steps_total",
        "counter",
        "Batched forward passes.",
        &[("", Stats::get(&s.steps) as f64)],
    );
    put(
        "engine_step_seconds_total",
        "counter",
        "Time spent in batched forward passes.",
        &[("", Stats::get(&s.step_nanos) as f64 / 1e9)],
    );
    put(
        "engine_step_sequences_total",
        "counter",
        "Sequences over all passes (the mean batch is this over the steps).",
        &[("", Stats::get(&s.step_sequences) as f64)],
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

async fn models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = check_key(&st, &headers) {
        return e.into_response();
    }
    Json(json!({"object": "list", "data": [{"id": st.model_name, "object": "model", "created": 0, "owned_by": "hymba", "max_model_len": st.max_context}]}))
        .into_response()
}

/// `stop`: a string or a list of strings.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Stop {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn list(&self) -> Vec<String> {
        match self {
            Stop::None => Vec::new(),
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
    }
}

/// `stream_options`.
#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Request fields that only describe the caller (OpenAI's metadata), accepted and ignored;
/// any other field this server does not know is refused unless null, never silently dropped.
const IGNORED_FIELDS: [&str; 4] = ["user", "metadata", "store", "service_tier"];

/// The 400 for request fields this server does not know (`rest`: what the request's struct did
/// not name). A null asks for nothing (clients write unset fields so), so only set ones are
/// refused; caller metadata (IGNORED_FIELDS) is accepted.
fn refuse_unknown(rest: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    let unknown: Vec<&str> = rest
        .iter()
        .filter(|(k, v)| !v.is_null() && !IGNORED_FIELDS.contains(&k.as_str()))
        .map(|(k, _)| k.as_str())
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    Err(error(
        StatusCode::BAD_REQUEST,
        format!(
            "Unrecognized request argument(s) supplied: {}.",
            unknown.join(", ")
        ),
        None,
    ))
}

/// Sampling fields both endpoints accept (OpenAI's, plus vLLM's top_k, min_p,
/// repetition_penalty and ignore_eos).
#[derive(Deserialize)]
struct Sampling {
    model: Option<String>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    /// Token id (as a string, as OpenAI's JSON has it) → bias.
    logit_bias: Option<HashMap<String, f32>>,
    seed: Option<u64>,
    #[serde(default)]
    stop: Stop,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    /// Only plain text: `{"type": "text"}`.
    response_format: Option<Value>,
    n: Option<usize>,
    #[serde(default)]
    ignore_eos: bool,
    /// Every field neither this nor the endpoint's request names.
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

impl Sampling {
    /// Generation options for a prompt of `prompt_len` tokens, or the 400 that explains why not.
    fn options(
        &self,
        st: &AppState,
        prompt_len: usize,
        default_max: usize,
    ) -> Result<GenerateOptions, ApiError> {
        refuse_unknown(&self.rest)?;
        if let Some(f) = self
            .response_format
            .as_ref()
            .filter(|f| !f.is_null() && f["type"] != "text")
        {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("`response_format` {f} is not supported: only {{\"type\": \"text\"}}."),
                Some("response_format"),
            ));
        }
        let n = self.choices();
        if n == 0 || n > st.engine.max_batch {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!(
                    "`n` must be in 1..={} (--max-batch), found {n}.",
                    st.engine.max_batch
                ),
                Some("n"),
            ));
        }
        let room = st.max_context.saturating_sub(prompt_len);
        let max = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(default_max.min(room));
        if prompt_len + max > st.max_context {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!(
                    "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the prompt, {} in the completion).",
                    st.max_context,
                    prompt_len + max,
                    prompt_len,
                    max
                ),
                Some("max_tokens"),
            ));
        }
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k: self.top_k.filter(|&k| k > 0).unwrap_or(0) as usize,
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            logit_bias: self.logit_bias(st)?,
            seed: self.seed.unwrap_or_else(now),
        };
        sampling
            .validate()
            .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string(), None))?;
        let stop = self.stop.list();
        if stop.len() > MAX_STOPS {
            return Err(over_limit("stop", stop.len(), MAX_STOPS, None));
        }
        if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!(
                    "A stop string is at most {MAX_STOP_BYTES} bytes, found {}.",
                    long.len()
                ),
                Some("stop"),
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "A stop string is empty.",
                Some("stop"),
            ));
        }
        if self.stream_options.is_some() && !self.stream {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "`stream_options` is only allowed when `stream` is true.",
                Some("stream_options"),
            ));
        }
        Ok(GenerateOptions {
            max_new_tokens: max,
            sampling,
            stop,
            ignore_eos: self.ignore_eos,
            eos_id: st.eos_id,
            window: DecodeWindow::Trained,
            keep_logits: false,
        })
    }
}

impl Sampling {
    /// `logit_bias` as (token, bias), each key a token id of the vocabulary.
    fn logit_bias(&self, st: &AppState) -> Result<Vec<(u32, f32)>, ApiError> {
        let vocab = st.tokenizer.vocab_size();
        let Some(map) = &self.logit_bias else {
            return Ok(Vec::new());
        };
        map.iter()
            .map(|(k, &b)| match k.parse::<u32>() {
                Ok(id) if (id as usize) < vocab => Ok((id, b)),
                _ => Err(error(
                    StatusCode::BAD_REQUEST,
                    format!("`logit_bias` key {k:?} is not a token id (vocabulary of {vocab})."),
                    Some("logit_bias"),
                )),
            })
            .collect()
    }

    /// Answers per prompt (`n`).
    fn choices(&self) -> usize {
        self.n.unwrap_or(1)
    }

    /// Whether a stream ends with a chunk of the token counts (`stream_options.include_usage`).
    fn stream_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// Counts a stream's finished answers, to end it with the usage chunk when asked.
struct UsageTally {
    /// Answers in the stream.
    n: usize,
    wanted: bool,
    done: usize,
    completion_tokens: usize,
    /// The first answer's prompt tokens resumed from the prompt cache: the prompt counts once
    /// however many answers it has, as a non-streamed answer counts it.
    cached_tokens: usize,
}

impl UsageTally {
    fn new(n: usize, wanted: bool) -> Self {
        UsageTally {
            n,
            wanted,
            done: 0,
            completion_tokens: 0,
            cached_tokens: 0,
        }
    }

    /// Records answer `index`'s end; the usage when it was the last one and usage was asked
    /// for.
    fn finished(
        &mut self,
        index: usize,
        prompt_tokens: usize,
        cached_tokens: usize,
        completion_tokens: usize,
    ) -> Option<Value> {
        self.done += 1;
        self.completion_tokens += completion_tokens;
        if index == 0 {
            self.cached_tokens = cached_tokens;
        }
        (self.wanted && self.done == self.n)
            .then(|| usage(prompt_tokens, self.cached_tokens, self.completion_tokens))
    }
}

/// OpenAI's usage object: the counts, and of the prompt tokens those resumed from the engine's
/// prompt cache rather than computed.
fn usage(prompt_tokens: usize, cached_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens,
           "prompt_tokens_details": {"cached_tokens": cached_tokens}})
}

/// The chunk OpenAI ends a stream with when asked for usage: no choices, the counts.
fn usage_chunk(id: &str, object: &str, created: u64, model: &str, usage: Value) -> Value {
    json!({"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": usage})
}

/// Submits one request; its events arrive on the returned receiver. Dropping the receiver
/// cancels the request.
fn submit(
    st: &AppState,
    prompt: Vec<u32>,
    options: GenerateOptions,
    logprobs: Option<usize>,
    echo: bool,
    branch_point: Option<usize>,
) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let req = Request {
        prompt,
        options,
        logprobs,
        echo,
        branch_point,
        sink: Box::new(move |ev| tx.send(ev).is_ok()),
    };
    match st.engine.submit(req) {
        Ok(()) => Ok(rx),
        Err(SubmitError::Busy) => Err(error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "The server is busy ({} requests running and queued); retry later.",
                st.engine.max_batch * 2
            ),
            None,
        )),
        Err(SubmitError::Stopped) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The engine has stopped.",
            None,
        )),
    }
}

/// Submits `n` answers to one prompt, the j-th sampled with seed `seed + j`; their receivers in
/// order. If one is refused, those already submitted are cancelled as their receivers drop.
fn submit_n(
    st: &AppState,
    prompt: &[u32],
    options: &GenerateOptions,
    n: usize,
    logprobs: Option<usize>,
    echo: bool,
    branch_point: Option<usize>,
) -> Result<Vec<mpsc::UnboundedReceiver<Event>>, ApiError> {
    (0..n)
        .map(|j| {
            let mut o = options.clone();
            o.sampling.seed = o.sampling.seed.wrapping_add(j as u64);
            submit(st, prompt.to_vec(), o, logprobs, echo, branch_point)
        })
        .collect()
}

/// The events of several answers as one stream, each tagged with its choice index.
fn merged(
    rxs: Vec<mpsc::UnboundedReceiver<Event>>,
) -> impl tokio_stream::Stream<Item = (usize, Event)> {
    futures_util::stream::select_all(
        rxs.into_iter()
            .enumerate()
            .map(|(i, rx)| UnboundedReceiverStream::new(rx).map(move |ev| (i, ev))),
    )
}

/// Everything one request produced, for a non-streaming answer.
#[derive(Default)]
struct Outcome {
    text: String,
    tokens: Vec<(u32, Option<TokenLogprob>)>,
    prompt_logprobs: Vec<Option<TokenLogprob>>,
    finish: Option<FinishReason>,
    prompt_tokens: usize,
    cached_tokens: usize,
    completion_tokens: usize,
}

async fn collect(mut rx: mpsc::UnboundedReceiver<Event>) -> Result<Outcome, ApiError> {
    let mut o = Outcome::default();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Prompt(lp) => o.prompt_logprobs = lp,
            Event::Token { id, text, logprob } => {
                o.text.push_str(&text);
                o.tokens.push((id, logprob));
            }
            Event::Done {
                finish,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
            } => {
                o.finish = Some(finish);
                o.prompt_tokens = prompt_tokens;
                o.cached_tokens = cached_tokens;
                o.completion_tokens = completion_tokens;
                return Ok(o);
            }
            Event::Error(e) => return Err(error(StatusCode::BAD_REQUEST, e, None)),
        }
    }
    Err(error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "The engine dropped the request.",
        None,
    ))
}

fn finish_name(f: Option<FinishReason>) -> Value {
    match f {
        Some(FinishReason::Stop) => json!("stop"),
        Some(FinishReason::Length) => json!("length"),
        None => Value::Null,
    }
}

#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(flatten)]
    sampling: Sampling,
    prompt: Value,
    logprobs: Option<usize>,
    #[serde(default)]
    echo: bool,
}

/// The prompts of a completion request as token ids: a string, a list of strings, a list of
/// ids or a list of lists of ids.
fn prompts(st: &AppState, v: &Value) -> Result<Vec<Vec<u32>>, ApiError> {
    let bad = || {
        error(StatusCode::BAD_REQUEST, "`prompt` must be a string, a list of strings, a list of token ids or a list of lists of token ids.", Some("prompt"))
    };
    let ids = |v: &Value| -> Option<Vec<u32>> {
        v.as_array()?
            .iter()
            .map(|x| {
                x.as_u64()
                    .filter(|&i| i <= u32::MAX as u64)
                    .map(|i| i as u32)
            })
            .collect()
    };
    let text = |s: &str| {
        st.tokenizer
            .encode_prompt(s)
            .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string(), Some("prompt")))
    };
    let out = match v {
        Value::String(s) => vec![text(s)?],
        Value::Array(items) if items.is_empty() => return Err(bad()),
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .map(|s| text(s.as_str().expect("checked")))
            .collect::<Result<_, _>>()?,
        Value::Array(items) if items.iter().all(Value::is_number) => vec![ids(v).ok_or_else(bad)?],
        Value::Array(items) => items
            .iter()
            .map(|p| ids(p).ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    let vocab = st.tokenizer.vocab_size();
    for p in &out {
        if p.is_empty() {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "A prompt is empty.",
                Some("prompt"),
            ));
        }
        if let Some(id) = p.iter().find(|&&id| id as usize >= vocab) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("Token id {id} is out of range (vocabulary of {vocab})."),
                Some("prompt"),
            ));
        }
    }
    Ok(out)
}

/// OpenAI's legacy completion logprobs: tokens (as text, after the ids of `context`), their
/// logprobs, the top alternatives (with the chosen token among them, as vLLM gives them) and
/// the text offsets.
fn logprobs_json(
    tok: &Tokenizer,
    context: &[u32],
    entries: &[(u32, Option<TokenLogprob>)],
    start_offset: usize,
) -> Value {
    let (mut tokens, mut lps, mut tops, mut offsets) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut offset = start_offset;
    let mut ctx = context.to_vec();
    for (id, lp) in entries {
        let s = tok.token_text(&ctx, *id);
        offsets.push(offset);
        offset += s.len();
        match lp {
            Some(lp) => {
                lps.push(json!(lp.logprob));
                let mut top: serde_json::Map<String, Value> = lp
                    .top
                    .iter()
                    .map(|(t, l)| (tok.token_text(&ctx, *t), json!(l)))
                    .collect();
                top.entry(s.clone()).or_insert(json!(lp.logprob));
                tops.push(Value::Object(top));
            }
            None => {
                lps.push(Value::Null);
                tops.push(Value::Null);
            }
        }
        tokens.push(json!(s));
        ctx.push(*id);
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

async fn completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    match completions_inner(st, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(
    st: Arc<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_key(&st, &headers)?;
    let req: CompletionRequest = parse(&body)?;
    check_model(&st, &req.sampling.model)?;
    let prompts = prompts(&st, &req.prompt)?;
    if prompts.len() > st.limits.max_prompts {
        return Err(over_limit(
            "prompt",
            prompts.len(),
            st.limits.max_prompts,
            Some("--max-prompts"),
        ));
    }
    if let Some(k) = req.logprobs.filter(|&k| k > st.limits.max_logprobs) {
        return Err(over_limit(
            "logprobs",
            k,
            st.limits.max_logprobs,
            Some("--max-logprobs"),
        ));
    }
    let id = request_id("cmpl");
    let created = now();
    let n = req.sampling.choices();
    if req.sampling.stream {
        if prompts.len() != 1 {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "Streaming takes a single prompt.",
                Some("prompt"),
            ));
        }
        let options = req.sampling.options(&st, prompts[0].len(), 16)?;
        let rxs = submit_n(&st, &prompts[0], &options, n, req.logprobs, false, None)?;
        let (model, tok) = (st.model_name.clone(), st.tokenizer.clone());
        let mut tally = UsageTally::new(n, req.sampling.stream_usage());
        // Each answer's ids so far, after the prompt: the context of its tokens' text.
        let mut seen = vec![prompts[0].clone(); n];
        let values = merged(rxs).map(move |(index, ev)| {
            let chunk = |text: &str, lp: Value, finish: Value| {
                json!({"id": id, "object": "text_completion", "created": created, "model": model,
                       "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}]})
            };
            match ev {
                Event::Token { id: tid, text, logprob } => {
                    let lp = if logprob.is_some() { logprobs_json(&tok, &seen[index], &[(tid, logprob)], 0) } else { Value::Null };
                    seen[index].push(tid);
                    vec![chunk(&text, lp, Value::Null)]
                }
                Event::Done { finish, prompt_tokens, cached_tokens, completion_tokens } => {
                    let mut v = vec![chunk("", Value::Null, finish_name(Some(finish)))];
                    if let Some(u) = tally.finished(index, prompt_tokens, cached_tokens, completion_tokens) {
                        v.push(usage_chunk(&id, "text_completion", created, &model, u));
                    }
                    v
                }
                Event::Error(e) => vec![json!({"error": {"message": e, "type": "invalid_request_error"}})],
                Event::Prompt(_) => Vec::new(),
            }
        });
        let stream = futures_util::StreamExt::flat_map(values, sse_events);
        let done = tokio_stream::once(Ok(SseEvent::default().data("[DONE]")));
        return Ok(Sse::new(stream.chain(done))
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    // Every prompt runs at once in the engine; answers are gathered in order.
    let mut rxs = Vec::new();
    for p in &prompts {
        let options = req.sampling.options(&st, p.len(), 16)?;
        rxs.extend(
            submit_n(&st, p, &options, n, req.logprobs, req.echo, None)?
                .into_iter()
                .map(|rx| (p.clone(), rx)),
        );
    }
    let (mut choices, mut prompt_tokens, mut cached_tokens, mut completion_tokens) =
        (Vec::new(), 0, 0, 0);
    for (i, (prompt, rx)) in rxs.into_iter().enumerate() {
        let o = collect(rx).await?;
        // A prompt counts once however many answers it has (as OpenAI counts).
        if i % n == 0 {
            prompt_tokens += o.prompt_tokens;
            cached_tokens += o.cached_tokens;
        }
        completion_tokens += o.completion_tokens;
        let prompt_text = if req.echo {
            st.tokenizer.decode(&prompt).unwrap_or_default()
        } else {
            String::new()
        };
        let logprobs = match req.logprobs {
            None => Value::Null,
            Some(_) => {
                let mut entries: Vec<(u32, Option<TokenLogprob>)> = Vec::new();
                if req.echo {
                    entries.extend(
                        prompt
                            .iter()
                            .copied()
                            .zip(o.prompt_logprobs.iter().cloned()),
                    );
                }
                entries.extend(o.tokens.iter().cloned());
                let context: &[u32] = if req.echo { &[] } else { &prompt };
                logprobs_json(&st.tokenizer, context, &entries, 0)
            }
        };
        choices.push(json!({"index": i, "text": format!("{prompt_text}{}", o.text), "logprobs": logprobs, "finish_reason": finish_name(o.finish)}));
    }
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": st.model_name, "choices": choices,
        "usage": usage(prompt_tokens, cached_tokens, completion_tokens),
    }))
    .into_response())
}

/// A chat message; `content` may be a string or a list of text parts.
#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Value,
}

fn messages(v: &[ChatMessage]) -> Result<Vec<Message>, ApiError> {
    v.iter()
        .map(|m| {
            let content = match &m.content {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                Value::Array(parts) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join(""),
                _ => {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        "A message's `content` must be a string or a list of text parts.",
                        Some("messages"),
                    ))
                }
            };
            match m.role.as_str() {
                "system" | "user" | "assistant" | "tool" | "developer" => Ok(Message::new(
                    if m.role == "developer" {
                        "system"
                    } else {
                        &m.role
                    },
                    &content,
                )),
                other => Err(error(
                    StatusCode::BAD_REQUEST,
                    format!("Unknown role `{other}`."),
                    Some("messages"),
                )),
            }
        })
        .collect()
}

/// The chat prompt as the checkpoint's template renders it, tokenized without an added BOS
/// (what `apply_chat_template` gives); `extra` holds more template variables.
fn chat_prompt(
    st: &AppState,
    msgs: &[Message],
    tools: Option<&[Value]>,
    add_generation_prompt: bool,
    extra: Option<&serde_json::Map<String, Value>>,
) -> Result<Vec<u32>, ApiError> {
    let tmpl = st.tokenizer.chat_template.as_ref().ok_or_else(|| {
        error(
            StatusCode::BAD_REQUEST,
            "This model has no chat template.",
            Some("messages"),
        )
    })?;
    let text = tmpl
        .render_with(
            msgs,
            tools,
            add_generation_prompt,
            extra.unwrap_or(&serde_json::Map::new()),
        )
        .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string(), Some("messages")))?;
    st.tokenizer
        .encode(&text, false)
        .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string(), Some("messages")))
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(flatten)]
    sampling: Sampling,
    messages: Vec<ChatMessage>,
    tools: Option<Vec<Value>>,
    /// "auto" (the default: the template shows the tools) or "none" (it does not).
    tool_choice: Option<Value>,
    /// More variables for the chat template (vLLM's field), e.g. Hymba's `contexts`.
    chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<usize>,
}

/// Chat log-probabilities in OpenAI's shape: `{"content": [{token, logprob, bytes,
/// top_logprobs: [...]}]}`, each token as the text it adds after `context` and what came before.
fn chat_logprobs(
    tok: &Tokenizer,
    context: &[u32],
    entries: &[(u32, Option<TokenLogprob>)],
) -> Value {
    let mut ctx = context.to_vec();
    let mut content = Vec::new();
    for (id, lp) in entries {
        if let Some(lp) = lp {
            let item = |id: u32, lp: f32| {
                let text = tok.token_text(&ctx, id);
                json!({"token": text, "logprob": lp, "bytes": text.as_bytes()})
            };
            let mut v = item(*id, lp.logprob);
            v["top_logprobs"] = Value::Array(lp.top.iter().map(|(t, l)| item(*t, *l)).collect());
            content.push(v);
        }
        ctx.push(*id);
    }
    json!({"content": content})
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match chat_inner(st, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(
    st: Arc<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_key(&st, &headers)?;
    let req: ChatRequest = parse(&body)?;
    check_model(&st, &req.sampling.model)?;
    let msgs = messages(&req.messages)?;
    let tools = match req.tool_choice.as_ref().and_then(Value::as_str) {
        _ if req.tool_choice.as_ref().is_none_or(Value::is_null) => req.tools.as_deref(),
        Some("auto") => req.tools.as_deref(),
        Some("none") => None,
        _ => {
            let msg = "Only `tool_choice` \"auto\" and \"none\" are supported: tool calls are not parsed out of the answer.";
            return Err(error(StatusCode::BAD_REQUEST, msg, Some("tool_choice")));
        }
    };
    let kwargs = req.chat_template_kwargs.as_ref();
    let prompt = chat_prompt(&st, &msgs, tools, true, kwargs)?;
    // The conversation before its last message, where the prompt cache keeps the state too:
    // other conversations with the same system prompt begin there, and this one's next turn
    // does even where its answer's text encodes to other tokens than were generated.
    let branch_point = if st.engine.prompt_cache_bytes > 0 && msgs.len() > 1 {
        chat_prompt(&st, &msgs[..msgs.len() - 1], tools, false, kwargs)
            .ok()
            .filter(|before| before.len() < prompt.len() && prompt.starts_with(before))
            .map(|before| before.len())
            .filter(|&c| c > 0)
    } else {
        None
    };
    let options = req.sampling.options(&st, prompt.len(), st.max_context)?;
    let n_prompt = prompt.len();
    let logprobs = req.logprobs.then(|| req.top_logprobs.unwrap_or(0));
    if let Some(k) = logprobs.filter(|&k| k > st.limits.max_logprobs) {
        return Err(over_limit(
            "top_logprobs",
            k,
            st.limits.max_logprobs,
            Some("--max-logprobs"),
        ));
    }
    let n = req.sampling.choices();
    let rxs = submit_n(&st, &prompt, &options, n, logprobs, false, branch_point)?;
    let (id, created) = (request_id("chatcmpl"), now());
    if req.sampling.stream {
        let (model, tok) = (st.model_name.clone(), st.tokenizer.clone());
        let mut seen = vec![prompt.clone(); n];
        let firsts: Vec<Value> = (0..n)
            .map(|index| {
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]})
            })
            .collect();
        let head = sse_events(firsts);
        let mut tally = UsageTally::new(n, req.sampling.stream_usage());
        let values = merged(rxs).map(move |(index, ev)| {
            let chunk = |delta: Value, finish: Value, usage: Value| {
                let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                                   "choices": [{"index": index, "delta": delta, "finish_reason": finish}]});
                if !usage.is_null() {
                    c["usage"] = usage;
                }
                c
            };
            match ev {
                Event::Token { id: tid, text, logprob: None } if text.is_empty() => {
                    seen[index].push(tid);
                    Vec::new()
                }
                Event::Token { id: tid, text, logprob } => {
                    let mut c = chunk(json!({"content": text}), Value::Null, Value::Null);
                    if logprob.is_some() {
                        c["choices"][0]["logprobs"] = chat_logprobs(&tok, &seen[index], &[(tid, logprob)]);
                    }
                    seen[index].push(tid);
                    vec![c]
                }
                Event::Done { finish, prompt_tokens, cached_tokens, completion_tokens } => {
                    let mut v = vec![chunk(
                        json!({}),
                        finish_name(Some(finish)),
                        usage(prompt_tokens, cached_tokens, completion_tokens),
                    )];
                    if let Some(u) = tally.finished(index, prompt_tokens, cached_tokens, completion_tokens) {
                        v.push(usage_chunk(&id, "chat.completion.chunk", created, &model, u));
                    }
                    v
                }
                Event::Error(e) => vec![json!({"error": {"message": e, "type": "invalid_request_error"}})],
                Event::Prompt(_) => Vec::new(),
            }
        });
        let stream = futures_util::StreamExt::flat_map(values, sse_events);
        let done = tokio_stream::once(Ok(SseEvent::default().data("[DONE]")));
        return Ok(Sse::new(head.chain(stream).chain(done))
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let (mut choices, mut completion_tokens, mut cached_tokens) = (Vec::new(), 0, 0);
    for (index, rx) in rxs.into_iter().enumerate() {
        let o = collect(rx).await?;
        completion_tokens += o.completion_tokens;
        // The prompt counts once however many answers it has; its cached part, the first's.
        if index == 0 {
            cached_tokens = o.cached_tokens;
        }
        choices.push(json!({"index": index, "message": {"role": "assistant", "content": o.text},
                            "logprobs": if logprobs.is_some() { chat_logprobs(&st.tokenizer, &prompt, &o.tokens) } else { Value::Null },
                            "finish_reason": finish_name(o.finish)}));
    }
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": st.model_name, "choices": choices,
        "usage": usage(n_prompt, cached_tokens, completion_tokens),
    }))
    .into_response())
}

/// vLLM's `/tokenize`: a prompt, or messages rendered with the chat template.
#[derive(Deserialize)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    /// Shown to the chat template as in a chat request.
    tools: Option<Vec<Value>>,
    add_special_tokens: Option<bool>,
    add_generation_prompt: Option<bool>,
    chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

async fn tokenize(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let run = || -> Result<Response, ApiError> {
        check_key(&st, &headers)?;
        let req: TokenizeRequest = parse(&body)?;
        check_model(&st, &req.model)?;
        refuse_unknown(&req.rest)?;
        if req.tools.is_some() && req.messages.is_none() {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "`tools` goes with `messages`.",
                Some("tools"),
            ));
        }
        let tokens = match (&req.prompt, &req.messages) {
            (Some(p), None) => {
                let add = req.add_special_tokens.unwrap_or(true) && st.tokenizer.add_bos;
                st.tokenizer
                    .encode(p, add)
                    .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string(), Some("prompt")))?
            }
            (None, Some(m)) => chat_prompt(
                &st,
                &messages(m)?,
                req.tools.as_deref(),
                req.add_generation_prompt.unwrap_or(true),
                req.chat_template_kwargs.as_ref(),
            )?,
            _ => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "Give exactly one of `prompt` and `messages`.",
                    None,
                ))
            }
        };
        Ok(
            Json(json!({"count": tokens.len(), "max_model_len": st.max_context, "tokens": tokens}))
                .into_response(),
        )
    };
    match run() {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

async fn detokenize(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let run = || -> Result<Response, ApiError> {
        check_key(&st, &headers)?;
        let req: DetokenizeRequest = parse(&body)?;
        check_model(&st, &req.model)?;
        refuse_unknown(&req.rest)?;
        let vocab = st.tokenizer.vocab_size();
        if let Some(id) = req.tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("Token id {id} is out of range (vocabulary of {vocab})."),
                Some("tokens"),
            ));
        }
        let text = st
            .tokenizer
            .decode(&req.tokens)
            .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string(), Some("tokens")))?;
        Ok(Json(json!({"prompt": text})).into_response())
    };
    match run() {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// The tokenizer's configuration as vLLM's `GET /tokenizer_info` gives it (what a client that
/// tokenizes through the server, as lm-eval's `tokenizer_backend=remote`, reads): the keys of
/// tokenizer_config.json with the special tokens as plain strings, the chat template the server
/// applies (a `--chat-template` file's where one was given), and `tokenizer_class`.
async fn tokenizer_info(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = check_key(&st, &headers) {
        return e.into_response();
    }
    let tok = &st.tokenizer;
    let mut info = match &tok.config {
        Some(Value::Object(m)) => m.clone(),
        _ => serde_json::Map::new(),
    };
    for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
        if let Some(content) = info.get(key).and_then(|v| v.get("content")).cloned() {
            info.insert(key.into(), content);
        }
    }
    for (key, id) in [("bos_token", tok.bos_id), ("eos_token", tok.eos_id)] {
        if let (false, Some(id)) = (info.contains_key(key), id) {
            info.insert(key.into(), Value::String(tok.id_to_token(id)));
        }
    }
    info.insert(
        "chat_template".into(),
        tok.chat_template
            .as_ref()
            .map_or(Value::Null, |t| Value::String(t.source().into())),
    );
    info.entry("tokenizer_class")
        .or_insert_with(|| Value::String("PreTrainedTokenizerFast".into()));
    Json(Value::Object(info)).into_response()
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_compare_equal_only_when_equal() {
        let keys: [&[u8]; 6] = [b"", b"a", b"ab", b"abc", b"abd", b"\0"];
        for a in keys {
            for b in keys {
                assert_eq!(same_secret(a, b), a == b, "{a:?} {b:?}");
            }
        }
    }
}
