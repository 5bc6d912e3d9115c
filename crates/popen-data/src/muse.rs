//! MUSE importer: PixelLM's multi-target reasoning-segmentation JSON -> sample shards.
//!
//! A MUSE file is a JSON list of per-image records: `file_name` or `coco_url`, `height`,
//! `width`, `ann_list` (every instance: `category_name`, optional `rephrased_name`, `bbox`,
//! `segmentation` as COCO polygons or RLE), `questions`, `answers` (per question, the list
//! of answer instances, each with its own `segmentation`) and `text_answers` (per question,
//! the answer with `{seg}` after each object). Each (record, question) becomes one sample.
//! Like PixelLM's loader, a question whose `{seg}` count differs from its answer-instance
//! count is rejected; here it is reported in the manifest, not fatal.

use popen_core::manifest::Manifest;
use popen_core::mask::{rle_from_coco_polygons, Rle};
use popen_core::shard::{Sample, ShardWriter, SEG_TOKEN};
use popen_core::shardspec::ShardSpec;
use popen_core::{CoreError, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MuseImportConfig {
    /// The MUSE JSON file (e.g. muse_val.json).
    pub json: PathBuf,
    /// Folder holding the images; `file_name`, the basename of `coco_url`, and
    /// `train2017/`, `val2017/`, `train2014/` subfolders are tried in that order.
    pub images: PathBuf,
    /// Split name written into every sample.
    pub split: String,
}

/// What one record turned into.
struct Imported {
    samples: Vec<Sample>,
    skipped: Vec<(String, String)>,
}

/// What an import wrote.
#[derive(Debug)]
pub struct ImportReport {
    pub manifest: Manifest,
    pub shard_path: PathBuf,
    pub manifest_path: PathBuf,
}

/// Imports the MUSE file into `out_dir/{split}[-I-of-N].parquet` plus
/// `{split}[-I-of-N].manifest.json` (one per split, so several splits can share a folder).
/// Bad records and questions are skipped and listed in the manifest with the reason; a
/// file that is not a JSON list of records is an error.
pub fn import(cfg: &MuseImportConfig, out_dir: &Path, shard: ShardSpec) -> Result<ImportReport> {
    let t0 = Instant::now();
    let valid = !cfg.split.is_empty()
        && cfg.split != "."
        && cfg.split != ".."
        && cfg.split.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !valid {
        return Err(CoreError::Invalid(format!(
            "split name {:?} must be non-empty letters, digits, '_', '.' or '-' (it names the output file)",
            cfg.split
        )));
    }
    let mut manifest = Manifest::new("import-muse", cfg)?;
    if !shard.is_all() {
        manifest.shard = Some(shard.to_string());
    }
    let text = std::fs::read_to_string(&cfg.json).map_err(|e| CoreError::io(&cfg.json, e))?;
    let root: Value = serde_json::from_str(&text).map_err(|e| {
        CoreError::Invalid(format!(
            "{}: not valid JSON (line {}, column {}): {e}",
            cfg.json.display(),
            e.line(),
            e.column()
        ))
    })?;
    let records = root
        .as_array()
        .ok_or_else(|| CoreError::Invalid(format!("{}: expected a JSON list of records", cfg.json.display())))?;
    manifest.add_input(&cfg.json)?;

    let suffix = if shard.is_all() { String::new() } else { shard.suffix() };
    let out = out_dir.join(format!("{}{suffix}.parquet", cfg.split));
    let mut writer = ShardWriter::<Sample>::create(&out)?;
    let mut rows = 0u64;
    let bar = popen_core::progress::bar(records.len() as u64, "import-muse");
    for (i, rec) in records.iter().enumerate() {
        bar.inc(1);
        if !shard.takes(i) {
            continue;
        }
        manifest.count("records", 1);
        let label = record_label(rec, i);
        match import_record(rec, i, cfg) {
            Ok(imp) => {
                for (what, why) in imp.skipped {
                    manifest.skip(what, why);
                }
                for s in imp.samples {
                    writer.write(s)?;
                    rows += 1;
                }
            }
            Err(why) => manifest.skip(label, why),
        }
    }
    bar.finish_and_clear();
    let written = writer.finish()?;
    debug_assert_eq!(written as u64, rows);
    manifest.add_output(&out, Some(rows))?;
    manifest.count("samples", rows);
    manifest.count("skipped", manifest.skipped.len() as u64);
    manifest.time("total", t0);
    let manifest_path = out_dir.join(format!("{}{suffix}.manifest.json", cfg.split));
    manifest.write(&manifest_path)?;
    tracing::info!(
        "import-muse: {} samples from {} records, {} skipped -> {}",
        rows,
        manifest.counts.get("records").copied().unwrap_or(0),
        manifest.skipped.len(),
        out.display()
    );
    Ok(ImportReport { manifest, shard_path: out, manifest_path })
}

fn record_label(rec: &Value, i: usize) -> String {
    let name = rec
        .get("file_name")
        .and_then(Value::as_str)
        .or_else(|| rec.get("coco_url").and_then(Value::as_str).map(|u| u.rsplit('/').next().unwrap_or(u)));
    match name {
        Some(n) => format!("record {i} ({n})"),
        None => format!("record {i}"),
    }
}

fn field<'a>(rec: &'a Value, name: &str) -> std::result::Result<&'a Value, String> {
    rec.get(name).ok_or_else(|| format!("field '{name}' is missing"))
}

