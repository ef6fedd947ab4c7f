//! The real Hymba tokenizer and chat template (shared/hymba-1.5b).

mod common;
use common::{shared, Expected};
use hymba::{Detokenizer, Message, Tokenizer};

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&shared().join("hymba-1.5b/tokenizer.json")).unwrap()
}

#[test]
fn prompt_ids_match_the_fixture() {
    let tok = tokenizer();
    let exp: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("tiny-a").join("expected.json")).unwrap(),
    )
    .unwrap();
    let text = exp["prompt_text"].as_str().unwrap();
    let ids = tok.encode_prompt(text).unwrap();
    assert_eq!(ids, Expected::load("tiny-a").ids("input_ids"));
    assert_eq!(ids[0], 1, "BOS first (add_bos_token)");
    assert_eq!(tok.decode(&ids).unwrap(), text);
}

#[test]
fn chat_template_renders_the_instruct_format() {
    let tok = tokenizer();
    let t = tok
        .chat_template
        .as_ref()
        .expect("the Instruct tokenizer_config has a template");
    let msgs = [
        Message::new("system", " Be brief. "),
        Message::new("user", "Hi there\n"),
    ];
    let out = t.render(&msgs, None, true).unwrap();
    assert_eq!(
        out,
        "<extra_id_0>System\nBe brief.\n\n<extra_id_1>User\nHi there\n<extra_id_1>Assistant\n"
    );
    let tools = [serde_json::json!({"name": "get_time", "parameters": {"tz": "string"}})];
    let out = t
        .render(&[Message::new("user", "time?")], Some(&tools), true)
        .unwrap();
    assert_eq!(
        out,
        "<extra_id_0>System\n<tool> {\"name\": \"get_time\", \"parameters\": {\"tz\": \"string\"}} </tool>\n\n<extra_id_1>User\ntime?\n<extra_id_1>Assistant\n"
    );
}

#[test]
fn streaming_detokenization_never_splits_characters() {
    let tok = tokenizer();
    let text = "Grüße, 世界! 🦀 Hymba mixes attention 🧠 and SSM heads.\nNew line — done.";
    let ids = tok.encode(text, false).unwrap();
    let prompt = tok.encode_prompt("Say:").unwrap();
    let mut d = Detokenizer::new(&prompt);
    let mut pieces = Vec::new();
    for &id in &ids {
        let p = d.push(&tok, id).unwrap();
        assert!(
            !p.contains('\u{FFFD}'),
            "piece {p:?} holds a broken character"
        );
        pieces.push(p);
    }
    // With the prompt as context, the stream carries the leading space the tokens encode.
    assert_eq!(pieces.concat(), format!(" {text}"));
    assert!(
        pieces.iter().filter(|p| p.is_empty()).count() > 0,
        "multi-token characters were held back"
    );
}

/// Every tokenizer this project ships or runs (the built-in model's, the official one) encodes a
/// prompt, through Hugging Face's `tokenizers` with `add_special_tokens=True` as clients of the
/// server do, into the ids the engine runs: BOS from the post-processor, as `add_bos_token` says.
#[test]
fn huggingface_encoding_equals_the_engines_prompt_ids() {
    let built_in = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets/default-model/tokenizer.json");
    for path in [built_in, shared().join("hymba-1.5b/tokenizer.json")] {
        let ours = Tokenizer::from_file(&path).unwrap();
        let hf = tokenizers::Tokenizer::from_file(&path).unwrap();
        for text in [
            "And it came to pass",
            "  two spaces, ünïcode and\nnew lines ",
            "x",
        ] {
            let want = ours.encode_prompt(text).unwrap();
            let got = hf.encode(text, true).unwrap().get_ids().to_vec();
            assert_eq!(got, want, "{}: {text:?}", path.display());
            assert_eq!(
                got[0],
                ours.bos_id.unwrap(),
                "{}: BOS first",
                path.display()
            );
        }
    }
}
