//! Reading what the stages wrote into a run folder: the eval reports (`eval/<row>/report.json`,
//! their overlays and manifests), the training stages' `metrics.csv` and every manifest.
//! Only the fields the report shows are read, so reports of older versions still load.

use crate::{ReportError, Result};
use popen_core::manifest::{Manifest, MANIFEST_FILE};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The training stages' folders in pipeline order (others with a metrics.csv follow by name).
pub const STAGE_ORDER: [&str; 4] = ["sft-llm", "sft", "dpo", "ensemble"];

/// One eval row of one run.
#[derive(Clone, Debug)]
pub struct EvalRow {
    /// The report file (named in errors and the page).
    pub path: PathBuf,
    /// Metric name -> value (fractions); localization rates under today's names.
    pub metrics: BTreeMap<String, Option<f64>>,
    /// The report's named inputs (samples, predictions, lexicon, baseline).
    pub inputs: BTreeMap<String, String>,
    /// Per sample: id and the IoUs of its pairs (PixelLM's gIoU averages these).
    pub samples: Vec<(String, Vec<f64>)>,
    /// Per-sample gIoU of the best / worst samples the report names, by id.
    pub ranked: BTreeMap<String, f64>,
    /// (`best` | `worst`, rank, sample id, file) of the overlays, best first then worst, by rank.
    pub overlays: Vec<(String, usize, String, PathBuf)>,
}

/// A training stage's `metrics.csv`: the header and the rows (an empty cell is None).
#[derive(Clone, Debug, Default)]
pub struct Csv {
    pub header: Vec<String>,
    pub rows: Vec<Vec<Option<f64>>>,
}

impl Csv {
    /// (step, value) points of a column; rows without either are left out.
    pub fn series(&self, column: &str) -> Option<Vec<(f64, f64)>> {
        let c = self.header.iter().position(|h| h == column)?;
        let s = self.header.iter().position(|h| h == "step")?;
        let pts: Vec<(f64, f64)> = self
            .rows
            .iter()
            .filter_map(|r| match (r.get(s).copied().flatten(), r.get(c).copied().flatten()) {
                (Some(x), Some(y)) if x.is_finite() && y.is_finite() => Some((x, y)),
                _ => None,
            })
            .collect();
        (!pts.is_empty()).then_some(pts)
    }
}

/// A manifest with the file it came from (relative to the run folder where possible).
#[derive(Clone, Debug)]
pub struct Provenance {
    pub file: String,
    pub manifest: Manifest,
}

/// One run folder (one seed of the demo).
#[derive(Clone, Debug)]
pub struct Run {
    pub dir: PathBuf,
    pub eval_dir: Option<PathBuf>,
    /// The seed of its training stages' manifests (config `seed`), if any.
    pub seed: Option<u64>,
    /// Eval rows present (sub-folder names with a report.json), loaded or not.
    pub rows_present: Vec<String>,
    pub evals: BTreeMap<String, EvalRow>,
    /// Training stage folder -> its metrics.
    pub stages: BTreeMap<String, Csv>,
    pub provenance: Vec<Provenance>,
}

impl Run {
    /// "seed 1 (out/popen-seed-1)" or the folder alone.
    pub fn label(&self) -> String {
        match self.seed {
            Some(s) => format!("seed {s} ({})", self.dir.display()),
            None => self.dir.display().to_string(),
        }
    }
    pub fn short_label(&self) -> String {
        match self.seed {
            Some(s) => format!("seed {s}"),
            None => self.dir.display().to_string(),
        }
    }
}

fn file_err(path: &Path, msg: impl std::fmt::Display) -> ReportError {
    ReportError::File { path: path.to_path_buf(), msg: msg.to_string() }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn name_of(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Where the eval rows of a run folder are: `DIR/eval`, or DIR itself when it holds
/// `*/report.json`; and the folder of its training stages.
fn layout(dir: &Path) -> (Option<PathBuf>, Option<PathBuf>) {
    if dir.join("eval").is_dir() {
        return (Some(dir.join("eval")), Some(dir.to_path_buf()));
    }
    if subdirs(dir).iter().any(|d| d.join("report.json").is_file()) {
        let stages = (name_of(dir) == "eval").then(|| dir.parent().map(Path::to_path_buf)).flatten();
        return (Some(dir.to_path_buf()), stages);
    }
    (None, Some(dir.to_path_buf()))
}

/// Opens a run folder: lists its eval rows, reads its stages' metrics and manifests. The eval
/// reports are read by [`load_row`].
pub fn open_run(dir: &Path) -> Result<Run> {
    if !dir.is_dir() {
        return Err(file_err(dir, "is not a folder (expected a run folder such as out/demo)"));
    }
    let (eval_dir, stage_dir) = layout(dir);
    let rows_present = eval_dir
        .as_ref()
        .map(|e| subdirs(e).into_iter().filter(|d| d.join("report.json").is_file()).map(|d| name_of(&d)).collect())
        .unwrap_or_default();
    let mut run = Run {
        dir: dir.to_path_buf(),
        eval_dir,
        seed: None,
        rows_present,
        evals: BTreeMap::new(),
        stages: BTreeMap::new(),
        provenance: Vec::new(),
    };
    if let Some(sd) = &stage_dir {
        for d in subdirs(sd) {
            let csv = d.join("metrics.csv");
            if csv.is_file() {
                run.stages.insert(name_of(&d), read_csv(&csv)?);
            }
            let m = d.join(MANIFEST_FILE);
            if m.is_file() {
                run.provenance.push(read_provenance(&m, dir)?);
            }
            let mut side: Vec<PathBuf> = std::fs::read_dir(&d)
                .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                .unwrap_or_default();
            side.retain(|p| p.is_file() && name_of(p).ends_with(".manifest.json"));
            side.sort();
            for p in side {
                run.provenance.push(read_provenance(&p, dir)?);
            }
        }
    }
    if let Some(ed) = &run.eval_dir {
        for r in &run.rows_present {
            let m = ed.join(r).join(MANIFEST_FILE);
            if m.is_file() {
                run.provenance.push(read_provenance(&m, dir)?);
            }
        }
    }
    run.provenance.sort_by_key(|p| (stage_rank(&p.manifest.stage), p.file.clone()));
    // The seed: the first training stage's manifest that names one.
    run.seed = STAGE_ORDER.iter().find_map(|s| {
        run.provenance.iter().find(|p| p.file.starts_with(&format!("{s}/"))).and_then(|p| seed_of(&p.manifest))
    });
    Ok(run)
}

/// The seed a manifest records (its `seed`, else its config's `seed`).
pub fn seed_of(m: &Manifest) -> Option<u64> {
    m.seed.or_else(|| m.config.get("seed").and_then(|v| v.as_u64()))
}

fn stage_rank(stage: &str) -> usize {
    const ORDER: [&str; 11] = [
        "synth",
        "import-muse",
        "tokenizer-tiny",
        "model-init",
        "sft",
        "collect-pt",
        "collect-ps",
        "dpo",
        "ensemble-train",
        "predict",
        "eval",
    ];
    ORDER.iter().position(|s| *s == stage).unwrap_or(ORDER.len())
}

/// Reads one manifest; a file that is not one is an error naming it.
pub fn read_provenance(path: &Path, base: &Path) -> Result<Provenance> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| file_err(path, format!("not a popen manifest: {e}")))?;
    let file = path.strip_prefix(base).unwrap_or(path).display().to_string();
    Ok(Provenance { file, manifest })
}

