//! Helpers shared by the command-line test files.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub fn shared() -> PathBuf {
    std::env::var_os("HYMBA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
}

pub fn fixture() -> PathBuf {
    shared().join("fixtures/tiny-a")
}

pub fn temp_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "hymba-cli-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `hymba`; returns (exit code, stdout, stderr).
pub fn hymba(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hymba"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// A failing run: exit code 1, `needles` in the message, no panic.
pub fn assert_fails(args: &[&str], needles: &[&str]) {
    let (code, _, err) = hymba(args);
    assert_eq!(
        code, 1,
        "{args:?} should fail with exit code 1; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr should name {n:?}: {err}");
    }
}
