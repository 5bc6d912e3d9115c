//! Checkpoint configs of both transformers generations (issue 24 item 1).
//!
//! tests/fixtures/config_generations/tf4 and tf5 hold the config.json files transformers
//! 4.57.1 and 5.25.0 write for the same models (tools/reference/config_generations_fixture.py;
//! versions in each file and in meta.json): 5.x nests the RoPE base and scaling under
//! `rope_parameters`. Loaded with the weights of the existing fixtures (tests/fixtures/llama,
//! llava), both generations must reproduce transformers' log-probs; `interpreted.json` is how
//! transformers 5.25.0 itself reads every file, `rope_reference.json` its RoPE frequencies.

use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use burn::prelude::*;
use burn::tensor::{Int, TensorData};
use popen_model::clip::{ClipActivation, ClipVisionConfig};
use popen_model::llama::{AttnExtras, Llama, LlamaConfig, RopeScaling};
use popen_model::llava::LlavaHfConfig;
use popen_model::weights::Remap;
use serde_json::Value;

type B = NdArray<f32>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn gen_file(gen: &str, name: &str) -> PathBuf {
    fixtures().join("config_generations").join(gen).join(name)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

const GENS: [(&str, &str); 2] = [("tf4", "4.57.1"), ("tf5", "5.25.0")];

/// Each file was written by the transformers it is filed under.
fn written_by(gen: &str, name: &str, version: &str) {
    let v = json(&gen_file(gen, name));
    assert_eq!(v["transformers_version"], version, "{gen}/{name}");
}

/// `interpreted.json`'s rope_parameters of a file vs what popen read.
fn assert_rope_as_transformers(key: &str, cfg: &LlamaConfig) {
    let interp = json(&fixtures().join("config_generations/interpreted.json"));
    let rp = &interp["files"][key]["rope_parameters"];
    assert_eq!(rp["rope_theta"].as_f64().unwrap(), cfg.rope_theta, "{key}");
    match (&cfg.rope_scaling, rp["rope_type"].as_str().unwrap()) {
        (None, "default") => {}
        (Some(RopeScaling::Linear { factor }), "linear") => {
            assert_eq!(rp["factor"].as_f64().unwrap(), *factor, "{key}")
        }
        (
            Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }),
            "llama3",
        ) => {
            assert_eq!(rp["factor"].as_f64().unwrap(), *factor, "{key}");
            assert_eq!(rp["low_freq_factor"].as_f64().unwrap(), *low_freq_factor, "{key}");
            assert_eq!(rp["high_freq_factor"].as_f64().unwrap(), *high_freq_factor, "{key}");
            assert_eq!(
                rp["original_max_position_embeddings"].as_u64().unwrap() as usize,
                *original_max_position_embeddings,
                "{key}"
            );
        }
        (ours, theirs) => panic!("{key}: popen read {ours:?}, transformers rope_type {theirs}"),
    }
}

fn llama_model(cfg: &LlamaConfig) -> Llama<B> {
    Llama::load(cfg, fixtures().join("llama"), &Remap::none(), &Default::default()).unwrap()
}

/// The LLaMA fixture's config as transformers 4.x and 5.x write it: the same config, and with
/// the fixture's weights the teacher-forced log-probs of transformers (fixture "score"). Today's
/// 4.x-only reader took theta = 10000 from the 5.x file (its `rope_theta` is nested).
#[test]
fn llama_config_of_both_generations_gives_transformers_logprobs() {
    let e = json(&fixtures().join("llama/expected.json"));
    let rows = |k: &str| -> Vec<Vec<u32>> {
        e["score"][k]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
            .collect()
    };
    let (prompts, responses) = (rows("prompts"), rows("responses"));
    let original = LlamaConfig::from_json_file(fixtures().join("llama/config.json")).unwrap();
    for (gen, version) in GENS {
        written_by(gen, "llama.json", version);
        let cfg = LlamaConfig::from_json_file(gen_file(gen, "llama.json")).unwrap();
        assert_eq!(cfg, original, "{gen}");
        assert_eq!(cfg.rope_theta, 50000.0, "{gen}");
        assert_rope_as_transformers(&format!("{gen}/llama.json"), &cfg);
        let got = llama_model(&cfg).score(&prompts, &responses).unwrap();
        for (r, (g, w)) in got.iter().zip(e["score"]["logprobs"].as_array().unwrap()).enumerate() {
            let w: Vec<f32> = w.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            assert_eq!(g.len(), w.len());
            for (a, b) in g.iter().zip(&w) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{gen} row {r}: {g:?} vs {w:?}");
            }
        }
    }
}

