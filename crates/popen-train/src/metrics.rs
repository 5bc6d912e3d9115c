//! Per-step metrics as JSONL and CSV (appended and flushed every line, so a killed job
//! keeps what it logged; a resumed one truncates what came after its checkpoint), and the
//! loss-curve PNG. The row type is the stage's ([`MetricsRow`]): SFT's [`StepMetrics`],
//! DPO's `crate::dpo::DpoStepMetrics`.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{io_err, Result};

/// One line of a stage's metrics files. The CSV columns come from the row's serialization
/// ([`csv_columns`]): a new field is a new column in both files.
pub trait MetricsRow: Serialize + DeserializeOwned + Clone + Default {
    /// The 0-based optimizer step of the row.
    fn step(&self) -> usize;
    /// The step's total loss (the checkpoint's `last_loss`).
    fn loss(&self) -> f32;
    /// The CSV header (no newline): the serialized field names in declaration order.
    fn csv_header() -> String {
        csv_columns(&Self::default()).into_iter().map(|(name, _)| name).collect::<Vec<_>>().join(",")
    }
    /// One CSV line, newline included.
    fn csv_line(&self) -> String {
        csv_line_of_json(&serde_json::to_string(self).expect("metrics serialize"))
    }
    /// The curves of the loss plot: (name, colour, (step, value) points).
    fn series(rows: &[Self]) -> Vec<(&'static str, [u8; 3], Vec<(f64, f64)>)>;
}

/// An optional value as the log lines print it: 6 decimals, empty for `None`.
pub fn opt(v: Option<f32>) -> String {
    v.map(|x| format!("{x:.6}")).unwrap_or_default()
}

/// One curve of a loss plot: (step, value) of the rows where `f` has a value.
pub fn curve<R: MetricsRow>(rows: &[R], f: impl Fn(&R) -> Option<f32>) -> Vec<(f64, f64)> {
    rows.iter().filter_map(|r| f(r).map(|v| (r.step() as f64, v as f64))).collect()
}

/// A row's fields as (serialized name, JSON value), in declaration order (`#[serde(rename)]`
/// names included: `loss/text`, `seg/margins`, ...).
pub fn csv_columns<R: Serialize>(row: &R) -> Vec<(String, serde_json::Value)> {
    json_columns(&serde_json::to_string(row).expect("metrics serialize"))
}

/// The CSV line (newline included) of a row given as its JSON text (the `metrics.jsonl` line).
fn csv_line_of_json(text: &str) -> String {
    let cells: Vec<String> = json_columns(text).iter().map(|(name, v)| csv_cell(name, v)).collect();
    format!("{}\n", cells.join(","))
}

/// The fields of a JSON object text, in their order.
fn json_columns(text: &str) -> Vec<(String, serde_json::Value)> {
    struct Ordered(Vec<(String, serde_json::Value)>);
    impl<'de> Deserialize<'de> for Ordered {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            struct Fields;
            impl<'de> serde::de::Visitor<'de> for Fields {
                type Value = Ordered;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a metrics row (a struct)")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> std::result::Result<Ordered, A::Error> {
                    let mut v = Vec::new();
                    while let Some(e) = m.next_entry()? {
                        v.push(e);
                    }
                    Ok(Ordered(v))
                }
            }
            d.deserialize_map(Fields)
        }
    }
    serde_json::from_str::<Ordered>(text).expect("a metrics row serializes to a JSON object").0
}

/// One CSV cell: integers as they are, empty for `None`, other numbers with 6 decimals except
/// `epoch` (4), `lr` (exponent notation, 6) and `seconds` (3).
pub fn csv_cell(name: &str, v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::Number(n) if n.is_u64() || n.is_i64() => n.to_string(),
        serde_json::Value::Number(n) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            match name {
                "epoch" => format!("{x:.4}"),
                "lr" => format!("{x:.6e}"),
                "seconds" => format!("{x:.3}"),
                _ => format!("{x:.6}"),
            }
        }
        other => other.to_string(),
    }
}

