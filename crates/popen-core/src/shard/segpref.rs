//! The segmentation preference shard `P_s` (SPEC section 4, Algorithm 1): what collect-ps
//! writes and the DPO stage reads. The three kept perturbed images are stored as noise
//! recipes (rebuilt from the clean image), with the reference model's segmentation
//! embeddings `f^{n,i}`, masks `M^{n,i}`, scores and the per-target rankings `L_s^n`.
//!
//! Flattened layouts (K = 3 kept images, N targets, D = `f_dim`):
//! `ref_f[(k * N + n) * D + d]`, `ref_masks[k * N + n]`, `s_terms[k * N + n]`,
//! `b_terms[k * N + n]`, `rankings[n * 3 + r]` (the r-th best kept image for target n, as an
//! index 0..3 into the kept images), `noise_rect[k * 4 ..]` = x, y, width, height.

use super::{list_field, rle_struct_field, Columns, Record, RleListBuilder};
use crate::error::{CoreError, Result};
use crate::mask::Rle;
use arrow::array::{
    ArrayRef, BinaryBuilder, Float32Builder, Int32Builder, ListBuilder, RecordBatch, StringBuilder, UInt32Builder,
    UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// Kept perturbed images per record.
pub const SEG_PREF_KEPT: usize = 3;

#[derive(Clone, Debug, PartialEq)]
pub struct SegPref {
    pub id: String,
    pub split: String,
    /// The clean image, encoded as in the sample shard.
    pub image: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub instruction: String,
    /// The ground-truth answer that was teacher-forced (SPEC 10.2).
    pub answer: String,
    /// Curriculum phase, 1 or 2.
    pub phase: u32,
    /// Which draw of perturbations was kept (0 = the first; phase 1 regenerates).
    pub draw: u32,
    pub noise_seed: Vec<u64>,
    pub noise_rect: Vec<u32>,
    pub noise_sigma: Vec<f32>,
    /// Ground-truth masks `M_g^n`, one per target.
    pub target_masks: Vec<Rle>,
    pub f_dim: u32,
    pub ref_f: Vec<f32>,
    pub ref_masks: Vec<Rle>,
    /// Eq. 1's `s^i` and the boundary score `b^i` of each kept image, and their per-target terms.
    pub s: Vec<f32>,
    pub b: Vec<f32>,
    pub s_terms: Vec<f32>,
    pub b_terms: Vec<f32>,
    pub rankings: Vec<i32>,
    pub meta: String,
}

impl SegPref {
    pub fn targets(&self) -> usize {
        self.target_masks.len()
    }

    /// `L_s^n`: kept-image indices of target `n`, best first.
    pub fn ranking(&self, n: usize) -> &[i32] {
        &self.rankings[n * SEG_PREF_KEPT..(n + 1) * SEG_PREF_KEPT]
    }

    /// `f^{n,k}` of kept image `k`, target `n`.
    pub fn f(&self, k: usize, n: usize) -> &[f32] {
        let d = self.f_dim as usize;
        let at = (k * self.targets() + n) * d;
        &self.ref_f[at..at + d]
    }

    /// Consistency of one record; errors name the field.
    pub fn validate(&self) -> std::result::Result<(), (String, String)> {
        let bad = |field: &str, msg: String| Err((field.to_string(), msg));
        let (k, n, d) = (SEG_PREF_KEPT, self.targets(), self.f_dim as usize);
        if self.width == 0 || self.height == 0 {
            return bad("width", format!("image size {}x{} is empty", self.width, self.height));
        }
        if self.image.is_empty() {
            return bad("image", "no image bytes".into());
        }
        if !(self.phase == 1 || self.phase == 2) {
            return bad("phase", format!("{} (must be 1 or 2)", self.phase));
        }
        if n == 0 {
            return bad("target_masks", "no targets".into());
        }
        if d == 0 {
            return bad("f_dim", "0".into());
        }
        let lens: [(&str, usize, usize); 10] = [
            ("noise_seed", self.noise_seed.len(), k),
            ("noise_rect", self.noise_rect.len(), 4 * k),
            ("noise_sigma", self.noise_sigma.len(), k),
            ("ref_f", self.ref_f.len(), k * n * d),
            ("ref_masks", self.ref_masks.len(), k * n),
            ("s", self.s.len(), k),
            ("b", self.b.len(), k),
            ("s_terms", self.s_terms.len(), k * n),
            ("b_terms", self.b_terms.len(), k * n),
            ("rankings", self.rankings.len(), k * n),
        ];
        for (field, got, want) in lens {
            if got != want {
                return bad(field, format!("{got} values, expected {want} ({k} kept images, {n} targets, f_dim {d})"));
            }
        }
        super::check_masks("target_masks", &self.target_masks, self.height, self.width)?;
        super::check_masks("ref_masks", &self.ref_masks, self.height, self.width)?;
        for (i, r) in self.noise_rect.chunks(4).enumerate() {
            if r[2] == 0 || r[3] == 0 || r[0] + r[2] > self.width || r[1] + r[3] > self.height {
                return bad(
                    "noise_rect",
                    format!("image {i}: rectangle {r:?} does not fit {}x{}", self.width, self.height),
                );
            }
        }
        for (field, v) in [
            ("noise_sigma", &self.noise_sigma),
            ("ref_f", &self.ref_f),
            ("s", &self.s),
            ("b", &self.b),
            ("s_terms", &self.s_terms),
            ("b_terms", &self.b_terms),
        ] {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return bad(field, format!("value {i} is {}", v[i]));
            }
        }
        for t in 0..n {
            let mut r = self.ranking(t).to_vec();
            r.sort_unstable();
            if r != [0, 1, 2] {
                return bad(
                    "rankings",
                    format!("target {t}: {:?} is not an order of the 3 kept images", self.ranking(t)),
                );
            }
        }
        if !self.meta.is_empty() && serde_json::from_str::<serde_json::Value>(&self.meta).is_err() {
            return bad("meta", "not valid JSON".into());
        }
        Ok(())
    }
}

