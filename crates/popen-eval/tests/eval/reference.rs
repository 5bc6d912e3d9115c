//! Against tools/reference/pixellm_eval.py: a numpy/SciPy transcription of PixelLM's
//! `ar_validate` + `match_pred` (fixtures pixellm_eval_cases.json -> pixellm_eval_expected.json)
//! and SciPy 1.17.1's `linear_sum_assignment` (lsap_scipy.json). Exact pairs and counts;
//! IoUs to 1e-12.

use super::{fixture, prediction, sample};
use popen_core::mask::Rle;
use popen_eval::hungarian::linear_sum_assignment;
use popen_eval::matching::{match_masks, IouTotals, DEFAULT_MATCH_LOGIT};
use popen_eval::{evaluate, EvalConfig, EvalInputs, Lexicon};
use serde_json::Value;

fn read(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

fn rles(case: &Value, key: &str) -> Vec<Rle> {
    let (h, w) = (case["height"].as_u64().unwrap() as u32, case["width"].as_u64().unwrap() as u32);
    case[key].as_array().unwrap().iter().map(|s| Rle::from_coco_string(h, w, s.as_str().unwrap()).unwrap()).collect()
}

fn opt(v: &Value) -> Option<usize> {
    v.as_u64().map(|x| x as usize)
}

#[test]
fn assignment_equals_scipy() {
    let f = read("lsap_scipy.json");
    let mats = f["matrices"].as_array().unwrap();
    assert!(mats.len() > 200);
    for (k, m) in mats.iter().enumerate() {
        let (r, c) = (m["rows"].as_u64().unwrap() as usize, m["cols"].as_u64().unwrap() as usize);
        let cost: Vec<f64> =
            m["cost"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().parse().unwrap()).collect();
        let want: Vec<(usize, usize)> = m["row_ind"]
            .as_array()
            .unwrap()
            .iter()
            .zip(m["col_ind"].as_array().unwrap())
            .map(|(a, b)| (a.as_u64().unwrap() as usize, b.as_u64().unwrap() as usize))
            .collect();
        assert_eq!(linear_sum_assignment(&cost, r, c).unwrap(), want, "matrix {k} ({r}x{c})");
    }
}

#[test]
fn pairs_giou_ciou_equal_pixellm_reference() {
    let cases = read("pixellm_eval_cases.json");
    let want = read("pixellm_eval_expected.json");
    assert_eq!(want["logit"].as_f64().unwrap(), DEFAULT_MATCH_LOGIT);
    let mut totals = IouTotals::default();
    let cases = cases["cases"].as_array().unwrap();
    let records = want["records"].as_array().unwrap();
    assert_eq!(cases.len(), records.len());
    for (case, rec) in cases.iter().zip(records) {
        let id = case["id"].as_str().unwrap();
        assert_eq!(rec["id"], case["id"]);
        let pairs = match_masks(&rles(case, "preds"), &rles(case, "gts"), DEFAULT_MATCH_LOGIT).unwrap();
        let wp = rec["pairs"].as_array().unwrap();
        assert_eq!(pairs.len(), wp.len(), "{id}: pair count");
        for (k, (p, w)) in pairs.iter().zip(wp).enumerate() {
            assert_eq!((p.pred, p.gt), (opt(&w["pred"]), opt(&w["gt"])), "{id}: pair {k}");
            assert_eq!(
                (p.intersection, p.union),
                (w["intersection"].as_u64().unwrap(), w["union"].as_u64().unwrap()),
                "{id}: pair {k}"
            );
            assert!((p.iou - w["iou"].as_f64().unwrap()).abs() < 1e-12, "{id}: pair {k}: {} vs {}", p.iou, w["iou"]);
        }
        totals.add(&pairs);
    }
    assert_eq!(totals.pairs, want["pairs"].as_u64().unwrap());
    assert_eq!(
        (totals.intersection, totals.union),
        (want["intersection"].as_u64().unwrap(), want["union"].as_u64().unwrap())
    );
    assert!((totals.giou().unwrap() - want["giou"].as_f64().unwrap()).abs() < 1e-12);
    assert!((totals.ciou() - want["ciou"].as_f64().unwrap()).abs() < 1e-12);
}

/// The same cases through the whole `evaluate` path (samples + prediction records).
#[test]
fn evaluate_reproduces_the_reference_metrics() {
    let cases = read("pixellm_eval_cases.json");
    let want = read("pixellm_eval_expected.json");
    let (mut samples, mut preds) = (Vec::new(), Vec::new());
    for case in cases["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let (h, w) = (case["height"].as_u64().unwrap() as u32, case["width"].as_u64().unwrap() as u32);
        let gts: Vec<(&str, Rle, i32)> = rles(case, "gts").into_iter().map(|m| ("ball", m, -1)).collect();
        samples.push(sample(id, h, w, &gts, &[]));
        let masks = rles(case, "preds");
        let answer = vec!["ball <seg>"; masks.len()].join(", ");
        preds.push(prediction(id, h, w, &answer, masks));
    }
    preds.reverse(); // joined on id, not position
    let lex = Lexicon::from_benchmark_json(super::BENCH_LEXICON).unwrap();
    let r = evaluate(
        &EvalConfig::default(),
        EvalInputs { samples: &samples, predictions: &preds, lexicon: &lex, proposals: None, judge: None },
    )
    .unwrap();
    assert!((r.metrics.giou.unwrap() - want["giou"].as_f64().unwrap()).abs() < 1e-12);
    assert!((r.metrics.ciou - want["ciou"].as_f64().unwrap()).abs() < 1e-12);
    assert_eq!(r.counts.pairs, want["pairs"].as_u64().unwrap());
    // the 'nothing' case has no pairs and no per-sample gIoU
    let nothing = r.samples.iter().find(|s| s.id == "nothing").unwrap();
    assert_eq!((nothing.pairs.len(), nothing.giou), (0, None));
    assert_eq!(r.counts.samples_with_pairs, r.counts.samples - 1);
}
