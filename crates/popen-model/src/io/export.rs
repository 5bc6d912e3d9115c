//! `popen model-export`: a popen model written back in the key layout of PixelLM's code or of
//! transformers' `LlavaForConditionalGeneration`, so a POPEN-finetuned model can leave popen.
//!
//! Each exported tensor name is checked against the import rules ([`Layout::remap`]): what
//! `model-import --layout L` reads from an export of layout L lands on the tensor it came
//! from, so an export imports back to the same tensors (tests/model/export.rs).
//!
//! - [`ExportLayout::Pixellm`]: `model.safetensors` with PixelLM's names
//!   (`PixelLMForCausalLM.state_dict()` without the CLIP tower, as PixelLM's merge script
//!   writes it; docs/checkpoint-keys.md), the CLIP tower as a `CLIPVisionModel` folder
//!   `vision_tower/` (`config.json` + `model.safetensors`, saved at the model's input size:
//!   its position table is already resized, so PixelLM's resize is the identity), a
//!   `config.json` with the LLaMA fields and PixelLM's settings, and `model.toml` (popen's
//!   config, for `model-import --config`). POPEN's own tensors (`p_hat`, the seg-feedback
//!   projection) have no place in PixelLM's model: they are stored as `popen.*` in the same
//!   file, which PixelLM's loader reports as unused and `model-import` reads back.
//! - [`ExportLayout::LlavaHf`]: the LLaVA part (CLIP tower, projector, LLaMA) as
//!   transformers 4.57's `save_pretrained` writes `LlavaForConditionalGeneration`
//!   (`vision_tower.*`, `multi_modal_projector.linear_{1,2}.*`, `language_model.model.*`,
//!   `language_model.lm_head.*`; transformers 5.x converts these names on load), and its
//!   `config.json`. PixelLM's and POPEN's parts (decoder, `text_hidden_fcs`,
//!   `out_mm_projector`, `image_feature_neck`, `p_hat`, feedback projection) cannot be held
//!   there and are listed as left out.
//!
//! Architectures neither code base has (the tiny-sam preset's SAM image encoder, the seg
//! locator, the pixel-cell projection) are refused, naming the config field.

use std::collections::BTreeMap;
use std::path::Path;

use burn::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::bundle::io_err;
use crate::pixellm::{Layout, PixelLm, PixelLmConfig, PixelLmError};
use crate::tokenizer::Tokenizer;
use crate::weights;

type Result<T> = std::result::Result<T, PixelLmError>;

/// The layouts `model-export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExportLayout {
    /// PixelLM's code (`PixelLMForCausalLM`).
    Pixellm,
    /// transformers' `LlavaForConditionalGeneration` (the LLaVA part only).
    LlavaHf,
}

