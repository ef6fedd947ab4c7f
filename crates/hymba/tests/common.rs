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

/// Runs the same batches twice on fresh caches: once with every step's logits copied out, once
/// with some steps asking only for their greedy pick (`Logits::Greedy`), mixed with steps that
/// want their last row or all their rows, and in rounds where every step is greedy. The two
/// runs compute the same logits, so each pick must be the argmax of the logits the first run
/// copied out, and the other steps' logits must be the first run's bit for bit. `prompts` are
/// fed in one step each, then `rounds` decode steps.
pub fn greedy_picks_match_logits<B: hymba::backend::Backend>(
    model: &hymba::Model<B>,
    prompts: &[Vec<u32>],
    rounds: u32,
) {
    use hymba::{BatchLogits, DecodeWindow, Logits, Step};
    let v = model.config.vocab_size;
    // Round r's kind for sequence i: all greedy in the last round, otherwise a mix.
    let kind = |r: u32, i: usize| match (r == rounds, (i + r as usize) % 3) {
        (true, _) | (false, 0) => Logits::Greedy,
        (false, 1) => Logits::Last,
        _ if r == 0 => Logits::All,
        _ => Logits::Last,
    };
    let run = |picking: bool| -> Vec<Vec<(Vec<f32>, Option<u32>)>> {
        let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
        let mut out = BatchLogits::default();
        let mut got = Vec::new();
        for r in 0..=rounds {
            let tok = [(r * 11 + 5) % v as u32];
            let mut steps: Vec<Step<B>> = caches
                .iter_mut()
                .zip(prompts)
                .enumerate()
                .map(|(i, (cache, p))| Step {
                    cache,
                    ids: if r == 0 { &p[..] } else { &tok[..] },
                    logits: match kind(r, i) {
                        Logits::Greedy if !picking => Logits::Last,
                        k => k,
                    },
                    window: DecodeWindow::Trained,
                })
                .collect();
            model.forward_batch_into(&mut steps, &mut out).unwrap();
            assert_eq!(out.len(), prompts.len());
            got.push(
                (0..out.len())
                    .map(|i| (out.get(i).to_vec(), out.pick(i)))
                    .collect(),
            );
        }
        got
    };
    let (all, picked) = (run(false), run(true));
    for (r, (a, p)) in all.iter().zip(&picked).enumerate() {
        for (i, ((la, pa), (lp, pp))) in a.iter().zip(p).enumerate() {
            assert_eq!(
                *pa, None,
                "round {r}, sequence {i}: a pick nobody asked for"
            );
            if kind(r as u32, i) == Logits::Greedy {
                let want = hymba::sample::argmax(&la[la.len() - v..]);
                assert_eq!(*pp, Some(want), "round {r}, sequence {i}: the greedy pick");
                assert!(
                    lp.is_empty(),
                    "round {r}, sequence {i}: logits of a greedy step"
                );
            } else {
                assert_eq!(
                    *pp, None,
                    "round {r}, sequence {i}: a pick nobody asked for"
                );
                assert!(
                    la.len() == lp.len()
                        && la.iter().zip(lp).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "round {r}, sequence {i}: the logits beside greedy steps differ"
                );
            }
        }
    }
}
