//! The `config.json` of a Hugging Face `LlavaForConditionalGeneration`, as transformers 4.x and
//! 5.x write it: `text_config` (a LLaMA, read by [`LlamaConfig`], which knows both RoPE
//! spellings), `vision_config` (read by [`ClipVisionConfig`]) and the LLaVA glue settings.
//! What popen's LLaVA path ([`crate::pixellm`]) does not compute is an error naming the field:
//! a projector activation other than `gelu`, `vision_feature_select_strategy` `full`, several
//! `vision_feature_layer`s, a projector without bias, a text model other than LLaMA or a vision
//! tower other than CLIP. PixelLM's own checkpoints (`LlavaLlamaForCausalLM`) keep the LLaMA
//! fields at the top level: [`LlamaConfig::from_json_file`] reads them.

use std::path::Path;

use serde_json::Value;

use crate::clip::ClipVisionConfig;
use crate::llama::LlamaConfig;

/// A bad LLaVA `config.json`.
#[derive(Debug, thiserror::Error)]
#[error("{path}: bad LLaVA config: {msg}")]
pub struct LlavaConfigError {
    pub path: String,
    pub msg: String,
}

/// What a `LlavaForConditionalGeneration` config fixes for popen.
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaHfConfig {
    pub text: LlamaConfig,
    pub vision: ClipVisionConfig,
    /// `image_token_index` (5.x also spells it `image_token_id`); transformers' default 32000.
    pub image_token_index: u32,
    /// The tower's `hidden_states` index whose patch tokens (CLS dropped) feed the projector
    /// ([`crate::pixellm::PixelLmConfig::vision_select_layers`]'s first entry); default -2.
    pub vision_feature_layer: isize,
}

/// `LlavaConfig`'s vision tower when `vision_config` is absent (both generations):
/// CLIP ViT-L/14 at 336.
fn default_vision() -> ClipVisionConfig {
    ClipVisionConfig::vit_l_14_336()
}

impl LlavaHfConfig {
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, LlavaConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| LlavaConfigError { path: path.display().to_string(), msg: e.to_string() })?;
        Self::from_json_str(&text).map_err(|msg| LlavaConfigError { path: path.display().to_string(), msg })
    }

    pub fn from_json_str(text: &str) -> Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        Self::from_value(&v)
    }

    pub fn from_value(v: &Value) -> Result<Self, String> {
        let obj = v.as_object().ok_or("not a JSON object")?;
        let get = |k: &str| obj.get(k).filter(|x| !x.is_null());
        if let Some(t) = get("model_type").and_then(Value::as_str).filter(|t| *t != "llava") {
            return Err(format!("model_type {t:?} is not a LLaVA config (llava)"));
        }
        let str_setting = |k: &str, default: &str, ok: &[&str]| -> Result<(), String> {
            match get(k) {
                None => Ok(()),
                Some(Value::String(s)) if ok.contains(&s.as_str()) => Ok(()),
                Some(other) => {
                    Err(format!("{k} {other} is not supported (only {ok:?}; transformers' default {default:?})"))
                }
            }
        };
        str_setting("projector_hidden_act", "gelu", &["gelu"])?;
        str_setting("vision_feature_select_strategy", "default", &["default"])?;
        if let Some(b) = get("multimodal_projector_bias").filter(|b| **b != Value::Bool(true)) {
            return Err(format!("multimodal_projector_bias {b} is not supported (only true)"));
        }
        let vision_feature_layer = match get("vision_feature_layer") {
            None => -2,
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_i64() => a[0].as_i64().unwrap() as isize,
            Some(x) if x.is_i64() => x.as_i64().unwrap() as isize,
            Some(other) => return Err(format!("vision_feature_layer {other} is not supported (one layer index)")),
        };
        let image_token_index = match (get("image_token_index"), get("image_token_id")) {
            (Some(a), Some(b)) if a != b => {
                return Err(format!("image_token_index {a} and image_token_id {b} disagree"))
            }
            (Some(a), _) | (None, Some(a)) => a
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| format!("image_token_index {a} is not a token id"))?,
            (None, None) => 32000,
        };
        let sub = |k: &str, model_type: &str| -> Result<Option<Value>, String> {
            match get(k) {
                None => Ok(None),
                Some(Value::Object(m)) => {
                    if let Some(t) = m.get("model_type").and_then(Value::as_str).filter(|t| *t != model_type) {
                        return Err(format!("{k}.model_type {t:?} is not supported ({model_type})"));
                    }
                    Ok(Some(Value::Object(m.clone())))
                }
                Some(other) => Err(format!("{k} must be an object, got {other}")),
            }
        };
        let mut text: LlamaConfig = match sub("text_config", "llama")? {
            Some(t) => serde_json::from_value(t).map_err(|e| format!("text_config: {e}"))?,
            None => LlamaConfig::default(),
        };
        // transformers 5 keeps `tie_word_embeddings` at the top level (or-ed with the text
        // config's); 4.x reads the text config's alone and does not write a top-level one.
        match get("tie_word_embeddings") {
            None | Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) => text.tie_word_embeddings = true,
            Some(other) => return Err(format!("tie_word_embeddings {other} is not a boolean")),
        }
        let vision: ClipVisionConfig = match sub("vision_config", "clip_vision_model")? {
            Some(vc) => {
                // LlavaConfig builds the tower from `vision_config` over CLIPVisionConfig's own
                // defaults, not over the ViT-L default it uses when the whole dict is absent.
                let c: ClipVisionConfig = serde_json::from_value(vc).map_err(|e| format!("vision_config: {e}"))?;
                c.validate().map_err(|e| format!("vision_config: {e}"))?;
                c
            }
            None => default_vision(),
        };
        let layers = vision.num_hidden_layers as isize;
        if !(-(layers + 1)..=layers).contains(&vision_feature_layer) {
            return Err(format!(
                "vision_feature_layer {vision_feature_layer} is out of range for {layers} vision layers"
            ));
        }
        Ok(Self { text, vision, image_token_index, vision_feature_layer })
    }
}
