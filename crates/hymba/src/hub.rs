//! Models where Hugging Face users keep them: a repo id (`ORG/NAME`) resolves, offline, to its
//! snapshot in the hub cache that `huggingface-cli download` and transformers fill
//! (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`; inside,
//! `models--ORG--NAME/refs/REVISION` names a commit and `snapshots/COMMIT/` holds the files,
//! symlinks into `blobs/`).

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The hub cache of this environment.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface/hub")))
}

/// Whether `s` reads as a repo id (`ORG/NAME`) rather than a path.
pub fn is_repo_id(s: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!(s.split_once('/'), Some((org, name)) if ok(org) && ok(name))
}

/// A `--model` argument as a directory: `arg` itself when it is one, else the hub cache's
/// snapshot of the repo id `arg` at `revision` (a branch, tag or commit; default `main`).
pub fn resolve(arg: &Path, revision: Option<&str>) -> Result<PathBuf> {
    let s = arg.to_string_lossy();
    if arg.is_dir() || !is_repo_id(&s) {
        if revision.is_some() && !arg.is_dir() {
            return Err(Error::Input(format!(
                "--revision: `{s}` is not a Hugging Face repo id (ORG/NAME)"
            )));
        }
        return Ok(arg.to_path_buf());
    }
    let root = cache_dir().ok_or_else(|| {
        Error::Input(format!(
            "--model {s}: no hub cache (set HF_HUB_CACHE or HF_HOME)"
        ))
    })?;
    resolve_in(&root, &s, revision)
}

/// [`resolve`] of the repo id `repo` in the hub cache `root`.
pub fn resolve_in(root: &Path, repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    let rev = revision.unwrap_or("main");
    let dir = root.join(format!("models--{}", repo.replace('/', "--")));
    let missing = |looked: &Path, what: &str| {
        let fetch = match revision {
            Some(r) => format!("huggingface-cli download {repo} --revision {r}"),
            None => format!("huggingface-cli download {repo}"),
        };
        Error::Input(format!(
            "--model {repo}: {what} ({}); fetch it with `{fetch}`",
            looked.display()
        ))
    };
    if !dir.is_dir() {
        return Err(missing(&dir, "not in the Hugging Face hub cache"));
    }
    let commit = if rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit()) {
        rev.to_string()
    } else {
        let r = dir.join("refs").join(rev);
        std::fs::read_to_string(&r)
            .map_err(|_| missing(&r, &format!("revision `{rev}` not in the cache")))?
            .trim()
            .to_string()
    };
    let snap = dir.join("snapshots").join(&commit);
    if !snap.join("config.json").is_file() {
        return Err(missing(&snap, "the snapshot has no config.json"));
    }
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache laid out as the hub writes it: a ref naming a commit, a snapshot of symlinks into
    /// blobs.
    fn fake_cache(root: &Path) -> String {
        let repo = root.join("models--nvidia--Tiny-Hymba");
        let commit = "0123456789abcdef0123456789abcdef01234567".to_string();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        let snap = repo.join("snapshots").join(&commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{commit}\n")).unwrap();
        std::fs::write(repo.join("blobs/abc"), "{}").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink("../../blobs/abc", snap.join("config.json")).unwrap();
        #[cfg(not(unix))]
        std::fs::copy(repo.join("blobs/abc"), snap.join("config.json")).unwrap();
        commit
    }

    #[test]
    fn repo_ids_resolve_to_their_snapshot() {
        let root = std::env::temp_dir().join(format!("hymba-hub-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let commit = fake_cache(&root);
        let snap = resolve_in(&root, "nvidia/Tiny-Hymba", None).unwrap();
        assert_eq!(
            snap,
            root.join("models--nvidia--Tiny-Hymba/snapshots")
                .join(&commit)
        );
        assert_eq!(
            resolve_in(&root, "nvidia/Tiny-Hymba", Some(&commit)).unwrap(),
            snap
        );
        let e = resolve_in(&root, "nvidia/Tiny-Hymba", Some("v2"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("revision `v2`")
                && e.contains("huggingface-cli download nvidia/Tiny-Hymba --revision v2"),
            "{e}"
        );
        let e = resolve_in(&root, "nvidia/Other", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("models--nvidia--Other")
                && e.contains("huggingface-cli download nvidia/Other"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn paths_are_not_repo_ids() {
        assert!(is_repo_id("nvidia/Hymba-1.5B-Instruct"));
        for p in [
            "./model",
            "/abs/model",
            "model",
            "a/b/c",
            "../x",
            "org/",
            "/x",
        ] {
            assert!(!is_repo_id(p), "{p}");
        }
    }
}
