//! The embedded synthetic reasoning-segmentation benchmark (MUSE-style).
//!
//! Each sample is a small image (default 96x96) of 2-6 objects from 27 categories (balls,
//! fruit, boxes, books, dice, rings, coins, stars, cups, bottles, keys, leaves, fish, tools,
//! ...) in 9 named colours, with irregular outlines, shading, texture, cast shadows and
//! partial occlusion over a textured background with clutter; an instruction that needs
//! reasoning (12 template kinds: colour, function, group, category, colour+category,
//! spatial relation, spatial extreme, size, exclusion, occlusion, same colour, count); and
//! an answer in which every target is named and followed by `<seg>`, with its visible mask.
//!
//! Determinism: sample `i` of split `s` draws all its randomness from a ChaCha8 stream
//! seeded by a stable hash of (seed, s, i), so any shard of the work reproduces exactly the
//! rows of the unsharded run, and the same config gives byte-identical shards.
//!
//! Held-out split: a fixed 15% of the category-colour combinations (listed in
//! `lexicon.json`) never appear in train or val; every test sample has at least one of them
//! among its targets.
//!
//! Layout: [`lexicon`] (vocabulary and held-out combinations), `shapes` (outlines), `scene`
//! (placement and rendering), `query` (instruction templates).

pub mod lexicon;
mod query;
mod scene;
mod shapes;

pub use lexicon::{lexicon, Combo, Lexicon, TEMPLATE_KINDS};

use popen_core::manifest::Manifest;
use popen_core::mask::{Mask, Rle};
use popen_core::shard::{atomic_write, Sample, ShardWriter, SEG_TOKEN};
use popen_core::shardspec::ShardSpec;
use popen_core::{CoreError, Result};
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

pub(crate) const SEG: &str = SEG_TOKEN;

/// The splits, in generation order.
pub const SPLITS: &[&str] = &["train", "val", "test"];

/// Generator version, recorded in every sample's meta.
pub const GENERATOR: &str = "popen-synth/1";

/// Benchmark generation settings. Every field has a default (`#[serde(default)]`), so a
/// TOML config may set only some.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    /// Random seed; same seed and config give byte-identical shards.
    pub seed: u64,
    /// Samples per split.
    pub train: usize,
    pub val: usize,
    pub test: usize,
    /// Questions asked about each generated image (MUSE-style: several instructions per
    /// image): samples `k*q .. k*q + q - 1` share scene `k`. 1 = one image per sample.
    pub questions_per_image: usize,
    /// Image size in pixels.
    pub width: u32,
    pub height: u32,
    /// Objects per image (inclusive range; fewer are kept only when placement fails, never
    /// fewer than `min_objects`).
    pub min_objects: usize,
    pub max_objects: usize,
    /// Object radius range as a fraction of the shorter image side (before the category's
    /// own size factor; thin objects such as keys are drawn larger).
    pub size_min: f64,
    pub size_max: f64,
    /// Random stretch of the object's aspect ratio (+-).
    pub aspect_jitter: f64,
    /// Irregularity of outlines: amplitude of the random low-frequency radial perturbation
    /// and domain warp (relative to the radius; scaled down for rigid man-made categories).
    pub outline_jitter: f64,
    /// Probability that an object is deliberately placed overlapping an earlier one (later
    /// objects are drawn on top; instance masks are the visible parts).
    pub occlusion: f64,
    /// An object placement is rejected when it would leave an earlier object with less than
    /// this fraction of its area visible.
    pub min_visible_fraction: f64,
    /// ... or with fewer visible pixels than this fraction of the image.
    pub min_visible_area: f64,
    /// Distractors: probability that a new object repeats an existing object's category in
    /// another colour, ...
    pub same_category_rate: f64,
    /// ... is a look-alike category of an existing object (ball/peach/coin, lemon/egg,
    /// banana/moon, box/book/dice, ...), ...
    pub lookalike_rate: f64,
    /// ... or another category in an existing object's colour (otherwise: any category).
    pub same_colour_rate: f64,
    /// Per-object colour variation (relative, gaussian sigma) around the named colour.
    pub colour_jitter: f64,
    /// Strength of the directional shading across each object.
    pub shading: f64,
    /// Darkening of objects near their outline (0 = none).
    pub edge_darkening: f64,
    /// Strength of the per-object texture noise (relative brightness).
    pub texture: f64,
    /// Darkening of the cast shadow each object throws on what lies below (0 = none).
    pub shadow: f64,
    /// Contrast of the background pattern (noise, gradient, stripes, checks, wood).
    pub background_contrast: f64,
    /// Up to this many muted background blobs that are not objects.
    pub clutter: usize,
    /// Per-pixel sensor noise (sigma on 0..1 values).
    pub noise: f64,
    /// Probability of naming a category by a synonym (mug, crate, toadstool, ...) in
    /// instructions and answers.
    pub synonym_rate: f64,
    /// Relative frequency of each instruction template kind (see [`TEMPLATE_KINDS`]); 0
    /// disables a kind; kinds not listed get their default weight.
    pub template_weights: BTreeMap<String, f64>,
}

