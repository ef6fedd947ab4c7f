//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// `../shared` beside the repository (CI lays it out the same way).
pub fn shared() -> PathBuf {
    std::env::var_os("HYMBA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
}

pub fn fixture(name: &str) -> PathBuf {
    shared().join("fixtures").join(name)
}

/// The official outputs of a fixture.
pub struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    pub fn load(name: &str) -> Expected {
        let p = fixture(name).join("expected.safetensors");
        Expected {
            bytes: std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        }
    }
    fn view(&self, key: &str) -> (Vec<usize>, Vec<u8>, safetensors::Dtype) {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).unwrap();
        let v = st
            .tensor(key)
            .unwrap_or_else(|_| panic!("expected.safetensors has no {key}"));
        (v.shape().to_vec(), v.data().to_vec(), v.dtype())
    }
    pub fn f32(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        let (s, b, dt) = self.view(key);
        assert_eq!(dt, safetensors::Dtype::F32);
        (
            s,
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        )
    }
    pub fn ids(&self, key: &str) -> Vec<u32> {
        let (_, b, dt) = self.view(key);
        assert_eq!(dt, safetensors::Dtype::I64);
        b.chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect()
    }
}

/// A fresh empty directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "hymba-test-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
