//! The sample shard: one row per (image, instruction, answer) with every mask of the image.

use super::{list_field, rle_struct_field, Columns, Record, RleListBuilder};
use crate::error::{CoreError, Result};
use crate::mask::Rle;
use arrow::array::{ArrayRef, BinaryBuilder, Int32Builder, ListBuilder, RecordBatch, StringBuilder, UInt32Builder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// Largest encoded image a shard accepts (Arrow binary columns hold < 2 GiB per batch).
pub const MAX_IMAGE_BYTES: usize = 1 << 30;

/// The token that follows each target object in an answer.
pub const SEG_TOKEN: &str = "<seg>";

/// One reasoning-segmentation sample.
///
/// The answer names each target followed by [`SEG_TOKEN`]; the i-th `<seg>` goes with
/// `target_names[i]` and `target_masks[i]`. `instance_*` hold every annotated object of the
/// image (targets included); `target_instances[i]` is the index of target i among them, or
/// -1 when the target is not one of the listed instances.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub id: String,
    pub split: String,
    /// PNG or JPEG bytes, as the source had them.
    pub image: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub instruction: String,
    pub answer: String,
    pub target_names: Vec<String>,
    pub target_masks: Vec<Rle>,
    pub target_instances: Vec<i32>,
    pub instance_names: Vec<String>,
    pub instance_masks: Vec<Rle>,
    /// Free-form JSON object (generator parameters, source record, attributes).
    pub meta: String,
}

impl Sample {
    /// Number of `<seg>` tokens in the answer.
    pub fn seg_count(&self) -> usize {
        self.answer.matches(SEG_TOKEN).count()
    }

    /// Consistency of one record: counts line up, masks have the image's size, indices are
    /// in range. Errors name the field.
    pub fn validate(&self) -> std::result::Result<(), (String, String)> {
        let bad = |field: &str, msg: String| Err((field.to_string(), msg));
        if self.width == 0 || self.height == 0 {
            return bad("width", format!("image size {}x{} is empty", self.width, self.height));
        }
        if self.image.len() >= MAX_IMAGE_BYTES {
            return bad(
                "image",
                format!("{} bytes of encoded image; at most {MAX_IMAGE_BYTES} are supported", self.image.len()),
            );
        }
        let n = self.target_names.len();
        if self.seg_count() != n {
            return bad("answer", format!("{} {SEG_TOKEN} tokens but {n} target names", self.seg_count()));
        }
        if self.target_masks.len() != n {
            return bad("target_masks", format!("{} masks for {n} targets", self.target_masks.len()));
        }
        if self.target_instances.len() != n {
            return bad("target_instances", format!("{} entries for {n} targets", self.target_instances.len()));
        }
        if self.instance_masks.len() != self.instance_names.len() {
            return bad(
                "instance_masks",
                format!("{} masks for {} instance names", self.instance_masks.len(), self.instance_names.len()),
            );
        }
        for (field, masks) in [("target_masks", &self.target_masks), ("instance_masks", &self.instance_masks)] {
            super::check_masks(field, masks, self.height, self.width)?;
        }
        for (i, &t) in self.target_instances.iter().enumerate() {
            if t < -1 || t >= self.instance_names.len() as i32 {
                return bad(
                    "target_instances",
                    format!("target {i} points at instance {t}, but there are {}", self.instance_names.len()),
                );
            }
        }
        if !self.meta.is_empty() && serde_json::from_str::<serde_json::Value>(&self.meta).is_err() {
            return bad("meta", "not valid JSON".into());
        }
        Ok(())
    }

    /// Decodes the image bytes, checking that they match the recorded width and height.
    pub fn decode_image(&self) -> Result<image::RgbImage> {
        let img = crate::imageio::decode_rgb(&self.image, Some(&format!("sample '{}'", self.id)))?;
        if img.width() != self.width || img.height() != self.height {
            return Err(CoreError::Image {
                context: Some(format!("sample '{}'", self.id)),
                message: format!(
                    "decoded image is {}x{} (w x h) but the record says {}x{}",
                    img.width(),
                    img.height(),
                    self.width,
                    self.height
                ),
            });
        }
        Ok(img)
    }
}