/// Reads a stage's metrics.csv (numbers; an empty or non-numeric cell is None).
pub fn read_csv(path: &Path) -> Result<Csv> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let Some(head) = lines.next() else {
        return Ok(Csv::default());
    };
    let header: Vec<String> = head.split(',').map(|h| h.trim().to_string()).collect();
    if !header.iter().any(|h| h == "step") {
        return Err(file_err(path, "has no 'step' column (expected a stage's metrics.csv)"));
    }
    let rows = lines.map(|l| l.split(',').map(|c| c.trim().parse::<f64>().ok()).collect()).collect();
    Ok(Csv { header, rows })
}

#[derive(Deserialize)]
struct RawPair {
    #[serde(default)]
    iou: f64,
}

#[derive(Deserialize)]
struct RawSample {
    id: String,
    #[serde(default)]
    pairs: Vec<RawPair>,
}

#[derive(Deserialize)]
struct RawRanked {
    id: String,
    giou: f64,
}

#[derive(Deserialize)]
struct RawReport {
    metrics: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    counts: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    inputs: BTreeMap<String, String>,
    #[serde(default)]
    samples: Vec<RawSample>,
    #[serde(default)]
    best: Vec<RawRanked>,
    #[serde(default)]
    worst: Vec<RawRanked>,
}

/// The metrics of a report with the localization rates under today's names: a report from
/// before issue 24 (no `localization_error_rate_matched`) held the matched-pair share under
/// `localization_error_rate`; the paper's rate is then recomputed from its counts
/// (`localization_errors / target_objects`), as tools/baseline_table.py does.
fn normalized_metrics(raw: &RawReport) -> BTreeMap<String, Option<f64>> {
    let mut m: BTreeMap<String, Option<f64>> = raw.metrics.iter().map(|(k, v)| (k.clone(), v.as_f64())).collect();
    if !raw.metrics.contains_key("localization_error_rate_matched") {
        let old = m.get("localization_error_rate").copied().flatten();
        m.insert("localization_error_rate_matched".into(), old);
        let t = raw.counts.get("target_objects").and_then(|v| v.as_f64()).unwrap_or(0.0);
        let e = raw.counts.get("localization_errors").and_then(|v| v.as_f64());
        m.insert("localization_error_rate".into(), e.filter(|_| t > 0.0).map(|e| e / t));
    }
    m
}

/// Reads `eval/<row>/report.json` and lists its overlays. A malformed report is one error
/// naming the file.
pub fn load_row(eval_dir: &Path, row: &str) -> Result<EvalRow> {
    let dir = eval_dir.join(row);
    let path = dir.join("report.json");
    let text = std::fs::read_to_string(&path).map_err(|e| file_err(&path, e))?;
    let raw: RawReport =
        serde_json::from_str(&text).map_err(|e| file_err(&path, format!("not a popen eval report: {e}")))?;
    let metrics = normalized_metrics(&raw);
    let mut overlays = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir.join("overlays")) {
        for p in rd.filter_map(|e| e.ok()).map(|e| e.path()) {
            let name = name_of(&p);
            let Some(stem) = name.strip_suffix(".png") else { continue };
            let mut parts = stem.splitn(3, '_');
            let (Some(kind), Some(rank), Some(id)) = (parts.next(), parts.next(), parts.next()) else { continue };
            let (Ok(rank), true) = (rank.parse::<usize>(), kind == "best" || kind == "worst") else { continue };
            overlays.push((kind.to_string(), rank, id.to_string(), p));
        }
    }
    overlays.sort_by_key(|a| (a.0 != "best", a.1));
    let ranked = raw.best.iter().chain(&raw.worst).map(|r| (r.id.clone(), r.giou)).collect();
    let samples = raw.samples.into_iter().map(|s| (s.id, s.pairs.into_iter().map(|p| p.iou).collect())).collect();
    Ok(EvalRow { path, metrics, inputs: raw.inputs, samples, ranked, overlays })
}