/// Default template weights: kinds that usually have several targets are drawn more often
/// (MUSE is a multi-target benchmark), plain category look-ups least.
/// Default template mix: direct references (category, colour) outweigh multi-step
/// reasoning, so that the tiny model learns something within the demo's CPU budget (see
/// the README's baseline).
fn default_weight(kind: &str) -> f64 {
    match kind {
        "colour_category" => 1.5,
        "category" | "colour" => 1.0,
        "exclusion" | "occlusion" | "spatial_relation" => 0.3,
        _ => 0.5,
    }
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            seed: 0,
            train: 2000,
            val: 200,
            test: 200,
            questions_per_image: 1,
            width: 96,
            height: 96,
            min_objects: 2,
            max_objects: 4,
            size_min: 0.1,
            size_max: 0.2,
            aspect_jitter: 0.2,
            outline_jitter: 0.08,
            occlusion: 0.3,
            min_visible_fraction: 0.45,
            min_visible_area: 0.003,
            same_category_rate: 0.25,
            lookalike_rate: 0.2,
            same_colour_rate: 0.2,
            colour_jitter: 0.08,
            shading: 0.35,
            edge_darkening: 0.3,
            texture: 0.08,
            shadow: 0.25,
            background_contrast: 0.15,
            clutter: 1,
            noise: 0.015,
            synonym_rate: 0.2,
            template_weights: TEMPLATE_KINDS.iter().map(|k| (k.to_string(), default_weight(k))).collect(),
        }
    }
}

impl SynthConfig {
    /// Weight of a template kind (its default when not listed).
    pub fn template_weight(&self, kind: &str) -> f64 {
        self.template_weights.get(kind).copied().unwrap_or_else(|| default_weight(kind))
    }