/// RoPE scaling of both spellings (4.x `rope_scaling`, 5.x `rope_parameters`): read as
/// transformers 5 reads it, inverse frequencies as its formulas give them.
#[test]
fn rope_scaling_of_both_generations_matches_transformers() {
    let reference = json(&fixtures().join("config_generations/rope_reference.json"));
    for (gen, version) in GENS {
        for name in ["llama_linear.json", "llama_llama3.json"] {
            written_by(gen, name, version);
            let key = format!("{gen}/{name}");
            let cfg = LlamaConfig::from_json_file(gen_file(gen, name)).unwrap();
            assert!(cfg.rope_scaling.is_some(), "{key}");
            assert_rope_as_transformers(&key, &cfg);
            let want: Vec<f64> =
                reference["files"][&key]["inv_freq"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            let got = cfg.rope_inv_freq();
            assert_eq!(got.len(), want.len(), "{key}");
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-12 * b.abs(), "{key}: {got:?} vs {want:?}");
            }
            // The same model as popen writes it reads back the same (JSON and TOML).
            let back: LlamaConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
            assert_eq!(back, cfg, "{key}");
            let back: LlamaConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
            assert_eq!(back, cfg, "{key}");
        }
        // Which band each frequency falls in (llama3, original context 200 -> wavelengths
        // 50 and 200): kept, smoothed, divided by 8, divided by 8.
        let plain = LlamaConfig::from_json_file(gen_file(gen, "llama.json")).unwrap().rope_inv_freq();
        let l3 = LlamaConfig::from_json_file(gen_file(gen, "llama_llama3.json")).unwrap().rope_inv_freq();
        assert_eq!(l3[0], plain[0]);
        assert!(l3[1] < plain[1] && l3[1] > plain[1] / 8.0);
        assert!((l3[2] - plain[2] / 8.0).abs() < 1e-18 && (l3[3] - plain[3] / 8.0).abs() < 1e-18);
    }
}

/// Linear scaling is position interpolation: with factor 2, positions 2p compute exactly what
/// plain RoPE computes at p (the fixture's weights, the 5.x-written configs).
#[test]
fn linear_rope_scaling_is_position_interpolation() {
    let plain = llama_model(&LlamaConfig::from_json_file(gen_file("tf5", "llama.json")).unwrap());
    let lin = llama_model(&LlamaConfig::from_json_file(gen_file("tf5", "llama_linear.json")).unwrap());
    let dev = Default::default();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![5i64, 17, 42, 8, 77, 3], [1, 6]), &dev);
    let pos = |step: i64| {
        Tensor::<B, 2, Int>::from_data(TensorData::new((0..6).map(|p| p * step).collect::<Vec<i64>>(), [1, 6]), &dev)
    };
    let run = |m: &Llama<B>, step: i64| -> Vec<f32> {
        let extras = AttnExtras { positions: Some(pos(step)), key_keep: None, gamma: None };
        let h = m.forward_embeds(m.embed(ids.clone()), &extras, &mut m.new_cache()).unwrap();
        m.logits(h).into_data().convert::<f32>().into_vec().unwrap()
    };
    let (a, b, c) = (run(&plain, 1), run(&lin, 2), run(&lin, 1));
    let diff = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max);
    assert!(diff(&a, &b) <= 1e-5, "{}", diff(&a, &b));
    assert!(diff(&a, &c) > 1e-3, "the scaling must change the model at the same positions");
}