impl ExportLayout {
    /// The `--layout` spelling.
    pub fn cli_name(self) -> &'static str {
        match self {
            ExportLayout::Pixellm => "pixellm",
            ExportLayout::LlavaHf => "llava-hf",
        }
    }

    /// The import layout that reads this export back.
    pub fn import_layout(self) -> Layout {
        match self {
            ExportLayout::Pixellm => Layout::Pixellm,
            ExportLayout::LlavaHf => Layout::LlavaHf,
        }
    }

    /// Our prefix -> the layout's prefix; first match wins. `None`: the layout has no place
    /// for tensors under that prefix.
    fn rules(self) -> &'static [(&'static str, Option<&'static str>)] {
        match self {
            ExportLayout::Pixellm => &[
                ("mm_projector.linear_1.", Some("model.mm_projector.0.")),
                ("mm_projector.linear_2.", Some("model.mm_projector.2.")),
                ("out_mm_projector.linear_1.", Some("model.out_mm_projector.0.")),
                ("out_mm_projector.linear_2.", Some("model.out_mm_projector.2.")),
                ("image_feature_neck.conv_1.", Some("model.image_feature_neck.0.")),
                ("image_feature_neck.norm_1.", Some("model.image_feature_neck.1.")),
                ("image_feature_neck.conv_2.", Some("model.image_feature_neck.2.")),
                ("image_feature_neck.norm_2.", Some("model.image_feature_neck.3.")),
                ("text_hidden_fcs.fc_1.", Some("model.text_hidden_fcs.0.0.")),
                ("text_hidden_fcs.fc_2.", Some("model.text_hidden_fcs.0.2.")),
                ("decoder.mask_decoder.", Some("model.mask_decoder.")),
                ("decoder.prompt_encoder.", Some("model.prompt_encoder.")),
                ("llm.model.", Some("model.")),
                ("llm.lm_head.", Some("lm_head.")),
                ("prompt_embeddings", Some("popen.prompt_embeddings")),
                ("seg_feedback.", Some("popen.seg_feedback.")),
            ],
            ExportLayout::LlavaHf => &[
                ("vision_tower.", Some("vision_tower.")),
                ("mm_projector.linear_1.", Some("multi_modal_projector.linear_1.")),
                ("mm_projector.linear_2.", Some("multi_modal_projector.linear_2.")),
                ("llm.model.", Some("language_model.model.")),
                ("llm.lm_head.", Some("language_model.lm_head.")),
                ("out_mm_projector.", None),
                ("image_feature_neck.", None),
                ("text_hidden_fcs.", None),
                ("decoder.", None),
                ("prompt_embeddings", None),
                ("seg_feedback.", None),
            ],
        }
    }

    /// The layout's name for our tensor `name`: `Ok(None)` when the layout has no place for
    /// it, an error when no rule covers it (a module this exporter does not know).
    pub fn name_of(self, name: &str) -> Result<Option<String>> {
        for (ours, theirs) in self.rules() {
            if let Some(rest) = name.strip_prefix(ours) {
                return Ok(theirs.map(|t| format!("{t}{rest}")));
            }
        }
        Err(PixelLmError::Config(format!("model-export: no {self:?} name for tensor '{name}'")))
    }
}

/// What an export wrote and what it left out.
#[derive(Debug, Clone, Default)]
pub struct ExportReport {
    /// Tensors written, by their name in the export.
    pub tensors: usize,
    /// Our tensors the layout cannot hold (grouped by module in messages).
    pub left_out: Vec<String>,
    /// Files written, relative to the export folder.
    pub files: Vec<String>,
}

/// Why `cfg` cannot be written in `layout`, if it cannot.
pub fn check_exportable(cfg: &PixelLmConfig, layout: ExportLayout) -> Result<()> {
    let refuse = |field: &str, why: &str| {
        Err(PixelLmError::Config(format!(
            "model-export --layout {}: the model's `{field}` {why}; neither PixelLM's code nor transformers has it",
            layout.cli_name()
        )))
    };
    if cfg.sam_encoder.is_some() {
        return refuse("sam_encoder", "is a SAM image encoder in place of the CLIP tower (the tiny-sam preset)");
    }
    if cfg.seg_locator > 0 {
        return refuse("seg_locator", "adds a seg locator");
    }
    if cfg.llm_image_pixels {
        return refuse("llm_image_pixels", "adds a projection of each cell's pixels to the image tokens");
    }
    if cfg.llm_image_pe {
        return refuse("llm_image_pe", "adds SAM's positional encoding to the image tokens");
    }
    if layout == ExportLayout::LlavaHf {
        if cfg.mm_projector_hidden != cfg.llm.hidden_size {
            return Err(PixelLmError::Config(format!(
                "model-export --layout llava-hf: transformers' LLaVA projector is Linear(vision, H) -> GELU -> Linear(H, H) with H = {} (the LLM width), but this model's `mm_projector_hidden` is {} (PixelLM's 2H): export --layout pixellm instead",
                cfg.llm.hidden_size, cfg.mm_projector_hidden
            )));
        }
        let grid = cfg.image_size / cfg.vision.patch_size;
        if cfg.llm_image_grid != grid {
            tracing::warn!(
                "llava-hf export: this model resizes the {grid}x{grid} patch features to a {g}x{g} grid of LLM image tokens (PixelLM), transformers' LLaVA feeds every patch: image prompts will compute differently there (the LLM, the tower and the projector are exact)",
                g = cfg.llm_image_grid
            );
        }
    }
    Ok(())
}

