//! `popen eval`: thin front end of the popen-eval crate. Reads the two shards (or makes a
//! trivial baseline's predictions), scores them, writes report.json, report.md, overlays of
//! the best and worst samples and manifest.json, and prints the Markdown table.

use anyhow::{bail, Context, Result};
use image::{Rgb, RgbImage};
use popen_core::chat::ChatConfig;
use popen_core::manifest::Manifest;
use popen_core::shard::{read_shard, Prediction, Sample};
use popen_eval::{evaluate, Baseline, ChairTruth, EvalConfig, EvalInputs, Judge, JudgeConfig, Lexicon, Report};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Ground-truth samples shard (e.g. data/synth/val.parquet).
    #[arg(long)]
    samples: PathBuf,
    /// Predictions shard (`popen predict`), one record per sample id.
    #[arg(long, required_unless_present = "baseline", conflicts_with = "baseline")]
    predictions: Option<PathBuf>,
    /// Score a trivial baseline instead of a predictions shard: nothing | largest-instance.
    #[arg(long)]
    baseline: Option<Baseline>,
    /// CHAIR lexicon: the benchmark's lexicon.json, or coco:<path to CHAIR's chair_synonyms.txt>.
    #[arg(long, default_value = "data/synth/lexicon.json")]
    lexicon: String,
    /// Output folder: report.json, report.md, overlays/, manifest.json (and
    /// baseline-<name>.parquet, the baseline's predictions, with --baseline).
    #[arg(long, default_value = "out/eval")]
    out: PathBuf,
    /// Objects present for CHAIR: every annotated instance, or only the answer's targets.
    #[arg(long, value_enum, default_value = "instances")]
    chair_truth: ChairTruthArg,
    /// Logit magnitude a binary mask stands for in PixelLM's matching cost.
    #[arg(long, default_value_t = popen_eval::matching::DEFAULT_MATCH_LOGIT, value_parser = positive_finite)]
    match_logit: f64,
    /// Class-agnostic proposals (`popen sam-masks` shards) for the localization error: the
    /// other objects are the proposals that are not the target (IoU < 0.5) instead of the
    /// annotated instances. Every sample needs a record.
    #[arg(long, num_args = 1..)]
    proposals: Vec<PathBuf>,
    /// Overlays of the N best and N worst samples by per-sample gIoU (0: none).
    #[arg(long, default_value_t = 3)]
    overlays: usize,
    /// Upscaling factor of the overlays.
    #[arg(long, default_value_t = 4)]
    overlay_scale: u32,
    /// LLM judge (off unless given): base URL of an OpenAI-compatible endpoint, e.g.
    /// https://api.openai.com/v1 or http://127.0.0.1:8000/v1.
    #[arg(long, requires = "judge_model")]
    judge_url: Option<String>,
    /// LLM judge model name.
    #[arg(long, requires = "judge_url")]
    judge_model: Option<String>,
    /// Environment variable holding the judge's API key (unset: no key is sent).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    judge_key_env: String,
    /// Send the image to the judge (vision models); otherwise the annotated object names.
    #[arg(long)]
    judge_image: bool,
    /// Seconds per judge request.
    #[arg(long, default_value_t = 120)]
    judge_timeout: u64,
    /// Retries of a judge request (transport errors, 429, 5xx).
    #[arg(long, default_value_t = 4)]
    judge_retries: u32,
}

