//! LLaMA forward pass: shapes on a tiny random model, KV-cache consistency, and greedy decoding
//! on the real SmolLM2-135M-Instruct weights (`make assets`).

use std::collections::HashMap;
use std::time::Instant;

use burn::backend::Flex;
use burn::prelude::*;
use burn::tensor::TensorData;
use popen_model::gguf::GgufFile;
use popen_model::llama::{load_gguf, Llama, LlamaConfig, LlamaError};

// Flex: the CPU backend popen runs on (3x NdArray here); the real-weights test is the slow one.
type B = Flex;

use crate::common;
use common::smollm2_path;

fn ids_tensor(ids: &[u32], device: &burn::tensor::Device<B>) -> Tensor<B, 2, Int> {
    let d: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(d, [1, ids.len()]), device)
}

fn to_vec(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Prefill + one-token cached steps must match a single full forward at the last position.
fn check_cache_consistency(model: &Llama<B>, ids: &[u32], split: usize, tol: f32) -> f32 {
    let device = Default::default();
    let vocab = model.model.embed_tokens.weight.val().dims()[0];
    let mut full_cache = model.new_cache();
    let full = model.forward(ids_tensor(ids, &device), &mut full_cache).unwrap();
    let n = ids.len();
    let full_last = to_vec(full.narrow(1, n - 1, 1));

    let mut cache = model.new_cache();
    let mut last = model.forward(ids_tensor(&ids[..split], &device), &mut cache).unwrap();
    for i in split..n {
        last = model.forward(ids_tensor(&ids[i..i + 1], &device), &mut cache).unwrap();
    }
    assert_eq!(cache.len(), n);
    assert_eq!(last.dims(), [1, 1, vocab]);
    let d = max_abs_diff(&to_vec(last), &full_last);
    assert!(d < tol, "cached vs full last-step logits differ by {d}");
    d
}

#[test]
fn tiny_shapes_and_cache() {
    let cfg = LlamaConfig::tiny();
    let device = Default::default();
    let model: Llama<B> = cfg.init(&device);
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 4, 5, 6, 7, 8], [2, 4]), &device);
    let mut cache = model.new_cache();
    let logits = model.forward(tokens, &mut cache).unwrap();
    assert_eq!(logits.dims(), [2, 4, cfg.vocab_size]);
    assert_eq!(cache.len(), 4);
    let step = model.forward(Tensor::from_data(TensorData::new(vec![9i64, 10], [2, 1]), &device), &mut cache).unwrap();
    assert_eq!(step.dims(), [2, 1, cfg.vocab_size]);
    assert_eq!(cache.len(), 5);
    check_cache_consistency(&model, &[3, 1, 4, 1, 5, 9, 2, 6], 3, 1e-5);

    // Untied head.
    let untied = LlamaConfig { tie_word_embeddings: false, ..LlamaConfig::tiny() };
    let m2: Llama<B> = untied.init(&device);
    assert!(m2.lm_head.is_some());
    let mut c2 = m2.new_cache();
    assert_eq!(m2.forward(ids_tensor(&[1, 2, 3], &device), &mut c2).unwrap().dims(), [1, 3, 64]);

    let json = serde_json::to_string(&cfg).unwrap();
    assert!(json.contains("\"num_key_value_heads\":2"));
    assert_eq!(serde_json::from_str::<LlamaConfig>(&json).unwrap(), cfg);
}

fn load_smollm2() -> (GgufFile, LlamaConfig, Llama<B>) {
    let g = GgufFile::open(smollm2_path()).unwrap();
    let cfg = LlamaConfig::from_gguf(&g).unwrap();
    let t = Instant::now();
    let model = load_gguf::<B>(&cfg, &g, &Default::default()).unwrap();
    eprintln!("load_gguf: {:.2?}", t.elapsed());
    (g, cfg, model)
}

/// Byte-level BPE of one pre-tokenized word (already in byte-level characters, e.g. "Ġis"):
/// repeatedly merge the adjacent pair with the lowest merge rank.
fn bpe_word(word: &str, ranks: &HashMap<(String, String), usize>) -> Vec<String> {
    let mut parts: Vec<String> = word.chars().map(String::from).collect();
    loop {
        let best = (0..parts.len().saturating_sub(1))
            .filter_map(|i| ranks.get(&(parts[i].clone(), parts[i + 1].clone())).map(|&r| (r, i)))
            .min();
        let Some((_, i)) = best else { return parts };
        let merged = format!("{}{}", parts[i], parts[i + 1]);
        parts.splice(i..i + 2, [merged]);
    }
}

