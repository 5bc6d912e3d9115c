//! Scoring a predictions shard against its samples shard: per-sample scores, the aggregate
//! metrics, and the JSON and Markdown reports.

use crate::chair::{chair_sample, ChairSample, ChairTotals, ChairTruth, Lexicon};
use crate::error::{EvalError, Result};
use crate::judge::{Judge, JudgeScore};
use crate::localization::{self, LocalizationConfig};
use crate::matching::{self, IouTotals, Pair, DEFAULT_MATCH_LOGIT};
use popen_core::mask::{boundary_iou, Rle, DEFAULT_BOUNDARY_DILATION_RATIO};
use popen_core::shard::{Prediction, Sample};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Every setting of the evaluation, with the paper's or PixelLM's value as default.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct EvalConfig {
    /// Logit magnitude a binary mask stands for in PixelLM's matching cost
    /// ([`matching::DEFAULT_MATCH_LOGIT`]).
    pub match_logit: f64,
    /// Objects that count as present for CHAIR.
    pub chair_truth: ChairTruth,
    /// Boundary IoU band, fraction of the image diagonal (SPEC 10.5: 0.02).
    pub boundary_dilation_ratio: f64,
    pub localization: LocalizationConfig,
    /// How many best and worst samples (by per-sample gIoU) the report names.
    pub best_worst: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            match_logit: DEFAULT_MATCH_LOGIT,
            chair_truth: ChairTruth::Instances,
            boundary_dilation_ratio: DEFAULT_BOUNDARY_DILATION_RATIO,
            localization: LocalizationConfig::default(),
            best_worst: 5,
        }
    }
}

impl EvalConfig {
    /// `match_logit` must be a finite number > 0: NaN makes every matching cost NaN, and 0 or
    /// a negative value makes the cost ignore (or reward) the overlap.
    pub fn validate(&self) -> Result<()> {
        if !(self.match_logit.is_finite() && self.match_logit > 0.0) {
            return Err(EvalError::Invalid(format!(
                "match_logit (--match-logit) must be a finite number > 0, got {}",
                self.match_logit
            )));
        }
        Ok(())
    }
}

/// What [`evaluate`] scores.
#[derive(Clone, Copy)]
pub struct EvalInputs<'a> {
    /// Ground truth.
    pub samples: &'a [Sample],
    /// One per sample, joined on `id` (any order).
    pub predictions: &'a [Prediction],
    pub lexicon: &'a Lexicon,
    /// Class-agnostic proposal masks per sample id (SAM automatic masks) for the
    /// localization error's `IoU_o`; None uses each sample's other annotated instances.
    pub proposals: Option<&'a HashMap<String, Vec<Rle>>>,
    /// The optional LLM judge.
    pub judge: Option<&'a Judge>,
}

/// A prediction matched to a ground-truth target, with the boundary and localization scores.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MatchedPair {
    pub pred: usize,
    pub gt: usize,
    /// Exact IoU (no epsilon).
    pub iou: f64,
    pub boundary_iou: f64,
    /// Largest IoU with another object of the image (0 when there is none).
    pub iou_other: f64,
    pub localization_error: bool,
}

/// Everything measured on one sample.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SampleScores {
    pub id: String,
    pub predicted: usize,
    pub targets: usize,
    /// PixelLM's pairs, in PixelLM's order.
    pub pairs: Vec<Pair>,
    /// Mean pair IoU of this sample; None when it has no pairs.
    pub giou: Option<f64>,
    pub matched: Vec<MatchedPair>,
    pub chair: ChairSample,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<JudgeScore>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_error: Option<String>,
}

