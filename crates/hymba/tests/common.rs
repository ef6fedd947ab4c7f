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
/// with some steps asking only for their token picked where the logits are (`Logits::Greedy`,
/// `Logits::Sample`), mixed with steps that want their last row or all their rows, and in
/// rounds where every step picks. The two runs compute the same logits, so each pick must be
/// what `sample::draw` makes of the logits the first run copied out, and the other steps'
/// logits must be the first run's bit for bit. `prompts` are fed in one step each, then
/// `rounds` decode steps. `exact`: a draw must be the host's token; else (a backend that sums
/// the weights in another order) its running sums must bracket u × total to rounding.
pub fn picks_match_logits<B: hymba::backend::Backend>(
    model: &hymba::Model<B>,
    prompts: &[Vec<u32>],
    rounds: u32,
    exact: bool,
) {
    use hymba::sample::{draw, Draw};
    use hymba::{BatchLogits, DecodeWindow, Logits, Step};
    let v = model.config.vocab_size;
    // Round r's kind for sequence i: every step picks in the last round, otherwise a mix.
    let kind = |r: u32, i: usize| {
        let u = ((i as u32 * 7 + r * 13) % 17) as f32 / 17.0;
        let sample = |temperature, min_p, top_k, top_p| {
            Logits::Sample(Draw {
                temperature,
                top_k,
                top_p,
                min_p,
                u,
            })
        };
        match (r == rounds, (i + r as usize) % 5) {
            (true, 0) | (false, 0) => Logits::Greedy,
            (true, 1) => sample(0.8, 0.0, 40, 0.9),
            (true, 2) => sample(1.2, 0.0, 3, 1.0),
            (true, 3) => sample(0.8, 0.05, 0, 0.95),
            (true, _) => sample(0.8, 0.0, 0, 1.0),
            (false, 1) => Logits::Last,
            (false, 2) => sample(1.0, 0.0, 0, 1.0),
            (false, 3) => sample(0.5, 0.1, 0, 0.7),
            _ if r == 0 => Logits::All,
            _ => Logits::Last,
        }
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
                        Logits::Greedy | Logits::Sample(_) if !picking => Logits::Last,
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
            let what = format!("round {r}, sequence {i}");
            assert_eq!(*pa, None, "{what}: a pick nobody asked for");
            let d = match kind(r as u32, i) {
                Logits::Greedy => Draw::GREEDY,
                Logits::Sample(d) => d,
                _ => {
                    assert_eq!(*pp, None, "{what}: a pick nobody asked for");
                    assert!(
                        la.len() == lp.len()
                            && la.iter().zip(lp).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{what}: the logits beside picked steps differ"
                    );
                    continue;
                }
            };
            assert!(lp.is_empty(), "{what}: logits of a picked step");
            let row = &la[la.len() - v..];
            let got = pp.unwrap_or_else(|| panic!("{what}: no pick"));
            if exact {
                assert_eq!(got, draw(row, &d), "{what}: the pick of {d:?}");
            } else {
                check_pick(row, &d, got, &what);
            }
        }
    }
}

/// A token picked by a backend that sums in another order than the host: the host's token,
/// or (at a temperature) one either side of a boundary within rounding, the running sum in id
/// order of the weights the filters keep up to it bracketing u × their total.
pub fn check_pick(row: &[f32], d: &hymba::sample::Draw, got: u32, what: &str) {
    let want = hymba::sample::draw(row, d);
    if got == want || d.temperature == 0.0 {
        assert_eq!(got, want, "{what}: the pick of {d:?}");
        return;
    }
    let mut kept = Vec::new();
    hymba::sample::kept_weights(row, d, &mut kept);
    let w: Vec<f64> = kept.iter().map(|&p| p.max(0.0) as f64).collect();
    let total: f64 = w.iter().sum();
    let target = d.u as f64 * total;
    let before: f64 = w[..got as usize].iter().sum();
    let slack = 1e-5 * total;
    assert!(
        w[got as usize] > 0.0
            && before <= target + slack
            && before + w[got as usize] >= target - slack,
        "{what}: {d:?} picked {got} (host {want}): sums {before} + {} against {target}",
        w[got as usize]
    );
}
