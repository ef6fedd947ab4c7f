//! Saving and restoring one sequence's state: its K/V stores, SSM and conv states and position
//! (the shared meta prefix is not saved; it is recomputed with the model). Hymba's state is
//! small, so a long conversation resumes without recomputing it. The file is safetensors with
//! a fingerprint of the model, so a state is never restored into a different model (nor into
//! one caching K/V in another element type). K/V are stored in the cache's element type.

use crate::cache::{Cache, KvDtype, KvStore, LayerState};
use crate::error::{Error, Result};
use crate::model::Model;
use half::bf16;
use safetensors::tensor::TensorView;
use safetensors::Dtype as StDtype;
use std::collections::HashMap;
use std::path::Path;

/// FNV-1a over the config and the meta prefix: changes with the architecture and the weights.
pub fn fingerprint(model: &Model) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
    };
    eat(model.config.raw.to_string().as_bytes());
    for kv in &model.meta_prefix().kv {
        for v in kv.k.to_row_major().iter().chain(&kv.v.to_row_major()) {
            eat(&v.to_le_bytes());
        }
    }
    format!("{h:016x}")
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// K/V values in the cache's element type: a bf16 cache is saved as bf16 (exactly, in half the
/// bytes of widening it).
fn kv_tensor(v: &[f32], dtype: KvDtype) -> (StDtype, Vec<u8>) {
    match dtype {
        KvDtype::F32 => (StDtype::F32, f32_bytes(v)),
        KvDtype::BF16 => (
            StDtype::BF16,
            v.iter()
                .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
                .collect(),
        ),
    }
}

/// Writes `cache` and the caller's `extra` text (e.g. a conversation as JSON) to `path`,
/// atomically.
pub fn save(model: &Model, cache: &Cache, extra: &str, path: &Path) -> Result<()> {
    let mut named: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (g, store) in cache.kv.iter().enumerate() {
        // Saved row-major, as the rows were computed: the file does not depend on the layout.
        let (kv, pos) = match store {
            KvStore::Global { kv, .. } => (kv, None),
            KvStore::Window { kv, pos, .. } => (kv, Some(pos)),
        };
        for (name, rows) in [("k", &kv.k), ("v", &kv.v)] {
            let values = rows.to_row_major();
            let (dtype, bytes) = kv_tensor(&values, rows.dtype());
            named.push((format!("kv.{g}.{name}"), dtype, vec![values.len()], bytes));
        }
        if let Some(p) = pos {
            named.push((
                format!("kv.{g}.pos"),
                StDtype::I64,
                vec![p.len()],
                p.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect(),
            ));
        }
    }
    for (l, s) in cache.states.iter().enumerate() {
        named.push((
            format!("state.{l}.ssm"),
            StDtype::F32,
            vec![s.ssm.len()],
            f32_bytes(&s.ssm),
        ));
        named.push((
            format!("state.{l}.conv"),
            StDtype::F32,
            vec![s.conv.len()],
            f32_bytes(&s.conv),
        ));
    }
    let views = named
        .iter()
        .map(|(n, dt, s, b)| TensorView::new(*dt, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    let meta: HashMap<String, String> = [
        ("hymba_session".to_string(), "1".to_string()),
        ("fingerprint".to_string(), fingerprint(model)),
        ("pos".to_string(), cache.pos.to_string()),
        ("kv_cache".to_string(), cache.kv_dtype().to_string()),
        ("extra".to_string(), extra.to_string()),
    ]
    .into();
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    crate::error::write_atomic(path, &bytes)
}

/// Reads a state written by [`save`] for this model; returns it and the `extra` text.
pub fn load(model: &Model, path: &Path) -> Result<(Cache, String)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::Checkpoint {
        file: path.display().to_string(),
        msg,
    };
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a session file: {e}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("hymba_session").map(String::as_str) != Some("1") {
        return Err(bad("not a hymba session file".into()));
    }
    // Files from before the K/V type was recorded lack it; their fingerprint still guards them.
    if let Some(saved) = meta.get("kv_cache") {
        let ours = model.kv_dtype().to_string();
        if *saved != ours {
            return Err(bad(format!("holds a {saved} K/V cache; this model caches K/V in {ours} (choose it with --kv-cache {saved})")));
        }
    }
    if meta.get("fingerprint") != Some(&fingerprint(model)) {
        return Err(bad("was saved with a different model".into()));
    }
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    // Values of tensor `name`, widened: F32 everywhere, or BF16 for the K/V of a bf16 cache
    // (`bf16_ok`); `want` values when given.
    let values = |name: &str, want: Option<usize>, bf16_ok: bool| -> Result<Vec<f32>> {
        let t = st
            .tensor(name)
            .map_err(|_| bad(format!("missing `{name}`")))?;
        let v: Vec<f32> = match t.dtype() {
            StDtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
            StDtype::BF16 if bf16_ok => t
                .data()
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(bad(format!(
                    "`{name}` is {other:?}, expected F32{}",
                    if bf16_ok { " or BF16" } else { "" }
                )))
            }
        };
        match want {
            Some(n) if n != v.len() => Err(bad(format!(
                "`{name}` has {} values, expected {n}",
                v.len()
            ))),
            _ => Ok(v),
        }
    };
    let mut cache = model.new_cache();
    cache.pos = meta
        .get("pos")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| bad("no position".into()))?;
    let (kw, vw) = (model.config.k_width(), model.config.v_width());
    for (g, store) in cache.kv.iter_mut().enumerate() {
        let (k, v) = (
            values(&format!("kv.{g}.k"), None, true)?,
            values(&format!("kv.{g}.v"), None, true)?,
        );
        if k.len() % kw != 0 || v.len() % vw != 0 || v.len() / vw != k.len() / kw {
            return Err(bad(format!("K/V of group {g} have inconsistent sizes")));
        }
        let n = k.len() / kw;
        let kv = match store {
            KvStore::Global { kv, start } => {
                if cache.pos < *start || n != cache.pos - *start {
                    return Err(bad(format!(
                        "global K/V of group {g} does not match the position"
                    )));
                }
                kv
            }
            KvStore::Window { kv, pos, cap } => {
                let t = st
                    .tensor(&format!("kv.{g}.pos"))
                    .map_err(|_| bad(format!("missing `kv.{g}.pos`")))?;
                *pos = t
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as usize)
                    .collect();
                if pos.len() != n || pos.len() > *cap {
                    return Err(bad(format!("window of group {g} does not fit its ring")));
                }
                kv
            }
        };
        kv.k.extend(&k);
        kv.v.extend(&v);
    }
    for (l, s) in cache.states.iter_mut().enumerate() {
        *s = LayerState {
            ssm: values(&format!("state.{l}.ssm"), Some(s.ssm.len()), false)?,
            conv: values(&format!("state.{l}.conv"), Some(s.conv.len()), false)?,
        };
    }
    Ok((cache, meta.get("extra").cloned().unwrap_or_default()))
}
