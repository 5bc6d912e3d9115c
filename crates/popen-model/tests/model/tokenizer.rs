//! Tests of the tokenizer (`popen_model::tokenizer`) against an independent reference:
//! `tests/fixtures/smollm2_tokens.json`, written by `tools/reference/tokenizer_fixture.py`
//! (HF tokenizers built from the GGUF read with llama.cpp's gguf-py, the chat template rendered
//! with jinja2) from the SmolLM2-135M-Instruct Q4_1 GGUF that `make assets` fetches.

use std::path::Path;
use std::sync::OnceLock;

use popen_model::gguf::GgufFile;
use popen_model::tokenizer::{Tokenizer, TokenizerError};
use serde_json::Value;

use crate::common;
use common::{repo_root, smollm2_path};

fn smollm2() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let g = GgufFile::open(smollm2_path()).unwrap();
        Tokenizer::from_gguf(&g).unwrap()
    })
}

fn fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_tokens.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn cases(fx: &Value) -> Vec<(String, Vec<u32>)> {
    fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let text = c["text"].as_str().unwrap().to_owned();
            let ids = c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            (text, ids)
        })
        .collect()
}

#[test]
fn encodes_and_decodes_fixture_strings() {
    let tok = smollm2();
    let fx = fixture();
    let cases = cases(&fx);
    assert!(cases.len() >= 8);
    for (text, want) in &cases {
        let got = tok.encode(text, false).unwrap();
        assert_eq!(&got, want, "ids of {text:?}");
        // SmolLM2 has add_bos_token = false: add_special adds nothing.
        assert_eq!(&tok.encode(text, true).unwrap(), want, "ids of {text:?} (add_special)");
        assert_eq!(&tok.decode(&got, false).unwrap(), text, "decode of {text:?}");
    }
}

#[test]
fn chat_prompt_matches_rendered_template() {
    let tok = smollm2();
    let fx = fixture();
    let user = fx["chat"]["user"].as_str().unwrap();
    let want = fx["chat"]["prompt"].as_str().unwrap();
    let got = tok.chat_prompt(user);
    assert_eq!(got, want);
    assert!(got.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
    assert!(got.ends_with("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"));
    // The fixture's cases include the rendered prompt; its ids start with <|im_start|>.
    let ids = tok.encode(&got, false).unwrap();
    assert_eq!(ids[0], 1);
    let (_, fx_ids) = cases(&fx).into_iter().find(|(t, _)| t == want).unwrap();
    assert_eq!(ids, fx_ids);
    // Skipping special tokens drops exactly the markers.
    let plain = tok.decode(&ids, true).unwrap();
    assert!(!plain.contains("<|im_"));
    assert!(plain.contains("What is the capital of France?"));
}

#[test]
fn special_tokens_are_single_ids() {
    let tok = smollm2();
    let fx = fixture();
    let specials = fx["special_tokens"].as_object().unwrap();
    assert_eq!(specials.len(), 17);
    for (t, id) in specials {
        let id = id.as_u64().unwrap() as u32;
        assert_eq!(tok.token_to_id(t), Some(id), "{t}");
        assert_eq!(tok.encode(t, false).unwrap(), vec![id], "{t}");
        assert_eq!(tok.decode(&[id], false).unwrap(), *t);
        assert_eq!(tok.decode(&[id], true).unwrap(), "");
    }
    assert_eq!(
        tok.encode("a<|im_end|>b", false).unwrap(),
        vec![tok.token_to_id("a").unwrap(), 2, tok.token_to_id("b").unwrap()]
    );
}

#[test]
fn metadata() {
    let tok = smollm2();
    let fx = fixture();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(fx["meta"]["vocab_size"], 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert!(tok.chat_template().unwrap().contains("add_generation_prompt"));
}

#[test]
fn save_and_from_file_round_trip() {
    let tok = smollm2();
    let dir = std::env::temp_dir().join(format!("popen-tokenizer-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    tok.save(&path).unwrap();
    let back = Tokenizer::from_file(&path).unwrap();
    let fx = fixture();
    for (text, want) in cases(&fx) {
        assert_eq!(back.encode(&text, false).unwrap(), want, "{text:?}");
        assert_eq!(back.decode(&want, false).unwrap(), text);
    }
    assert_eq!(back.vocab_size(), 49152);
    assert_eq!(back.bos_id(), Some(1));
    assert_eq!(back.eos_id(), Some(2));
    assert_eq!(back.chat_prompt("hi"), tok.chat_prompt("hi"));
    assert_eq!(back.encode("<|im_start|>", false).unwrap(), vec![1]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_asset_says_run_make_assets() {
    let missing = repo_root().join("data/assets/nope/missing.gguf");
    let e = Tokenizer::from_gguf_path(&missing).unwrap_err();
    assert!(matches!(e, TokenizerError::Missing { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("run make assets"), "{msg}");
    assert!(msg.contains("missing.gguf"), "{msg}");
    let e = Tokenizer::from_file(repo_root().join("data/assets/nope/tokenizer.json")).unwrap_err();
    assert!(e.to_string().contains("run make assets"), "{e}");
}

#[test]
fn from_gguf_path_matches_from_gguf() {
    let t = Tokenizer::from_gguf_path(smollm2_path()).unwrap();
    assert_eq!(t.encode("café — naïve 😀", false).unwrap(), smollm2().encode("café — naïve 😀", false).unwrap());
}
