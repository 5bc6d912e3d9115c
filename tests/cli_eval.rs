//! End-to-end tests of `popen eval`: the trivial baselines on a small generated benchmark,
//! the same numbers from a predictions shard, and bad predictions shards (ids that do not
//! match the ground truth, a wrong image size) failing with the ids named.

use popen_core::shard::{read_shard, write_shard, Prediction, Sample};
use serde_json::Value;
use std::path::Path;

mod common;
#[allow(unused_imports)]
use common::{err, ok, popen};

fn report(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

#[test]
fn eval_baselines_predictions_and_bad_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let d = data.to_str().unwrap();
    ok(&["synth", "--out", d, "--seed", "3", "--train-samples", "4", "--val-samples", "6", "--test-samples", "2"]);
    let val = data.join("val.parquet");
    let lex = data.join("lexicon.json");
    let (v, l) = (val.to_str().unwrap(), lex.to_str().unwrap());

    // largest instance: report files, overlays, manifest, the table on stdout
    let big = tmp.path().join("big");
    let out = ok(&[
        "eval",
        "--samples",
        v,
        "--baseline",
        "largest-instance",
        "--lexicon",
        l,
        "--out",
        big.to_str().unwrap(),
        "--overlays",
        "2",
    ]);
    assert!(
        out.contains("| gIoU (PixelLM: mean over pairs) % |") && out.contains("| CHAIR C_I % (lower is better) |"),
        "{out}"
    );
    let r = report(&big);
    assert_eq!(r["counts"]["samples"], 6);
    assert_eq!(r["counts"]["predicted_objects"], 6);
    assert_eq!(r["inputs"]["baseline"], "largest-instance");
    let giou = r["metrics"]["giou"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&giou));
    // the largest instance exists in the image: never a hallucination with instance truth
    assert_eq!(r["metrics"]["chair_s"], 0.0);
    assert!(big.join("report.md").is_file() && big.join("manifest.json").is_file());
    let overlays: Vec<String> = std::fs::read_dir(big.join("overlays"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(overlays.iter().filter(|n| n.starts_with("best_")).count(), 2, "{overlays:?}");
    assert_eq!(overlays.iter().filter(|n| n.starts_with("worst_")).count(), 2, "{overlays:?}");
    let png =
        image::open(big.join("overlays").join(overlays.iter().find(|n| n.starts_with("best_1_")).unwrap())).unwrap();
    assert!(png.height() > 2 * 96 * 4, "{}x{}", png.width(), png.height());
    let m: Value = serde_json::from_str(&std::fs::read_to_string(big.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["stage"], "eval");
    assert_eq!(m["counts"]["samples"], 6);

    // the same answers as a predictions shard give the same numbers
    let pred = big.join("baseline-largest-instance.parquet");
    let again = tmp.path().join("again");
    ok(&[
        "eval",
        "--samples",
        v,
        "--predictions",
        pred.to_str().unwrap(),
        "--lexicon",
        l,
        "--out",
        again.to_str().unwrap(),
        "--overlays",
        "0",
    ]);
    let r2 = report(&again);
    assert_eq!(r2["metrics"], r["metrics"]);
    assert!(!again.join("overlays").exists());

    // nothing: every target pairs with an empty prediction
    let none = tmp.path().join("none");
    ok(&[
        "eval",
        "--samples",
        v,
        "--baseline",
        "nothing",
        "--lexicon",
        l,
        "--out",
        none.to_str().unwrap(),
        "--chair-truth",
        "targets",
    ]);
    let r = report(&none);
    assert_eq!((r["metrics"]["giou"].as_f64(), r["metrics"]["ciou"].as_f64()), (Some(0.0), Some(0.0)));
    assert_eq!(r["counts"]["chair"]["mentions"], 0);

    // COCO lexicon flag: a table file in CHAIR's format
    let table = tmp.path().join("chair_synonyms.txt");
    std::fs::write(&table, "ball, toy ball\napple\n").unwrap();
    let coco = tmp.path().join("coco");
    ok(&[
        "eval",
        "--samples",
        v,
        "--baseline",
        "largest-instance",
        "--lexicon",
        &format!("coco:{}", table.display()),
        "--out",
        coco.to_str().unwrap(),
        "--overlays",
        "0",
    ]);
    assert!(report(&coco)["lexicon"].as_str().unwrap().starts_with("coco (2 classes)"));

    // ids that do not match: the missing and the extra ids are named
    let samples: Vec<Sample> = read_shard(&val).unwrap();
    let preds: Vec<Prediction> = read_shard(&pred).unwrap();
    let mut bad = preds[1..].to_vec();
    let mut extra = preds[1].clone();
    extra.id = "bogus-id".into();
    bad.push(extra);
    let bad_path = tmp.path().join("bad.parquet");
    write_shard(&bad_path, bad).unwrap();
    let e = err(&[
        "eval",
        "--samples",
        v,
        "--predictions",
        bad_path.to_str().unwrap(),
        "--lexicon",
        l,
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert!(e.contains(&format!("1 sample(s) have no prediction: '{}'", samples[0].id)), "{e}");
    assert!(e.contains("1 prediction(s) have no sample: 'bogus-id'"), "{e}");
    assert!(e.contains("bad.parquet"), "{e}");

    // a prediction for an image of another size names the sample
    let mut sized = preds.clone();
    sized[2] = Prediction {
        width: 64,
        height: 64,
        masks: vec![],
        mask_scores: vec![],
        answer: String::new(),
        ..sized[2].clone()
    };
    let sized_path = tmp.path().join("sized.parquet");
    write_shard(&sized_path, sized).unwrap();
    let e = err(&[
        "eval",
        "--samples",
        v,
        "--predictions",
        sized_path.to_str().unwrap(),
        "--lexicon",
        l,
        "--out",
        tmp.path().join("y").to_str().unwrap(),
    ]);
    assert!(e.contains(&format!("sample '{}'", samples[2].id)) && e.contains("64x64"), "{e}");

    // neither predictions nor a baseline; a missing lexicon
    let e = err(&["eval", "--samples", v, "--out", tmp.path().join("z").to_str().unwrap()]);
    assert!(e.contains("--predictions") || e.contains("--baseline"), "{e}");
    let e = err(&["eval", "--samples", v, "--baseline", "nothing", "--lexicon", "/nonexistent/lex.json"]);
    assert!(e.contains("/nonexistent/lex.json"), "{e}");
}

/// `--match-logit` NaN, inf, 0 or a negative value is refused by the argument parser, with
/// the flag named (before, NaN was accepted and every matching cost became NaN).
#[test]
fn eval_refuses_a_non_finite_or_non_positive_match_logit() {
    for bad in ["NaN", "inf", "0", "-1"] {
        let flag = format!("--match-logit={bad}");
        let e = err(&["eval", "--samples", "no.parquet", "--baseline", "nothing", &flag]);
        assert!(e.contains("--match-logit") && e.contains("finite number > 0"), "{bad}: {e}");
    }
}
