//! `--model ORG/NAME` for a repo missing from the hub cache: downloaded into the cache (as
//! huggingface-cli lays it out) from a hub on loopback that answers what the hub's clients ask
//! (the repo's file list; each file's commit, etag and size from a one-byte range request; the
//! file), then used offline; with `HF_HUB_OFFLINE` set nothing is asked and the error says how
//! to fetch it.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const COMMIT: &str = "5f2d0c1e9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d";

struct Hub {
    endpoint: String,
    requests: Arc<AtomicUsize>,
}

/// Serves `files` of the repo `repo` at revision main (one connection a request).
fn hub(repo: &str, files: Vec<(String, Vec<u8>)>) -> Hub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let (files, repo, count) = (Arc::new(files), repo.to_string(), requests.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            let (files, repo) = (files.clone(), repo.clone());
            std::thread::spawn(move || answer(stream, &repo, &files));
        }
    });
    Hub { endpoint, requests }
}

fn answer(mut stream: TcpStream, repo: &str, files: &[(String, Vec<u8>)]) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = v.trim().strip_prefix("bytes=").map(str::to_string);
            }
        }
    }
    let respond = |stream: &mut TcpStream, status: &str, headers: &[String], body: &[u8]| {
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for h in headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(body);
    };
    if path == format!("/api/models/{repo}/revision/main") {
        let siblings: Vec<_> = files
            .iter()
            .map(|(n, _)| serde_json::json!({ "rfilename": n }))
            .collect();
        let body = serde_json::json!({ "sha": COMMIT, "siblings": siblings }).to_string();
        return respond(
            &mut stream,
            "200 OK",
            &["Content-Type: application/json".into()],
            body.as_bytes(),
        );
    }
    let prefix = format!("/{repo}/resolve/main/");
    let found = path
        .strip_prefix(&prefix)
        .and_then(|name| files.iter().enumerate().find(|(_, (n, _))| n == name));
    let Some((i, (_, data))) = found else {
        return respond(&mut stream, "404 Not Found", &[], b"");
    };
    let (from, to) = match range.as_deref().and_then(|r| r.split_once('-')) {
        Some((a, b)) => (
            a.parse::<usize>().unwrap_or(0),
            b.parse::<usize>()
                .map_or(data.len() - 1, |b| b.min(data.len() - 1)),
        ),
        None => (0, data.len() - 1),
    };
    let headers = [
        format!("ETag: \"{i:064x}\""),
        format!("X-Repo-Commit: {COMMIT}"),
        format!("Content-Range: bytes {from}-{to}/{}", data.len()),
    ];
    respond(
        &mut stream,
        "206 Partial Content",
        &headers,
        &data[from..=to],
    );
}

fn run(args: &[&str], cache: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hymba"))
        .args(args)
        .env("HF_HUB_CACHE", cache)
        .env_remove("HF_HUB_OFFLINE")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn missing_repo_ids_download_into_the_hub_cache() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/default-model");
    let mut files: Vec<(String, Vec<u8>)> = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ]
    .iter()
    .map(|n| (n.to_string(), std::fs::read(model.join(n)).unwrap()))
    .collect();
    files.push(("README.md".into(), b"# not fetched\n".to_vec()));
    let hub = hub("test-org/Tiny", files);
    let cache = temp_dir("hub-download");
    let gen = |m: &str| {
        [
            "generate",
            "--model",
            m,
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "8",
        ]
        .map(String::from)
    };
    let args = gen("test-org/Tiny");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let online = [("HF_ENDPOINT", hub.endpoint.as_str())];
    let (code, got, err) = run(&args, &cache, &online);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("downloading test-org/Tiny"), "{err}");
    let direct = gen(model.to_str().unwrap());
    let direct: Vec<&str> = direct.iter().map(String::as_str).collect();
    let (code, want, err) = run(&direct, &cache, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        got, want,
        "the downloaded model answers as the built-in one"
    );

    // The hub's layout: the ref names the commit, the snapshot links into blobs, only what the
    // engine reads was fetched.
    let repo = cache.join("models--test-org--Tiny");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main"))
            .unwrap()
            .trim(),
        COMMIT
    );
    let snap = repo.join("snapshots").join(COMMIT);
    assert!(snap.join("model.safetensors").is_file());
    #[cfg(unix)]
    assert!(std::fs::symlink_metadata(snap.join("config.json"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(!snap.join("README.md").exists());

    // Present now: used from the cache, nothing asked of the hub.
    let asked = hub.requests.load(Ordering::SeqCst);
    let (code, again, err) = run(&args, &cache, &online);
    assert_eq!(code, 0, "{err}");
    assert_eq!(again, want);
    assert_eq!(hub.requests.load(Ordering::SeqCst), asked);

    // Missing and offline: no request, an error naming where it looked and how to fetch it.
    let (code, _, err) = run(
        &["inspect", "--model", "test-org/Other"],
        &cache,
        &[
            ("HF_ENDPOINT", hub.endpoint.as_str()),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("models--test-org--Other")
            && err.contains("huggingface-cli download test-org/Other"),
        "{err}"
    );
    assert_eq!(hub.requests.load(Ordering::SeqCst), asked);

    // Missing on the hub too: the cache's message and the hub's answer.
    let (code, _, err) = run(&["inspect", "--model", "test-org/Other"], &cache, &online);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("models--test-org--Other") && err.contains("downloading it failed"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&cache);
}