impl MetricsRow for StepMetrics {
    fn step(&self) -> usize {
        self.step
    }
    fn loss(&self) -> f32 {
        self.loss
    }
    fn series(rows: &[Self]) -> Vec<(&'static str, [u8; 3], Vec<(f64, f64)>)> {
        vec![
            ("loss", [20, 20, 20], rows.iter().map(|r| (r.step as f64, r.loss as f64)).collect()),
            ("ce", [31, 119, 180], rows.iter().map(|r| (r.step as f64, r.ce as f64)).collect()),
            ("bce", [214, 39, 40], rows.iter().map(|r| (r.step as f64, r.bce as f64)).collect()),
            ("dice", [44, 160, 44], rows.iter().map(|r| (r.step as f64, r.dice as f64)).collect()),
        ]
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: f64,
    pub lr: f64,
    pub loss: f32,
    pub ce: f32,
    pub bce: f32,
    pub dice: f32,
    pub grad_norm: f32,
    pub samples: usize,
    pub seconds: f64,
}

pub struct MetricsLog<R: MetricsRow = StepMetrics> {
    jsonl: PathBuf,
    csv: PathBuf,
    pub rows: Vec<R>,
}

impl<R: MetricsRow> MetricsLog<R> {
    /// Opens `dir/metrics.{jsonl,csv}`, keeping the rows with `step < keep_before` (those a
    /// resumed run already has) and rewriting both files with them.
    pub fn open(dir: &Path, keep_before: usize) -> Result<MetricsLog<R>> {
        let jsonl = dir.join("metrics.jsonl");
        let csv = dir.join("metrics.csv");
        let mut rows = Vec::new();
        if keep_before > 0 && jsonl.is_file() {
            let text = std::fs::read_to_string(&jsonl).map_err(|e| io_err(&jsonl, e))?;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                // A line cut by a kill is dropped.
                if let Ok(r) = serde_json::from_str::<R>(line) {
                    if r.step() < keep_before {
                        rows.push(r);
                    }
                }
            }
        }
        let log = MetricsLog { jsonl, csv, rows };
        log.rewrite()?;
        Ok(log)
    }

    fn rewrite(&self) -> Result<()> {
        let mut j = String::new();
        let mut c = format!("{}\n", R::csv_header());
        for r in &self.rows {
            let json = serde_json::to_string(r).expect("metrics serialize");
            c.push_str(&csv_line_of_json(&json));
            j.push_str(&json);
            j.push('\n');
        }
        popen_core::shard::atomic_write(&self.jsonl, j.as_bytes())?;
        popen_core::shard::atomic_write(&self.csv, c.as_bytes())?;
        Ok(())
    }

    pub fn push(&mut self, r: R) -> Result<()> {
        let json = serde_json::to_string(&r).expect("metrics serialize");
        for (path, line) in [(&self.jsonl, format!("{json}\n")), (&self.csv, csv_line_of_json(&json))] {
            let mut f = std::fs::OpenOptions::new().append(true).open(path).map_err(|e| io_err(path, e))?;
            f.write_all(line.as_bytes()).map_err(|e| io_err(path, e))?;
        }
        self.rows.push(r);
        Ok(())
    }
}

/// Draws the row type's loss curves ([`MetricsRow::series`]; SFT: total, CE, BCE, DICE)
/// against the step into a PNG with axes, tick labels and a legend.
pub fn plot_losses<R: MetricsRow>(rows: &[R], path: &Path) -> Result<()> {
    let series = R::series(rows);
    let img = line_plot(&series, "step", 720, 420);
    let bytes = popen_core::imageio::encode_png(&img)?;
    popen_core::shard::atomic_write(path, &bytes)?;
    Ok(())
}