/// Settings popen does not compute are errors naming the field, in either spelling.
#[test]
fn unsupported_settings_are_errors_naming_the_field() {
    for (gen, _) in GENS {
        for (name, words) in [
            ("llama_yarn.json", &["rope_type", "yarn"][..]),
            ("llama_dynamic.json", &["rope_type", "dynamic"][..]),
            ("llama_gelu.json", &["hidden_act", "gelu"][..]),
        ] {
            let err = LlamaConfig::from_json_file(gen_file(gen, name)).unwrap_err().to_string();
            let field = if gen == "tf4" { "rope_scaling" } else { "rope_parameters" };
            for w in words {
                assert!(err.contains(w), "{gen}/{name}: {err}");
            }
            if name != "llama_gelu.json" {
                assert!(err.contains(field), "{gen}/{name}: {err}");
            }
        }
        let err = ClipVisionConfig::from_json_file(gen_file(gen, "clip_gelu_new.json")).unwrap_err().to_string();
        assert!(err.contains("hidden_act") && err.contains("gelu_new"), "{gen}: {err}");
    }
    // Two spellings of one setting that disagree; a setting required by its rope_type.
    for (bad, words) in [
        (
            r#"{"rope_theta": 10000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}}"#,
            &["rope_parameters.rope_theta", "rope_theta 10000"][..],
        ),
        (
            r#"{"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": {"rope_type": "default"}}"#,
            &["rope_scaling", "rope_parameters", "disagree"][..],
        ),
        (r#"{"rope_parameters": {"rope_type": "linear"}}"#, &["rope_parameters.factor"][..]),
        (
            r#"{"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}}"#,
            &["rope_scaling.high_freq_factor"][..],
        ),
        (
            r#"{"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}"#,
            &["partial_rotary_factor"][..],
        ),
        (
            r#"{"rope_parameters": {"full_attention": {"rope_type": "default"}}}"#,
            &["rope_parameters.full_attention"][..],
        ),
    ] {
        let err = serde_json::from_str::<LlamaConfig>(bad).unwrap_err().to_string();
        for w in words {
            assert!(err.contains(w), "{bad}: {err}");
        }
    }
    for (bad, word) in [
        (r#"{"projector_hidden_act": "relu"}"#, "projector_hidden_act"),
        (r#"{"vision_feature_select_strategy": "full"}"#, "vision_feature_select_strategy"),
        (r#"{"vision_feature_layer": [-2, -5]}"#, "vision_feature_layer"),
        (r#"{"multimodal_projector_bias": false}"#, "multimodal_projector_bias"),
        (r#"{"text_config": {"model_type": "mistral"}}"#, "text_config.model_type"),
        (r#"{"image_token_index": 5, "image_token_id": 6}"#, "image_token_id"),
        (r#"{"text_config": {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}}"#, "rope_parameters.rope_type"),
        (r#"{"vision_config": {"hidden_act": "gelu_new"}}"#, "hidden_act"),
    ] {
        let err = LlavaHfConfig::from_json_str(bad).unwrap_err();
        assert!(err.contains(word), "{bad}: {err}");
    }
    // A 4.x file with neither spelling takes transformers' defaults (the same in 5.x).
    let c: LlamaConfig = serde_json::from_str("{}").unwrap();
    assert_eq!((c.rope_theta, c.rope_scaling), (10000.0, None));
}

/// CLIP's vision config reads the same from both generations (5.x may write sizes as [h, w]).
#[test]
fn clip_config_of_both_generations() {
    let original = ClipVisionConfig::from_json_file(fixtures().join("clip/model/config.json")).unwrap();
    for (gen, version) in GENS {
        written_by(gen, "clip.json", version);
        let c = ClipVisionConfig::from_json_file(gen_file(gen, "clip.json")).unwrap();
        assert_eq!(c, original, "{gen}");
        assert_eq!(c.hidden_act, ClipActivation::QuickGelu);
    }
    written_by("tf5", "clip_list_sizes.json", "5.25.0");
    let c = ClipVisionConfig::from_json_file(gen_file("tf5", "clip_list_sizes.json")).unwrap();
    assert_eq!(c, original);
    let err = serde_json::from_str::<ClipVisionConfig>(r#"{"image_size": [16, 32]}"#).unwrap_err();
    assert!(err.to_string().contains("image_size"), "{err}");
}

/// The LLaVA fixture's config as both generations write it (and as the fixture itself holds
/// it): the same settings, and with the fixture's weights transformers' logits.
#[test]
fn llava_config_of_both_generations_gives_transformers_logits() {
    let original = LlavaHfConfig::from_json_file(fixtures().join("llava/config.json")).unwrap();
    assert_eq!(original.image_token_index, 99);
    assert_eq!(original.vision_feature_layer, -2);
    for (gen, version) in GENS {
        written_by(gen, "llava.json", version);
        let c = LlavaHfConfig::from_json_file(gen_file(gen, "llava.json")).unwrap();
        assert_eq!(c, original, "{gen}");
        assert_rope_as_transformers(&format!("{gen}/llava.json"), &c.text);
        crate::pixellm::check_llava_fixture(c.text, c.vision, c.vision_feature_layer);
    }
}