/// A finite number > 0 (clap names the flag in its error).
fn positive_finite(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(v) => Err(format!("must be a finite number > 0, got {v}")),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ChairTruthArg {
    Instances,
    Targets,
}

/// What the manifest records as the stage config.
#[derive(Serialize)]
struct StageConfig<'a> {
    eval: &'a EvalConfig,
    samples: String,
    predictions: Option<String>,
    baseline: Option<&'static str>,
    lexicon: &'a str,
    overlays: usize,
    judge: Option<&'a JudgeConfig>,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let t0 = Instant::now();
    let cfg = EvalConfig {
        match_logit: a.match_logit,
        chair_truth: match a.chair_truth {
            ChairTruthArg::Instances => ChairTruth::Instances,
            ChairTruthArg::Targets => ChairTruth::Targets,
        },
        best_worst: a.overlays.max(EvalConfig::default().best_worst),
        ..EvalConfig::default()
    };
    let judge_cfg = match (&a.judge_url, &a.judge_model) {
        (Some(url), Some(model)) => {
            let api_key = std::env::var(&a.judge_key_env).ok().filter(|k| !k.is_empty());
            if api_key.is_none() {
                tracing::info!("judge: ${} is not set, no API key sent", a.judge_key_env);
            }
            Some(JudgeConfig {
                chat: ChatConfig {
                    api_key,
                    timeout: Duration::from_secs(a.judge_timeout),
                    retries: a.judge_retries,
                    ..ChatConfig::new(url.clone(), model.clone())
                },
                send_image: a.judge_image,
            })
        }
        _ => None,
    };

    let samples: Vec<Sample> = read_shard(&a.samples)?;
    let lexicon = Lexicon::load(&a.lexicon).with_context(|| format!("loading the CHAIR lexicon '{}'", a.lexicon))?;
    let predictions: Vec<Prediction> = match (&a.predictions, a.baseline) {
        (Some(p), _) => read_shard(p)?,
        (None, Some(b)) => b.predict_all(&samples)?,
        (None, None) => bail!("give --predictions or --baseline"),
    };
    let judge = judge_cfg.clone().map(Judge::new).transpose()?;
    let proposals: Option<std::collections::HashMap<String, Vec<popen_core::mask::Rle>>> = if a.proposals.is_empty() {
        None
    } else {
        let sets = popen_core::shard::read_proposals(&a.proposals).context("reading the proposals")?;
        Some(sets.into_iter().map(|(id, p)| (id, p.masks)).collect())
    };
    let mut report = evaluate(
        &cfg,
        EvalInputs {
            samples: &samples,
            predictions: &predictions,
            lexicon: &lexicon,
            proposals: proposals.as_ref(),
            judge: judge.as_ref(),
        },
    )
    .with_context(|| match &a.predictions {
        Some(p) => format!("evaluating {} against {}", p.display(), a.samples.display()),
        None => format!("evaluating the baseline against {}", a.samples.display()),
    })?;
    report.inputs.insert("samples".into(), a.samples.display().to_string());
    if let Some(p) = &a.predictions {
        report.inputs.insert("predictions".into(), p.display().to_string());
    }
    if let Some(b) = a.baseline {
        report.inputs.insert("baseline".into(), b.name().into());
    }
    report.inputs.insert("lexicon".into(), a.lexicon.clone());

    let mut inputs: Vec<(&str, &Path)> = vec![("--samples", &a.samples)];
    if let Some(p) = &a.predictions {
        inputs.push(("--predictions", p));
    }
    let _lock = popen_core::guard::claim_output(&a.out, &inputs)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut manifest = Manifest::new(
        "eval",
        &StageConfig {
            eval: &cfg,
            samples: a.samples.display().to_string(),
            predictions: a.predictions.as_ref().map(|p| p.display().to_string()),
            baseline: a.baseline.map(Baseline::name),
            lexicon: &a.lexicon,
            overlays: a.overlays,
            judge: judge_cfg.as_ref(),
        },
    )?;
    manifest.add_input(&a.samples)?;
    if let Some(p) = &a.predictions {
        manifest.add_input(p)?;
    }
    manifest.add_input(a.lexicon.strip_prefix("coco:").unwrap_or(&a.lexicon))?;
    let mut outputs = report.write(&a.out)?;
    if let Some(b) = a.baseline {
        // the baseline's answers, so that other tools can score the same predictions
        let path = a.out.join(format!("baseline-{}.parquet", b.name()));
        popen_core::shard::write_shard(&path, predictions.iter().cloned())?;
        outputs.push(path);
    }
    outputs.extend(write_overlays(&report, &samples, &predictions, &a.out, a.overlays, a.overlay_scale)?);
    for p in &outputs {
        manifest.add_output(p, None)?;
    }
    let c = &report.counts;
    for (k, v) in [
        ("samples", c.samples),
        ("pairs", c.pairs),
        ("matched_pairs", c.matched_pairs),
        ("chair_mentions", c.chair.mentions),
        ("judged", c.judged),
        ("judge_failed", c.judge_failed),
    ] {
        manifest.count(k, v);
    }
    for s in report.samples.iter().filter(|s| s.judge_error.is_some()) {
        manifest.skip(&s.id, s.judge_error.clone().unwrap_or_default());
    }
    manifest.time("total", t0);
    manifest.write(popen_core::manifest::manifest_path(&a.out))?;
    print!("{}", report.markdown());
    tracing::info!("eval: {} samples -> {}", c.samples, a.out.display());
    Ok(())
}

