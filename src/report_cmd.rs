//! `popen report`: thin front end of the popen-report crate (one self-contained HTML page of
//! one or more run folders).

use anyhow::{Context, Result};
use popen_report::{Options, Row};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ReportArgs {
    /// Run folders, one per seed: a demo output folder (out/demo: stage folders sft/, dpo/,
    /// ensemble/ and eval/<row>/report.json) or an eval folder. Several: mean ± std.
    #[arg(long, num_args = 1.., required = true)]
    runs: Vec<PathBuf>,
    /// Table rows as NAME=SUB (SUB: the eval sub-folder, e.g. "SFT baseline=model"); default:
    /// the demo's rows present in some run, then the other eval folders by name.
    #[arg(long, num_args = 1..)]
    rows: Vec<String>,
    /// Paired differences B - A per seed as A:B (eval sub-folders); default: model:dpo,
    /// dpo:popen, model:popen where present.
    #[arg(long, num_args = 1..)]
    paired: Vec<String>,
    /// Samples shard for the per-template breakdown; default: the one the reports name.
    #[arg(long)]
    samples: Option<PathBuf>,
    /// Best and worst overlays shown per model (each).
    #[arg(long, default_value_t = 1)]
    overlays: usize,
    /// Page title.
    #[arg(long, default_value = "POPEN report")]
    title: String,
    /// The HTML file to write; default: <first run>/report.html.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn report(a: ReportArgs) -> Result<()> {
    let rows = a.rows.iter().map(|r| Row::parse(r)).collect::<popen_report::Result<Vec<_>>>()?;
    let paired = a
        .paired
        .iter()
        .map(|p| match p.split_once(':') {
            Some((x, y)) if !x.is_empty() && !y.is_empty() => Ok((x.to_string(), y.to_string())),
            _ => anyhow::bail!("--paired takes A:B entries (eval sub-folders of two rows), got '{p}'"),
        })
        .collect::<Result<Vec<_>>>()?;
    let out = a.out.clone().unwrap_or_else(|| a.runs[0].join("report.html"));
    let opts = Options { runs: a.runs, rows, paired, samples: a.samples, overlays: a.overlays, title: a.title };
    popen_report::write(&opts, &out).with_context(|| format!("popen report into {}", out.display()))?;
    println!("report: {}", out.display());
    Ok(())
}