/// Write `model`'s weights and config in `layout` into the folder `dir` (created).
/// `image_token_id`: the vocabulary id transformers' LLaVA replaces by image features
/// (`image_token_index`; llava-hf only).
pub fn export_weights<B: Backend>(
    model: &PixelLm<B>,
    dir: &Path,
    layout: ExportLayout,
    image_token_id: Option<u32>,
) -> Result<ExportReport> {
    let cfg = model.config();
    check_exportable(cfg, layout)?;
    let config = match layout {
        ExportLayout::Pixellm => pixellm_config_json(cfg),
        ExportLayout::LlavaHf => {
            let id = image_token_id.ok_or_else(|| {
                PixelLmError::Config(
                    "model-export --layout llava-hf: transformers' LLaVA needs the id of the token it replaces by image features (`image_token_index`): the tokenizer has no `<image>` token; pass --image-token-id".into(),
                )
            })?;
            llava_hf_config_json(cfg, id)
        }
    };
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let import = layout.import_layout().remap();
    let mut main = Vec::new();
    let mut tower = Vec::new();
    let mut report = ExportReport::default();
    for (name, shape, data) in weights::named_tensors(model) {
        if layout == ExportLayout::Pixellm {
            if let Some(rest) = name.strip_prefix("vision_tower.") {
                tower.push((rest.to_string(), shape, data));
                continue;
            }
        }
        match layout.name_of(&name)? {
            None => report.left_out.push(name),
            Some(theirs) => {
                // The import rules must bring the name back (an export imports to itself).
                let back = import.apply(&theirs);
                if back != name {
                    return Err(PixelLmError::Config(format!(
                        "model-export: '{name}' would be written as '{theirs}', which model-import reads as '{back}'"
                    )));
                }
                main.push((theirs, shape, data));
            }
        }
    }
    report.tensors = main.len() + tower.len();
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    weights::write_safetensors(&dir.join("model.safetensors"), &main, &meta)?;
    report.files.push("model.safetensors".into());
    if !tower.is_empty() {
        let td = dir.join("vision_tower");
        std::fs::create_dir_all(&td).map_err(|e| io_err(&td, e))?;
        weights::write_safetensors(&td.join("model.safetensors"), &tower, &meta)?;
        write_json(&td.join("config.json"), &clip_config_json(cfg))?;
        report.files.push("vision_tower/model.safetensors".into());
        report.files.push("vision_tower/config.json".into());
    }
    write_json(&dir.join("config.json"), &config)?;
    report.files.push("config.json".into());
    crate::bundle::save_config(dir, cfg)?;
    report.files.push(crate::bundle::CONFIG_FILE.into());
    Ok(report)
}

/// Write the tokenizer as transformers' fast tokenizer reads it: `tokenizer.json`,
/// `tokenizer_config.json` (`PreTrainedTokenizerFast`, the BOS/EOS/pad tokens, whether BOS
/// is added, the chat template) and `special_tokens_map.json`.
pub fn export_tokenizer(tok: &Tokenizer, dir: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    tok.save(dir.join("tokenizer.json")).map_err(|e| io_err(dir, e))?;
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
    let mut special = serde_json::Map::new();
    for (key, id) in [("bos_token", tok.bos_id()), ("eos_token", tok.eos_id()), ("pad_token", tok.pad_id())] {
        if let Some(t) = name(id) {
            special.insert(key.into(), Value::String(t));
        }
    }
    let mut cfg = special.clone();
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    cfg.insert("add_bos_token".into(), json!(tok.bos_id().is_some()));
    if let Some(t) = tok.chat_template() {
        cfg.insert("chat_template".into(), json!(t));
    }
    write_json(&dir.join("tokenizer_config.json"), &Value::Object(cfg))?;
    write_json(&dir.join("special_tokens_map.json"), &Value::Object(special))?;
    Ok(vec!["tokenizer.json".into(), "tokenizer_config.json".into(), "special_tokens_map.json".into()])
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v).expect("json");
    text.push('\n');
    popen_core::shard::atomic_write(path, text.as_bytes()).map_err(|e| io_err(path, e))
}

