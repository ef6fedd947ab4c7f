//! `hymba serve` end to end over HTTP: endpoints, errors, continuous batching (concurrent
//! greedy requests give the tokens they give alone) and cancellation of a disconnected stream.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn shared() -> PathBuf {
    std::env::var_os("HYMBA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
}

/// The tiny fixture with the real tokenizer beside it, in a temp dir.
fn model_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hymba-serve-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for (src, name) in [
        (shared().join("fixtures/tiny-a/config.json"), "config.json"),
        (
            shared().join("fixtures/tiny-a/model.safetensors"),
            "model.safetensors",
        ),
        (shared().join("hymba-1.5b/tokenizer.json"), "tokenizer.json"),
        (
            shared().join("hymba-1.5b/tokenizer_config.json"),
            "tokenizer_config.json",
        ),
    ] {
        std::fs::copy(src, d.join(name)).unwrap();
    }
    d
}

struct Server {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(tag: &str, extra: &[&str]) -> Server {
    start_with(tag, extra, &[])
}

/// `hymba serve` on the tiny fixture in `dir` at a free port, its stderr piped.
fn spawn(dir: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_hymba"))
        .env_remove("HYMBA_API_KEY")
        .envs(env.iter().copied())
        .args([
            "serve",
            "--model",
            dir.to_str().unwrap(),
            "--port",
            "0",
            "--served-model-name",
            "tiny",
        ])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn start_with(tag: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
    let dir = model_dir(tag);
    let mut child = spawn(&dir, extra, env);
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    Server { child, port, dir }
}

/// Minimal HTTP/1.1 client: returns (status, body), de-chunking when needed.
fn http(
    port: u16,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn post(port: u16, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let (st, b) = http(port, "POST", path, &body.to_string(), &[]);
    (
        st,
        serde_json::from_str(&b).unwrap_or_else(|_| panic!("not JSON: {b}")),
    )
}

#[test]
fn endpoints_and_errors() {
    let srv = start("endpoints", &["--max-context", "64"]);
    let p = srv.port;
    let (st, b) = http(p, "GET", "/health", "", &[]);
    assert_eq!(st, 200, "{b}");
    let (st, b) = http(p, "GET", "/v1/models", "", &[]);
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&b).unwrap()["data"][0]["id"],
        "tiny"
    );

    // Completions: greedy text, usage, logprobs that are real log-probabilities.
    let (st, r) = post(
        p,
        "/v1/completions",
        serde_json::json!({"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0, "logprobs": 3}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 4);
    let lp = &r["choices"][0]["logprobs"];
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let best = top
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        // Greedy: the chosen token is the most likely one.
        assert!((best - lp["token_logprobs"][i].as_f64().unwrap()).abs() < 1e-6);
        assert!(best <= 0.0);
        // Tokens are text (not vocabulary entries), and the chosen one is among the top.
        assert!(
            top.as_object()
                .unwrap()
                .contains_key(lp["tokens"][i].as_str().unwrap()),
            "{r}"
        );
    }
    let texts: String = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        r["choices"][0]["text"].as_str().unwrap(),
        "the tokens' text is the answer: {r}"
    );
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let lens: Vec<u64> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().len() as u64)
        .collect();
    assert!(
        offsets
            .windows(2)
            .zip(&lens)
            .all(|(w, l)| w[1] - w[0] == *l),
        "{r}"
    );
    // Echo with max_tokens 0: the prompt's log-probabilities (lm-eval loglikelihood).
    let (st, r) = post(
        p,
        "/v1/completions",
        serde_json::json!({"prompt": [1, 450, 4996, 17354], "max_tokens": 0, "echo": true, "logprobs": 1}),
    );
    assert_eq!(st, 200, "{r}");
    let tl = r["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap();
    assert_eq!(tl.len(), 4);
    assert!(tl[0].is_null() && tl[1..].iter().all(|v| v.as_f64().unwrap() < 0.0));

    // Chat, tokenize, detokenize.
    let (st, r) = post(
        p,
        "/v1/chat/completions",
        serde_json::json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    let (st, lp) = post(
        p,
        "/v1/chat/completions",
        serde_json::json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0, "logprobs": true, "top_logprobs": 2}),
    );
    assert_eq!(st, 200, "{lp}");
    let content = lp["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    for c in content {
        // Greedy: the chosen token is the first of the top alternatives.
        assert_eq!(c["logprob"], c["top_logprobs"][0]["logprob"], "{c}");
        assert_eq!(c["top_logprobs"].as_array().unwrap().len(), 2);
    }
    let (_, t) = post(
        p,
        "/tokenize",
        serde_json::json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "add_generation_prompt": true}),
    );
    assert_eq!(r["usage"]["prompt_tokens"], t["count"]);
    let (_, t) = post(p, "/tokenize", serde_json::json!({"prompt": "Hello world"}));
    assert_eq!(t["tokens"][0], 1);
    let (_, d) = post(p, "/detokenize", serde_json::json!({"tokens": t["tokens"]}));
    assert_eq!(d["prompt"], "Hello world");

    // Errors in OpenAI's shape.
    let (st, r) = http(p, "POST", "/v1/completions", "{not json", &[]);
    assert_eq!(st, 400, "{r}");
    assert!(r.contains("\"error\""));
    let (st, r) = post(
        p,
        "/v1/completions",
        serde_json::json!({"prompt": "x", "temperature": -1}),
    );
    assert_eq!(st, 400, "{r}");
    let (st, r) = post(
        p,
        "/v1/completions",
        serde_json::json!({"prompt": "x", "max_tokens": 100}),
    );
    assert_eq!(st, 400);
    assert!(
        r["error"]["message"].as_str().unwrap().contains("64"),
        "{r}"
    );
    let (st, _) = post(
        p,
        "/v1/completions",
        serde_json::json!({"model": "other", "prompt": "x"}),
    );
    assert_eq!(st, 404);
    let (st, _) = post(
        p,
        "/v1/completions",
        serde_json::json!({"prompt": [1, 99999]}),
    );
    assert_eq!(st, 400);
}

