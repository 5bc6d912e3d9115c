//! `popen_model::export` (`popen model-export`) against checkpoints PyTorch wrote, and
//! PyTorch loading what popen writes:
//!
//! - pixellm: the PixelLM fixture (tests/fixtures/pixellm: PixelLM's key layout, written by
//!   tools/reference/pixellm_fixture.py from PyTorch modules under PixelLM's attribute names)
//!   is imported with POPEN's p_hat and seg-feedback projection on top, exported, and the
//!   export must hold every tensor of that file under the same name with the same values
//!   (bf16 -> f32 is exact), POPEN's tensors as `popen.*`, and the CLIP tower as a
//!   `CLIPVisionModel` folder at the model's input size; imported back, every tensor is
//!   bitwise the same and the model still computes the reference's log-probs and masks.
//! - llava-hf: the LLaVA fixture (tests/fixtures/llava, transformers 4.57.1
//!   `save_pretrained`) is imported and exported: the same tensor names and values as
//!   transformers' file, the config fields that define the model equal transformers'; imported
//!   back, the LLaVA tensors are the same and reproduce transformers' logits.
//! - PyTorch side: tools/reference/export_check.py loads the exports these tests write to
//!   target/tmp/export-fixture/ (transformers' from_pretrained without missing or unexpected
//!   keys; PixelLM's modules with strict state-dict loading) and reproduces the fixtures'
//!   log-probs, masks and logits (max relative error 1e-4); it records the sha256 of the files
//!   it loaded in tests/fixtures/export/check.json, and the tests here require the files they
//!   write to have exactly those hashes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use burn::prelude::*;
use burn::tensor::TensorData;
use popen_model::clip::ClipVisionConfig;
use popen_model::export::{self, ExportLayout};
use popen_model::llama::LlamaConfig;
use popen_model::pixellm::{self, Layout, PixelLm, PixelLmConfig};
use popen_model::tokenizer::{Tokenizer, TINY_SPECIALS};
use popen_model::weights::{self, Checkpoint};
use serde_json::Value;

type B = NdArray<f32>;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Where the exports go (export_check.py reads them from there); emptied first.
fn out_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("export-fixture").join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    Checkpoint::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .tensors
        .into_iter()
        .map(|(k, t)| (k, (t.shape.clone(), t.read_f32().unwrap())))
        .collect()
}

fn named(model: &PixelLm<B>) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    weights::named_tensors(model).into_iter().map(|(n, s, d)| (n, (s, d))).collect()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn sha256(path: &Path) -> String {
    popen_core::manifest::sha256_file(path).unwrap().0
}

/// The files export_check.py loaded in PyTorch are the files written now.
fn assert_checked_by_pytorch(layout: &str, dir: &Path) {
    let check = json(&fixtures().join("export/check.json"));
    let files = check[layout]["files"].as_object().expect("check.json lists the files");
    for (f, want) in files {
        let got = sha256(&dir.join(f));
        assert_eq!(
            got,
            want.as_str().unwrap(),
            "{layout}/{f} differs from the file tools/reference/export_check.py loaded in PyTorch: \
             rerun it on {} and commit tests/fixtures/export/check.json",
            dir.parent().unwrap().display()
        );
    }
}

/// The PixelLM fixture's model with POPEN's additions (fresh: random p_hat and projection).
fn pixellm_fixture_with_popen() -> (PixelLmConfig, PixelLm<B>) {
    let mut cfg = crate::pixellm_reference::fixture_config();
    cfg.prompt_embeddings = 10;
    cfg.seg_feedback = true;
    let (w, clip) = crate::pixellm_reference::fixture_files();
    let (mut model, fresh) = pixellm::load::<B>(&cfg, w, Layout::Pixellm, Some(&clip), &Default::default()).unwrap();
    assert!(fresh.iter().any(|n| n == "prompt_embeddings") && fresh.iter().any(|n| n.starts_with("seg_feedback.")));
    // Fixed values in place of the random initialization: the export's bytes are checked.
    let fill = |dims: &[usize], k: f32| -> TensorData {
        let n: usize = dims.iter().product();
        TensorData::new((0..n).map(|i| (i as f32 * 0.37 + k).sin() * 0.5).collect::<Vec<f32>>(), dims.to_vec())
    };
    let dev = Default::default();
    let p = model.prompt_embeddings.take().unwrap();
    model.prompt_embeddings = Some(p.map(|t| Tensor::from_data(fill(&t.dims(), 1.0), &dev)));
    let mut lin = model.seg_feedback.take().unwrap();
    lin.weight = lin.weight.map(|t| Tensor::from_data(fill(&t.dims(), 2.0), &dev));
    lin.bias = lin.bias.map(|b| b.map(|t| Tensor::from_data(fill(&t.dims(), 3.0), &dev)));
    model.seg_feedback = Some(lin);
    (cfg, model)
}