impl Record for Sample {
    const KIND: &'static str = "sample/1";

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
                Field::new("answer", DataType::Utf8, false),
                list_field("target_names", DataType::Utf8),
                list_field("target_masks", rle_struct_field()),
                list_field("target_instances", DataType::Int32),
                list_field("instance_names", DataType::Utf8),
                list_field("instance_masks", rle_struct_field()),
                Field::new("meta", DataType::Utf8, false),
            ]))
        })
        .clone()
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut id = StringBuilder::new();
        let mut split = StringBuilder::new();
        let mut image = BinaryBuilder::new();
        let mut width = UInt32Builder::new();
        let mut height = UInt32Builder::new();
        let mut instruction = StringBuilder::new();
        let mut answer = StringBuilder::new();
        let mut target_names =
            ListBuilder::new(StringBuilder::new()).with_field(Field::new("item", DataType::Utf8, false));
        let mut target_masks = RleListBuilder::new();
        let mut target_instances =
            ListBuilder::new(Int32Builder::new()).with_field(Field::new("item", DataType::Int32, false));
        let mut instance_names =
            ListBuilder::new(StringBuilder::new()).with_field(Field::new("item", DataType::Utf8, false));
        let mut instance_masks = RleListBuilder::new();
        let mut meta = StringBuilder::new();
        for r in rows {
            id.append_value(&r.id);
            split.append_value(&r.split);
            image.append_value(&r.image);
            width.append_value(r.width);
            height.append_value(r.height);
            instruction.append_value(&r.instruction);
            answer.append_value(&r.answer);
            for n in &r.target_names {
                target_names.values().append_value(n);
            }
            target_names.append(true);
            target_masks.append(&r.target_masks);
            for &t in &r.target_instances {
                target_instances.values().append_value(t);
            }
            target_instances.append(true);
            for n in &r.instance_names {
                instance_names.values().append_value(n);
            }
            instance_names.append(true);
            instance_masks.append(&r.instance_masks);
            meta.append_value(if r.meta.is_empty() { "{}" } else { &r.meta });
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(id.finish()),
            Arc::new(split.finish()),
            Arc::new(image.finish()),
            Arc::new(width.finish()),
            Arc::new(height.finish()),
            Arc::new(instruction.finish()),
            Arc::new(answer.finish()),
            Arc::new(target_names.finish()),
            target_masks.finish(),
            Arc::new(target_instances.finish()),
            Arc::new(instance_names.finish()),
            instance_masks.finish(),
            Arc::new(meta.finish()),
        ];
        RecordBatch::try_new(Self::schema(), cols)
            .map_err(|e| CoreError::Invalid(format!("building sample batch: {e}")))
    }

    fn check(&self) -> std::result::Result<(), (String, String)> {
        self.validate()
    }

    fn approx_bytes(&self) -> usize {
        let rle = |m: &[Rle]| m.iter().map(|r| r.counts.len() * 2 + 16).sum::<usize>();
        self.image.len()
            + self.instruction.len()
            + self.answer.len()
            + self.meta.len()
            + rle(&self.target_masks)
            + rle(&self.instance_masks)
    }

    fn from_batch(batch: &RecordBatch, path: &Path, first_row: usize) -> Result<Vec<Self>> {
        let cols = Columns::new(batch, path, first_row);
        let id = cols.str("id")?;
        let split = cols.str("split")?;
        let image = cols.binary("image")?;
        let width = cols.u32("width")?;
        let height = cols.u32("height")?;
        let instruction = cols.str("instruction")?;
        let answer = cols.str("answer")?;
        let target_names = cols.list_str("target_names")?;
        let target_instances = cols.list_i32("target_instances")?;
        let instance_names = cols.list_str("instance_names")?;
        let meta = cols.str("meta")?;
        let target_masks = cols.list_rle("target_masks")?;
        let instance_masks = cols.list_rle("instance_masks")?;
        let mut out = Vec::with_capacity(batch.num_rows());
        for (i, ((tm, im), ((tn, ti), inn))) in target_masks
            .into_iter()
            .zip(instance_masks)
            .zip(target_names.into_iter().zip(target_instances).zip(instance_names))
            .enumerate()
        {
            let row = first_row + i;
            let s = Sample {
                id: id.value(i).to_string(),
                split: split.value(i).to_string(),
                image: image.value(i).to_vec(),
                width: width.value(i),
                height: height.value(i),
                instruction: instruction.value(i).to_string(),
                answer: answer.value(i).to_string(),
                target_names: tn,
                target_masks: tm,
                target_instances: ti,
                instance_names: inn,
                instance_masks: im,
                meta: meta.value(i).to_string(),
            };
            if let Err((field, msg)) = s.validate() {
                return Err(CoreError::field(path, row, field, format!("record '{}': {msg}", s.id)));
            }
            out.push(s);
        }
        Ok(out)
    }
}
