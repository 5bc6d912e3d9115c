//! Trivial predictors, so that a report can say how far a model is from doing nothing.

use crate::error::{EvalError, Result};
use popen_core::mask::Rle;
use popen_core::shard::{Prediction, Sample, SEG_TOKEN};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Baseline {
    /// Empty answer, no masks.
    Nothing,
    /// `"<name> <seg>"` with the image's largest annotated instance (first on ties); an image
    /// without instances gets the empty answer.
    LargestInstance,
}

impl Baseline {
    pub fn name(self) -> &'static str {
        match self {
            Baseline::Nothing => "nothing",
            Baseline::LargestInstance => "largest-instance",
        }
    }

    /// The baseline's answer for one sample.
    pub fn predict(self, sample: &Sample) -> Result<Prediction> {
        let mut p = Prediction {
            id: sample.id.clone(),
            split: sample.split.clone(),
            width: sample.width,
            height: sample.height,
            answer: String::new(),
            masks: Vec::new(),
            mask_scores: Vec::new(),
            token_ids: Vec::new(),
            token_logprobs: Vec::new(),
            meta: serde_json::json!({ "baseline": self.name() }).to_string(),
        };
        if self == Baseline::LargestInstance {
            let mut best: Option<(usize, u64)> = None;
            for (i, m) in sample.instance_masks.iter().enumerate() {
                m.validate().map_err(|e| EvalError::sample(&sample.id, format!("instance mask {i}: {e}")))?;
                if best.is_none_or(|(_, a)| m.area() > a) {
                    best = Some((i, m.area()));
                }
            }
            if let Some((i, _)) = best {
                let m: &Rle = &sample.instance_masks[i];
                p.answer = format!("{} {SEG_TOKEN}", sample.instance_names[i]);
                p.masks = vec![m.clone()];
                p.mask_scores = vec![1.0];
            }
        }
        Ok(p)
    }

    /// The baseline's answers for every sample, in order.
    pub fn predict_all(self, samples: &[Sample]) -> Result<Vec<Prediction>> {
        samples.iter().map(|s| self.predict(s)).collect()
    }
}

impl std::str::FromStr for Baseline {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "nothing" => Ok(Baseline::Nothing),
            "largest-instance" => Ok(Baseline::LargestInstance),
            _ => Err(format!("unknown baseline '{s}' (nothing, largest-instance)")),
        }
    }
}