    /// Checks ranges; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CoreError::Invalid(format!("synth config: {m}")));
        if self.width < 32 || self.height < 32 || self.width > 4096 || self.height > 4096 {
            return bad(format!("width/height {}x{} must be within 32..=4096", self.width, self.height));
        }
        if self.questions_per_image < 1 || self.questions_per_image > 16 {
            return bad(format!("questions_per_image {} must be within 1..=16", self.questions_per_image));
        }
        if self.min_objects < 1 || self.max_objects < self.min_objects || self.max_objects > 12 {
            return bad(format!(
                "min_objects {} / max_objects {}: need 1 <= min <= max <= 12",
                self.min_objects, self.max_objects
            ));
        }
        if !(self.size_min > 0.0 && self.size_max >= self.size_min && self.size_max <= 0.4) {
            return bad(format!("size_min {} / size_max {}: need 0 < min <= max <= 0.4", self.size_min, self.size_max));
        }
        for (name, v, hi) in [
            ("aspect_jitter", self.aspect_jitter, 0.6),
            ("outline_jitter", self.outline_jitter, 0.3),
            ("occlusion", self.occlusion, 1.0),
            ("min_visible_fraction", self.min_visible_fraction, 1.0),
            ("min_visible_area", self.min_visible_area, 0.2),
            ("same_category_rate", self.same_category_rate, 1.0),
            ("lookalike_rate", self.lookalike_rate, 1.0),
            ("same_colour_rate", self.same_colour_rate, 1.0),
            ("colour_jitter", self.colour_jitter, 0.5),
            ("shading", self.shading, 1.0),
            ("edge_darkening", self.edge_darkening, 0.9),
            ("texture", self.texture, 1.0),
            ("shadow", self.shadow, 0.9),
            ("background_contrast", self.background_contrast, 1.0),
            ("noise", self.noise, 0.3),
            ("synonym_rate", self.synonym_rate, 1.0),
        ] {
            if !(v >= 0.0 && v <= hi) {
                return bad(format!("{name} = {v} must be within 0..={hi}"));
            }
        }
        if self.same_category_rate + self.lookalike_rate + self.same_colour_rate > 1.0 {
            return bad("same_category_rate + lookalike_rate + same_colour_rate must be <= 1".into());
        }
        for (k, &w) in &self.template_weights {
            if !TEMPLATE_KINDS.contains(&k.as_str()) {
                return bad(format!("template_weights: unknown kind '{k}' (known: {})", TEMPLATE_KINDS.join(", ")));
            }
            if !(w >= 0.0 && w.is_finite()) {
                return bad(format!("template_weights.{k} = {w} must be >= 0"));
            }
        }
        if TEMPLATE_KINDS.iter().all(|k| self.template_weight(k) <= 0.0) {
            return bad("template_weights: every kind is disabled".into());
        }
        Ok(())
    }
}

/// The RNG of one sample: a function of (seed, split, index) alone.
pub fn sample_rng(seed: u64, split: &str, index: usize) -> ChaCha8Rng {
    let h = lexicon::mix(lexicon::mix(seed, lexicon::stable_hash(split)), index as u64);
    ChaCha8Rng::seed_from_u64(h)
}

/// Sample id: `synth-{split}-{index:06}`.
pub fn sample_id(split: &str, index: usize) -> String {
    format!("synth-{split}-{index:06}")
}

/// Generates sample `index` of `split` (`test` draws held-out combinations; other split
/// names behave like train). Deterministic.
pub fn generate_sample(cfg: &SynthConfig, split: &str, index: usize) -> Result<Sample> {
    let id = sample_id(split, index);
    let qpi = cfg.questions_per_image.max(1);
    let (image_index, question) = (index / qpi, index % qpi);
    let mut rng = sample_rng(cfg.seed, split, image_index);
    let test = split == "test";
    let heldout: Vec<(usize, u8)> = if test {
        (0..lexicon::CATS.len())
            .flat_map(|c| lexicon::CATS[c].colours.iter().map(move |&k| (c, k)))
            .filter(|&(c, k)| lexicon::is_heldout(c, k))
            .collect()
    } else {
        Vec::new()
    };
    for _attempt in 0..100 {
        let forced = heldout.choose(&mut rng).copied();
        let Some(scene) = scene::sample_scene(cfg, &mut rng, test, forced) else { continue };
        let insts = query::instances(&scene);
        let Some(q) = query::make_query(cfg, &scene, &insts, &mut rng, test) else { continue };
        if question == 0 {
            return build_sample(cfg, &id, split, index, &scene, &insts, &q);
        }
        // Question j > 0 of the scene: its own RNG stream; one that repeats question 0 of the
        // image is redrawn (a few times; the scene is kept either way).
        let mut qrng = ChaCha8Rng::seed_from_u64(lexicon::mix(
            lexicon::mix(cfg.seed, lexicon::stable_hash(split)),
            lexicon::mix(image_index as u64, 0x5157_0000 + question as u64),
        ));
        let mut chosen = None;
        for _ in 0..20 {
            if let Some(qj) = query::make_query(cfg, &scene, &insts, &mut qrng, test) {
                let dup = qj.instruction == q.instruction;
                chosen = Some(qj);
                if !dup {
                    break;
                }
            }
        }
        let qj = chosen.unwrap_or(q);
        return build_sample(cfg, &id, split, index, &scene, &insts, &qj);
    }
    Err(CoreError::Invalid(format!(
        "sample {id}: no valid scene and instruction in 100 attempts (config too constrained?)"
    )))
}

