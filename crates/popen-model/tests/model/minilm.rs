//! `popen_model::minilm`: the BERT sentence encoder (`h = BERT(y)` of POPEN's `L_ti`).
//!
//! * Against an independent reference: `tests/fixtures/minilm/minilm_ref.json`, written by
//!   `tools/reference/minilm_fixture.py` with sentence-transformers 5.1.2 (checked there
//!   against transformers' BertModel + hand-written pooling) on the real all-MiniLM-L6-v2
//!   weights that `make assets` fetches into data/assets/minilm: token ids, embeddings (1e-5)
//!   and their cosine similarities, with and without batching (padding masked), truncation
//!   at 256 word pieces.
//! * On tiny random checkpoints written here: strict loading (missing, mis-shaped and
//!   unexpected tensors named as in the file, with the file), `bert.` prefix and skipped
//!   pooler/buffers, config inferred from shapes, padding invariance of `BertModel::forward`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::prelude::*;
use burn::tensor::{Bool, TensorData};
use popen_model::minilm::{cosine_matrix, load_bert, BertConfig, BertError, SentenceEncoder, MINILM_MAX_SEQ_LENGTH};
use popen_model::weights::{self, Checkpoint};
use serde_json::Value;

use crate::common::repo_root;

// Flex: the CPU backend popen runs on (the real-weights tests encode 256-token batches).
type B = Flex;

fn minilm_dir() -> PathBuf {
    let p = repo_root().join("data/assets/minilm");
    for f in ["model.safetensors", "tokenizer.json"] {
        assert!(
            p.join(f).is_file(),
            "{} is missing: run make assets (it fetches all-MiniLM-L6-v2)",
            p.join(f).display()
        );
    }
    p
}

fn fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm/minilm_ref.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn sentences(fx: &Value) -> Vec<String> {
    fx["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

fn matrix(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()).collect()
}

fn to_rows(t: Tensor<B, 2>) -> Vec<Vec<f64>> {
    let [n, d] = t.dims();
    let v = t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    (0..n).map(|i| v[i * d..(i + 1) * d].iter().map(|&x| x as f64).collect()).collect()
}

/// Largest |got - want| / (1 + |want|) over all entries (abs near 0, rel for large values).
fn max_err(got: &[Vec<f64>], want: &[Vec<f64>]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .flat_map(|(g, w)| {
            assert_eq!(g.len(), w.len());
            g.iter().zip(w).map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
        })
        .fold(0.0, f64::max)
}

fn encoder(batch: usize) -> SentenceEncoder<B> {
    SentenceEncoder::<B>::load(minilm_dir(), &Default::default()).unwrap().with_batch_size(batch)
}

#[test]
fn minilm_matches_sentence_transformers() {
    let fx = fixture();
    let sents = sentences(&fx);
    let enc = encoder(fx["batch_size"].as_u64().unwrap() as usize);
    assert_eq!(enc.dim(), 384);
    assert_eq!(enc.max_seq_length(), MINILM_MAX_SEQ_LENGTH);
    assert_eq!(fx["max_seq_length"].as_u64().unwrap() as usize, MINILM_MAX_SEQ_LENGTH);
    assert_eq!(enc.model.config, BertConfig::all_minilm_l6_v2());

    // Word pieces, [CLS]/[SEP] and truncation exactly as sentence-transformers tokenizes.
    let toks = enc.tokenize(&sents).unwrap();
    for (i, want) in fx["input_ids"].as_array().unwrap().iter().enumerate() {
        let want: Vec<u32> = want.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(toks[i].0, want, "token ids of sentence {i} {:?}", sents[i]);
        assert!(toks[i].1.iter().all(|&t| t == 0));
    }
    assert_eq!(toks.last().unwrap().0.len(), 256, "the long text is truncated to 256");

    let want = matrix(&fx["embeddings"]);
    let got = to_rows(enc.encode(&sents).unwrap());
    let err = max_err(&got, &want);
    assert!(err < 1e-5, "embeddings differ from sentence-transformers by {err:e}");
    for (i, row) in got.iter().enumerate() {
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "row {i} has norm {norm}");
    }
    // Host vectors are the same rows.
    let vecs = enc.encode_vecs(&sents[..2]).unwrap();
    for (g, w) in vecs.iter().zip(&got) {
        assert!(g.iter().zip(w).all(|(a, b)| (*a as f64 - b).abs() < 1e-6));
    }
}

#[test]
fn minilm_embeddings_do_not_depend_on_batching() {
    let fx = fixture();
    let sents = sentences(&fx);
    let want = matrix(&fx["embeddings"]);
    // One sentence per pass (no padding), and all in one batch (padded to 256).
    let single = to_rows(encoder(1).encode(&sents).unwrap());
    let all = to_rows(encoder(64).encode(&sents).unwrap());
    assert!(max_err(&single, &want) < 1e-5);
    assert!(max_err(&all, &want) < 1e-5);
    assert!(max_err(&single, &all) < 1e-5);
    // Order of the input is the order of the rows; duplicates give identical rows.
    let rev: Vec<&str> = sents.iter().rev().map(String::as_str).chain([sents[0].as_str()]).collect();
    let got = to_rows(encoder(3).encode(&rev).unwrap());
    let mut want_rev: Vec<Vec<f64>> = want.iter().rev().cloned().collect();
    want_rev.push(want[0].clone());
    assert!(max_err(&got, &want_rev) < 1e-5);
    // No sentences: an empty [0, 384] tensor.
    let none: [&str; 0] = [];
    assert_eq!(encoder(3).encode(&none).unwrap().dims(), [0, 384]);
}