/// A positive integer; JSON writers that emit `480.0` are accepted.
fn u32_field(rec: &Value, name: &str) -> std::result::Result<u32, String> {
    let v = field(rec, name)?;
    v.as_f64()
        .filter(|&x| x.fract() == 0.0 && x >= 1.0 && x <= u32::MAX as f64)
        .map(|x| x as u32)
        .ok_or_else(|| format!("field '{name}' is not a positive integer (got {v})"))
}

fn array_field<'a>(rec: &'a Value, name: &str) -> std::result::Result<&'a Vec<Value>, String> {
    field(rec, name)?.as_array().ok_or_else(|| format!("field '{name}' is not a list"))
}

fn import_record(rec: &Value, index: usize, cfg: &MuseImportConfig) -> std::result::Result<Imported, String> {
    let height = u32_field(rec, "height")?;
    let width = u32_field(rec, "width")?;
    let anns = array_field(rec, "ann_list")?;
    let questions = array_field(rec, "questions")?;
    let answers = array_field(rec, "answers")?;
    if answers.len() != questions.len() {
        return Err(format!("{} questions but {} answer lists", questions.len(), answers.len()));
    }
    let text_answers = match rec.get("text_answers") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let a = v.as_array().ok_or("field 'text_answers' is not a list")?;
            if a.len() != questions.len() {
                return Err(format!("{} questions but {} text_answers", questions.len(), a.len()));
            }
            Some(a)
        }
    };
    let image_path = find_image(rec, &cfg.images)?;
    let image = std::fs::read(&image_path).map_err(|e| format!("image {}: {e}", image_path.display()))?;
    let decoded =
        popen_core::imageio::decode_rgb(&image, Some(&image_path.display().to_string())).map_err(|e| e.to_string())?;
    if decoded.width() != width || decoded.height() != height {
        return Err(format!(
            "image {} is {}x{} (w x h) but the record says {width}x{height}",
            image_path.display(),
            decoded.width(),
            decoded.height()
        ));
    }

    let mut instance_names = Vec::with_capacity(anns.len());
    let mut instance_masks = Vec::with_capacity(anns.len());
    let mut instance_ids = Vec::with_capacity(anns.len());
    for (k, ann) in anns.iter().enumerate() {
        let name = ann_name(ann, "category_name").map_err(|e| format!("ann_list[{k}]: {e}"))?;
        let seg = field(ann, "segmentation").map_err(|e| format!("ann_list[{k}]: {e}"))?;
        let rle = segmentation_to_rle(seg, height, width).map_err(|e| format!("ann_list[{k}].segmentation: {e}"))?;
        instance_names.push(name);
        instance_masks.push(rle);
        instance_ids.push(ann.get("id").cloned());
    }

    let stem = image_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| index.to_string());
    let mut out = Imported { samples: Vec::new(), skipped: Vec::new() };
    for (q, (question, answer_list)) in questions.iter().zip(answers).enumerate() {
        let id = format!("{stem}-{index}-q{q}");
        let res = (|| -> std::result::Result<Sample, String> {
            let instruction = question.as_str().ok_or(format!("questions[{q}] is not a string"))?;
            let targets = answer_list.as_array().ok_or(format!("answers[{q}] is not a list"))?;
            let mut target_names = Vec::new();
            let mut target_masks = Vec::new();
            let mut target_instances = Vec::new();
            for (t, ann) in targets.iter().enumerate() {
                let name = ann_name(ann, "rephrased_name")
                    .or_else(|_| ann_name(ann, "category_name"))
                    .map_err(|_| format!("answers[{q}][{t}]: neither 'rephrased_name' nor 'category_name'"))?;
                let seg = field(ann, "segmentation").map_err(|e| format!("answers[{q}][{t}]: {e}"))?;
                let rle = segmentation_to_rle(seg, height, width)
                    .map_err(|e| format!("answers[{q}][{t}].segmentation: {e}"))?;
                target_instances.push(match_instance(ann, &rle, &instance_ids, &instance_masks));
                target_names.push(name);
                target_masks.push(rle);
            }
            let answer = match text_answers {
                Some(ta) => {
                    let t = ta[q].as_str().ok_or(format!("text_answers[{q}] is not a string"))?;
                    let n = t.matches("{seg}").count();
                    if n != targets.len() {
                        return Err(format!(
                            "text_answers[{q}] has {n} {{seg}} but answers[{q}] has {} instances",
                            targets.len()
                        ));
                    }
                    t.replace("{seg}", SEG_TOKEN)
                }
                // PixelLM builds "name [SEG], name [SEG] and name [SEG]." when no text answer exists.
                None => default_answer(&target_names),
            };
            let meta = serde_json::json!({
                "source": "muse",
                "file": image_path.file_name().map(|s| s.to_string_lossy().into_owned()),
                "record": index,
                "question": q,
                "generated_answer": text_answers.is_none(),
            });
            let s = Sample {
                id: id.clone(),
                split: cfg.split.clone(),
                image: image.clone(),
                width,
                height,
                instruction: instruction.to_string(),
                answer,
                target_names,
                target_masks,
                target_instances,
                instance_names: instance_names.clone(),
                instance_masks: instance_masks.clone(),
                meta: meta.to_string(),
            };
            s.validate().map_err(|(f, m)| format!("{f}: {m}"))?;
            Ok(s)
        })();
        match res {
            Ok(s) => out.samples.push(s),
            Err(why) => out.skipped.push((format!("{} question {q}", record_label(rec, index)), why)),
        }
    }
    Ok(out)
}

