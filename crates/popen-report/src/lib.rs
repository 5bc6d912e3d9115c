//! `popen report`: one self-contained HTML page (no network: charts are inline SVG, overlays
//! `data:` URIs) of one or more run folders (seeds of the demo): the Table-3-shaped results
//! (mean ± sample std over the runs), paired differences per seed, the training curves of
//! every stage, the best/worst overlays per model, the per-template gIoU and the manifests'
//! provenance. Missing pieces are shown as "—" with a note; a malformed report.json or
//! manifest is one error naming the file.
//!
//! The table follows `tools/baseline_table.py` (same columns, row names and the localization
//! rates' back-compat rule).

pub mod load;
pub mod plot;

use base64::Engine;
use load::{load_row, open_run, seed_of, Provenance, Run, STAGE_ORDER};
use popen_core::shard::{read_shard, Sample};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    #[error("plot {0}")]
    Plot(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, ReportError>;

/// The metric columns of the results table: report key, header, scale (percent).
pub const COLUMNS: [(&str, &str); 7] = [
    ("giou", "gIoU"),
    ("ciou", "cIoU"),
    ("chair_s", "C_S"),
    ("chair_i", "C_I"),
    ("boundary_iou", "Boundary IoU"),
    ("localization_error_rate", "loc. error p"),
    ("localization_error_rate_matched", "loc. error (matched)"),
];

/// The paired-difference columns: key, header, the sign that counts as better.
const PAIRED: [(&str, &str, f64); 3] = [("giou", "gIoU", 1.0), ("ciou", "cIoU", 1.0), ("chair_s", "C_S", -1.0)];

/// The demo's rows (the Makefile's POPEN_ROWS and ablations), in table order: eval
/// sub-folder, name.
const KNOWN_ROWS: [(&str, &str); 10] = [
    ("model", "SFT baseline"),
    ("dpo", "POPEN w/o ensemble (dpo)"),
    ("popen", "POPEN (dpo + ensemble)"),
    ("popen-no-seg-feedback", "... w/o seg-embedding ensemble"),
    ("popen-paper", "... paper's stage 3 (only p_hat, no warm-up)"),
    ("popen-frozen-feedback", "... feedback projection frozen after the warm-up"),
    ("popen-no-gamma", "... w/o gamma"),
    ("popen-fallback", "... with fallback (not in the paper)"),
    ("baseline-largest", "largest instance"),
    ("baseline-nothing", "nothing"),
];

/// One row of the results table: its name and the eval sub-folder it reads in every run.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub name: String,
    pub sub: String,
}

impl Row {
    /// `NAME=SUB` (split at the last `=`, as tools/baseline_table.py does).
    pub fn parse(spec: &str) -> Result<Row> {
        match spec.rsplit_once('=') {
            Some((n, s)) if !n.trim().is_empty() && !s.trim().is_empty() => {
                Ok(Row { name: n.trim().to_string(), sub: s.trim().to_string() })
            }
            _ => Err(ReportError::Invalid(format!("--rows takes NAME=SUBDIR entries, got '{spec}'"))),
        }
    }
}

/// What [`render`] reads.
#[derive(Clone, Debug)]
pub struct Options {
    /// Run folders (one per seed): a demo output folder such as out/demo (stage folders and
    /// eval/), or an eval folder itself.
    pub runs: Vec<PathBuf>,
    /// Table rows; empty: the known demo rows present in some run, then the others by name.
    pub rows: Vec<Row>,
    /// Paired differences (A, B) as eval sub-folders; empty: model->dpo, dpo->popen,
    /// model->popen where both rows exist.
    pub paired: Vec<(String, String)>,
    /// The samples shard for the per-template breakdown; None: the one the first report names.
    pub samples: Option<PathBuf>,
    /// Best and worst overlays shown per model (each).
    pub overlays: usize,
    pub title: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            runs: Vec::new(),
            rows: Vec::new(),
            paired: Vec::new(),
            samples: None,
            overlays: 1,
            title: "POPEN report".into(),
        }
    }
}