/// OpenAI's sampling fields beyond the basics, checked against the raw log-probabilities the
/// server reports beside them: each greedy choice under a frequency or presence penalty is the
/// argmax of the reported top logprobs minus the penalty for the tokens generated before it.
/// Also logit_bias, stream_options.include_usage, response_format, tool_choice, and unknown
/// arguments refused by name.
#[test]
fn openai_sampling_fields_and_unknown_arguments() {
    use serde_json::json;
    let srv = start("fields", &[]);
    let p = srv.port;
    // A prompt on which the fixture's greedy answer repeats a token, so the penalties matter.
    let base = json!({"prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0, "ignore_eos": true, "logprobs": 5});
    let with = |k: &str, v: serde_json::Value| {
        let mut b = base.clone();
        b[k] = v;
        post(p, "/v1/completions", b)
    };
    let (_, plain) = with("seed", json!(1));
    let plain_tokens = plain["choices"][0]["logprobs"]["tokens"].clone();
    let repeats = |t: &serde_json::Value| {
        let t = t.as_array().unwrap();
        t.iter().enumerate().any(|(i, x)| t[..i].contains(x))
    };
    assert!(
        repeats(&plain_tokens),
        "the unpenalised answer should repeat a token: {plain_tokens}"
    );
    for (field, per_count, once) in [
        ("frequency_penalty", 2.0, 0.0),
        ("presence_penalty", 0.0, 1.5),
    ] {
        let (st, r) = with(field, json!(per_count + once));
        assert_eq!(st, 200, "{r}");
        let lp = &r["choices"][0]["logprobs"];
        let tokens: Vec<&str> = lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        for (i, chosen) in tokens.iter().enumerate() {
            let penalised = |tok: &str, raw: f64| {
                let n = tokens[..i].iter().filter(|t| **t == tok).count() as f64;
                raw - per_count * n - if n > 0.0 { once } else { 0.0 }
            };
            let top = lp["top_logprobs"][i].as_object().unwrap();
            let best = top
                .iter()
                .map(|(t, v)| (t.as_str(), penalised(t, v.as_f64().unwrap())))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap();
            assert_eq!(best.0, *chosen, "{field}, step {i}: {r}");
        }
        assert_ne!(lp["tokens"], plain_tokens, "{field} changed nothing");
    }

    // logit_bias +100 on one token: greedy takes it every time.
    let (_, t) = post(p, "/tokenize", json!({"prompt": "Hello world"}));
    let world = t["tokens"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_u64()
        .unwrap();
    let (st, r) = post(
        p,
        "/v1/completions",
        json!({"prompt": "The", "max_tokens": 3, "temperature": 0, "ignore_eos": true, "logit_bias": {world.to_string(): 100}}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], " world world world");

    // stream_options.include_usage: a last chunk with no choices and the counts.
    let body = json!({"prompt": "The", "max_tokens": 2, "stream": true, "stream_options": {"include_usage": true}}).to_string();
    let (st, sse) = http(p, "POST", "/v1/completions", &body, &[]);
    assert_eq!(st, 200, "{sse}");
    let chunks: Vec<serde_json::Value> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]), "{sse}");
    assert_eq!(last["usage"]["completion_tokens"], 2, "{sse}");

    // What the server cannot honour is refused, never dropped.
    let msgs = json!([{"role": "user", "content": "Hi"}]);
    let cases = [
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 1, "best_of": 3, "echo2": 1}),
            "best_of, echo2",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "logit_bias": {"abc": 1}}),
            "logit_bias",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "presence_penalty": 3}),
            "presence_penalty",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "stream_options": {"include_usage": true}}),
            "stream",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "tool_choice": "required"}),
            "tool_choice",
        ),
    ];
    for (path, body, needle) in cases {
        let (st, r) = post(p, path, body.clone());
        assert_eq!(st, 400, "{body}: {r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains(needle),
            "{body}: {r}"
        );
    }
    for (path, body) in [
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 1, "user": "someone", "response_format": {"type": "text"}, "suffix": null}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "max_tokens": 1, "tool_choice": "none"}),
        ),
    ] {
        let (st, r) = post(p, path, body.clone());
        assert_eq!(st, 200, "{body}: {r}");
    }
}