/// File-name-safe form of a sample id.
fn safe(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' }).collect()
}

/// `overlays/best_{k}_{id}.png` and `worst_{k}_{id}.png`: the ground truth (targets in colour,
/// other instances outlined grey) above the prediction (each predicted mask in its `<seg>`'s
/// colour, with its answer).
fn write_overlays(
    report: &Report,
    samples: &[Sample],
    predictions: &[Prediction],
    out: &Path,
    n: usize,
    scale: u32,
) -> Result<Vec<PathBuf>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let dir = out.join("overlays");
    let by_id: HashMap<&str, &Sample> = samples.iter().map(|s| (s.id.as_str(), s)).collect();
    let preds: HashMap<&str, &Prediction> = predictions.iter().map(|p| (p.id.as_str(), p)).collect();
    let scores: HashMap<&str, &popen_eval::SampleScores> = report.samples.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut written = Vec::new();
    for (kind, list) in [("best", &report.best), ("worst", &report.worst)] {
        for (k, r) in list.iter().take(n).enumerate() {
            let (Some(s), Some(p), Some(sc)) =
                (by_id.get(r.id.as_str()), preds.get(r.id.as_str()), scores.get(r.id.as_str()))
            else {
                continue;
            };
            let img = compare(s, p, sc, scale).with_context(|| format!("overlay of sample '{}'", s.id))?;
            let path = dir.join(format!("{kind}_{}_{}.png", k + 1, safe(&s.id)));
            popen_core::shard::atomic_write(&path, &popen_core::imageio::encode_png(&img)?)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// Ground-truth panel above prediction panel, both drawn by popen_data::render::overlay.
fn compare(s: &Sample, p: &Prediction, sc: &popen_eval::SampleScores, scale: u32) -> Result<RgbImage> {
    let gt = popen_data::render::overlay(&Sample { id: format!("ground truth: {}", s.id), ..s.clone() }, scale)?;
    let names: Vec<String> = (0..p.masks.len())
        .map(|i| match sc.matched.iter().find(|m| m.pred == i) {
            Some(m) => format!("#{i}: target {} IoU {:.2}", m.gt, m.iou),
            None => format!("#{i}: unmatched"),
        })
        .collect();
    let giou = sc.giou.map(|g| format!("{:.1}", 100.0 * g)).unwrap_or_else(|| "-".into());
    let pred_view = Sample {
        id: format!("prediction, gIoU {giou}"),
        answer: p.answer.clone(),
        target_instances: vec![-1; p.masks.len()],
        target_names: names,
        target_masks: p.masks.clone(),
        ..s.clone()
    };
    let pr = popen_data::render::overlay(&pred_view, scale)?;
    let gap = 8;
    let mut out =
        RgbImage::from_pixel(gt.width().max(pr.width()), gt.height() + gap + pr.height(), Rgb([255, 255, 255]));
    image::imageops::replace(&mut out, &gt, 0, 0);
    for x in 0..out.width() {
        out.put_pixel(x, gt.height() + gap / 2, Rgb([0, 0, 0]));
    }
    image::imageops::replace(&mut out, &pr, 0, (gt.height() + gap) as i64);
    Ok(out)
}
