//! `popen report` on a small fake tree of two runs (seeds 0 and 1): the numbers of the page
//! are computed by hand below, next to the values they come from.

use popen_core::mask::Rle;
use popen_core::shard::{write_shard, Sample};
use popen_report::{render, Options, Row};
use serde_json::json;
use std::path::Path;

const SHA_TRAIN: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const SHA_SFT_MODEL: &str = "2222222222222222222222222222222222222222222222222222222222222222";

fn put(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn manifest(stage: &str, seed: u64, inputs: &[(&str, &str)]) -> String {
    let inputs: Vec<_> = inputs.iter().map(|(p, h)| json!({"path": p, "bytes": 123, "sha256": h})).collect();
    json!({
        "stage": stage, "tool_version": "0.1.0", "config": {"seed": seed, "lr": 1e-4},
        "config_hash": format!("c0ffee{seed}"), "inputs": inputs, "outputs": [], "counts": {},
        "skipped": [], "timings": {}
    })
    .to_string()
}

fn tiny_png() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(4, 2, image::Rgb([200, 30, 30]));
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    bytes
}

fn sample(id: &str, template: &str) -> Sample {
    Sample {
        id: id.into(),
        split: "val".into(),
        image: tiny_png(),
        width: 4,
        height: 2,
        instruction: "Find it.".into(),
        answer: "Nothing.".into(),
        target_names: vec![],
        target_masks: Vec::<Rle>::new(),
        target_instances: vec![],
        instance_names: vec![],
        instance_masks: vec![],
        meta: json!({ "template": template }).to_string(),
    }
}

/// A report.json: metrics, counts and two samples' pair IoUs.
fn report(samples: &Path, metrics: serde_json::Value, counts: serde_json::Value, s1: &[f64], s2: &[f64]) -> String {
    let pairs = |v: &[f64]| {
        v.iter().map(|i| json!({"pred": 0, "gt": 0, "intersection": 1, "union": 1, "iou": i})).collect::<Vec<_>>()
    };
    json!({
        "inputs": {"samples": samples.display().to_string()},
        "config": {}, "lexicon": "benchmark", "metrics": metrics, "counts": counts,
        "best": [{"id": "s1", "giou": 0.75}], "worst": [{"id": "s2", "giou": 0.2}],
        "samples": [{"id": "s1", "pairs": pairs(s1)}, {"id": "s2", "pairs": pairs(s2)}]
    })
    .to_string()
}

