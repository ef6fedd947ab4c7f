//! A model missing from the Hugging Face hub cache, downloaded into that cache (hf-hub), so that
//! `--model ORG/NAME` works the first time as it does in transformers. `HF_HUB_OFFLINE=1` turns
//! it off; `HF_ENDPOINT` names another hub (a mirror); `HF_TOKEN` or the token file of
//! `huggingface-cli login` is sent where set.

use anyhow::{anyhow, Context, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use std::io::IsTerminal;
use std::path::Path;

/// Whether the environment forbids the network (`HF_HUB_OFFLINE`, as huggingface_hub reads it).
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// The files of a repo the engine reads: config, tokenizer and generation files (JSON at the
/// top level) and the weights (safetensors, one file or shards with their index).
fn wanted(name: &str) -> bool {
    !name.contains('/') && (name.ends_with(".json") || name.ends_with(".safetensors"))
}

/// Downloads what the engine reads of `repo` at `revision` (default `main`) into the hub cache
/// `root`, laid out as the hub's own clients lay it out (blobs, a snapshot of links, the ref).
pub fn download(repo: &str, revision: Option<&str>, root: &Path) -> Result<()> {
    let mut builder = ApiBuilder::from_cache(Cache::new(root.to_path_buf()))
        .with_progress(std::io::stderr().is_terminal());
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().context("starting the hub client")?;
    let rev = revision.unwrap_or("main");
    let remote = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        rev.to_string(),
    ));
    let info = remote
        .info()
        .with_context(|| format!("asking the hub for {repo} at revision `{rev}`"))?;
    let files: Vec<&str> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.as_str())
        .filter(|f| wanted(f))
        .collect();
    if !files.contains(&"config.json") {
        return Err(anyhow!(
            "{repo} at revision `{rev}` has no config.json (files: {})",
            info.siblings
                .iter()
                .map(|s| s.rfilename.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    eprintln!(
        "downloading {repo} (revision {rev}, {} files) into {}",
        files.len(),
        root.display()
    );
    for f in files {
        remote
            .download(f)
            .with_context(|| format!("downloading {f} of {repo}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_the_engine_reads_is_fetched() {
        for f in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
        ] {
            assert!(wanted(f), "{f}");
        }
        for f in [
            "README.md",
            "modeling_hymba.py",
            "images/figure.png",
            "onnx/model.json",
            "pytorch_model.bin",
        ] {
            assert!(!wanted(f), "{f}");
        }
    }
}