fn ann_name(ann: &Value, key: &str) -> std::result::Result<String, String> {
    ann.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().to_string())
        .ok_or_else(|| format!("field '{key}' is missing or empty"))
}

/// Answer instances are copies of `ann_list` entries: match by `id`, else by identical mask.
fn match_instance(ann: &Value, rle: &Rle, ids: &[Option<Value>], masks: &[Rle]) -> i32 {
    if let Some(id) = ann.get("id") {
        if let Some(k) = ids.iter().position(|x| x.as_ref() == Some(id)) {
            return k as i32;
        }
    }
    masks.iter().position(|m| m == rle).map(|k| k as i32).unwrap_or(-1)
}

fn default_answer(names: &[String]) -> String {
    let parts: Vec<String> = names.iter().map(|n| format!("{n} {SEG_TOKEN}")).collect();
    match parts.len() {
        0 => "There is no such object.".to_string(),
        1 => format!("It is {}.", parts[0]),
        n => format!("They are {} and {}.", parts[..n - 1].join(", "), parts[n - 1]),
    }
}

/// COCO `segmentation` -> RLE, as pycocotools `frPyObjects` + merge: a list of polygons,
/// an uncompressed RLE (`counts` list) or a compressed one (`counts` string).
pub fn segmentation_to_rle(seg: &Value, height: u32, width: u32) -> std::result::Result<Rle, String> {
    match seg {
        Value::Array(polys) => {
            let mut out = Vec::with_capacity(polys.len());
            for (p, poly) in polys.iter().enumerate() {
                let coords = poly.as_array().ok_or(format!("polygon {p} is not a list of numbers"))?;
                let xy: Option<Vec<f64>> = coords.iter().map(Value::as_f64).collect();
                // Lengths are judged by rle_from_coco_polygons exactly as pycocotools does.
                out.push(xy.ok_or(format!("polygon {p} holds a non-number"))?);
            }
            if out.is_empty() {
                return Err("empty polygon list".into());
            }
            rle_from_coco_polygons(&out, height, width).map_err(|e| e.to_string())
        }
        Value::Object(o) => {
            let size = o.get("size").and_then(Value::as_array).ok_or("RLE without 'size'")?;
            let dims: Option<Vec<u64>> = size.iter().map(Value::as_u64).collect();
            let dims = dims.filter(|d| d.len() == 2).ok_or("RLE 'size' is not [h, w]")?;
            if dims[0] != height as u64 || dims[1] != width as u64 {
                return Err(format!("RLE size {}x{} differs from the image's {height}x{width}", dims[0], dims[1]));
            }
            match o.get("counts") {
                Some(Value::String(s)) => Rle::from_coco_string(height, width, s).map_err(|e| e.to_string()),
                Some(Value::Array(c)) => {
                    let counts: Option<Vec<u32>> =
                        c.iter().map(|v| v.as_u64().filter(|&x| x <= u32::MAX as u64).map(|x| x as u32)).collect();
                    let counts = counts.ok_or("RLE 'counts' holds a non-integer")?;
                    Rle::new(height, width, counts).map_err(|e| e.to_string())
                }
                _ => Err("RLE without 'counts'".into()),
            }
        }
        _ => Err("neither a polygon list nor an RLE object".into()),
    }
}