/// Two runs: seed 0 has sft, dpo, ensemble and eval rows model + dpo; seed 1 has sft, dpo and
/// eval row model only (in the pre-issue-24 report format).
fn tree(root: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = root.join("data/val.parquet");
    std::fs::create_dir_all(data.parent().unwrap()).unwrap();
    write_shard(&data, vec![sample("s1", "colour"), sample("s2", "count")]).unwrap();
    let (r0, r1) = (root.join("run0"), root.join("run1"));
    for (seed, run) in [(0u64, &r0), (1, &r1)] {
        put(
            &run.join("sft/metrics.csv"),
            "step,epoch,lr,loss,ce,bce,dice\n0,0.1,0,1.5,0.9,0.3,0.3\n9,0.5,1e-4,1.0,0.6,0.2,0.2\n",
        );
        put(&run.join("sft/manifest.json"), &manifest("sft", seed, &[("data/train.parquet", SHA_TRAIN)]));
        put(
            &run.join("dpo/metrics.csv"),
            "step,loss,rewards/chosen,rewards/rejected,rewards/margins,seg/margins\n0,4.4,0,0,0,\n4,4.1,0.2,-0.1,0.3,0.01\n",
        );
        put(&run.join("dpo/manifest.json"), &manifest("dpo", seed, &[("sft/model/model.safetensors", SHA_SFT_MODEL)]));
    }
    put(&r0.join("ensemble/metrics.csv"), "step,loss,loss/ti,loss/si,adapt/ce\n0,3.1,0,,2.7\n1,2.4,0.1,0.2,1.9\n");
    put(&r0.join("ensemble/manifest.json"), &manifest("ensemble-train", 0, &[]));
    // Seed 0: today's format. gIoU 30, cIoU 40, p 50, matched 70.
    let m0 = json!({"giou": 0.30, "ciou": 0.40, "chair_s": 0.9, "chair_i": 0.8, "boundary_iou": 0.25,
        "localization_error_rate": 0.5, "localization_error_rate_matched": 0.7});
    put(&r0.join("eval/model/report.json"), &report(&data, m0, json!({}), &[1.0, 0.5], &[0.2]));
    let png = tiny_png();
    std::fs::create_dir_all(r0.join("eval/model/overlays")).unwrap();
    std::fs::write(r0.join("eval/model/overlays/best_1_s1.png"), &png).unwrap();
    std::fs::write(r0.join("eval/model/overlays/worst_1_s2.png"), &png).unwrap();
    let md = json!({"giou": 0.5, "ciou": 0.5, "chair_s": 0.5, "chair_i": 0.5, "boundary_iou": 0.5,
        "localization_error_rate": 0.1, "localization_error_rate_matched": 0.2});
    put(&r0.join("eval/dpo/report.json"), &report(&data, md, json!({}), &[0.5], &[0.5]));
    // Seed 1: a report from before issue 24: `localization_error_rate` was the matched share
    // (60); p = localization_errors / target_objects = 3 / 10 = 30.
    let m1 = json!({"giou": 0.20, "ciou": 0.44, "chair_s": 0.7, "chair_i": 0.6, "boundary_iou": 0.15,
        "localization_error_rate": 0.6});
    put(
        &r1.join("eval/model/report.json"),
        &report(&data, m1, json!({"localization_errors": 3, "target_objects": 10}), &[0.5, 0.5], &[0.0]),
    );
    (r0, r1)
}

fn section<'a>(html: &'a str, from: &str, to: &str) -> &'a str {
    let a = html.find(from).unwrap_or_else(|| panic!("no '{from}' in the page"));
    let b = html[a..].find(to).map(|b| a + b).unwrap_or(html.len());
    &html[a..b]
}