/// `n` answers per prompt: the j-th is the answer a request with seed + j gets alone, streamed
/// or not; the prompt counts once in the usage.
#[test]
fn n_answers_are_the_seeded_single_answers() {
    use serde_json::json;
    let srv = start("n", &["--max-batch", "4"]);
    let p = srv.port;
    let req = |n: usize, seed: u64| json!({"prompt": "The quick brown fox", "max_tokens": 6, "temperature": 1.0, "seed": seed, "n": n, "ignore_eos": true});
    let (st, r) = post(p, "/v1/completions", req(3, 5));
    assert_eq!(st, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (j, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], j);
        let (_, alone) = post(p, "/v1/completions", req(1, 5 + j as u64));
        assert_eq!(c["text"], alone["choices"][0]["text"], "answer {j}");
    }
    assert_ne!(
        choices[0]["text"], choices[1]["text"],
        "different seeds should sample differently: {r}"
    );
    let (_, one) = post(p, "/v1/completions", req(1, 5));
    assert_eq!(r["usage"]["prompt_tokens"], one["usage"]["prompt_tokens"]);
    assert_eq!(r["usage"]["completion_tokens"], 18);

    // Chat, streamed: the deltas of each index add up to that answer unstreamed.
    let chat = |stream: bool| json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 1.0, "seed": 9, "n": 2, "stream": stream});
    let (st, whole) = post(p, "/v1/chat/completions", chat(false));
    assert_eq!(st, 200, "{whole}");
    let (st, sse) = http(
        p,
        "POST",
        "/v1/chat/completions",
        &chat(true).to_string(),
        &[],
    );
    assert_eq!(st, 200, "{sse}");
    let mut texts = [String::new(), String::new()];
    for d in sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
    {
        let c: serde_json::Value = serde_json::from_str(d).unwrap();
        let i = c["choices"][0]["index"].as_u64().unwrap() as usize;
        texts[i] += c["choices"][0]["delta"]["content"].as_str().unwrap_or("");
    }
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(whole["choices"][i]["message"]["content"], *t, "answer {i}");
    }
    for n in [0, 5] {
        let (st, r) = post(p, "/v1/completions", req(n, 1));
        assert_eq!(st, 400, "{r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains("`n`"),
            "{r}"
        );
    }
}