/// Mean and sample standard deviation (n - 1; None for one value).
pub fn mean_std(v: &[f64]) -> (f64, Option<f64>) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.len() > 1).then(|| (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
    (mean, std)
}

/// "27.33 ± 1.11", or "27.33" for one value.
fn fmt_mean_std(v: &[f64]) -> String {
    match mean_std(v) {
        (m, Some(s)) => format!("{m:.2} ± {s:.2}"),
        (m, None) => format!("{m:.2}"),
    }
}

/// HTML text escaping.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const MISSING: &str = "—";

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;max-width:1240px;\
color:#222;padding:0 16px;line-height:1.4}h1{font-size:1.6em;margin-bottom:4px}h2{border-bottom:2px solid #ddd;\
padding-bottom:4px;margin-top:36px}h3{margin:18px 0 6px}table{border-collapse:collapse;margin:8px 0;font-size:.92em}\
th,td{border:1px solid #d6d6d6;padding:4px 8px;text-align:right;vertical-align:top}th{background:#f3f3f3}\
td{white-space:nowrap}.prov td,.prov th{text-align:left}td:first-child,th:first-child{text-align:left;white-space:normal}.note{color:#666;font-size:.88em}.missing{color:#999}\
.stages{display:flex;flex-wrap:wrap;column-gap:22px}.stage h3{margin-top:14px}.panels{display:flex;flex-wrap:wrap;gap:6px}.panels svg{border:1px solid #eee}\
.ov{display:grid;gap:10px}.ov figure{margin:0}.ov img{width:100%;image-rendering:pixelated;\
border:1px solid #ccc}figcaption{font-size:.85em;color:#444}code,pre{font-size:.85em}pre{background:#f7f7f7;padding:8px;\
overflow-x:auto}details{margin:4px 0}nav a{margin-right:14px}small{color:#666}td.best{font-weight:600}";

/// Renders the page.
pub fn render(opts: &Options) -> Result<String> {
    if opts.runs.is_empty() {
        return Err(ReportError::Invalid("no run folder given (--runs DIR ...)".into()));
    }
    let mut runs = opts.runs.iter().map(|d| open_run(d)).collect::<Result<Vec<Run>>>()?;
    let rows = if opts.rows.is_empty() { default_rows(&runs) } else { opts.rows.clone() };
    for run in &mut runs {
        let Some(ed) = run.eval_dir.clone() else { continue };
        for row in &rows {
            if run.rows_present.contains(&row.sub) && !run.evals.contains_key(&row.sub) {
                let r = load_row(&ed, &row.sub)?;
                run.evals.insert(row.sub.clone(), r);
            }
        }
    }
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>\n",
        esc(&opts.title)
    );
    let _ = writeln!(h, "<h1>{}</h1>", esc(&opts.title));
    let _ = writeln!(
        h,
        "<p class=\"note\">Written by <code>popen report</code> {} from {} run folder(s); one file, no network.</p>",
        env!("CARGO_PKG_VERSION"),
        runs.len()
    );
    h.push_str("<ul>");
    for r in &runs {
        let _ = write!(h, "<li>{}</li>", esc(&r.label()));
    }
    h.push_str("</ul>\n<nav><a href=\"#results\">Results</a><a href=\"#curves\">Training curves</a>\
<a href=\"#templates\">Per template</a><a href=\"#overlays\">Overlays</a><a href=\"#provenance\">Provenance</a></nav>\n");
    results_section(&mut h, &runs, &rows);
    paired_section(&mut h, &runs, &rows, &opts.paired);
    curves_section(&mut h, &runs)?;
    let samples_file = samples_path(opts, &runs, &rows);
    let samples = samples_file.as_deref().map(load_samples);
    templates_section(&mut h, &runs, &rows, samples_file.as_deref(), samples.as_ref());
    let known = samples.as_ref().and_then(|s| s.as_ref().ok());
    overlays_section(&mut h, &runs, &rows, opts.overlays, known);
    // The samples shard's folder manifest (the data's provenance), when there is one.
    let data_manifest = samples_file
        .as_deref()
        .and_then(Path::parent)
        .map(|p| p.join(popen_core::manifest::MANIFEST_FILE))
        .filter(|p| p.is_file())
        .and_then(|p| load::read_provenance(&p, Path::new("")).ok());
    provenance_section(&mut h, &runs, data_manifest);
    h.push_str("</body></html>\n");
    Ok(h)
}

/// [`render`] and write the page (atomically).
pub fn write(opts: &Options, out: &Path) -> Result<()> {
    let html = render(opts)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| ReportError::File { path: parent.to_path_buf(), msg: e.to_string() })?;
    }
    popen_core::shard::atomic_write(out, html.as_bytes())
        .map_err(|e| ReportError::File { path: out.to_path_buf(), msg: e.to_string() })
}

/// The known demo rows present in some run, in table order, then the other rows by name.
fn default_rows(runs: &[Run]) -> Vec<Row> {
    let present: BTreeSet<&String> = runs.iter().flat_map(|r| &r.rows_present).collect();
    let mut rows: Vec<Row> = KNOWN_ROWS
        .iter()
        .filter(|(s, _)| present.iter().any(|p| p.as_str() == *s))
        .map(|(s, n)| Row { name: n.to_string(), sub: s.to_string() })
        .collect();
    for p in present {
        if !KNOWN_ROWS.iter().any(|(s, _)| s == p) {
            rows.push(Row { name: p.clone(), sub: p.clone() });
        }
    }
    rows
}

/// Per run, the row's metric (percent); None when the run lacks the row or the value.
fn values(runs: &[Run], sub: &str, key: &str) -> Vec<Option<f64>> {
    runs.iter()
        .filter_map(|r| r.evals.get(sub))
        .map(|e| e.metrics.get(key).copied().flatten().map(|v| v * 100.0))
        .collect()
}

fn results_section(h: &mut String, runs: &[Run], rows: &[Row]) {
    h.push_str("<h2 id=\"results\">Results (the paper's Table 3 shape)</h2>\n");
    let _ = writeln!(
        h,
        "<p class=\"note\">Percent on the evaluated split. {}C_S/C_I: CHAIR (lower is better); loc. error p: share of all \
target objects whose matched prediction is a localization error (SPEC 10.20); (matched): share of matched pairs.</p>",
        if runs.len() > 1 { "Mean ± sample standard deviation over the runs (seeds). " } else { "" }
    );
    h.push_str("<table><tr><th>model</th>");
    for (_, head) in COLUMNS {
        let _ = write!(h, "<th>{head}</th>");
    }
    h.push_str("<th>runs</th></tr>\n");
    let mut notes = Vec::new();
    for row in rows {
        let have: Vec<&Run> = runs.iter().filter(|r| r.evals.contains_key(&row.sub)).collect();
        let _ = write!(h, "<tr><td>{} <small>({})</small></td>", esc(&row.name), esc(&row.sub));
        if have.is_empty() {
            for _ in COLUMNS {
                let _ = write!(h, "<td class=\"missing\">{MISSING}</td>");
            }
            let _ = writeln!(h, "<td class=\"missing\">0 of {}</td></tr>", runs.len());
            notes.push(format!("{}: no {}/report.json in any run.", row.name, row.sub));
            continue;
        }
        for (key, _) in COLUMNS {
            let vals = values(runs, &row.sub, key);
            if vals.iter().any(Option::is_none) {
                let _ = write!(h, "<td class=\"missing\">{MISSING}</td>");
            } else {
                let v: Vec<f64> = vals.into_iter().flatten().collect();
                let _ = write!(h, "<td>{}</td>", fmt_mean_std(&v));
            }
        }
        let _ = writeln!(h, "<td>{} of {}</td></tr>", have.len(), runs.len());
        if have.len() < runs.len() {
            let missing: Vec<String> =
                runs.iter().filter(|r| !r.evals.contains_key(&row.sub)).map(|r| r.short_label()).collect();
            notes.push(format!(
                "{}: averaged over {} run(s); missing in {}.",
                row.name,
                have.len(),
                missing.join(", ")
            ));
        }
    }
    h.push_str("</table>\n");
    for n in notes {
        let _ = writeln!(h, "<p class=\"note\">{MISSING} {}</p>", esc(&n));
    }
}

fn paired_section(h: &mut String, runs: &[Run], rows: &[Row], paired: &[(String, String)]) {
    let has = |s: &str| runs.iter().any(|r| r.evals.contains_key(s));
    let pairs: Vec<(String, String)> = if paired.is_empty() {
        [("model", "dpo"), ("dpo", "popen"), ("model", "popen")]
            .iter()
            .filter(|(a, b)| has(a) && has(b) && rows.iter().any(|r| r.sub == *a) && rows.iter().any(|r| r.sub == *b))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    } else {
        paired.to_vec()
    };
    if pairs.is_empty() {
        return;
    }
    let name = |s: &str| rows.iter().find(|r| r.sub == s).map(|r| r.name.clone()).unwrap_or_else(|| s.to_string());
    h.push_str("<h3>Paired by run (B − A per seed, in run order; mean)</h3>\n<table><tr><th>A → B</th>");
    for (_, head, _) in PAIRED {
        let _ = write!(h, "<th>{head}</th>");
    }
    h.push_str("<th>B ≥ A on every seed</th><th>spread of A's gIoU</th></tr>\n");
    for (a, b) in &pairs {
        let per: Vec<(&load::EvalRow, &load::EvalRow)> =
            runs.iter().filter_map(|r| Some((r.evals.get(a)?, r.evals.get(b)?))).collect();
        let _ = write!(h, "<tr><td>{} → {}</td>", esc(&name(a)), esc(&name(b)));
        let get = |e: &load::EvalRow, k: &str| e.metrics.get(k).copied().flatten();
        if per.is_empty() {
            for _ in 0..PAIRED.len() + 2 {
                let _ = write!(h, "<td class=\"missing\">{MISSING}</td>");
            }
            h.push_str("</tr>\n");
            continue;
        }
        let mut ok = true;
        for (k, _, sign) in PAIRED {
            let ds: Option<Vec<f64>> = per.iter().map(|(ea, eb)| Some((get(eb, k)? - get(ea, k)?) * 100.0)).collect();
            match ds {
                Some(ds) => {
                    ok &= ds.iter().all(|d| sign * d >= 0.0);
                    let list: Vec<String> = ds.iter().map(|d| format!("{d:+.2}")).collect();
                    let _ = write!(h, "<td>{} ({:+.2})</td>", list.join(" / "), mean_std(&ds).0);
                }
                None => {
                    ok = false;
                    let _ = write!(h, "<td class=\"missing\">{MISSING}</td>");
                }
            }
        }
        let ga: Vec<f64> = per.iter().filter_map(|(ea, _)| get(ea, "giou").map(|v| v * 100.0)).collect();
        let spread = match mean_std(&ga).1 {
            Some(s) if ga.len() > 1 => format!("{s:.2}"),
            _ => MISSING.to_string(),
        };
        let _ = writeln!(h, "<td>{}</td><td>{spread}</td></tr>", if ok { "yes" } else { "no" });
    }
    h.push_str("</table>\n");
}

fn stage_title(stage: &str) -> String {
    match stage {
        "sft-llm" => "SFT, phase 1 (LLM) — sft-llm".into(),
        "sft" => "SFT — sft".into(),
        "dpo" => "DPO (text + segmentation preferences) — dpo".into(),
        "ensemble" => "Ensemble training (POPEN stage 3) — ensemble".into(),
        "ensemble-paper" => "Ensemble, the paper's stage 3 (ablation) — ensemble-paper".into(),
        "ensemble-frozen-feedback" => {
            "Ensemble, feedback projection frozen (ablation) — ensemble-frozen-feedback".into()
        }
        s => s.to_string(),
    }
}

fn curves_section(h: &mut String, runs: &[Run]) -> Result<()> {
    h.push_str("<h2 id=\"curves\">Training curves</h2>\n");
    if runs.len() > 1 {
        let labels: Vec<String> = runs.iter().map(|r| r.short_label()).collect();
        let _ = writeln!(
            h,
            "<p class=\"note\">Runs overlaid: {} solid, then lighter and thinner in order ({}).</p>",
            esc(&labels[0]),
            esc(&labels[1..].join(", "))
        );
    }
    let mut stages: Vec<String> = STAGE_ORDER.iter().map(|s| s.to_string()).collect();
    let others: BTreeSet<&String> = runs.iter().flat_map(|r| r.stages.keys()).collect();
    stages.extend(others.into_iter().filter(|s| !STAGE_ORDER.contains(&s.as_str())).cloned());
    h.push_str("<div class=\"stages\">\n");
    for stage in stages {
        let csvs: Vec<Option<&load::Csv>> = runs.iter().map(|r| r.stages.get(&stage)).collect();
        let n = csvs.iter().filter(|c| c.is_some()).count();
        if n == 0 && stage == "sft-llm" {
            continue; // only a two-phase SFT has it
        }
        let _ = writeln!(h, "<div class=\"stage\"><h3>{}</h3>", esc(&stage_title(&stage)));
        if n == 0 {
            let _ =
                writeln!(h, "<p class=\"missing\">{MISSING} not run (no {stage}/metrics.csv in any run).</p></div>");
            continue;
        }
        let header: Vec<String> = csvs.iter().flatten().flat_map(|c| c.header.clone()).collect();
        h.push_str("<div class=\"panels\">");
        let mut drawn = 0;
        for (title, cols) in plot::panels(&header) {
            if let Some(svg) = plot::panel_svg(title, &cols, &csvs)? {
                h.push_str(&svg);
                drawn += 1;
            }
        }
        h.push_str("</div>\n");
        if drawn == 0 {
            let _ = writeln!(h, "<p class=\"missing\">{MISSING} no logged steps.</p>");
        }
        if n < runs.len() {
            let missing: Vec<String> =
                runs.iter().filter(|r| !r.stages.contains_key(&stage)).map(|r| r.short_label()).collect();
            let _ = writeln!(h, "<p class=\"note\">{MISSING} not in {}.</p>", esc(&missing.join(", ")));
        }
        h.push_str("</div>\n");
    }
    h.push_str("</div>\n");
    Ok(())
}

fn overlays_section(h: &mut String, runs: &[Run], rows: &[Row], per_side: usize, samples: Option<&SampleInfo>) {
    h.push_str("<h2 id=\"overlays\">Best and worst samples per model</h2>\n");
    h.push_str(
        "<p class=\"note\">By per-sample gIoU, from the first run that has the model. Each overlay keeps the image \
untouched on the left and draws the masks on the right as outlines in contrasting colours (ground truth above, \
prediction below), so a mask on an object of its own colour stays visible. Open the page wider or zoom in to read \
the answers printed under each panel.</p>\n",
    );
    let engine = base64::engine::general_purpose::STANDARD;
    for row in rows {
        let Some((run, e)) = runs.iter().find_map(|r| r.evals.get(&row.sub).map(|e| (r, e))) else {
            let _ = writeln!(h, "<h3>{}</h3><p class=\"missing\">{MISSING} not evaluated.</p>", esc(&row.name));
            continue;
        };
        let _ = writeln!(h, "<h3>{} <small>{}</small></h3>", esc(&row.name), esc(&run.short_label()));
        let mut figs = Vec::new();
        for kind in ["best", "worst"] {
            for (_, rank, id, path) in e.overlays.iter().filter(|o| o.0 == kind).take(per_side) {
                let score = e.ranked.get(id).map(|g| format!(" · gIoU {:.1}", g * 100.0)).unwrap_or_default();
                let question =
                    samples.and_then(|s| s.get(id)).map(|(_, q)| format!("<br>“{}”", esc(q))).unwrap_or_default();
                figs.push(match std::fs::read(path) {
                    Ok(bytes) => format!(
                        "<figure><img alt=\"{kind} {rank}: {}\" src=\"data:image/png;base64,{}\">\
<figcaption><b>{kind} {rank}</b>{score} · {}{question}</figcaption></figure>",
                        esc(id),
                        engine.encode(bytes),
                        esc(id)
                    ),
                    Err(err) => format!(
                        "<p class=\"missing\">{MISSING} {}: {}</p>",
                        esc(&path.display().to_string()),
                        esc(&err.to_string())
                    ),
                });
            }
        }
        if figs.is_empty() {
            let _ = writeln!(h, "<p class=\"missing\">{MISSING} no overlays (eval --overlays 0?).</p>");
        } else {
            let _ = writeln!(
                h,
                "<div class=\"ov\" style=\"grid-template-columns:repeat({},1fr)\">{}</div>",
                figs.len().min(4),
                figs.concat()
            );
        }
    }
}

/// The samples shard of the per-template breakdown: --samples, else the first report's input.
fn samples_path(opts: &Options, runs: &[Run], rows: &[Row]) -> Option<PathBuf> {
    if let Some(p) = &opts.samples {
        return Some(p.clone());
    }
    rows.iter()
        .find_map(|row| runs.iter().find_map(|r| r.evals.get(&row.sub)?.inputs.get("samples").map(PathBuf::from)))
}

/// Sample id -> (question template, instruction).
type SampleInfo = BTreeMap<String, (String, String)>;

/// The template (`meta.template`) and instruction of every sample of the shard.
fn load_samples(path: &Path) -> std::result::Result<SampleInfo, String> {
    let shard = read_shard::<Sample>(path).map_err(|e| e.to_string())?;
    Ok(shard
        .into_iter()
        .map(|s| {
            let t = serde_json::from_str::<serde_json::Value>(&s.meta)
                .ok()
                .and_then(|m| m.get("template").and_then(|t| t.as_str()).map(str::to_string))
                .unwrap_or_else(|| "(no template)".into());
            (s.id, (t, s.instruction))
        })
        .collect())
}

/// Writes the per-template table.
fn templates_section(
    h: &mut String,
    runs: &[Run],
    rows: &[Row],
    path: Option<&Path>,
    samples: Option<&std::result::Result<SampleInfo, String>>,
) {
    h.push_str("<h2 id=\"templates\">gIoU per question template</h2>\n");
    let (Some(path), Some(samples)) = (path, samples) else {
        let _ =
            writeln!(h, "<p class=\"missing\">{MISSING} no samples shard (no report names one; pass --samples).</p>");
        return;
    };
    let samples = match samples {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(h, "<p class=\"missing\">{MISSING} cannot read the samples shard: {}</p>", esc(e));
            return;
        }
    };
    let template_of: BTreeMap<&str, &String> = samples.iter().map(|(id, (t, _))| (id.as_str(), t)).collect();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for t in template_of.values() {
        *counts.entry(t.as_str()).or_default() += 1;
    }
    let mut templates: Vec<(&str, usize)> = counts.into_iter().collect();
    templates.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let _ = writeln!(
        h,
        "<p class=\"note\">PixelLM's gIoU (mean pair IoU) within each template of <code>{}</code> (the sample's \
<code>meta.template</code>), percent; {}n: samples of the template.</p>",
        esc(&path.display().to_string()),
        if runs.len() > 1 { "mean over the runs, ± sample std; " } else { "" }
    );
    let present: Vec<&Row> = rows.iter().filter(|r| runs.iter().any(|run| run.evals.contains_key(&r.sub))).collect();
    h.push_str("<table><tr><th>template</th><th>n</th>");
    for r in &present {
        let _ = write!(h, "<th>{}</th>", esc(&r.name));
    }
    h.push_str("</tr>\n");
    // Per row, per run, per template: (IoU sum, pairs).
    let mut sums: Vec<Vec<BTreeMap<&str, (f64, usize)>>> = Vec::new();
    let mut unknown = 0usize;
    for r in &present {
        let mut per_run = Vec::new();
        for run in runs {
            let mut m: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
            if let Some(e) = run.evals.get(&r.sub) {
                for (id, ious) in &e.samples {
                    let t = match template_of.get(id.as_str()) {
                        Some(t) => t.as_str(),
                        None => {
                            unknown += 1;
                            "(not in the shard)"
                        }
                    };
                    let c = m.entry(t).or_default();
                    c.0 += ious.iter().sum::<f64>();
                    c.1 += ious.len();
                }
            }
            per_run.push(m);
        }
        sums.push(per_run);
    }
    if unknown > 0 {
        templates.push(("(not in the shard)", 0));
    }
    for (t, n) in &templates {
        let _ = write!(h, "<tr><td>{}</td><td>{n}</td>", esc(t));
        let cells: Vec<Option<(f64, Option<f64>)>> = sums
            .iter()
            .map(|per_run| {
                let v: Vec<f64> = per_run
                    .iter()
                    .filter_map(|m| m.get(t).filter(|c| c.1 > 0).map(|c| c.0 / c.1 as f64 * 100.0))
                    .collect();
                (!v.is_empty()).then(|| mean_std(&v))
            })
            .collect();
        // The best model of the template in bold.
        let top = cells.iter().flatten().map(|c| c.0).fold(f64::NEG_INFINITY, f64::max);
        for cell in cells {
            let Some((m, s)) = cell else {
                let _ = write!(h, "<td class=\"missing\">{MISSING}</td>");
                continue;
            };
            let alpha = (m / 100.0).clamp(0.0, 1.0) * 0.55;
            let std = s.map(|s| format!(" <small>± {s:.1}</small>")).unwrap_or_default();
            let class = if m == top && m > 0.0 { " class=\"best\"" } else { "" };
            let _ = write!(h, "<td{class} style=\"background:rgba(44,160,44,{alpha:.2})\">{m:.1}{std}</td>");
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");
    if unknown > 0 {
        let _ = writeln!(h, "<p class=\"note\">{unknown} scored sample(s) are not in the samples shard.</p>");
    }
}

fn short(hash: &str) -> String {
    hash.chars().take(12).collect()
}

fn provenance_table(h: &mut String, items: &[Provenance]) {
    h.push_str(
        "<table class=\"prov\"><tr><th>manifest</th><th>stage</th><th>seed</th><th>tool</th><th>config (sha256)</th>\
<th>inputs (sha256)</th></tr>\n",
    );
    for p in items {
        let m = &p.manifest;
        let seed = seed_of(m).map(|s| s.to_string()).unwrap_or_else(|| MISSING.into());
        let config = serde_json::to_string_pretty(&m.config).unwrap_or_default();
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td>{}</td><td>{seed}</td><td>{}</td><td><details><summary><code title=\"{}\">{}</code>\
</summary><pre>{}</pre></details></td><td>",
            esc(&p.file),
            esc(&m.stage),
            esc(&m.tool_version),
            esc(&m.config_hash),
            esc(&short(&m.config_hash)),
            esc(&config)
        );
        if m.inputs.is_empty() {
            h.push_str(MISSING);
        }
        for i in &m.inputs {
            let _ = write!(
                h,
                "<div><code>{}</code> <code title=\"{}\">{}</code> <small>{} B</small></div>",
                esc(&i.path),
                esc(&i.sha256),
                esc(&short(&i.sha256)),
                i.bytes
            );
        }
        h.push_str("</td></tr>\n");
    }
    h.push_str("</table>\n");
}

fn provenance_section(h: &mut String, runs: &[Run], data: Option<Provenance>) {
    h.push_str("<h2 id=\"provenance\">Provenance</h2>\n");
    h.push_str(
        "<p class=\"note\">Every manifest of the runs: the stage's seed, tool version, the sha256 of its config \
(click for the config) and of its inputs (hover for the full hash).</p>\n",
    );
    if let Some(d) = data {
        h.push_str("<h3>Data</h3>\n");
        provenance_table(h, &[d]);
    }
    for (i, run) in runs.iter().enumerate() {
        let _ = writeln!(
            h,
            "<details{}><summary><b>{}</b> — {} manifest(s)</summary>",
            if i == 0 { " open" } else { "" },
            esc(&run.label()),
            run.provenance.len()
        );
        if run.provenance.is_empty() {
            let _ = writeln!(h, "<p class=\"missing\">{MISSING} no manifest.json in this run folder.</p>");
        } else {
            provenance_table(h, &run.provenance);
        }
        h.push_str("</details>\n");
    }
}