fn build_sample(
    cfg: &SynthConfig,
    id: &str,
    split: &str,
    index: usize,
    scene: &scene::Scene,
    insts: &[query::Inst],
    q: &query::Query,
) -> Result<Sample> {
    let (w, h) = (scene.w, scene.h);
    let masks: Vec<Rle> = (0..insts.len())
        .map(|k| {
            let kk = k as i16;
            Rle::encode(
                &Mask::from_row_major(h, w, scene.zbuf.iter().map(|&z| (z == kk) as u8).collect())
                    .expect("zbuf has w*h pixels"),
            )
        })
        .collect();
    let names: Vec<String> = insts.iter().map(|i| lexicon::CATS[i.cat].name.to_string()).collect();
    let meta = serde_json::json!({
        "generator": GENERATOR,
        "seed": cfg.seed,
        "split": split,
        "index": index,
        "template": q.kind,
        "variant": q.variant,
        "heldout": q.targets.iter().any(|&t| insts[t].heldout),
        "references": q.refs,
        "background": scene.background,
        "clutter": scene.clutter,
        "instances": insts.iter().enumerate().map(|(k, i)| serde_json::json!({
            "category": lexicon::CATS[i.cat].name,
            "colour": lexicon::COLOURS[i.colour as usize].0,
            "bbox": [i.bbox[0], i.bbox[1], i.bbox[2].saturating_sub(i.bbox[0]), i.bbox[3].saturating_sub(i.bbox[1])],
            "z": k,
            "area": i.vis,
            "full_area": i.full,
            "visible_fraction": (i.vis as f64 / i.full.max(1) as f64 * 1000.0).round() / 1000.0,
            "heldout": i.heldout,
        })).collect::<Vec<_>>(),
    });
    let mut meta = meta;
    if cfg.questions_per_image > 1 {
        meta["image_index"] = serde_json::json!(index / cfg.questions_per_image);
    }
    let s = Sample {
        id: id.to_string(),
        split: split.to_string(),
        image: popen_core::imageio::encode_png(&scene.image)?,
        width: w,
        height: h,
        instruction: q.instruction.clone(),
        answer: q.answer.clone(),
        target_names: q.targets.iter().map(|&t| names[t].clone()).collect(),
        target_masks: q.targets.iter().map(|&t| masks[t].clone()).collect(),
        target_instances: q.targets.iter().map(|&t| t as i32).collect(),
        instance_names: names,
        instance_masks: masks,
        meta: meta.to_string(),
    };
    s.validate().map_err(|(f, m)| CoreError::Invalid(format!("sample {id}: generated an invalid record: {f}: {m}")))?;
    Ok(s)
}