#[test]
fn minilm_cosine_similarities_match_reference() {
    let fx = fixture();
    let sents = sentences(&fx);
    let e = encoder(32).encode(&sents).unwrap();
    let cos = to_rows(cosine_matrix(e.clone(), e));
    let want = matrix(&fx["cosine"]);
    let err = max_err(&cos, &want);
    assert!(err < 1e-5, "cosine similarities differ by {err:e}");
    // The paraphrase (sentence 1) is by far the closest to the benchmark-like answer.
    let row = &cos[0];
    assert!(row[1] > 0.85, "paraphrase cos {}", row[1]);
    for (j, c) in row.iter().enumerate().skip(2) {
        assert!(*c < row[1] - 0.3, "sentence {j} cos {c} vs paraphrase {}", row[1]);
    }
    for (i, r) in cos.iter().enumerate() {
        assert!((r[i] - 1.0).abs() < 1e-5);
    }
}

#[test]
fn sentence_encoder_missing_files_say_make_assets() {
    let dir = tempfile::tempdir().unwrap();
    let msg = SentenceEncoder::<B>::load(dir.path(), &Default::default()).err().unwrap().to_string();
    assert!(msg.contains("model.safetensors") && msg.contains("make assets"), "{msg}");
    std::fs::copy(minilm_dir().join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let msg = SentenceEncoder::<B>::load(dir.path(), &Default::default()).err().unwrap().to_string();
    assert!(msg.contains("tokenizer.json") && msg.contains("make assets"), "{msg}");
}

// ---- tiny random checkpoints ----

/// Tensors of a tiny random BERT under Hugging Face's names (`attention.self`, `LayerNorm`),
/// PyTorch layout.
fn hf_tensors(model: &popen_model::minilm::BertModel<B>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    weights::named_tensors(model)
        .into_iter()
        .map(|(name, shape, data)| {
            let name = name.replace(".self_attn.", ".self.").replace("layer_norm.", "LayerNorm.");
            (name, shape, data)
        })
        .collect()
}

fn write(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    weights::write_safetensors(path, tensors, &BTreeMap::new()).unwrap();
}

fn ids_tensor(ids: &[i64], b: usize, n: usize) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [b, n]), &Default::default())
}

fn flat3(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().unwrap()
}

#[test]
fn bert_tiny_checkpoint_round_trip_with_prefix_and_skipped_tensors() {
    let device = Default::default();
    let cfg = BertConfig::tiny();
    let model = cfg.init::<B>(&device);
    let dir = tempfile::tempdir().unwrap();

    // `bert.`-prefixed (BertForMaskedLM-style) with a pooler, an MLM head and the buffers.
    let mut t: Vec<_> = hf_tensors(&model).into_iter().map(|(n, s, d)| (format!("bert.{n}"), s, d)).collect();
    let h = cfg.hidden_size;
    t.push(("bert.pooler.dense.weight".into(), vec![h, h], vec![0.5; h * h]));
    t.push(("bert.pooler.dense.bias".into(), vec![h], vec![0.0; h]));
    t.push(("cls.predictions.bias".into(), vec![cfg.vocab_size], vec![0.0; cfg.vocab_size]));
    let p = cfg.max_position_embeddings;
    t.push(("bert.embeddings.position_ids".into(), vec![1, p], (0..p).map(|i| i as f32).collect()));
    let file = dir.path().join("prefixed.safetensors");
    write(&file, &t);

    // Sizes from the shapes (heads given).
    let inferred = BertConfig::from_checkpoint(&Checkpoint::open(&file).unwrap(), 2).unwrap();
    assert_eq!(inferred, cfg);

    let loaded = load_bert::<B>(&cfg, &file, &device).unwrap();
    // Mistakes in a prefixed file: names without the prefix, the source says so.
    let bad = dir.path().join("prefixed-bad.safetensors");
    write(&bad, &t[1..]);
    let msg = load_bert::<B>(&cfg, &bad, &device).err().unwrap().to_string();
    assert!(msg.contains("prefixed-bad.safetensors [bert.*]"), "{msg}");
    assert!(msg.contains(&format!("missing {}", t[0].0.strip_prefix("bert.").unwrap())), "{msg}");
    let ids = ids_tensor(&[1, 5, 9, 2, 1, 7, 3, 2], 2, 4);
    let a = flat3(model.forward(ids.clone(), None, None).unwrap());
    let b = flat3(loaded.forward(ids, None, None).unwrap());
    assert_eq!(a, b);
}