/// The split's metrics (fractions, not percent).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Metrics {
    /// PixelLM's gIoU: mean pair IoU over the split; None without pairs.
    pub giou: Option<f64>,
    /// PixelLM's cIoU.
    pub ciou: f64,
    /// Mean over samples (with pairs) of the per-sample gIoU, for comparison.
    pub giou_per_sample: Option<f64>,
    /// CHAIR C_S (Eq. 7).
    pub chair_s: f64,
    /// CHAIR C_I (Eq. 7).
    pub chair_i: f64,
    /// Mean Boundary IoU over matched pairs.
    pub boundary_iou: Option<f64>,
    /// Target localization error rate `p` as the paper defines it (SPEC 8, 10.20): the share
    /// of *all* ground-truth target objects of the split whose matched prediction is a
    /// localization error; an unmatched target counts in the denominator (it cannot be an
    /// error). None without targets. Reports written before issue 24 held the share of matched
    /// pairs under this name (now [`Metrics::localization_error_rate_matched`]).
    pub localization_error_rate: Option<f64>,
    /// The share of *matched pairs* that are localization errors (this project's definition
    /// before issue 24; `>= localization_error_rate`). None without matched pairs; absent
    /// (None) in reports written before it existed.
    #[serde(default)]
    pub localization_error_rate_matched: Option<f64>,
    /// Mean judge scores over the judged samples.
    pub judge_accuracy: Option<f64>,
    pub judge_detail: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Counts {
    pub samples: u64,
    /// Samples with at least one pair (those in gIoU).
    pub samples_with_pairs: u64,
    pub predicted_objects: u64,
    pub target_objects: u64,
    pub pairs: u64,
    pub matched_pairs: u64,
    pub unmatched_predictions: u64,
    pub unmatched_targets: u64,
    pub intersection: u64,
    pub union: u64,
    pub chair: ChairTotals,
    pub localization_errors: u64,
    pub judged: u64,
    pub judge_failed: u64,
}

/// A sample id with its per-sample gIoU.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Ranked {
    pub id: String,
    pub giou: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// Named inputs (paths, baseline), filled in by the caller.
    pub inputs: BTreeMap<String, String>,
    pub config: EvalConfig,
    /// "benchmark" or "coco", and its class count.
    pub lexicon: String,
    pub metrics: Metrics,
    pub counts: Counts,
    pub best: Vec<Ranked>,
    pub worst: Vec<Ranked>,
    pub samples: Vec<SampleScores>,
}

/// Lists at most a few ids and the total.
fn some_ids(ids: &[&str]) -> String {
    const SHOWN: usize = 5;
    let mut s = ids.iter().take(SHOWN).map(|i| format!("'{i}'")).collect::<Vec<_>>().join(", ");
    if ids.len() > SHOWN {
        s.push_str(&format!(", ... ({} in all)", ids.len()));
    }
    s
}

/// Pairs every sample with its prediction (by id, in sample order). Duplicate ids on
/// either side, samples without a prediction and predictions without a sample are errors
/// that name the ids (the first few, and how many).
pub fn align<'a>(samples: &'a [Sample], predictions: &'a [Prediction]) -> Result<Vec<(&'a Sample, &'a Prediction)>> {
    let mut seen = HashSet::new();
    let dup: Vec<&str> = samples.iter().filter(|s| !seen.insert(s.id.as_str())).map(|s| s.id.as_str()).collect();
    if !dup.is_empty() {
        return Err(EvalError::Ids(format!("the ground truth repeats sample ids: {}", some_ids(&dup))));
    }
    let mut by_id: HashMap<&str, &Prediction> = HashMap::with_capacity(predictions.len());
    let mut dup = Vec::new();
    for p in predictions {
        if by_id.insert(p.id.as_str(), p).is_some() {
            dup.push(p.id.as_str());
        }
    }
    if !dup.is_empty() {
        return Err(EvalError::Ids(format!("the predictions repeat sample ids: {}", some_ids(&dup))));
    }
    let missing: Vec<&str> =
        samples.iter().filter(|s| !by_id.contains_key(s.id.as_str())).map(|s| s.id.as_str()).collect();
    let extra: Vec<&str> =
        predictions.iter().filter(|p| !seen.contains(p.id.as_str())).map(|p| p.id.as_str()).collect();
    if !missing.is_empty() || !extra.is_empty() {
        let mut parts = Vec::new();
        if !missing.is_empty() {
            parts.push(format!("{} sample(s) have no prediction: {}", missing.len(), some_ids(&missing)));
        }
        if !extra.is_empty() {
            parts.push(format!("{} prediction(s) have no sample: {}", extra.len(), some_ids(&extra)));
        }
        return Err(EvalError::Ids(format!("predictions do not match the ground truth: {}", parts.join("; "))));
    }
    Ok(samples.iter().map(|s| (s, by_id[s.id.as_str()])).collect())
}