#[test]
fn pixellm_export_holds_the_pytorch_checkpoint_and_imports_back() {
    let (cfg, model) = pixellm_fixture_with_popen();
    let dir = out_dir("pixellm");
    let report = export::export_weights(&model, &dir, ExportLayout::Pixellm, None).unwrap();
    assert!(report.left_out.is_empty(), "{:?}", report.left_out);

    // Every tensor PixelLM's modules saved, under its name, with its value.
    let (orig_path, clip_path) = crate::pixellm_reference::fixture_files();
    let orig = tensors(&orig_path);
    let got = tensors(&dir.join("model.safetensors"));
    for (name, t) in &orig {
        assert_eq!(got.get(name), Some(t), "'{name}' differs from PixelLM's checkpoint");
    }
    let extra: Vec<&String> = got.keys().filter(|k| !orig.contains_key(*k)).collect();
    assert_eq!(extra, ["popen.prompt_embeddings", "popen.seg_feedback.bias", "popen.seg_feedback.weight"]);
    let ours = named(&model);
    assert_eq!(got["popen.prompt_embeddings"], ours["prompt_embeddings"]);

    // The tower: the fixture's CLIPVisionModel tensors, the position table at the model's size.
    let tower = tensors(&dir.join("vision_tower/model.safetensors"));
    let clip = tensors(&clip_path.join("model.safetensors"));
    assert_eq!(tower.keys().collect::<Vec<_>>(), clip.keys().collect::<Vec<_>>());
    let pos = "vision_model.embeddings.position_embedding.weight";
    for (name, t) in &clip {
        if name != pos {
            assert_eq!(&tower[name], t, "tower '{name}'");
        }
    }
    assert_eq!(tower[pos], ours[&format!("vision_tower.{pos}")]);
    assert_eq!(tower[pos].0[0], (cfg.image_size / cfg.vision.patch_size).pow(2) + 1);
    let tcfg: ClipVisionConfig = serde_json::from_value(json(&dir.join("vision_tower/config.json"))).unwrap();
    assert_eq!(tcfg, ClipVisionConfig { image_size: cfg.image_size, ..cfg.vision.clone() });

    // config.json: transformers' LLaMA fields and PixelLM's settings.
    let c = json(&dir.join("config.json"));
    let llm: LlamaConfig = serde_json::from_value(c.clone()).unwrap();
    assert_eq!(llm, cfg.llm);
    assert_eq!(c["architectures"][0], "PixelLMForCausalLM");
    assert_eq!(c["mm_hidden_size"], cfg.vision.hidden_size);
    assert_eq!(c["mm_vision_select_layer"], cfg.vision_select_layers[0] as i64);
    assert_eq!(c["image_feature_scale_num"], cfg.vision_select_layers.len());
    assert_eq!(c["out_dim"], cfg.out_dim);
    assert_eq!(c["resize_vision_tower_size"], cfg.image_size);
    assert_eq!(c["mm_projector_hidden_dim"], 2);
    assert_eq!(c["mm_use_im_start_end"], true);

    // Imported back (model.toml as the config, vision_tower/ as the tower): the same tensors.
    let cfg2 = PixelLmConfig::from_toml_file(dir.join("model.toml")).unwrap();
    assert_eq!(cfg2, cfg);
    let (back, fresh) =
        pixellm::load::<B>(&cfg2, &dir, Layout::Pixellm, Some(&dir.join("vision_tower")), &Default::default()).unwrap();
    assert!(fresh.is_empty(), "p_hat and the projection come back from popen.*: {fresh:?}");
    assert_eq!(named(&back), ours);
    crate::pixellm_reference::assert_matches_reference(back);

    assert_checked_by_pytorch("pixellm", &dir);
}

fn llava_fixture() -> (PixelLmConfig, PixelLm<B>) {
    let c = json(&fixtures().join("llava/config.json"));
    let llm: LlamaConfig = serde_json::from_value(c["text_config"].clone()).unwrap();
    let vision: ClipVisionConfig = serde_json::from_value(c["vision_config"].clone()).unwrap();
    let cfg = crate::pixellm::llava_fixture_config(llm, vision, -2);
    let (model, _) =
        pixellm::load::<B>(&cfg, fixtures().join("llava"), Layout::LlavaHf, None, &Default::default()).unwrap();
    (cfg, model)
}

