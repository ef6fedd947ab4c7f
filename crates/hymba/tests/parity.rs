//! Parity with NVIDIA's official implementation on the `shared/fixtures` checkpoints: the
//! engine's logits against the ones the official code computed, 1e-3 absolute.

mod common;
use common::{fixture, Expected};
use hymba::{DecodeWindow, Logits, Model};
use hymba_kernels::testing::assert_close;

const TOL: f32 = 1e-3;

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn hidden_states_match_official_layer_by_layer() {
    let model = Model::load(&fixture("tiny-a")).unwrap();
    let exp = Expected::load("tiny-a");
    let ids = exp.ids("input_ids");
    let (shape, want) = exp.f32("prefill_hidden_states");
    let got = model.hidden_states_uncached(&ids).unwrap();
    assert_eq!(got.len(), shape[0]);
    let per = shape[1] * shape[2];
    for (l, g) in got.iter().enumerate() {
        assert_close(
            g,
            &want[l * per..(l + 1) * per],
            TOL,
            &format!("hidden state {l}"),
        );
    }
}

#[test]
fn prefill_logits_match_official() {
    let model = Model::load(&fixture("tiny-a")).unwrap();
    let exp = Expected::load("tiny-a");
    let ids = exp.ids("input_ids");
    let (_, want) = exp.f32("prefill_logits");
    let mut cache = model.new_cache();
    let got = model
        .forward(&mut cache, &ids, Logits::All, DecodeWindow::Trained)
        .unwrap();
    assert_close(&got, &want, TOL, "prefill logits (cached path)");
    let got = model.forward_uncached(&ids).unwrap();
    assert_close(&got, &want, TOL, "prefill logits (no-cache path)");
}

/// Prompt prefilled, then the official generated ids fed one at a time with the trained window:
/// the logits of a no-cache forward over the whole sequence.
#[test]
fn decode_matches_nocache_forward() {
    let model = Model::load(&fixture("tiny-a")).unwrap();
    let exp = Expected::load("tiny-a");
    let ids = exp.ids("input_ids");
    let gen = exp.ids("generated_ids");
    let (_, want) = exp.f32("nocache_generate_logits");
    let v = model.config.vocab_size;
    let mut cache = model.new_cache();
    let mut got = model
        .forward(&mut cache, &ids, Logits::Last, DecodeWindow::Trained)
        .unwrap();
    for &g in &gen[..gen.len() - 1] {
        got.extend(
            model
                .forward(&mut cache, &[g], Logits::Last, DecodeWindow::Trained)
                .unwrap(),
        );
    }
    assert_eq!(got.len(), gen.len() * v);
    assert_close(&got, &want, TOL, "decode logits vs no-cache forward");
}

/// The official-decode compatibility mode reproduces NVIDIA's `generate`: greedy ids and logits.
#[test]
fn official_decode_mode_reproduces_official_generate() {
    let model = Model::load(&fixture("tiny-a")).unwrap();
    let exp = Expected::load("tiny-a");
    let ids = exp.ids("input_ids");
    let want_ids = exp.ids("generated_ids");
    let (_, want) = exp.f32("generate_logits");
    let mut cache = model.new_cache();
    let mut logits = model
        .forward(&mut cache, &ids, Logits::Last, DecodeWindow::Official)
        .unwrap();
    let (mut got_ids, mut got) = (Vec::new(), Vec::new());
    for _ in 0..want_ids.len() {
        let next = argmax(&logits);
        got_ids.push(next);
        got.extend_from_slice(&logits);
        logits = model
            .forward(&mut cache, &[next], Logits::Last, DecodeWindow::Official)
            .unwrap();
    }
    assert_eq!(got_ids, want_ids);
    assert_close(&got, &want, TOL, "official-mode generate logits");
}

/// The fixture split into two shards with an index loads to the same model.
#[test]
fn sharded_checkpoint_gives_the_same_logits() {
    let src = fixture("tiny-a");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let dir = common::temp_dir("sharded");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<_> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        std::fs::write(
            dir.join(&file),
            safetensors::serialize(views, None).unwrap(),
        )
        .unwrap();
        for n in part {
            map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let model = Model::load(&dir).unwrap();
    let exp = Expected::load("tiny-a");
    let ids = exp.ids("input_ids");
    let (_, want) = exp.f32("prefill_logits");
    assert_close(
        &model.forward_uncached(&ids).unwrap(),
        &want,
        TOL,
        "sharded prefill logits",
    );
    std::fs::remove_dir_all(dir).unwrap();
}