fn f32_list() -> ListBuilder<Float32Builder> {
    ListBuilder::new(Float32Builder::new()).with_field(Field::new("item", DataType::Float32, false))
}

impl Record for SegPref {
    const KIND: &'static str = "seg-pref/1";

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
                Field::new("phase", DataType::UInt32, false),
                Field::new("draw", DataType::UInt32, false),
                list_field("noise_seed", DataType::UInt64),
                list_field("noise_rect", DataType::UInt32),
                list_field("noise_sigma", DataType::Float32),
                list_field("target_masks", rle_struct_field()),
                Field::new("f_dim", DataType::UInt32, false),
                list_field("ref_f", DataType::Float32),
                list_field("ref_masks", rle_struct_field()),
                list_field("s", DataType::Float32),
                list_field("b", DataType::Float32),
                list_field("s_terms", DataType::Float32),
                list_field("b_terms", DataType::Float32),
                list_field("rankings", DataType::Int32),
                Field::new("meta", DataType::Utf8, false),
            ]))
        })
        .clone()
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let mut strs: Vec<StringBuilder> = (0..5).map(|_| StringBuilder::new()).collect();
        let mut image = BinaryBuilder::new();
        let mut u32s: Vec<UInt32Builder> = (0..5).map(|_| UInt32Builder::new()).collect();
        let mut seeds = ListBuilder::new(UInt64Builder::new()).with_field(Field::new("item", DataType::UInt64, false));
        let mut rects = ListBuilder::new(UInt32Builder::new()).with_field(Field::new("item", DataType::UInt32, false));
        let mut f32s: Vec<ListBuilder<Float32Builder>> = (0..6).map(|_| f32_list()).collect();
        let mut rankings = ListBuilder::new(Int32Builder::new()).with_field(Field::new("item", DataType::Int32, false));
        let (mut target_masks, mut ref_masks) = (RleListBuilder::new(), RleListBuilder::new());
        for r in rows {
            for (b, v) in strs.iter_mut().zip([&r.id, &r.split, &r.instruction, &r.answer, &r.meta]) {
                b.append_value(v);
            }
            image.append_value(&r.image);
            for (b, v) in u32s.iter_mut().zip([r.width, r.height, r.phase, r.draw, r.f_dim]) {
                b.append_value(v);
            }
            seeds.values().append_slice(&r.noise_seed);
            seeds.append(true);
            rects.values().append_slice(&r.noise_rect);
            rects.append(true);
            for (b, v) in f32s.iter_mut().zip([&r.noise_sigma, &r.ref_f, &r.s, &r.b, &r.s_terms, &r.b_terms]) {
                b.values().append_slice(v);
                b.append(true);
            }
            rankings.values().append_slice(&r.rankings);
            rankings.append(true);
            target_masks.append(&r.target_masks);
            ref_masks.append(&r.ref_masks);
        }
        let mut s = strs.into_iter().map(|mut b| Arc::new(b.finish()) as ArrayRef);
        let mut u = u32s.into_iter().map(|mut b| Arc::new(b.finish()) as ArrayRef);
        let mut f = f32s.into_iter().map(|mut b| Arc::new(b.finish()) as ArrayRef);
        let (id, split, instruction, answer, meta) = (s.next(), s.next(), s.next(), s.next(), s.next());
        let (width, height, phase, draw, f_dim) = (u.next(), u.next(), u.next(), u.next(), u.next());
        let (sigma, ref_f, sv, bv, st, bt) = (f.next(), f.next(), f.next(), f.next(), f.next(), f.next());
        let cols: Vec<ArrayRef> = vec![
            id.expect("id"),
            split.expect("split"),
            Arc::new(image.finish()),
            width.expect("width"),
            height.expect("height"),
            instruction.expect("instruction"),
            answer.expect("answer"),
            phase.expect("phase"),
            draw.expect("draw"),
            Arc::new(seeds.finish()),
            Arc::new(rects.finish()),
            sigma.expect("sigma"),
            target_masks.finish(),
            f_dim.expect("f_dim"),
            ref_f.expect("ref_f"),
            ref_masks.finish(),
            sv.expect("s"),
            bv.expect("b"),
            st.expect("s_terms"),
            bt.expect("b_terms"),
            Arc::new(rankings.finish()),
            meta.expect("meta"),
        ];
        RecordBatch::try_new(Self::schema(), cols)
            .map_err(|e| CoreError::Invalid(format!("building seg-pref batch: {e}")))
    }

    fn check(&self) -> std::result::Result<(), (String, String)> {
        self.validate()
    }

    fn approx_bytes(&self) -> usize {
        self.image.len()
            + self.ref_f.len() * 4
            + self.instruction.len()
            + self.answer.len()
            + self.ref_masks.iter().chain(&self.target_masks).map(|r| r.counts.len() * 2 + 16).sum::<usize>()
    }

    fn from_batch(batch: &RecordBatch, path: &Path, first_row: usize) -> Result<Vec<Self>> {
        let cols = Columns::new(batch, path, first_row);
        let (id, split, instruction, answer, meta) =
            (cols.str("id")?, cols.str("split")?, cols.str("instruction")?, cols.str("answer")?, cols.str("meta")?);
        let image = cols.binary("image")?;
        let (width, height, phase, draw, f_dim) =
            (cols.u32("width")?, cols.u32("height")?, cols.u32("phase")?, cols.u32("draw")?, cols.u32("f_dim")?);
        let mut seeds = cols.list_u64("noise_seed")?.into_iter();
        let mut rects = cols.list_u32("noise_rect")?.into_iter();
        let mut f32s: Vec<std::vec::IntoIter<Vec<f32>>> = ["noise_sigma", "ref_f", "s", "b", "s_terms", "b_terms"]
            .iter()
            .map(|n| cols.list_f32(n).map(|v| v.into_iter()))
            .collect::<Result<_>>()?;
        let mut rankings = cols.list_i32("rankings")?.into_iter();
        let mut target_masks = cols.list_rle("target_masks")?.into_iter();
        let mut ref_masks = cols.list_rle("ref_masks")?.into_iter();
        let mut out = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let mut nf = || f32s.iter_mut().map(|it| it.next().unwrap_or_default()).collect::<Vec<_>>();
            let fl = nf();
            let r = SegPref {
                id: id.value(i).to_string(),
                split: split.value(i).to_string(),
                image: image.value(i).to_vec(),
                width: width.value(i),
                height: height.value(i),
                instruction: instruction.value(i).to_string(),
                answer: answer.value(i).to_string(),
                phase: phase.value(i),
                draw: draw.value(i),
                noise_seed: seeds.next().unwrap_or_default(),
                noise_rect: rects.next().unwrap_or_default(),
                noise_sigma: fl[0].clone(),
                target_masks: target_masks.next().unwrap_or_default(),
                f_dim: f_dim.value(i),
                ref_f: fl[1].clone(),
                ref_masks: ref_masks.next().unwrap_or_default(),
                s: fl[2].clone(),
                b: fl[3].clone(),
                s_terms: fl[4].clone(),
                b_terms: fl[5].clone(),
                rankings: rankings.next().unwrap_or_default(),
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