#[test]
fn llava_hf_export_is_what_transformers_saved_and_imports_back() {
    let (cfg, model) = llava_fixture();
    let original = json(&fixtures().join("llava/config.json"));
    let image_token = original["image_token_index"].as_u64().unwrap() as u32;
    let dir = out_dir("llava-hf");
    let report = export::export_weights(&model, &dir, ExportLayout::LlavaHf, Some(image_token)).unwrap();
    for part in ["text_hidden_fcs.", "decoder.", "out_mm_projector.", "image_feature_neck."] {
        assert!(report.left_out.iter().any(|n| n.starts_with(part)), "{part} is listed as left out");
    }
    assert!(!report
        .left_out
        .iter()
        .any(|n| n.starts_with("llm.") || n.starts_with("vision_tower.") || n.starts_with("mm_projector.")));

    // Tensor for tensor what transformers' save_pretrained wrote.
    let theirs = tensors(&fixtures().join("llava/model.safetensors"));
    let got = tensors(&dir.join("model.safetensors"));
    assert_eq!(got.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    assert_eq!(got, theirs);

    // The config fields that define the model, as transformers wrote them.
    let c = json(&dir.join("config.json"));
    for k in [
        "model_type",
        "image_token_index",
        "image_seq_length",
        "projector_hidden_act",
        "multimodal_projector_bias",
        "vision_feature_layer",
        "vision_feature_select_strategy",
    ] {
        assert_eq!(c[k], original[k], "config.json `{k}`");
    }
    for k in [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
        "head_dim",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
        "model_type",
        "rope_scaling",
    ] {
        assert_eq!(c["text_config"][k], original["text_config"][k], "config.json text_config `{k}`");
    }
    for k in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_channels",
        "image_size",
        "patch_size",
        "layer_norm_eps",
        "hidden_act",
        "model_type",
    ] {
        assert_eq!(c["vision_config"][k], original["vision_config"][k], "config.json vision_config `{k}`");
    }

    // Imported back: the LLaVA tensors, and transformers' logits.
    let (back, _) = pixellm::load::<B>(&cfg, &dir, Layout::LlavaHf, None, &Default::default()).unwrap();
    let (a, b) = (named(&model), named(&back));
    for (n, t) in &a {
        if n.starts_with("llm.") || n.starts_with("vision_tower.") || n.starts_with("mm_projector.") {
            assert_eq!(&b[n], t, "'{n}' after the round trip");
        }
    }
    crate::pixellm::assert_llava_logits(&back);

    assert_checked_by_pytorch("llava-hf", &dir);
}

#[test]
fn export_refuses_what_the_layouts_cannot_hold() {
    let err = export::check_exportable(&PixelLmConfig::tiny_sam(1024), ExportLayout::Pixellm).unwrap_err().to_string();
    assert!(err.contains("sam_encoder"), "{err}");
    let pixellm = crate::pixellm_reference::fixture_config();
    let err = export::check_exportable(&pixellm, ExportLayout::LlavaHf).unwrap_err().to_string();
    assert!(err.contains("mm_projector_hidden") && err.contains("--layout pixellm"), "{err}");
    export::check_exportable(&pixellm, ExportLayout::Pixellm).unwrap();
    // llava-hf needs the image token's id.
    let (_, model) = llava_fixture();
    let dir = out_dir("no-image-token");
    let err = export::export_weights(&model, &dir, ExportLayout::LlavaHf, None).unwrap_err().to_string();
    assert!(err.contains("--image-token-id"), "{err}");
    assert!(!dir.exists(), "nothing is written before the refusal");
}

/// The tokenizer files: tokenizer.json reloads with the same ids, tokenizer_config.json and
/// special_tokens_map.json name BOS / EOS / pad as transformers' fast tokenizer reads them.
#[test]
fn exported_tokenizer_reloads_with_the_same_ids() {
    let texts = ["Show me the red apple.", "The red apple [SEG0] is here.", "Find the blue cup on the left."];
    let mut tok = Tokenizer::train_tiny(texts.iter().copied(), 300, TINY_SPECIALS).unwrap();
    tok.add_pixellm_tokens(6).unwrap();
    let dir = out_dir("tokenizer");
    let files = export::export_tokenizer(&tok, &dir).unwrap();
    assert_eq!(files, ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]);
    let back = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    for t in texts {
        assert_eq!(back.encode(t, true).unwrap(), tok.encode(t, true).unwrap(), "{t}");
    }
    let c = json(&dir.join("tokenizer_config.json"));
    assert_eq!(c["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(c["eos_token"], tok.id_to_token(tok.eos_id().unwrap()).unwrap());
    let m = json(&dir.join("special_tokens_map.json"));
    assert_eq!(m["eos_token"], c["eos_token"]);
}