/// Generates the benchmark into `out_dir`: `{split}.parquet` for train, val and test
/// (`{split}{suffix}.parquet` and `manifest{suffix}.json` when `shard` is one task of a job
/// array: task i generates the sample indices `shard.takes(i)`), `lexicon.json` and
/// `manifest.json` (stage `synth`).
pub fn generate(cfg: &SynthConfig, out_dir: &Path, shard: ShardSpec) -> Result<Manifest> {
    cfg.validate()?;
    let t0 = Instant::now();
    std::fs::create_dir_all(out_dir).map_err(|e| CoreError::io(out_dir, e))?;
    let mut manifest = Manifest::new("synth", cfg)?;
    manifest.seed = Some(cfg.seed);
    if !shard.is_all() {
        manifest.shard = Some(shard.to_string());
    }
    let lex_path = out_dir.join("lexicon.json");
    let mut lex = serde_json::to_string_pretty(&lexicon()).expect("lexicon serializes");
    lex.push('\n');
    atomic_write(&lex_path, lex.as_bytes())?;

    let suffix = if shard.is_all() { String::new() } else { shard.suffix() };
    let total: usize = [cfg.train, cfg.val, cfg.test].iter().map(|&n| (0..n).filter(|&i| shard.takes(i)).count()).sum();
    let bar = popen_core::progress::bar(total as u64, "synth");
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 16);
    let mut outputs = Vec::new();
    for (split, n) in [("train", cfg.train), ("val", cfg.val), ("test", cfg.test)] {
        let ts = Instant::now();
        bar.set_prefix(split);
        let path = out_dir.join(format!("{split}{suffix}.parquet"));
        let mut writer = ShardWriter::<Sample>::create(&path)?;
        let indices: Vec<usize> = (0..n).filter(|&i| shard.takes(i)).collect();
        let mut rows = 0u64;
        for chunk in indices.chunks(64 * threads) {
            let results: Vec<Result<Sample>> = if threads == 1 {
                chunk.iter().map(|&i| generate_sample(cfg, split, i)).collect()
            } else {
                let mut slots: Vec<Option<Result<Sample>>> = (0..chunk.len()).map(|_| None).collect();
                std::thread::scope(|sc| {
                    let handles: Vec<_> = (0..threads)
                        .map(|t| {
                            sc.spawn(move || {
                                chunk
                                    .iter()
                                    .enumerate()
                                    .skip(t)
                                    .step_by(threads)
                                    .map(|(pos, &i)| (pos, generate_sample(cfg, split, i)))
                                    .collect::<Vec<_>>()
                            })
                        })
                        .collect();
                    for h in handles {
                        for (pos, r) in h.join().expect("generator thread panicked") {
                            slots[pos] = Some(r);
                        }
                    }
                });
                slots.into_iter().map(|s| s.expect("every slot filled")).collect()
            };
            for r in results {
                let s = r?;
                let m: serde_json::Value = serde_json::from_str(&s.meta).expect("meta is JSON");
                manifest.count(&format!("template/{}", m["template"].as_str().unwrap_or("?")), 1);
                manifest.count("targets", s.target_names.len() as u64);
                manifest.count("instances", s.instance_names.len() as u64);
                if m["heldout"].as_bool() == Some(true) {
                    manifest.count(&format!("heldout_samples/{split}"), 1);
                }
                writer.write(s)?;
                rows += 1;
                bar.inc(1);
            }
        }
        writer.finish()?;
        manifest.count(split, rows);
        outputs.push((path, rows));
        manifest.time(&format!("generate/{split}"), ts);
    }
    bar.finish_and_clear();
    for (path, rows) in outputs {
        manifest.add_output(&path, Some(rows))?;
    }
    manifest.add_output(&lex_path, None)?;
    manifest.time("total", t0);
    let mpath = if shard.is_all() {
        out_dir.join(popen_core::manifest::MANIFEST_FILE)
    } else {
        out_dir.join(format!("manifest{suffix}.json"))
    };
    manifest.write(&mpath)?;
    tracing::info!(
        "synth: {} train, {} val, {} test samples in {:.1}s -> {}",
        manifest.counts.get("train").copied().unwrap_or(0),
        manifest.counts.get("val").copied().unwrap_or(0),
        manifest.counts.get("test").copied().unwrap_or(0),
        t0.elapsed().as_secs_f64(),
        out_dir.display()
    );
    Ok(manifest)
}
