//! The predictions shard: what a model answered for each sample of a split (`popen predict`,
//! later the ensemble), read by the evaluator beside the samples shard.

use super::{list_field, rle_struct_field, Columns, Record, RleListBuilder, SEG_TOKEN};
use crate::error::{CoreError, Result};
use crate::mask::Rle;
use arrow::array::{ArrayRef, Float32Builder, Int32Builder, ListBuilder, RecordBatch, StringBuilder, UInt32Builder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// One model answer for one sample.
///
/// `answer` is the decoded text with every object's segmentation token group written as
/// [`SEG_TOKEN`]; `masks[i]` and `mask_scores[i]` go with the i-th `<seg>`. `token_ids` and
/// `token_logprobs` are the generated tokens (model vocabulary, stop token excluded) and the
/// log-probability the model gave each.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// The sample's id (the evaluator joins on it).
    pub id: String,
    pub split: String,
    pub width: u32,
    pub height: u32,
    pub answer: String,
    pub masks: Vec<Rle>,
    /// Per-mask confidence in [0, 1] (PixelLM: mean sigmoid over pixels with logit > 0).
    pub mask_scores: Vec<f32>,
    pub token_ids: Vec<i32>,
    pub token_logprobs: Vec<f32>,
    /// Free-form JSON object (model, sampling settings, stop reason).
    pub meta: String,
}

impl Prediction {
    /// Number of `<seg>` tokens in the answer.
    pub fn seg_count(&self) -> usize {
        self.answer.matches(SEG_TOKEN).count()
    }

    /// Consistency of one record; errors name the field.
    pub fn validate(&self) -> std::result::Result<(), (String, String)> {
        let bad = |field: &str, msg: String| Err((field.to_string(), msg));
        if self.width == 0 || self.height == 0 {
            return bad("width", format!("image size {}x{} is empty", self.width, self.height));
        }
        let n = self.seg_count();
        if self.masks.len() != n {
            return bad("masks", format!("{} masks for {n} {SEG_TOKEN} tokens in the answer", self.masks.len()));
        }
        if self.mask_scores.len() != n {
            return bad("mask_scores", format!("{} scores for {n} masks", self.mask_scores.len()));
        }
        super::check_masks("masks", &self.masks, self.height, self.width)?;
        if let Some(i) = self.mask_scores.iter().position(|s| !s.is_finite()) {
            return bad("mask_scores", format!("score {i} is {}", self.mask_scores[i]));
        }
        if self.token_logprobs.len() != self.token_ids.len() {
            return bad(
                "token_logprobs",
                format!("{} log-probs for {} tokens", self.token_logprobs.len(), self.token_ids.len()),
            );
        }
        if let Some(i) = self.token_logprobs.iter().position(|l| l.is_nan() || *l > 0.0) {
            return bad("token_logprobs", format!("log-prob {i} is {} (must be <= 0)", self.token_logprobs[i]));
        }
        if !self.meta.is_empty() && serde_json::from_str::<serde_json::Value>(&self.meta).is_err() {
            return bad("meta", "not valid JSON".into());
        }
        Ok(())
    }
}

impl Record for Prediction {
    const KIND: &'static str = "prediction/1";

    fn schema() -> SchemaRef {
        static S: OnceLock<SchemaRef> = OnceLock::new();
        S.get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Utf8, false),
                Field::new("split", DataType::Utf8, false),
                Field::new("width", DataType::UInt32, false),
                Field::new("height", DataType::UInt32, false),
                Field::new("answer", DataType::Utf8, false),
                list_field("masks", rle_struct_field()),
                list_field("mask_scores", DataType::Float32),
                list_field("token_ids", DataType::Int32),
                list_field("token_logprobs", DataType::Float32),
                Field::new("meta", DataType::Utf8, false),
            ]))
        })
        .clone()
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let f32_list =
            || ListBuilder::new(Float32Builder::new()).with_field(Field::new("item", DataType::Float32, false));
        let mut id = StringBuilder::new();
        let mut split = StringBuilder::new();
        let mut width = UInt32Builder::new();
        let mut height = UInt32Builder::new();
        let mut answer = StringBuilder::new();
        let mut masks = RleListBuilder::new();
        let mut mask_scores = f32_list();
        let mut token_ids =
            ListBuilder::new(Int32Builder::new()).with_field(Field::new("item", DataType::Int32, false));
        let mut token_logprobs = f32_list();
        let mut meta = StringBuilder::new();
        for r in rows {
            id.append_value(&r.id);
            split.append_value(&r.split);
            width.append_value(r.width);
            height.append_value(r.height);
            answer.append_value(&r.answer);
            masks.append(&r.masks);
            mask_scores.values().append_slice(&r.mask_scores);
            mask_scores.append(true);
            token_ids.values().append_slice(&r.token_ids);
            token_ids.append(true);
            token_logprobs.values().append_slice(&r.token_logprobs);
            token_logprobs.append(true);
            meta.append_value(if r.meta.is_empty() { "{}" } else { &r.meta });
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(id.finish()),
            Arc::new(split.finish()),
            Arc::new(width.finish()),
            Arc::new(height.finish()),
            Arc::new(answer.finish()),
            masks.finish(),
            Arc::new(mask_scores.finish()),
            Arc::new(token_ids.finish()),
            Arc::new(token_logprobs.finish()),
            Arc::new(meta.finish()),
        ];
        RecordBatch::try_new(Self::schema(), cols)
            .map_err(|e| CoreError::Invalid(format!("building prediction batch: {e}")))
    }

    fn check(&self) -> std::result::Result<(), (String, String)> {
        self.validate()
    }

    fn approx_bytes(&self) -> usize {
        self.answer.len()
            + self.meta.len()
            + self.token_ids.len() * 8
            + self.masks.iter().map(|r| r.counts.len() * 2 + 16).sum::<usize>()
    }

    fn from_batch(batch: &RecordBatch, path: &Path, first_row: usize) -> Result<Vec<Self>> {
        let cols = Columns::new(batch, path, first_row);
        let id = cols.str("id")?;
        let split = cols.str("split")?;
        let width = cols.u32("width")?;
        let height = cols.u32("height")?;
        let answer = cols.str("answer")?;
        let meta = cols.str("meta")?;
        let masks = cols.list_rle("masks")?;
        let mask_scores = cols.list_f32("mask_scores")?;
        let token_ids = cols.list_i32("token_ids")?;
        let token_logprobs = cols.list_f32("token_logprobs")?;
        let mut out = Vec::with_capacity(batch.num_rows());
        for (i, (((m, ms), ti), tl)) in
            masks.into_iter().zip(mask_scores).zip(token_ids).zip(token_logprobs).enumerate()
        {
            let p = Prediction {
                id: id.value(i).to_string(),
                split: split.value(i).to_string(),
                width: width.value(i),
                height: height.value(i),
                answer: answer.value(i).to_string(),
                masks: m,
                mask_scores: ms,
                token_ids: ti,
                token_logprobs: tl,
                meta: meta.value(i).to_string(),
            };
            if let Err((field, msg)) = p.validate() {
                return Err(CoreError::field(path, first_row + i, field, format!("record '{}': {msg}", p.id)));
            }
            out.push(p);
        }
        Ok(out)
    }
}