/// Scores one sample (without the judge). `proposals`: see [`EvalInputs::proposals`].
pub fn score_sample(
    cfg: &EvalConfig,
    sample: &Sample,
    pred: &Prediction,
    lexicon: &Lexicon,
    proposals: Option<&[Rle]>,
) -> Result<SampleScores> {
    cfg.validate()?;
    let id = sample.id.as_str();
    if let Err((field, msg)) = sample.validate() {
        return Err(EvalError::sample(id, format!("ground truth, field '{field}': {msg}")));
    }
    if pred.width != sample.width || pred.height != sample.height {
        return Err(EvalError::sample(
            id,
            format!(
                "the prediction is for a {}x{} image but the sample is {}x{} (w x h)",
                pred.width, pred.height, sample.width, sample.height
            ),
        ));
    }
    if let Err((field, msg)) = pred.validate() {
        return Err(EvalError::sample(id, format!("prediction, field '{field}': {msg}")));
    }
    let ctx = |e: EvalError| EvalError::sample(id, e.to_string());
    let pairs = matching::match_masks(&pred.masks, &sample.target_masks, cfg.match_logit).map_err(ctx)?;
    let giou = (!pairs.is_empty()).then(|| pairs.iter().map(|p| p.iou).sum::<f64>() / pairs.len() as f64);

    let mut matched = Vec::new();
    for p in pairs.iter().filter(|p| p.is_matched()) {
        let (pi, gi) = (p.pred.unwrap_or_default(), p.gt.unwrap_or_default());
        let (pm, gm) = (&pred.masks[pi], &sample.target_masks[gi]);
        let iou = popen_core::mask::iou_from_counts(p.intersection, p.union);
        let b = boundary_iou(&pm.decode()?, &gm.decode()?, cfg.boundary_dilation_ratio).map_err(|e| ctx(e.into()))?;
        let iou_other = match proposals {
            Some(props) => {
                let others = localization::other_proposals(props, gm, &cfg.localization).map_err(ctx)?;
                localization::max_iou_with(pm, others)
            }
            None => localization::max_iou_with(
                pm,
                localization::other_instances(&sample.instance_masks, sample.target_instances[gi]),
            ),
        }
        .map_err(ctx)?;
        matched.push(MatchedPair {
            pred: pi,
            gt: gi,
            iou,
            boundary_iou: b,
            iou_other,
            localization_error: localization::is_localization_error(iou, iou_other, &cfg.localization),
        });
    }
    let truth = match cfg.chair_truth {
        ChairTruth::Instances => &sample.instance_names,
        ChairTruth::Targets => &sample.target_names,
    };
    Ok(SampleScores {
        id: sample.id.clone(),
        predicted: pred.masks.len(),
        targets: sample.target_masks.len(),
        pairs,
        giou,
        matched,
        chair: chair_sample(lexicon, &pred.answer, truth),
        judge: None,
        judge_error: None,
    })
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (mut s, mut n) = (0.0, 0u64);
    for v in values {
        s += v;
        n += 1;
    }
    (n > 0).then(|| s / n as f64)
}

