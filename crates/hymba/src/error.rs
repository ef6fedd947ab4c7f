//! One error type for the engine. Every message names the file, key, tensor or argument at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: invalid JSON: {msg}")]
    Json { path: PathBuf, msg: String },
    /// An unsupported or inconsistent config value; `key` is the config.json key.
    #[error("config.json: `{key}`: {msg}")]
    Config { key: String, msg: String },
    /// A problem with one tensor of a checkpoint.
    #[error("{file}: tensor `{tensor}`: {msg}")]
    Tensor {
        file: String,
        tensor: String,
        msg: String,
    },
    /// A checkpoint file that cannot be read as safetensors.
    #[error("{file}: {msg}")]
    Checkpoint { file: String, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    /// Bad input to the engine: token ids, lengths, sampling options.
    #[error("{0}")]
    Input(String),
    /// A GPU that cannot be used, or failed: no driver, no device, too old, out of memory.
    #[error("GPU: {0}")]
    Device(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }
    pub(crate) fn config(key: &str, msg: impl Into<String>) -> Self {
        Error::Config {
            key: key.to_string(),
            msg: msg.into(),
        }
    }
}

/// Reads a file, naming it in the error.
pub(crate) fn read_to_string(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Parses JSON text, naming the file in the error.
pub(crate) fn parse_json(path: &std::path::Path, text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, then a rename, so a crash
/// never leaves a half-written file where the user expects a complete one.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}