/// transformers' `LlamaConfig` dict of the LLM (4.x spelling, which 5.x reads too).
fn llama_json(cfg: &PixelLmConfig) -> serde_json::Map<String, Value> {
    let Value::Object(mut m) = serde_json::to_value(&cfg.llm).expect("config serializes") else {
        unreachable!("a struct serializes to an object")
    };
    m.insert("model_type".into(), json!("llama"));
    m.insert("hidden_act".into(), json!("silu"));
    m.insert("head_dim".into(), json!(cfg.llm.hidden_size / cfg.llm.num_attention_heads));
    m.insert("attention_bias".into(), json!(false));
    m.insert("mlp_bias".into(), json!(false));
    m.entry("rope_scaling").or_insert(Value::Null);
    m
}

/// The tower's `CLIPVisionConfig` at the model's input size (its position table is saved
/// resized).
fn clip_config_json(cfg: &PixelLmConfig) -> Value {
    let Value::Object(mut m) = serde_json::to_value(&cfg.vision).expect("config serializes") else {
        unreachable!("a struct serializes to an object")
    };
    m.insert("image_size".into(), json!(cfg.image_size));
    m.insert("model_type".into(), json!("clip_vision_model"));
    m.insert("architectures".into(), json!(["CLIPVisionModel"]));
    Value::Object(m)
}

/// PixelLM's `config.json`: LLaVA's LLaMA fields plus the settings `PixelLMForCausalLM`
/// sets (docs/checkpoint-keys.md "config.json fields"), and what PixelLM reads from its
/// command line (`seg_token_num`) for reference.
fn pixellm_config_json(cfg: &PixelLmConfig) -> Value {
    let mut m = llama_json(cfg);
    let scales = cfg.vision_select_layers.len();
    let extra = json!({
        "architectures": ["PixelLMForCausalLM"],
        "model_type": "llava",
        "mm_vision_tower": "vision_tower",
        "vision_tower": "vision_tower",
        "mm_hidden_size": cfg.vision.hidden_size,
        "mm_vision_select_layer": cfg.vision_select_layers[0],
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": cfg.mm_use_im_start_end,
        "mm_use_im_patch_token": false,
        "use_mm_proj": true,
        "image_aspect_ratio": "square",
        "resize_vision_tower": cfg.image_size != cfg.vision.image_size,
        "resize_vision_tower_size": cfg.image_size,
        "pad_train_clip_images": true,
        "vision_tower_for_mask": true,
        "separate_mm_projector": true,
        "mm_projector_hidden_dim": cfg.mm_projector_hidden / cfg.llm.hidden_size.max(1),
        "mm_projector_out_dim": 1,
        "image_feature_scale_num": scales,
        "train_mask_decoder": true,
        "out_dim": cfg.out_dim,
        "seg_token_num": cfg.seg_token_num,
        "use_cache": false,
        "popen": {
            "vision_select_layers": cfg.vision_select_layers,
            "llm_image_grid": cfg.llm_image_grid,
            "prompt_embeddings": cfg.prompt_embeddings,
            "seg_feedback": cfg.seg_feedback,
            "note": "popen.* tensors (POPEN's p_hat and seg-feedback projection) are not PixelLM's; model-import reads them back"
        }
    });
    if let Value::Object(e) = extra {
        m.extend(e);
    }
    Value::Object(m)
}

/// transformers' `LlavaConfig` of the LLaVA part.
fn llava_hf_config_json(cfg: &PixelLmConfig, image_token_id: u32) -> Value {
    let mut vision = clip_config_json(cfg);
    if let Value::Object(v) = &mut vision {
        v.remove("architectures");
    }
    let grid = cfg.image_size / cfg.vision.patch_size;
    json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": Value::Object(llama_json(cfg)),
        "vision_config": vision,
        "image_token_index": image_token_id,
        "image_seq_length": grid * grid,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": true,
        "vision_feature_layer": cfg.vision_select_layers[0],
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": cfg.llm.tie_word_embeddings,
    })
}