/// A sample of `/metrics` (Prometheus text), by name and labels.
fn metric(port: u16, name: &str) -> f64 {
    let (st, body) = http(port, "GET", "/metrics", "", &[]);
    assert_eq!(st, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in {body}"))
        .parse()
        .unwrap()
}

/// `/metrics` counts what was served: tokens in and out as the responses' usage reports them,
/// requests by how they ended, the batch now.
#[test]
fn metrics_count_what_was_served() {
    use serde_json::json;
    let srv = start("metrics", &["--api-key", "k"]);
    let p = srv.port;
    let auth = [("Authorization", "Bearer k")];
    let (mut prompt, mut generated) = (0.0, 0.0);
    for (text, max) in [("The quick brown fox", 3), ("Hello", 4)] {
        let body = json!({"prompt": text, "max_tokens": max, "temperature": 0, "ignore_eos": true})
            .to_string();
        let (st, r) = http(p, "POST", "/v1/completions", &body, &auth);
        assert_eq!(st, 200, "{r}");
        let r: serde_json::Value = serde_json::from_str(&r).unwrap();
        prompt += r["usage"]["prompt_tokens"].as_f64().unwrap();
        generated += r["usage"]["completion_tokens"].as_f64().unwrap();
    }
    // Open without the key, like /health.
    assert_eq!(metric(p, "hymba_prompt_tokens_total"), prompt);
    assert_eq!(metric(p, "hymba_generation_tokens_total"), generated);
    assert_eq!(
        metric(p, "hymba_requests_finished_total{reason=\"length\"}"),
        2.0
    );
    assert_eq!(
        metric(p, "hymba_requests_finished_total{reason=\"cancelled\"}"),
        0.0
    );
    // A gauge: the batch empties just after the last answer went out.
    let t = Instant::now();
    while metric(p, "hymba_requests_running") != 0.0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the batch did not empty"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(metric(p, "hymba_engine_steps_total") >= generated);
    assert!(metric(p, "hymba_engine_step_seconds_total") > 0.0);
}

/// A prompt that extends a finished request's tokens resumes from its cache: the usage says how
/// many prompt tokens were resumed (OpenAI's `prompt_tokens_details.cached_tokens`), and so do
/// the metrics; `--prompt-cache-mb 0` turns it off.
#[test]
fn extended_prompt_reports_its_cached_tokens() {
    use serde_json::json;
    for (tag, extra, hit) in [
        ("pc-on", &[][..], true),
        ("pc-off", &["--prompt-cache-mb", "0"][..], false),
    ] {
        let srv = start(tag, extra);
        let first: Vec<u32> = vec![1, 450, 4996, 17354, 1701];
        // One token: it is never fed, so the cache holds exactly the prompt.
        let (st, r) = post(
            srv.port,
            "/v1/completions",
            json!({"prompt": first, "max_tokens": 1, "temperature": 0}),
        );
        assert_eq!(st, 200, "{r}");
        assert_eq!(r["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        let mut next = first.clone();
        next.extend([29871, 13, 450]);
        let (st, r) = post(
            srv.port,
            "/v1/completions",
            json!({"prompt": next, "max_tokens": 3, "temperature": 0}),
        );
        assert_eq!(st, 200, "{r}");
        let cached = if hit { first.len() } else { 0 };
        assert_eq!(
            r["usage"]["prompt_tokens_details"]["cached_tokens"], cached,
            "{tag}: {r}"
        );
        assert_eq!(r["usage"]["prompt_tokens"], next.len());
        assert_eq!(
            metric(srv.port, "hymba_prompt_cache_hits_total"),
            hit as u8 as f64
        );
        assert_eq!(
            metric(srv.port, "hymba_prompt_cache_tokens_total"),
            cached as f64
        );
        // Two answers to a new prompt, streamed with usage: the prompt counts once, as the
        // first answer computed it (the second waits and resumes it whole), as a non-streamed
        // answer counts it.
        let body = json!({"prompt": [1, 7, 8, 9, 10], "max_tokens": 2, "n": 2, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}).to_string();
        let (st, sse) = http(srv.port, "POST", "/v1/completions", &body, &[]);
        assert_eq!(st, 200, "{sse}");
        let last: serde_json::Value = sse
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .rfind(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .unwrap();
        assert_eq!(
            last["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
            "{tag}: {sse}"
        );
        let hits = metric(srv.port, "hymba_prompt_cache_hits_total");
        assert_eq!(hits, 2.0 * hit as u8 as f64, "{tag}");
        assert_eq!(last["usage"]["completion_tokens"], 4, "{sse}");
    }
}

/// Two chats with one system prompt: the second resumes where the conversation before its last
/// message ends (the system turn, as `/tokenize` renders it), which the first kept.
#[test]
fn chats_share_their_system_prompt() {
    use serde_json::json;
    let srv = start("pc-chat", &[]);
    let system =
        json!({"role": "system", "content": "You answer in one word. Be brief and exact."});
    let mut cached = Vec::new();
    for question in ["Hello there", "And the sea?"] {
        let body = json!({"messages": [system, {"role": "user", "content": question}], "max_tokens": 2, "temperature": 0});
        let (st, r) = post(srv.port, "/v1/chat/completions", body);
        assert_eq!(st, 200, "{r}");
        cached.push(
            r["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap(),
        );
    }
    let (st, t) = post(
        srv.port,
        "/tokenize",
        json!({"messages": [system], "add_generation_prompt": false}),
    );
    assert_eq!(st, 200, "{t}");
    assert_eq!(cached, [0, t["count"].as_u64().unwrap()]);
}

/// `chat_template_kwargs` reach the template: Hymba's Instruct template shows `contexts`
/// (retrieved passages) in the system turn.
#[test]
fn chat_template_kwargs_reach_the_template() {
    use serde_json::json;
    let srv = start("kwargs", &[]);
    let p = srv.port;
    let msgs = json!([{"role": "system", "content": "Answer from the context."}, {"role": "user", "content": "What colour is the sky?"}]);
    let kwargs = json!({"contexts": ["The sky is green."]});
    let (st, t) = post(
        p,
        "/tokenize",
        json!({"messages": msgs, "chat_template_kwargs": kwargs}),
    );
    assert_eq!(st, 200, "{t}");
    let (_, text) = post(p, "/detokenize", json!({"tokens": t["tokens"]}));
    let text = text["prompt"].as_str().unwrap();
    assert!(text.contains("Answer from the context.\n\n<context> The sky is green. </context>\n\n<extra_id_1>User"), "{text}");
    let (st, r) = post(
        p,
        "/v1/chat/completions",
        json!({"messages": msgs, "chat_template_kwargs": kwargs, "max_tokens": 2}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["usage"]["prompt_tokens"], t["count"]);
    let (st, r) = post(
        p,
        "/v1/chat/completions",
        json!({"messages": msgs, "chat_template_kwargs": {"messages": []}}),
    );
    assert_eq!(st, 400, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`messages`"),
        "{r}"
    );
    // `tools` reaches the template on /tokenize as on a chat request; unknown fields are refused.
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let (st, t) = post(p, "/tokenize", json!({"messages": msgs, "tools": tools}));
    assert_eq!(st, 200, "{t}");
    let (_, plain) = post(p, "/tokenize", json!({"messages": msgs}));
    assert_ne!(t["tokens"], plain["tokens"], "the template shows the tools");
    let (_, text) = post(p, "/detokenize", json!({"tokens": t["tokens"]}));
    assert!(
        text["prompt"].as_str().unwrap().contains("get_weather"),
        "{text}"
    );
    let (st, r) = post(
        p,
        "/v1/chat/completions",
        json!({"messages": msgs, "tools": tools, "max_tokens": 2}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["usage"]["prompt_tokens"], t["count"]);
    for (path, body) in [
        ("/tokenize", json!({"prompt": "Hi", "frobnicate": 1})),
        ("/detokenize", json!({"tokens": [1], "frobnicate": 1})),
    ] {
        let (st, r) = post(p, path, body);
        assert_eq!(st, 400, "{path}: {r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .contains("frobnicate"),
            "{r}"
        );
    }
}

/// `--chat-template FILE` replaces the checkpoint's template (for base models that ship none);
/// a broken one stops the server at start, naming the file.
#[test]
fn chat_template_file_replaces_the_checkpoints() {
    use serde_json::json;
    let dir = std::env::temp_dir().join(format!("hymba-serve-{}-templates", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (good, bad) = (dir.join("good.jinja"), dir.join("bad.jinja"));
    std::fs::write(&good, "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}").unwrap();
    std::fs::write(&bad, "{% for m in messages %").unwrap();
    let srv = start("tmpl", &["--chat-template", good.to_str().unwrap()]);
    let (_, t) = post(
        srv.port,
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "Hi there"}]}),
    );
    let (_, d) = post(srv.port, "/detokenize", json!({"tokens": t["tokens"]}));
    assert_eq!(d["prompt"], "[user] Hi there\n[assistant]");
    // Settings that cannot serve stop the server at start, naming the option.
    for (args, needle) in [
        (["--chat-template", bad.to_str().unwrap()], "bad.jinja"),
        (["--max-context", "0"], "--max-context"),
        (["--max-context", "100000000"], "max_position_embeddings"),
        (["--max-batch", "0"], "--max-batch"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_hymba"))
            .args(["serve", "--model", srv.dir.to_str().unwrap(), "--port", "0"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn api_key_is_required_when_set() {
    let srv = start("key", &["--api-key", "sekret"]);
    let body = serde_json::json!({"prompt": "x", "max_tokens": 1}).to_string();
    assert_eq!(http(srv.port, "POST", "/v1/completions", &body, &[]).0, 401);
    assert_eq!(
        http(
            srv.port,
            "POST",
            "/v1/completions",
            &body,
            &[("Authorization", "Bearer wrong")]
        )
        .0,
        401
    );
    assert_eq!(
        http(
            srv.port,
            "POST",
            "/v1/completions",
            &body,
            &[("Authorization", "Bearer sekret")]
        )
        .0,
        200
    );
}

/// The key can come from the environment or a file (out of the process list); an empty or
/// unreadable key file is refused by name.
#[test]
fn api_key_from_env_or_file() {
    let body = serde_json::json!({"prompt": "x", "max_tokens": 1}).to_string();
    let status = |port: u16, key: &str| {
        let auth = format!("Bearer {key}");
        http(
            port,
            "POST",
            "/v1/completions",
            &body,
            &[("Authorization", &auth)],
        )
        .0
    };
    let srv = start_with("key-env", &[], &[("HYMBA_API_KEY", "from-env")]);
    assert_eq!(status(srv.port, "from-env"), 200);
    assert_eq!(status(srv.port, "from-en"), 401);
    assert_eq!(status(srv.port, "from-envv"), 401);
    drop(srv);
    let file = std::env::temp_dir().join(format!("hymba-key-{}", std::process::id()));
    std::fs::write(&file, "from-file\n").unwrap();
    let srv = start("key-file", &["--api-key-file", file.to_str().unwrap()]);
    assert_eq!(status(srv.port, "from-file"), 200);
    assert_eq!(status(srv.port, "from-env"), 401);
    drop(srv);
    std::fs::write(&file, "\n").unwrap();
    let missing = file.with_extension("missing");
    let dir = model_dir("key-bad");
    for (f, needle) in [
        (&file, "the API key is empty"),
        (&missing, "reading the API key file"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_hymba"))
            .env_remove("HYMBA_API_KEY")
            .args(["serve", "--model", dir.to_str().unwrap(), "--port", "0"])
            .args(["--api-key-file", f.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(needle) && err.contains(f.file_name().unwrap().to_str().unwrap()),
            "{err}"
        );
    }
    std::fs::remove_file(&file).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// `GET /tokenizer_info` gives what a client tokenizing through the server reads (lm-eval's
/// remote tokenizer: the special tokens, which `/tokenize` then turns into their ids, and the
/// chat template), from the checkpoint's tokenizer_config.json or a `--chat-template` file.
#[test]
fn tokenizer_info_serves_a_remote_tokenizer() {
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shared().join("hymba-1.5b/tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    let vocab: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shared().join("hymba-1.5b/tokenizer.json")).unwrap(),
    )
    .unwrap();
    let added_id = |content: &str| {
        vocab["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["content"] == content)
            .unwrap_or_else(|| panic!("{content} not an added token"))["id"]
            .clone()
    };
    let srv = start("tinfo", &["--api-key", "k"]);
    let key = [("Authorization", "Bearer k")];
    assert_eq!(http(srv.port, "GET", "/tokenizer_info", "", &[]).0, 401);
    let (st, b) = http(srv.port, "GET", "/tokenizer_info", "", &key);
    assert_eq!(st, 200, "{b}");
    let info: serde_json::Value = serde_json::from_str(&b).unwrap();
    for k in [
        "bos_token",
        "eos_token",
        "pad_token",
        "tokenizer_class",
        "chat_template",
    ] {
        assert_eq!(info[k], cfg[k], "{k}");
    }
    for k in ["bos_token", "eos_token"] {
        let tok = info[k].as_str().unwrap();
        let body = serde_json::json!({"prompt": tok, "add_special_tokens": false}).to_string();
        let (st, r) = http(srv.port, "POST", "/tokenize", &body, &key);
        assert_eq!(st, 200, "{r}");
        let r: serde_json::Value = serde_json::from_str(&r).unwrap();
        assert_eq!(r["tokens"], serde_json::json!([added_id(tok)]), "{k}");
    }
    drop(srv);
    let file = std::env::temp_dir().join(format!("hymba-tmpl-{}.jinja", std::process::id()));
    let tmpl = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}";
    std::fs::write(&file, tmpl).unwrap();
    let srv = start("tinfo-file", &["--chat-template", file.to_str().unwrap()]);
    let (_, b) = http(srv.port, "GET", "/tokenizer_info", "", &[]);
    let info: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(info["chat_template"], tmpl);
    std::fs::remove_file(file).unwrap();
}

/// Serving beyond loopback without a key warns that anyone who reaches it can use it.
#[test]
fn open_server_without_key_warns() {
    let dir = model_dir("open");
    let mut child = spawn(&dir, &["--host", "0.0.0.0"], &[]);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let second = lines.next().unwrap().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(dir).unwrap();
    assert!(first.contains("serving"), "{first}");
    assert!(second.contains("without an API key"), "{second}");
}

/// Sixteen concurrent greedy requests of different lengths give the tokens each gives alone.
#[test]
fn concurrent_greedy_requests_match_sequential() {
    let srv = start("batch", &["--max-batch", "16"]);
    let port = srv.port;
    let prompts: Vec<serde_json::Value> = (0..16)
        .map(|i| {
            serde_json::json!((0..2 + i)
                .map(|j| 1 + (j * 97 + i * 13) % 30000)
                .collect::<Vec<_>>())
        })
        .collect();
    let req = |i: usize| serde_json::json!({"prompt": prompts[i], "max_tokens": 3 + i % 7, "temperature": 0, "ignore_eos": true});
    let alone: Vec<serde_json::Value> = (0..16)
        .map(|i| post(port, "/v1/completions", req(i)).1["choices"][0]["text"].clone())
        .collect();
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let body = req(i);
            std::thread::spawn(move || post(port, "/v1/completions", body))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (st, r) = h.join().unwrap();
        assert_eq!(st, 200, "{r}");
        assert_eq!(r["choices"][0]["text"], alone[i], "request {i}");
    }
}

/// A client that hangs up mid-stream frees its sequence.
#[test]
fn disconnect_mid_stream_frees_the_sequence() {
    let srv = start("cancel", &[]);
    let body = serde_json::json!({"prompt": "Once", "max_tokens": 200, "stream": true, "ignore_eos": true}).to_string();
    let mut s = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let (_, h) = http(srv.port, "GET", "/health", "", &[]);
    assert!(h.contains("\"requests_in_flight\":1"), "{h}");
    drop(s);
    let t = Instant::now();
    loop {
        let (_, h) = http(srv.port, "GET", "/health", "", &[]);
        if h.contains("\"requests_in_flight\":0") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the sequence was not freed: {h}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        metric(
            srv.port,
            "hymba_requests_finished_total{reason=\"cancelled\"}"
        ),
        1.0
    );
}

/// The interpreter with the `openai` package: HYMBA_TEST_PYTHON (what `.ci/run` sets), else a
/// venv under target/ made on first use (`python3 -m venv`, `pip install openai`); a machine that
/// cannot make it fails the test saying what is missing.
fn python_with_openai() -> PathBuf {
    if let Some(p) = std::env::var_os("HYMBA_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-venv");
    let python = venv.join("bin/python");
    let ready = venv.join("openai-installed");
    if ready.exists() {
        return python;
    }
    let run = |cmd: &mut Command, what: &str| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e} (the openai client test needs python3 with venv and pip, or HYMBA_TEST_PYTHON)"));
        assert!(
            out.status.success(),
            "{what} failed (the openai client test needs python3 with venv and pip, and the network once, or HYMBA_TEST_PYTHON):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv target/test-venv",
    );
    run(
        Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "openai",
        ]),
        "pip install openai",
    );
    std::fs::write(&ready, b"").unwrap();
    python
}

/// The real `openai` Python client against the server (streaming and not, chat and
/// completions).
#[test]
fn openai_python_client() {
    let python = python_with_openai();
    let srv = start("openai", &["--api-key", "k"]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(python)
        .arg(script)
        .arg(format!("http://127.0.0.1:{}/v1", srv.port))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai client check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SIGTERM mid-stream: the server takes no new work, the running stream finishes whole (every
/// answer to its end, then [DONE]), and the process exits 0.
#[cfg(unix)]
#[test]
fn sigterm_lets_running_streams_finish() {
    use serde_json::json;
    let mut srv = start("sigterm", &["--shutdown-grace", "120"]);
    let n = 16;
    let body = json!({"prompt": "The quick brown fox", "max_tokens": 240, "temperature": 0, "ignore_eos": true, "stream": true, "n": n}).to_string();
    let mut s = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let req = format!("POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).unwrap();
    let (mut raw, mut buf) = (Vec::new(), [0u8; 4096]);
    while !String::from_utf8_lossy(&raw).contains("data: {") {
        let got = s.read(&mut buf).unwrap();
        assert!(got > 0, "the stream ended before its first event");
        raw.extend_from_slice(&buf[..got]);
    }
    let at_signal = raw.len();
    let kill = Command::new("kill")
        .args(["-TERM", &srv.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text[at_signal..].matches("data: {").count() > 0,
        "the stream had ended before the signal"
    );
    assert!(
        text.contains("data: [DONE]"),
        "the stream was cut: {}",
        &text[text.len().saturating_sub(300)..]
    );
    assert_eq!(
        text.matches("\"finish_reason\":\"length\"").count(),
        n,
        "every answer ran to max_tokens"
    );
    let status = srv.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}

/// What multiplies a request's work has a limit (server options where users would change it),
/// refused by name beyond it.
#[test]
fn request_limits_are_refused_by_name() {
    use serde_json::json;
    let srv = start(
        "limits",
        &[
            "--max-logprobs",
            "3",
            "--max-prompts",
            "2",
            "--max-body-bytes",
            "4096",
        ],
    );
    let p = srv.port;
    let refused = |path: &str, body: serde_json::Value, field: &str| {
        let (st, r) = post(p, path, body);
        assert_eq!(st, 400, "{path}: {r}");
        assert_eq!(r["error"]["param"], field, "{r}");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(&format!("`{field}`")) || msg.contains(field),
            "{msg}"
        );
    };
    refused(
        "/v1/completions",
        json!({"prompt": "Hi", "max_tokens": 1, "logprobs": 4}),
        "logprobs",
    );
    refused(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "logprobs": true, "top_logprobs": 4}),
        "top_logprobs",
    );
    refused(
        "/v1/completions",
        json!({"prompt": ["a", "b", "c"], "max_tokens": 1}),
        "prompt",
    );
    let stops: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    refused(
        "/v1/completions",
        json!({"prompt": "Hi", "max_tokens": 1, "stop": stops}),
        "stop",
    );
    refused(
        "/v1/completions",
        json!({"prompt": "Hi", "max_tokens": 1, "stop": "x".repeat(300)}),
        "stop",
    );
    // At the limits: answered.
    let (st, r) = post(
        p,
        "/v1/completions",
        json!({"prompt": ["a", "b"], "max_tokens": 1, "logprobs": 3}),
    );
    assert_eq!(st, 200, "{r}");
    // A body over --max-body-bytes: 413.
    let big = json!({"prompt": "x".repeat(5000), "max_tokens": 1}).to_string();
    let (st, _) = http(p, "POST", "/v1/completions", &big, &[]);
    assert_eq!(st, 413);
}

/// The text a streamed completion or chat answer carries, from its server-sent events.
fn streamed_text(body: &str) -> String {
    let mut text = String::new();
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value =
            serde_json::from_str(data).unwrap_or_else(|_| panic!("not JSON: {data}"));
        let c = &v["choices"][0];
        text += c["text"]
            .as_str()
            .or(c["delta"]["content"].as_str())
            .unwrap_or("");
    }
    text
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb << 10
}

/// What real clients do, at once: 64 clients send 2,000 requests mixing completions and chat,
/// streamed and not, `n > 1`, logprobs, streams dropped mid-way, malformed and oversized bodies
/// and wrong keys. No answer is a 5xx; every well-formed greedy request gets the answer it gets
/// alone; the queue stays bounded (429 beyond it, which the clients retry; a burst of four times
/// the batch at once, first, must meet it whatever the machine's speed); the server's
/// resident memory does not grow from the first half of the run to the second (no leak; the
/// prompt cache, kept to 2 MB here, is full by then and evicting).
#[test]
fn load_of_mixed_clients() {
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    const CLIENTS: usize = 64;
    const REQUESTS: usize = 2000;
    const MAX_BATCH: usize = 8;
    let srv = start(
        "load",
        &[
            "--max-batch",
            &MAX_BATCH.to_string(),
            "--api-key",
            "k",
            "--max-body-bytes",
            "8192",
            "--prompt-cache-mb",
            "2",
        ],
    );
    let (port, pid) = (srv.port, srv.child.id());
    let key = [("Authorization", "Bearer k")];
    let prompts: Vec<String> = (0..12)
        .map(|i| {
            format!(
                "Story {i}: the {} went",
                ["cat", "river", "old man", "ship"][i % 4]
            )
        })
        .collect();
    let complete = |i: usize, stream: bool| {
        json!({"prompt": prompts[i % 12], "max_tokens": 2 + i % 5, "temperature": 0,
               "ignore_eos": true, "stream": stream})
    };
    let chat = |i: usize, stream: bool| {
        json!({"messages": [{"role": "user", "content": prompts[i % 12]}],
               "max_tokens": 2 + i % 5, "temperature": 0, "stream": stream})
    };
    let answer = |path: &str, body: &serde_json::Value| -> String {
        let (st, b) = http(port, "POST", path, &body.to_string(), &key);
        assert_eq!(st, 200, "{b}");
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        let c = &v["choices"][0];
        c["text"]
            .as_str()
            .or(c["message"]["content"].as_str())
            .unwrap()
            .to_string()
    };
    // Each greedy request alone: prompt i % 12 with 2 + i % 5 tokens repeats every 60.
    let alone: Vec<(String, String)> = (0..60)
        .map(|i| {
            (
                answer("/v1/completions", &complete(i, false)),
                answer("/v1/chat/completions", &chat(i, false)),
            )
        })
        .collect();

    // The queue's bound, whatever the machine's speed: four times the batch at once, released
    // together, each long enough to still be running when the others arrive.
    let burst = 4 * MAX_BATCH;
    let gate = Arc::new(std::sync::Barrier::new(burst));
    let refused: usize = (0..burst)
        .map(|_| {
            let gate = gate.clone();
            let body = json!({"prompt": prompts[0], "max_tokens": 64, "ignore_eos": true,
                              "temperature": 0})
            .to_string();
            std::thread::spawn(move || {
                gate.wait();
                let (st, b) = http(
                    port,
                    "POST",
                    "/v1/completions",
                    &body,
                    &[("Authorization", "Bearer k")],
                );
                assert!(st == 200 || st == 429, "burst: {st} {b}");
                (st == 429) as usize
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .sum();
    assert!(
        refused > 0,
        "{burst} requests at once never found the queue full"
    );

    let next = Arc::new(AtomicUsize::new(0));
    let busy = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let tokens = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The queue as /health sees it, sampled throughout.
    let most_in_flight = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut most = 0;
            while !done.load(Ordering::Relaxed) {
                let (_, h) = http(port, "GET", "/health", "", &[]);
                let v: serde_json::Value = serde_json::from_str(&h).unwrap();
                most = most.max(v["requests_in_flight"].as_u64().unwrap() as usize);
                std::thread::sleep(Duration::from_millis(5));
            }
            most
        })
    };
    let run_half = |upto: usize| {
        let t0 = Instant::now();
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (next, busy, latencies, tokens) =
                    (next.clone(), busy.clone(), latencies.clone(), tokens.clone());
                let (prompts, alone) = (prompts.clone(), alone.clone());
                std::thread::spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= upto {
                        return;
                    }
                    let k = i % 60;
                    let complete = |stream: bool| {
                        json!({"prompt": prompts[k % 12], "max_tokens": 2 + k % 5,
                               "temperature": 0, "ignore_eos": true, "stream": stream})
                    };
                    let chat = |stream: bool| {
                        json!({"messages": [{"role": "user", "content": prompts[k % 12]}],
                               "max_tokens": 2 + k % 5, "temperature": 0, "stream": stream})
                    };
                    // (path, body, headers' key, what the answer must be)
                    enum Want {
                        Text(String),
                        Streamed(String),
                        Choices(usize),
                        Logprobs(String),
                        Status(u16),
                        Dropped,
                    }
                    let good = "Bearer k";
                    let (path, body, auth, want) = match i % 16 {
                        0..=4 => ("/v1/completions", complete(false).to_string(), good, Want::Text(alone[k].0.clone())),
                        5..=7 => ("/v1/completions", complete(true).to_string(), good, Want::Streamed(alone[k].0.clone())),
                        8 => ("/v1/chat/completions", chat(false).to_string(), good, Want::Text(alone[k].1.clone())),
                        9 => ("/v1/chat/completions", chat(true).to_string(), good, Want::Streamed(alone[k].1.clone())),
                        10 => ("/v1/completions",
                               json!({"prompt": prompts[k % 12], "max_tokens": 3, "n": 3, "temperature": 0.9, "seed": i}).to_string(),
                               good, Want::Choices(3)),
                        11 => ("/v1/completions",
                               json!({"prompt": prompts[k % 12], "max_tokens": 2 + k % 5, "temperature": 0,
                                      "ignore_eos": true, "logprobs": 2}).to_string(),
                               good, Want::Logprobs(alone[k].0.clone())),
                        12 => ("/v1/completions",
                               json!({"prompt": prompts[k % 12], "max_tokens": 64, "ignore_eos": true, "stream": true}).to_string(),
                               good, Want::Dropped),
                        13 => ("/v1/completions", "{\"prompt\": \"Hi\", \"max_tok".to_string(), good, Want::Status(400)),
                        14 => ("/v1/completions", json!({"prompt": "x".repeat(9000), "max_tokens": 1}).to_string(), good, Want::Status(413)),
                        _ => ("/v1/chat/completions", chat(false).to_string(), "Bearer wrong", Want::Status(401)),
                    };
                    let t = Instant::now();
                    if let Want::Dropped = want {
                        // Read the head and one event, then hang up.
                        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                        write!(s, "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
                        let (mut buf, mut n) = ([0u8; 256], 0);
                        while n < 12 {
                            let got = s.read(&mut buf[n..]).unwrap();
                            assert!(got > 0, "request {i}: closed after {n} bytes");
                            n += got;
                        }
                        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                        assert!(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.1 429"), "{head}");
                        continue;
                    }
                    let (st, b) = loop {
                        let (st, b) = http(port, "POST", path, &body, &[("Authorization", auth)]);
                        assert!(st < 500, "request {i}: {st} {b}");
                        if st != 429 {
                            break (st, b);
                        }
                        busy.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(2 + (i % 7) as u64));
                    };
                    let v = || serde_json::from_str::<serde_json::Value>(&b).unwrap_or_else(|_| panic!("request {i}: {b}"));
                    match want {
                        Want::Status(s) => assert_eq!(st, s, "request {i}: {b}"),
                        Want::Text(text) => {
                            assert_eq!(st, 200, "request {i}: {b}");
                            let v = v();
                            let c = &v["choices"][0];
                            let got = c["text"].as_str().or(c["message"]["content"].as_str()).unwrap();
                            assert_eq!(got, text, "request {i}");
                            tokens.fetch_add(v["usage"]["completion_tokens"].as_u64().unwrap() as usize, Ordering::Relaxed);
                        }
                        Want::Streamed(text) => {
                            assert_eq!(st, 200, "request {i}: {b}");
                            assert_eq!(streamed_text(&b), text, "request {i}");
                            assert!(b.trim_end().ends_with("data: [DONE]"), "request {i}: {b}");
                        }
                        Want::Choices(n) => {
                            assert_eq!(st, 200, "request {i}: {b}");
                            let v = v();
                            assert_eq!(v["choices"].as_array().unwrap().len(), n, "request {i}: {b}");
                            assert_eq!(v["usage"]["completion_tokens"], 3 * n, "request {i}: {b}");
                        }
                        Want::Logprobs(text) => {
                            assert_eq!(st, 200, "request {i}: {b}");
                            let v = v();
                            let c = &v["choices"][0];
                            assert_eq!(c["text"], text.as_str(), "request {i}");
                            let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
                            assert_eq!(c["logprobs"]["token_logprobs"].as_array().unwrap().len(), n, "request {i}");
                            assert_eq!(c["logprobs"]["top_logprobs"].as_array().unwrap().len(), n, "request {i}");
                        }
                        Want::Dropped => unreachable!(),
                    }
                    latencies.lock().unwrap().push(t.elapsed().as_secs_f64());
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        t0.elapsed().as_secs_f64()
    };
    let first = run_half(REQUESTS / 2);
    // Dropped streams end on the server's next step: let it settle before reading its memory.
    std::thread::sleep(Duration::from_millis(300));
    let rss_half = rss(pid);
    let second = run_half(REQUESTS);
    std::thread::sleep(Duration::from_millis(300));
    let rss_end = rss(pid);
    done.store(true, Ordering::Relaxed);
    let most = most_in_flight.join().unwrap();

    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize] * 1e3;
    let retried = busy.load(Ordering::Relaxed);
    eprintln!(
        "load: {REQUESTS} requests from {CLIENTS} clients in {:.1} s; latency p50 {:.1} ms, p99 {:.1} ms (answered requests); {:.0} generated tokens/s (non-streamed greedy); {retried} answers of 429 retried ({refused} of a burst of {burst} refused); at most {most} requests in flight; resident memory {} MB after half, {} MB after all",
        first + second,
        pct(0.5),
        pct(0.99),
        tokens.load(Ordering::Relaxed) as f64 / (first + second),
        rss_half >> 20,
        rss_end >> 20,
    );
    assert!(most <= 2 * MAX_BATCH, "{most} requests in flight");
    assert!(
        rss_end <= rss_half + rss_half / 20 + (4 << 20),
        "resident memory grew from {} to {} bytes",
        rss_half,
        rss_end
    );
    let (_, h) = http(port, "GET", "/health", "", &[]);
    assert!(h.contains("\"requests_in_flight\":0"), "{h}");
}
