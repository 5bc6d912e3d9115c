//! The text preference shard `P_t` (SPEC section 3): what collect-pt writes and the DPO stage
//! reads. Self-contained: the image travels with the record, and the reference model's
//! per-token log-probs of both answers are precomputed (the DPO stage needs no second model).

use super::{list_field, Columns, Record};
use crate::error::{CoreError, Result};
use arrow::array::{
    ArrayRef, BinaryBuilder, Float32Builder, Int32Builder, ListBuilder, RecordBatch, StringBuilder, UInt32Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// One preference pair: the rejected answer `y` and the corrected `y_c` for (image, x).
#[derive(Clone, Debug, PartialEq)]
pub struct TextPref {
    /// The sample's id.
    pub id: String,
    pub split: String,
    /// Encoded image (PNG or JPEG), as in the sample shard.
    pub image: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub instruction: String,
    /// Rejected answer (our format, `<seg>` after each object).
    pub y: String,
    /// Chosen (corrected) answer.
    pub y_c: String,
    /// Model-tokenizer ids of the answers as the model reads them (seg groups expanded,
    /// stop token included).
    pub y_ids: Vec<i32>,
    pub y_c_ids: Vec<i32>,
    /// `L_y` / `L_yc`: positions in `y_ids` / `y_c_ids` that the diff marks as changed.
    pub l_y: Vec<i32>,
    pub l_yc: Vec<i32>,
    /// Reference model's log p of each token of `y_ids` / `y_c_ids`.
    pub ref_logp_y: Vec<f32>,
    pub ref_logp_yc: Vec<f32>,
    /// Which branch of SPEC 3.3 made the pair: `model` (the greedy answer had errors),
    /// `resampled` (a sampled answer had errors), `injected` (errors put into `y_g`).
    pub branch: String,
    /// Free-form JSON object (corrector, its notes, sampling settings).
    pub meta: String,
}

pub const TEXT_PREF_BRANCHES: &[&str] = &["model", "resampled", "injected"];

impl TextPref {
    /// Consistency of one record; errors name the field.
    pub fn validate(&self) -> std::result::Result<(), (String, String)> {
        let bad = |field: &str, msg: String| Err((field.to_string(), msg));
        if self.width == 0 || self.height == 0 {
            return bad("width", format!("image size {}x{} is empty", self.width, self.height));
        }
        if self.image.is_empty() {
            return bad("image", "no image bytes".into());
        }
        if !TEXT_PREF_BRANCHES.contains(&self.branch.as_str()) {
            return bad("branch", format!("'{}' is not one of {TEXT_PREF_BRANCHES:?}", self.branch));
        }
        for (ids_field, ids, lp_field, lp, pos_field, pos) in [
            ("y_ids", &self.y_ids, "ref_logp_y", &self.ref_logp_y, "l_y", &self.l_y),
            ("y_c_ids", &self.y_c_ids, "ref_logp_yc", &self.ref_logp_yc, "l_yc", &self.l_yc),
        ] {
            if ids.is_empty() {
                return bad(ids_field, "no tokens".into());
            }
            if lp.len() != ids.len() {
                return bad(lp_field, format!("{} log-probs for {} tokens", lp.len(), ids.len()));
            }
            if let Some(i) = lp.iter().position(|l| l.is_nan() || *l > 0.0) {
                return bad(lp_field, format!("log-prob {i} is {} (must be <= 0)", lp[i]));
            }
            if let Some(p) = pos.iter().find(|p| **p < 0 || **p as usize >= ids.len()) {
                return bad(pos_field, format!("position {p} outside the {} tokens", ids.len()));
            }
            if pos.windows(2).any(|w| w[0] >= w[1]) {
                return bad(pos_field, "positions must be strictly increasing".into());
            }
        }
        if !self.meta.is_empty() && serde_json::from_str::<serde_json::Value>(&self.meta).is_err() {
            return bad("meta", "not valid JSON".into());
        }
        Ok(())
    }
}

fn i32_list() -> ListBuilder<Int32Builder> {
    ListBuilder::new(Int32Builder::new()).with_field(Field::new("item", DataType::Int32, false))
}

fn f32_list() -> ListBuilder<Float32Builder> {
    ListBuilder::new(Float32Builder::new()).with_field(Field::new("item", DataType::Float32, false))
}

impl Record for TextPref {
    const KIND: &'static str = "text-pref/1";

    fn schema() -> SchemaRef {
        static S: OnceLock<SchemaRef> = OnceLock::new();
        S.get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Utf8, false),
                Field::new("split", DataType::Utf8, false),
                Field::new("image", DataType::Binary, false),
                Field::new("width", DataType::UInt32, false),
                Field::new("height", DataType::UInt32, false),
                Field::new("instruction", DataType::Utf8, false),
                Field::new("y", DataType::Utf8, false),
                Field::new("y_c", DataType::Utf8, false),
                list_field("y_ids", DataType::Int32),
                list_field("y_c_ids", DataType::Int32),
                list_field("l_y", DataType::Int32),
                list_field("l_yc", DataType::Int32),
                list_field("ref_logp_y", DataType::Float32),
                list_field("ref_logp_yc", DataType::Float32),
                Field::new("branch", DataType::Utf8, false),
                Field::new("meta", DataType::Utf8, false),
            ]))
        })
        .clone()
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let (mut id, mut split, mut instruction, mut y, mut y_c, mut branch, mut meta) = (
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
        );
        let mut image = BinaryBuilder::new();
        let (mut width, mut height) = (UInt32Builder::new(), UInt32Builder::new());
        let (mut y_ids, mut y_c_ids, mut l_y, mut l_yc) = (i32_list(), i32_list(), i32_list(), i32_list());
        let (mut lp_y, mut lp_yc) = (f32_list(), f32_list());
        for r in rows {
            id.append_value(&r.id);
            split.append_value(&r.split);
            image.append_value(&r.image);
            width.append_value(r.width);
            height.append_value(r.height);
            instruction.append_value(&r.instruction);
            y.append_value(&r.y);
            y_c.append_value(&r.y_c);
            for (b, v) in [(&mut y_ids, &r.y_ids), (&mut y_c_ids, &r.y_c_ids), (&mut l_y, &r.l_y), (&mut l_yc, &r.l_yc)]
            {
                b.values().append_slice(v);
                b.append(true);
            }
            for (b, v) in [(&mut lp_y, &r.ref_logp_y), (&mut lp_yc, &r.ref_logp_yc)] {
                b.values().append_slice(v);
                b.append(true);
            }
            branch.append_value(&r.branch);
            meta.append_value(if r.meta.is_empty() { "{}" } else { &r.meta });
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(id.finish()),
            Arc::new(split.finish()),
            Arc::new(image.finish()),
            Arc::new(width.finish()),
            Arc::new(height.finish()),
            Arc::new(instruction.finish()),
            Arc::new(y.finish()),
            Arc::new(y_c.finish()),
            Arc::new(y_ids.finish()),
            Arc::new(y_c_ids.finish()),
            Arc::new(l_y.finish()),
            Arc::new(l_yc.finish()),
            Arc::new(lp_y.finish()),
            Arc::new(lp_yc.finish()),
            Arc::new(branch.finish()),
            Arc::new(meta.finish()),
        ];
        RecordBatch::try_new(Self::schema(), cols)
            .map_err(|e| CoreError::Invalid(format!("building text-pref batch: {e}")))
    }

    fn check(&self) -> std::result::Result<(), (String, String)> {
        self.validate()
    }

    fn approx_bytes(&self) -> usize {
        self.image.len()
            + self.y.len()
            + self.y_c.len()
            + self.instruction.len()
            + self.meta.len()
            + (self.y_ids.len() + self.y_c_ids.len()) * 8
    }

    fn from_batch(batch: &RecordBatch, path: &Path, first_row: usize) -> Result<Vec<Self>> {
        let cols = Columns::new(batch, path, first_row);
        let (id, split, instruction) = (cols.str("id")?, cols.str("split")?, cols.str("instruction")?);
        let (y, y_c, branch, meta) = (cols.str("y")?, cols.str("y_c")?, cols.str("branch")?, cols.str("meta")?);
        let image = cols.binary("image")?;
        let (width, height) = (cols.u32("width")?, cols.u32("height")?);
        let mut y_ids = cols.list_i32("y_ids")?.into_iter();
        let mut y_c_ids = cols.list_i32("y_c_ids")?.into_iter();
        let mut l_y = cols.list_i32("l_y")?.into_iter();
        let mut l_yc = cols.list_i32("l_yc")?.into_iter();
        let mut lp_y = cols.list_f32("ref_logp_y")?.into_iter();
        let mut lp_yc = cols.list_f32("ref_logp_yc")?.into_iter();
        let mut out = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let r = TextPref {
                id: id.value(i).to_string(),
                split: split.value(i).to_string(),
                image: image.value(i).to_vec(),
                width: width.value(i),
                height: height.value(i),
                instruction: instruction.value(i).to_string(),
                y: y.value(i).to_string(),
                y_c: y_c.value(i).to_string(),
                y_ids: y_ids.next().unwrap_or_default(),
                y_c_ids: y_c_ids.next().unwrap_or_default(),
                l_y: l_y.next().unwrap_or_default(),
                l_yc: l_yc.next().unwrap_or_default(),
                ref_logp_y: lp_y.next().unwrap_or_default(),
                ref_logp_yc: lp_yc.next().unwrap_or_default(),
                branch: branch.value(i).to_string(),
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
