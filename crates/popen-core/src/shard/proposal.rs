//! The proposals shard: class-agnostic object masks of each sample's image (SAM's automatic
//! mask generator, or any tool), for collect-ps's Eq. 1 and the localization-error metric.

use super::{list_field, rle_struct_field, Columns, Record, RleListBuilder};
use crate::error::{CoreError, Result};
use crate::mask::Rle;
use arrow::array::{ArrayRef, Float32Builder, ListBuilder, RecordBatch, StringBuilder, UInt32Builder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// The proposals of one sample's image.
#[derive(Clone, Debug, PartialEq)]
pub struct ProposalSet {
    /// The sample's id.
    pub id: String,
    pub width: u32,
    pub height: u32,
    pub masks: Vec<Rle>,
    /// One score per mask (SAM: predicted IoU); any value for other tools.
    pub scores: Vec<f32>,
    /// Free-form JSON object (tool, its settings).
    pub meta: String,
}

impl ProposalSet {
    pub fn validate(&self) -> std::result::Result<(), (String, String)> {
        let bad = |field: &str, msg: String| Err((field.to_string(), msg));
        if self.width == 0 || self.height == 0 {
            return bad("width", format!("image size {}x{} is empty", self.width, self.height));
        }
        if self.scores.len() != self.masks.len() {
            return bad("scores", format!("{} scores for {} masks", self.scores.len(), self.masks.len()));
        }
        if let Some(i) = self.scores.iter().position(|s| !s.is_finite()) {
            return bad("scores", format!("score {i} is {}", self.scores[i]));
        }
        super::check_masks("masks", &self.masks, self.height, self.width)?;
        if !self.meta.is_empty() && serde_json::from_str::<serde_json::Value>(&self.meta).is_err() {
            return bad("meta", "not valid JSON".into());
        }
        Ok(())
    }
}

impl Record for ProposalSet {
    const KIND: &'static str = "proposal/1";

    fn schema() -> SchemaRef {
        static S: OnceLock<SchemaRef> = OnceLock::new();
        S.get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Utf8, false),
                Field::new("width", DataType::UInt32, false),
                Field::new("height", DataType::UInt32, false),
                list_field("masks", rle_struct_field()),
                list_field("scores", DataType::Float32),
                Field::new("meta", DataType::Utf8, false),
            ]))
        })
        .clone()
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let (mut id, mut meta) = (StringBuilder::new(), StringBuilder::new());
        let (mut width, mut height) = (UInt32Builder::new(), UInt32Builder::new());
        let mut masks = RleListBuilder::new();
        let mut scores =
            ListBuilder::new(Float32Builder::new()).with_field(Field::new("item", DataType::Float32, false));
        for r in rows {
            id.append_value(&r.id);
            width.append_value(r.width);
            height.append_value(r.height);
            masks.append(&r.masks);
            scores.values().append_slice(&r.scores);
            scores.append(true);
            meta.append_value(if r.meta.is_empty() { "{}" } else { &r.meta });
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(id.finish()),
            Arc::new(width.finish()),
            Arc::new(height.finish()),
            masks.finish(),
            Arc::new(scores.finish()),
            Arc::new(meta.finish()),
        ];
        RecordBatch::try_new(Self::schema(), cols)
            .map_err(|e| CoreError::Invalid(format!("building proposal batch: {e}")))
    }

    fn check(&self) -> std::result::Result<(), (String, String)> {
        self.validate()
    }

    fn approx_bytes(&self) -> usize {
        self.meta.len() + self.masks.iter().map(|r| r.counts.len() * 2 + 16).sum::<usize>()
    }

    fn from_batch(batch: &RecordBatch, path: &Path, first_row: usize) -> Result<Vec<Self>> {
        let cols = Columns::new(batch, path, first_row);
        let (id, meta) = (cols.str("id")?, cols.str("meta")?);
        let (width, height) = (cols.u32("width")?, cols.u32("height")?);
        let masks = cols.list_rle("masks")?;
        let scores = cols.list_f32("scores")?;
        let mut out = Vec::with_capacity(batch.num_rows());
        for (i, (m, s)) in masks.into_iter().zip(scores).enumerate() {
            let r = ProposalSet {
                id: id.value(i).to_string(),
                width: width.value(i),
                height: height.value(i),
                masks: m,
                scores: s,
                meta: meta.value(i).to_string(),
            };
            if let Err((field, msg)) = r.validate() {
                return Err(CoreError::field(path, first_row + i, field, format!("record '{}': {msg}", r.id)));
            }
            out.push(r);
        }
        Ok(out)
    }
}

/// Every proposals shard given (several shard-task outputs may be listed), by sample id. An
/// id present twice is an error naming both files.
pub fn read_proposals(paths: &[impl AsRef<Path>]) -> Result<HashMap<String, ProposalSet>> {
    let mut out: HashMap<String, ProposalSet> = HashMap::new();
    let mut from: HashMap<String, String> = HashMap::new();
    for p in paths {
        let p = p.as_ref();
        for r in super::read_shard::<ProposalSet>(p)? {
            let here = p.display().to_string();
            if let Some(prev) = from.insert(r.id.clone(), here.clone()) {
                return Err(CoreError::shard(p, format!("sample '{}' has proposals here and in {prev}", r.id)));
            }
            out.insert(r.id.clone(), r);
        }
    }
    Ok(out)
}