/// Token ids of the ChatML prompt. The pre-tokenization (ByteLevel split: special tokens,
/// words with their leading space as 'Ġ', newline as 'Ċ') is done by hand here; each word is
/// then BPE-merged with the GGUF's own `tokenizer.ggml.merges`.
fn chat_prompt_ids(g: &GgufFile, tokens: &[&str]) -> Vec<u32> {
    let merges = g.get_str_array("tokenizer.ggml.merges").unwrap();
    let ranks: HashMap<(String, String), usize> = merges
        .iter()
        .enumerate()
        .map(|(r, m)| {
            let (a, b) = m.split_once(' ').expect("merge 'a b'");
            ((a.to_string(), b.to_string()), r)
        })
        .collect();
    let vocab: HashMap<&str, u32> = tokens.iter().enumerate().map(|(i, t)| (*t, i as u32)).collect();
    let words = [
        "<|im_start|>",
        "user",
        "Ċ",
        "What",
        "Ġis",
        "Ġthe",
        "Ġcapital",
        "Ġof",
        "ĠFrance",
        "?",
        "<|im_end|>",
        "Ċ",
        "<|im_start|>",
        "assistant",
        "Ċ",
    ];
    let mut ids = Vec::new();
    for w in words {
        let pieces = if w.starts_with("<|") { vec![w.to_string()] } else { bpe_word(w, &ranks) };
        for p in pieces {
            ids.push(*vocab.get(p.as_str()).unwrap_or_else(|| panic!("piece {p:?} not in vocab")));
        }
    }
    ids
}

fn decode(tokens: &[&str], ids: &[u32]) -> String {
    ids.iter().map(|&i| tokens[i as usize].replace('Ġ', " ").replace('Ċ', "\n")).collect()
}

#[test]
fn smollm2_config_from_gguf() {
    let g = GgufFile::open(smollm2_path()).unwrap();
    let cfg = LlamaConfig::from_gguf(&g).unwrap();
    assert_eq!(cfg.vocab_size, 49152);
    assert_eq!(cfg.hidden_size, 576);
    assert_eq!(cfg.intermediate_size, 1536);
    assert_eq!(cfg.num_hidden_layers, 30);
    assert_eq!(cfg.num_attention_heads, 9);
    assert_eq!(cfg.num_key_value_heads, 3);
    assert_eq!(cfg.rope_theta, 100000.0);
    assert!(cfg.tie_word_embeddings);
}

#[test]
fn smollm2_greedy_paris_and_cache() {
    let (g, _cfg, model) = load_smollm2();
    let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap();
    let prompt = chat_prompt_ids(&g, &tokens);
    let im_end = tokens.iter().position(|t| *t == "<|im_end|>").unwrap() as u32;
    eprintln!("prompt ids {prompt:?}");

    let t = Instant::now();
    let out = model.greedy(&prompt, 12, &[im_end]).unwrap();
    let text = decode(&tokens, &out);
    eprintln!("greedy {} tokens in {:.2?}: {text:?} {out:?}", out.len(), t.elapsed());
    assert!(text.starts_with("The capital of France is Paris"), "unexpected continuation {text:?}");

    let t = Instant::now();
    let mut ids = prompt.clone();
    ids.extend_from_slice(&out[..4]);
    let split = prompt.len();
    let d = check_cache_consistency(&model, &ids, split, 1e-4);
    eprintln!("cache vs full max abs diff {d:e} ({:.2?})", t.elapsed());
}

#[test]
fn missing_tensor_is_reported_by_hf_name() {
    let g = GgufFile::open(smollm2_path()).unwrap();
    let cfg = LlamaConfig::from_gguf(&g).unwrap();
    // Ask for one layer more than the file has, and an untied head it lacks.
    let bad = LlamaConfig { num_hidden_layers: cfg.num_hidden_layers + 1, tie_word_embeddings: false, ..cfg.clone() };
    let err = match load_gguf::<B>(&bad, &g, &Default::default()) {
        Ok(_) => panic!("load should fail"),
        Err(e) => e,
    };
    let msg = err.to_string();
    match &err {
        LlamaError::Tensors { problems, .. } => assert_eq!(problems.len(), 10, "{msg}"),
        other => panic!("unexpected error {other}"),
    }
    assert!(msg.contains("model.layers.30.self_attn.q_proj.weight"), "{msg}");
    assert!(msg.contains("model.layers.30.mlp.down_proj.weight"), "{msg}");
    assert!(msg.contains("lm_head.weight"), "{msg}");

    // Mis-shaped: claim a wider FFN.
    let wide = LlamaConfig { intermediate_size: cfg.intermediate_size + 32, ..cfg };
    let msg = match load_gguf::<B>(&wide, &g, &Default::default()) {
        Ok(_) => panic!("load should fail"),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains("model.layers.0.mlp.gate_proj.weight: shape"), "{msg}");
}