#[test]
fn report_page_of_two_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let (r0, r1) = tree(tmp.path());
    let rows = ["SFT baseline=model", "POPEN w/o ensemble (dpo)=dpo", "POPEN (dpo + ensemble K=3)=popen"];
    let opts = Options {
        runs: vec![r0.clone(), r1.clone()],
        rows: rows.iter().map(|r| Row::parse(r).unwrap()).collect(),
        ..Options::default()
    };
    let html = render(&opts).unwrap();
    std::fs::write(tmp.path().join("report.html"), &html).unwrap();

    // Results, by hand: SFT gIoU 30 and 20 -> mean 25, sample std sqrt(((5)^2 + (5)^2) / 1)
    // = 7.07; cIoU 40, 44 -> 42.00 ± 2.83; C_S 90, 70 -> 80.00 ± 14.14; Boundary IoU 25, 15
    // -> 20.00 ± 7.07; p 50 and 30 (seed 1 recomputed from its counts) -> 40.00 ± 14.14;
    // matched 70 and 60 (seed 1's old key) -> 65.00 ± 7.07.
    let results = section(&html, "id=\"results\"", "id=\"curves\"");
    let sft = section(results, "SFT baseline", "</tr>");
    for cell in ["25.00 ± 7.07", "42.00 ± 2.83", "80.00 ± 14.14", "20.00 ± 7.07", "40.00 ± 14.14", "65.00 ± 7.07"]
    {
        assert!(sft.contains(&format!("<td>{cell}</td>")), "SFT row lacks {cell}: {sft}");
    }
    assert!(sft.contains("2 of 2"), "{sft}");
    // DPO in seed 0 only: its single values, "1 of 2" and a note naming the missing seed.
    let dpo = section(results, "POPEN w/o ensemble (dpo)", "</tr>");
    assert!(dpo.contains("<td>50.00</td>") && dpo.contains("1 of 2"), "{dpo}");
    assert!(results.contains("missing in seed 1"), "{results}");
    // POPEN in no run: "—" cells and a note.
    let popen = section(results, "POPEN (dpo + ensemble K=3)", "</tr>");
    assert_eq!(popen.matches("—").count(), 7, "{popen}");
    assert!(results.contains("no popen/report.json in any run"), "{results}");
    // Paired: model -> dpo exists in seed 0 only: gIoU 50 - 30 = +20.
    assert!(results.contains("+20.00 (+20.00)"), "{results}");

    // One chart per stage; the ensemble is missing in seed 1 (noted).
    let curves = section(&html, "id=\"curves\"", "id=\"templates\"");
    for stage in ["SFT — sft", "DPO (text", "Ensemble training"] {
        let s = section(curves, stage, "<h3>");
        assert!(s.contains("<svg"), "no chart for {stage}: {s}");
    }
    assert!(section(curves, "DPO (text", "<h3>").contains("rewards/margins"));
    assert!(section(curves, "Ensemble training", "<h3>").contains("not in seed 1"));

    // Overlays as data: URIs (a PNG starts with the bytes that base64-encode to iVBORw0KGgo).
    let overlays = section(&html, "id=\"overlays\"", "id=\"provenance\"");
    assert!(overlays.contains("src=\"data:image/png;base64,iVBORw0KGgo"), "{overlays}");
    assert!(
        overlays.contains("best 1</b> · gIoU 75.0 · s1<br>“Find it.”")
            && overlays.contains("worst 1</b> · gIoU 20.0 · s2"),
        "{overlays}"
    );

    // Per template, by hand: SFT "colour" (sample s1) seed 0 (1.0 + 0.5) / 2 = 75, seed 1
    // (0.5 + 0.5) / 2 = 50 -> 62.5 ± 17.7; "count" (s2): 20 and 0 -> 10.0 ± 14.1; DPO
    // (seed 0 only) colour 50.0.
    let templates = section(&html, "id=\"templates\"", "id=\"overlays\"");
    let colour = section(templates, "<td>colour</td>", "</tr>");
    assert!(colour.contains("62.5 <small>± 17.7</small>") && colour.contains(">50.0<"), "{colour}");
    assert!(section(templates, "<td>count</td>", "</tr>").contains("10.0 <small>± 14.1</small>"), "{templates}");

    // Provenance: the inputs' hashes, the seeds and the configs.
    let prov = section(&html, "id=\"provenance\"", "</body>");
    assert!(prov.contains(SHA_TRAIN) && prov.contains(SHA_SFT_MODEL), "hashes missing");
    assert!(prov.contains("seed 0 (") && prov.contains("seed 1 ("), "run labels missing");
    assert!(prov.contains("<details") && prov.contains("&quot;lr&quot;"), "config missing");

    // Self-contained: no URL at all; every src is a data: URI.
    assert!(!html.contains("http://") && !html.contains("https://"), "the page names a URL");
    for (i, _) in html.match_indices("src=\"") {
        assert!(html[i + 5..].starts_with("data:"), "non-data src at {i}");
    }
}

#[test]
fn report_names_a_malformed_report() {
    let tmp = tempfile::tempdir().unwrap();
    let (r0, r1) = tree(tmp.path());
    let bad = r1.join("eval/model/report.json");
    std::fs::write(&bad, "{\"metrics\": [1, 2").unwrap();
    let err = render(&Options { runs: vec![r0, r1], ..Options::default() }).unwrap_err().to_string();
    assert!(err.contains(&bad.display().to_string()) && err.contains("not a popen eval report"), "{err}");
}

#[test]
fn report_of_a_bare_folder_shows_gaps() {
    // A run folder with nothing in it: every section says what is missing, no error.
    let tmp = tempfile::tempdir().unwrap();
    let html = render(&Options { runs: vec![tmp.path().to_path_buf()], ..Options::default() }).unwrap();
    assert!(html.contains("not run (no sft/metrics.csv in any run)"), "{html}");
    assert!(html.contains("no samples shard"), "{html}");
    assert!(html.contains("no manifest.json in this run folder"), "{html}");
    assert!(Row::parse("no-equals").is_err());
    assert_eq!(Row::parse("a=b=c").unwrap(), Row { name: "a=b".into(), sub: "c".into() });
}