/// Scores every sample and aggregates. A judge failure on a sample is recorded on that
/// sample (`judge_error`, counted in `judge_failed`) and logged; every other problem is an
/// error naming the sample.
pub fn evaluate(cfg: &EvalConfig, inputs: EvalInputs<'_>) -> Result<Report> {
    cfg.validate()?;
    let pairs = align(inputs.samples, inputs.predictions)?;
    let bar = popen_core::progress::bar(pairs.len() as u64, "eval");
    let mut samples = Vec::with_capacity(pairs.len());
    for (s, p) in pairs {
        let props = match inputs.proposals {
            Some(map) => Some(
                map.get(&s.id)
                    .ok_or_else(|| EvalError::sample(&s.id, "proposal masks were given, but none for this sample"))?
                    .as_slice(),
            ),
            None => None,
        };
        let mut scores = score_sample(cfg, s, p, inputs.lexicon, props)?;
        if let Some(judge) = inputs.judge {
            match judge.score(s, &p.answer) {
                Ok(j) => scores.judge = Some(j),
                Err(e) => {
                    tracing::warn!("{e}");
                    scores.judge_error = Some(e.to_string());
                }
            }
        }
        samples.push(scores);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(aggregate(cfg, inputs.lexicon, samples))
}

/// The report of already scored samples.
pub fn aggregate(cfg: &EvalConfig, lexicon: &Lexicon, samples: Vec<SampleScores>) -> Report {
    let mut totals = IouTotals::default();
    let mut c = Counts::default();
    for s in &samples {
        totals.add(&s.pairs);
        c.samples += 1;
        c.samples_with_pairs += (!s.pairs.is_empty()) as u64;
        c.predicted_objects += s.predicted as u64;
        c.target_objects += s.targets as u64;
        c.matched_pairs += s.matched.len() as u64;
        c.unmatched_predictions += s.pairs.iter().filter(|p| p.gt.is_none()).count() as u64;
        c.unmatched_targets += s.pairs.iter().filter(|p| p.pred.is_none()).count() as u64;
        c.chair.add(&s.chair);
        c.localization_errors += s.matched.iter().filter(|m| m.localization_error).count() as u64;
        c.judged += s.judge.is_some() as u64;
        c.judge_failed += s.judge_error.is_some() as u64;
    }
    c.pairs = totals.pairs;
    c.intersection = totals.intersection;
    c.union = totals.union;
    let all_matched = || samples.iter().flat_map(|s| s.matched.iter());
    let metrics = Metrics {
        giou: totals.giou(),
        ciou: totals.ciou(),
        giou_per_sample: mean(samples.iter().filter_map(|s| s.giou)),
        chair_s: c.chair.c_s(),
        chair_i: c.chair.c_i(),
        boundary_iou: mean(all_matched().map(|m| m.boundary_iou)),
        localization_error_rate: (c.target_objects > 0).then(|| c.localization_errors as f64 / c.target_objects as f64),
        localization_error_rate_matched: (c.matched_pairs > 0)
            .then(|| c.localization_errors as f64 / c.matched_pairs as f64),
        judge_accuracy: mean(samples.iter().filter_map(|s| s.judge.as_ref().map(|j| j.accuracy))),
        judge_detail: mean(samples.iter().filter_map(|s| s.judge.as_ref().map(|j| j.detail))),
    };
    let mut ranked: Vec<Ranked> =
        samples.iter().filter_map(|s| s.giou.map(|g| Ranked { id: s.id.clone(), giou: g })).collect();
    ranked.sort_by(|a, b| b.giou.total_cmp(&a.giou).then_with(|| a.id.cmp(&b.id)));
    let best: Vec<Ranked> = ranked.iter().take(cfg.best_worst).cloned().collect();
    ranked.sort_by(|a, b| a.giou.total_cmp(&b.giou).then_with(|| a.id.cmp(&b.id)));
    let worst: Vec<Ranked> = ranked.iter().take(cfg.best_worst).cloned().collect();
    Report {
        inputs: BTreeMap::new(),
        config: cfg.clone(),
        lexicon: format!("{} ({} classes)", lexicon.kind, lexicon.classes.len()),
        metrics,
        counts: c,
        best,
        worst,
        samples,
    }
}

fn pct(v: Option<f64>) -> String {
    v.map(|v| format!("{:.2}", 100.0 * v)).unwrap_or_else(|| "-".into())
}

impl Report {
    /// The metrics as a Markdown table (percent, as the paper), with the counts and the best
    /// and worst sample ids below.
    pub fn markdown(&self) -> String {
        let m = &self.metrics;
        let c = &self.counts;
        let mut s = String::new();
        let title = self.inputs.get("predictions").or(self.inputs.get("baseline")).cloned().unwrap_or_default();
        s.push_str(&format!("## Evaluation: {title}\n\n"));
        s.push_str("| metric | value |\n|---|---|\n");
        let rows: Vec<(&str, String)> = vec![
            ("gIoU (PixelLM: mean over pairs) %", pct(m.giou)),
            ("cIoU %", pct(Some(m.ciou))),
            ("gIoU, mean over samples %", pct(m.giou_per_sample)),
            ("CHAIR C_S % (lower is better)", pct(Some(m.chair_s))),
            ("CHAIR C_I % (lower is better)", pct(Some(m.chair_i))),
            ("Boundary IoU, matched pairs %", pct(m.boundary_iou)),
            ("localization error rate p, of all targets (paper) % (lower is better)", pct(m.localization_error_rate)),
            ("localization error rate, of matched pairs % (lower is better)", pct(m.localization_error_rate_matched)),
            ("judge accuracy (1-10)", m.judge_accuracy.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into())),
            ("judge detailedness (1-10)", m.judge_detail.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into())),
        ];
        for (k, v) in rows {
            s.push_str(&format!("| {k} | {v} |\n"));
        }
        s.push_str(&format!(
            "\n{} samples ({} with pairs); {} predicted and {} target objects; {} pairs, {} matched, {} unmatched predictions, {} unmatched targets; {} object mentions, {} hallucinated ({} responses with a hallucination); {} localization errors; lexicon {}",
            c.samples,
            c.samples_with_pairs,
            c.predicted_objects,
            c.target_objects,
            c.pairs,
            c.matched_pairs,
            c.unmatched_predictions,
            c.unmatched_targets,
            c.chair.mentions,
            c.chair.hallucinated_mentions,
            c.chair.responses_with_hallucination,
            c.localization_errors,
            self.lexicon
        ));
        if c.judged + c.judge_failed > 0 {
            s.push_str(&format!("; judged {}, judge failed {}", c.judged, c.judge_failed));
        }
        s.push_str(".\n");
        let list = |r: &[Ranked]| {
            r.iter().map(|r| format!("`{}` ({:.1})", r.id, 100.0 * r.giou)).collect::<Vec<_>>().join(", ")
        };
        if !self.best.is_empty() {
            s.push_str(&format!("\nBest by per-sample gIoU: {}\n\nWorst: {}\n", list(&self.best), list(&self.worst)));
        }
        s
    }

    /// Writes `report.json` and `report.md` into `dir` (atomically); returns their paths.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let json_path = dir.join("report.json");
        let md_path = dir.join("report.md");
        let mut json = serde_json::to_string_pretty(self)
            .map_err(|e| EvalError::file(&json_path, format!("report does not serialize: {e}")))?;
        json.push('\n');
        popen_core::shard::atomic_write(&json_path, json.as_bytes())?;
        popen_core::shard::atomic_write(&md_path, self.markdown().as_bytes())?;
        Ok(vec![json_path, md_path])
    }

    /// Reads a `report.json`.
    pub fn read(path: &Path) -> Result<Report> {
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::file(path, e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| EvalError::file(path, format!("not a popen eval report: {e}")))
    }
}