#[test]
fn bert_load_names_missing_misshaped_and_unexpected_tensors() {
    let device = Default::default();
    let cfg = BertConfig::tiny();
    let model = cfg.init::<B>(&device);
    let dir = tempfile::tempdir().unwrap();
    let mut t = hf_tensors(&model);
    let gone = "encoder.layer.1.attention.self.key.weight";
    t.retain(|(n, _, _)| n != gone);
    for (n, s, d) in t.iter_mut() {
        if n == "embeddings.LayerNorm.weight" {
            *s = vec![cfg.hidden_size + 1];
            *d = vec![1.0; cfg.hidden_size + 1];
        }
    }
    t.push(("encoder.layer.0.attention.self.rotary.weight".into(), vec![2], vec![0.0; 2]));
    let file = dir.path().join("broken.safetensors");
    write(&file, &t);

    let msg = load_bert::<B>(&cfg, &file, &device).err().unwrap().to_string();
    assert!(msg.contains(&file.display().to_string()), "{msg}");
    assert!(msg.contains(&format!("missing {gone}")), "{msg}");
    assert!(msg.contains("embeddings.LayerNorm.weight: shape [17] in the file, the model needs [16]"), "{msg}");
    assert_eq!(msg.matches("embeddings.LayerNorm.weight").count(), 1, "{msg}");
    assert!(msg.contains("unexpected encoder.layer.0.attention.self.rotary.weight"), "{msg}");
    assert!(!msg.contains("self_attn") && !msg.contains("layer_norm"), "{msg}");

    // A layer too few: the missing layer's tensors are named.
    let mut t = hf_tensors(&model);
    t.retain(|(n, _, _)| !n.starts_with("encoder.layer.1."));
    write(&file, &t);
    let msg = load_bert::<B>(&cfg, &file, &device).err().unwrap().to_string();
    assert!(msg.contains("missing encoder.layer.1.output.LayerNorm.bias"), "{msg}");
    // Not a BERT checkpoint at all: from_checkpoint names the file and the tensor it needs.
    let other = dir.path().join("other.safetensors");
    write(&other, &[("w".into(), vec![2], vec![0.0; 2])]);
    let e = BertConfig::from_checkpoint(&Checkpoint::open(&other).unwrap(), 2).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, BertError::Config(_)), "{msg}");
    assert!(msg.contains("other.safetensors") && msg.contains("embeddings.word_embeddings.weight"), "{msg}");
    // A missing file names the path.
    let nope = dir.path().join("nope.safetensors");
    let msg = load_bert::<B>(&cfg, &nope, &device).err().unwrap().to_string();
    assert!(msg.contains("nope.safetensors"), "{msg}");
}

#[test]
fn bert_padding_is_masked() {
    let device = Default::default();
    let model = BertConfig::tiny().init::<B>(&device);
    // Row 0: 3 real tokens alone; row 1 of the batch: the same 3 + 3 padding tokens of
    // arbitrary ids; row 0 of the batch: 6 real tokens.
    let alone = flat3(model.forward(ids_tensor(&[1, 7, 2], 1, 3), None, None).unwrap());
    let ids = ids_tensor(&[1, 4, 4, 9, 8, 2, 1, 7, 2, 33, 0, 5], 2, 6);
    let mask = Tensor::<B, 2, Bool>::from_data(
        TensorData::new(vec![true, true, true, true, true, true, true, true, true, false, false, false], [2, 6]),
        &device,
    );
    let h = model.forward(ids, None, Some(mask.clone())).unwrap();
    let d = model.config.hidden_size;
    let row1 = flat3(h.clone().narrow(0, 1, 1).narrow(1, 0, 3));
    let err = alone.iter().zip(&row1).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err < 1e-5, "padding changed the real tokens by {err}");
    // Mean pooling counts only the real tokens.
    let pooled = popen_model::minilm::mean_pool(h, mask);
    let p1: Vec<f32> = pooled.narrow(0, 1, 1).into_data().into_vec::<f32>().unwrap();
    let mean: Vec<f32> = (0..d).map(|k| (0..3).map(|t| alone[t * d + k]).sum::<f32>() / 3.0).collect();
    let err = p1.iter().zip(&mean).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err < 1e-5, "{err}");
    // Shape checks.
    let e = model.forward(ids_tensor(&[1; 30], 1, 30), None, None).unwrap_err().to_string();
    assert!(e.contains("max_position_embeddings 24"), "{e}");
}

#[test]
fn sentence_encoder_rejects_a_tokenizer_larger_than_the_vocabulary() {
    let device = Default::default();
    let model = BertConfig::tiny().init::<B>(&device);
    let tok = tokenizers::Tokenizer::from_file(minilm_dir().join("tokenizer.json")).unwrap();
    let e = SentenceEncoder::new(model, tok, 16, &device).err().unwrap();
    assert!(e.to_string().contains("vocab_size is 64"), "{e}");
    let model = BertConfig::tiny().init::<B>(&device);
    let tok = tokenizers::Tokenizer::from_file(minilm_dir().join("tokenizer.json")).unwrap();
    let e = SentenceEncoder::new(model, tok, 100, &device).err().unwrap();
    assert!(e.to_string().contains("max_seq_length 100"), "{e}");
}