/// A name from the JSON must stay inside `--images`: relative, without `..` (nor a root or
/// drive prefix). `dir.join` of an absolute path would replace `dir`.
fn inside_images(key: &str, name: &str) -> std::result::Result<(), String> {
    use std::path::Component;
    let p = Path::new(name);
    if name.is_empty() {
        return Err(format!("'{key}' is empty"));
    }
    if !p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(format!(
            "'{key}' {name:?} is not a relative path inside the images folder (absolute, or with '..')"
        ));
    }
    Ok(())
}

fn find_image(rec: &Value, dir: &Path) -> std::result::Result<PathBuf, String> {
    let mut candidates = Vec::new();
    if let Some(f) = rec.get("file_name").and_then(Value::as_str) {
        inside_images("file_name", f)?;
        candidates.push(dir.join(f));
    }
    if let Some(u) = rec.get("coco_url").and_then(Value::as_str) {
        let base = u.rsplit('/').next().unwrap_or(u);
        if !base.is_empty() {
            inside_images("coco_url", base)?;
            candidates.push(dir.join(base));
            for sub in ["train2017", "val2017", "train2014"] {
                candidates.push(dir.join(sub).join(base));
            }
        }
    }
    if candidates.is_empty() {
        return Err("neither 'file_name' nor 'coco_url' is given".into());
    }
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        format!(
            "image not found (tried {})",
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    })
}