fn line_plot(series: &[(&str, [u8; 3], Vec<(f64, f64)>)], xlabel: &str, w: u32, h: u32) -> image::RgbImage {
    let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let (l, r, t, b) = (64i64, 16i64, 16i64, 40i64);
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|s| s.2.iter().copied()).filter(|p| p.1.is_finite()).collect();
    let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let (mut y0, mut y1) = pts.iter().fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    if pts.is_empty() {
        return img;
    }
    y0 = y0.min(0.0);
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let x1 = if x1 <= x0 { x0 + 1.0 } else { x1 };
    let px = |x: f64| l + ((x - x0) / (x1 - x0) * (w as i64 - l - r) as f64).round() as i64;
    let py = |y: f64| h as i64 - b - ((y - y0) / (y1 - y0) * (h as i64 - t - b) as f64).round() as i64;
    let grey = [150, 150, 150];
    line(&mut img, l, t, l, h as i64 - b, grey);
    line(&mut img, l, h as i64 - b, w as i64 - r, h as i64 - b, grey);
    for k in 0..=4 {
        let yv = y0 + (y1 - y0) * k as f64 / 4.0;
        let yy = py(yv);
        line(&mut img, l - 4, yy, l, yy, grey);
        text(&mut img, 2, yy - 4, &format!("{yv:.3}"), [60, 60, 60]);
        let xv = x0 + (x1 - x0) * k as f64 / 4.0;
        let xx = px(xv);
        line(&mut img, xx, h as i64 - b, xx, h as i64 - b + 4, grey);
        text(&mut img, xx - 12, h as i64 - b + 8, &format!("{}", xv.round() as i64), [60, 60, 60]);
    }
    text(&mut img, w as i64 / 2 - 16, h as i64 - 14, xlabel, [60, 60, 60]);
    for (i, (name, col, s)) in series.iter().enumerate() {
        let mut prev: Option<(i64, i64)> = None;
        for &(x, y) in s.iter().filter(|p| p.1.is_finite()) {
            let p = (px(x), py(y));
            if let Some(q) = prev {
                line(&mut img, q.0, q.1, p.0, p.1, *col);
            }
            prev = Some(p);
        }
        let ly = t + 4 + 12 * i as i64;
        line(&mut img, w as i64 - 110, ly + 4, w as i64 - 90, ly + 4, *col);
        text(&mut img, w as i64 - 84, ly, name, *col);
    }
    img
}

fn put(img: &mut image::RgbImage, x: i64, y: i64, c: [u8; 3]) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, image::Rgb(c));
    }
}

fn line(img: &mut image::RgbImage, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
    let n = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
    for k in 0..=n {
        put(img, x0 + (x1 - x0) * k / n, y0 + (y1 - y0) * k / n, c);
    }
}

fn text(img: &mut image::RgbImage, x: i64, y: i64, s: &str, c: [u8; 3]) {
    use font8x8::UnicodeFonts;
    for (i, ch) in s.chars().enumerate() {
        if let Some(g) = font8x8::BASIC_FONTS.get(ch) {
            for (row, bits) in g.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 1 {
                        put(img, x + 8 * i as i64 + col, y + row as i64, c);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The columns derived from the rows' serialization equal the hand-written CSV the stages
    /// wrote before (header strings and `format!` patterns of commit 36da690).
    #[test]
    fn csv_columns_match_the_hand_written_format() {
        assert_eq!(StepMetrics::csv_header(), "step,epoch,lr,loss,ce,bce,dice,grad_norm,samples,seconds");
        let r = StepMetrics {
            step: 7,
            epoch: 0.123456,
            lr: 1.5e-4,
            loss: 1.25,
            ce: 0.9508,
            bce: 0.2228,
            dice: 2.0,
            grad_norm: 1.185,
            samples: 4,
            seconds: 1.7614,
        };
        let old = format!(
            "{},{:.4},{:.6e},{:.6},{:.6},{:.6},{:.6},{:.6},{},{:.3}\n",
            r.step, r.epoch, r.lr, r.loss, r.ce, r.bce, r.dice, r.grad_norm, r.samples, r.seconds
        );
        assert_eq!(r.csv_line(), old);
        assert_eq!(
            crate::dpo::DpoStepMetrics::csv_header(),
            "step,epoch,lr,loss,loss/text,rewards/chosen,rewards/rejected,rewards/accuracies,rewards/margins,logps/chosen,logps/rejected,nll/chosen,loss/seg,seg/rewards_w,seg/rewards_l,seg/margins,seg/accuracies,seg/indicator_off,seg/targets,bce,dice,ps_phase,grad_norm,pairs,records,seconds"
        );
        let d = crate::dpo::DpoStepMetrics { step: 3, loss_text: Some(0.5), ps_phase: 2, ..Default::default() };
        assert_eq!(
            d.csv_line(),
            "3,0.0000,0.000000e0,0.000000,0.500000,,,,,,,,,,,,,,0,0.000000,0.000000,2,0.000000,0,0,0.000\n"
        );
        assert_eq!(
            crate::ensemble_train::EnsembleStepMetrics::csv_header(),
            "step,epoch,lr,loss,loss/ti,loss/si,p_tilde,text_gain,iou_refined,iou_candidates,si_samples,adapt/ce,adapt/mask,adapt/plain,grad_norm,seconds"
        );
    }
}
