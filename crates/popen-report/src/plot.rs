//! The training curves as inline SVG (plotters' SVG backend; text is laid out without fonts).

use crate::load::Csv;
use crate::{ReportError, Result};
use plotters::prelude::*;

/// Colours of the curves within a panel (matplotlib's tab10).
const PALETTE: [(u8, u8, u8); 8] = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (23, 190, 207),
];

/// Opacity of the i-th run's curves: the first run solid, the others lighter.
fn run_alpha(i: usize) -> f64 {
    match i {
        0 => 1.0,
        1 => 0.55,
        2 => 0.35,
        _ => 0.25,
    }
}

/// The panels of a stage's curves: a title and the columns plotted together (similar scales),
/// chosen by the columns its metrics.csv has.
pub fn panels(header: &[String]) -> Vec<(&'static str, Vec<&'static str>)> {
    let has = |c: &str| header.iter().any(|h| h == c);
    let groups: Vec<(&'static str, Vec<&'static str>)> = if has("rewards/margins") {
        vec![
            ("total loss", vec!["loss"]),
            ("loss terms", vec!["loss/text", "loss/seg", "nll/chosen", "bce", "dice"]),
            ("text rewards", vec!["rewards/chosen", "rewards/rejected", "rewards/margins"]),
            ("segmentation rewards", vec!["seg/rewards_w", "seg/rewards_l", "seg/margins"]),
        ]
    } else if has("loss/ti") {
        vec![
            ("losses", vec!["loss", "loss/ti", "loss/si"]),
            ("warm-up (adapt)", vec!["adapt/ce", "adapt/mask", "adapt/plain"]),
            ("refinement", vec!["p_tilde", "text_gain", "iou_refined", "iou_candidates"]),
        ]
    } else {
        vec![("losses", vec!["loss", "ce", "bce", "dice"])]
    };
    let mut out: Vec<_> = groups
        .into_iter()
        .map(|(t, cols)| (t, cols.into_iter().filter(|c| has(c)).collect::<Vec<_>>()))
        .filter(|(_, cols)| !cols.is_empty())
        .collect();
    if out.is_empty() && has("loss") {
        out.push(("loss", vec!["loss"]));
    }
    out
}

/// One panel: every column of `columns` for every run that has the stage (run i's curves
/// with [`run_alpha`]); None when no run has a point of these columns.
pub fn panel_svg(title: &str, columns: &[&str], runs: &[Option<&Csv>]) -> Result<Option<String>> {
    let mut curves = Vec::new();
    for (ri, csv) in runs.iter().enumerate() {
        let Some(csv) = csv else { continue };
        for (ci, col) in columns.iter().enumerate() {
            if let Some(pts) = csv.series(col) {
                curves.push((ri, ci, *col, pts));
            }
        }
    }
    if curves.is_empty() {
        return Ok(None);
    }
    let (mut x1, mut y0, mut y1) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for (_, _, _, pts) in &curves {
        for &(x, y) in pts {
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    let pad = if y1 > y0 { (y1 - y0) * 0.06 } else { y0.abs().max(1.0) * 0.1 };
    let (y0, y1) = (y0 - pad, y1 + pad);
    let plot_err = |e: &dyn std::fmt::Display| ReportError::Plot(format!("{title}: {e}"));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (300, 236)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 14))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..x1, y0..y1)
            .map_err(|e| plot_err(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_labels(5)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_labels(6)
            .light_line_style(RGBColor(235, 235, 235))
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(|e| plot_err(&e))?;
        let mut labelled = Vec::new();
        for (ri, ci, col, pts) in curves {
            let (r, g, b) = PALETTE[ci % PALETTE.len()];
            let colour = RGBAColor(r, g, b, run_alpha(ri));
            let style = ShapeStyle { color: colour, filled: false, stroke_width: if ri == 0 { 2 } else { 1 } };
            let series = chart.draw_series(LineSeries::new(pts, style)).map_err(|e| plot_err(&e))?;
            if !labelled.contains(&col) {
                labelled.push(col);
                let solid = RGBColor(r, g, b);
                series
                    .label(col)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], solid.stroke_width(2)));
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(190, 190, 190))
            .label_font(("sans-serif", 11))
            .draw()
            .map_err(|e| plot_err(&e))?;
        root.present().map_err(|e| plot_err(&e))?;
    }
    // Inline SVG needs no namespace; leaving it out keeps the page free of any URL.
    Ok(Some(svg.replace(" xmlns=\"http://www.w3.org/2000/svg\"", "")))
}
