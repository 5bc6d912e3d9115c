//! popen-eval's tests, one binary. Each module names its reference:
//! - `reference`: gIoU/cIoU and the Hungarian assignment against
//!   `tools/reference/pixellm_eval.py` (PixelLM's evaluation in numpy + SciPy 1.17.1);
//! - `chair`: CHAIR mentions and Eq. 7 on hand-computed sentences;
//! - `report`: localization error, Boundary IoU, baselines, id/size errors, the report and
//!   the LLM judge against a local HTTP server, all hand-computed.

mod chair;
mod reference;
mod report;

use popen_core::mask::{Mask, Rle};
use popen_core::shard::{Prediction, Sample, SEG_TOKEN};
use std::path::PathBuf;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn rect(h: u32, w: u32, y0: u32, y1: u32, x0: u32, x1: u32) -> Rle {
    Rle::encode(&Mask::from_fn(h, w, |y, x| y >= y0 && y < y1 && x >= x0 && x < x1))
}

/// A sample whose answer names each target once ("the <name> <seg>").
pub fn sample(id: &str, h: u32, w: u32, targets: &[(&str, Rle, i32)], instances: &[(&str, Rle)]) -> Sample {
    let answer = targets.iter().map(|(n, _, _)| format!("the {n} {SEG_TOKEN}")).collect::<Vec<_>>().join(" and ");
    Sample {
        id: id.into(),
        split: "val".into(),
        image: Vec::new(),
        width: w,
        height: h,
        instruction: "Find them.".into(),
        answer,
        target_names: targets.iter().map(|t| t.0.to_string()).collect(),
        target_masks: targets.iter().map(|t| t.1.clone()).collect(),
        target_instances: targets.iter().map(|t| t.2).collect(),
        instance_names: instances.iter().map(|i| i.0.to_string()).collect(),
        instance_masks: instances.iter().map(|i| i.1.clone()).collect(),
        meta: String::new(),
    }
}

/// A prediction with the given answer text and one mask per `<seg>`.
pub fn prediction(id: &str, h: u32, w: u32, answer: &str, masks: Vec<Rle>) -> Prediction {
    Prediction {
        id: id.into(),
        split: "val".into(),
        width: w,
        height: h,
        answer: answer.into(),
        mask_scores: vec![1.0; masks.len()],
        masks,
        token_ids: Vec::new(),
        token_logprobs: Vec::new(),
        meta: String::new(),
    }
}

/// A small benchmark-format lexicon (the shape `popen synth` writes to lexicon.json).
pub const BENCH_LEXICON: &str = r#"{
  "version": 1,
  "categories": [
    {"name": "ball", "plural": "balls", "synonyms": ["toy ball"], "synonym_plurals": ["toy balls"]},
    {"name": "apple", "plural": "apples", "synonyms": [], "synonym_plurals": []},
    {"name": "box", "plural": "boxes", "synonyms": ["crate", "carton"], "synonym_plurals": ["crates", "cartons"]},
    {"name": "leaf", "plural": "leaves", "synonyms": [], "synonym_plurals": []},
    {"name": "moon", "plural": "moons", "synonyms": ["crescent moon", "crescent"], "synonym_plurals": ["crescent moons", "crescents"]},
    {"name": "cup", "plural": "cups", "synonyms": ["mug"], "synonym_plurals": ["mugs"]},
    {"name": "dice", "plural": "dice", "synonyms": [], "synonym_plurals": []},
    {"name": "fish", "plural": "fish", "synonyms": [], "synonym_plurals": []}
  ],
  "colours": [{"name": "red", "rgb": [204, 33, 31]}, {"name": "orange", "rgb": [240, 128, 26]}],
  "mention_forms": {"toy balls": "ball", "mug": "cup", "leaves": "leaf"}
}"#;
