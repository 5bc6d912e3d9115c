//! Localization error, Boundary IoU, baselines, alignment errors, the report, and the LLM
//! judge (against a local HTTP server), all on hand-computed cases.

use super::{prediction, rect, sample, BENCH_LEXICON};
use popen_core::chat::ChatConfig;
use popen_core::mask::Rle;
use popen_eval::localization::LocalizationConfig;
use popen_eval::{
    evaluate, score_sample, Baseline, ChairTruth, EvalConfig, EvalInputs, Judge, JudgeConfig, Lexicon, Report,
};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

fn lex() -> Lexicon {
    Lexicon::from_benchmark_json(BENCH_LEXICON).unwrap()
}

/// 10x10 image: apple A on the left half of the top rows, box B on the right half.
fn two_objects() -> (Rle, Rle) {
    (rect(10, 10, 0, 5, 0, 5), rect(10, 10, 0, 5, 5, 10))
}

#[test]
fn localization_error_and_boundary_iou() {
    let (a, b) = two_objects();
    let s = sample("s", 10, 10, &[("apple", a.clone(), 0)], &[("apple", a.clone()), ("box", b.clone())]);
    let cfg = EvalConfig::default();
    // 35 px covering 10 of A and all 25 of B: IoU_g = 10/50 = 0.2, IoU_o = 25/35 > 0.25
    let wrong = rect(10, 10, 0, 5, 3, 10);
    let r =
        score_sample(&cfg, &s, &prediction("s", 10, 10, "the apple <seg>", vec![wrong.clone()]), &lex(), None).unwrap();
    let m = &r.matched[0];
    assert!((m.iou - 0.2).abs() < 1e-15);
    assert!((m.iou_other - 25.0 / 35.0).abs() < 1e-15);
    assert!(m.localization_error);
    assert!(m.boundary_iou < 1.0);
    // exact mask: IoU 1, Boundary IoU 1, no error (IoU_o with B is 0)
    let r = score_sample(&cfg, &s, &prediction("s", 10, 10, "the apple <seg>", vec![a.clone()]), &lex(), None).unwrap();
    let m = &r.matched[0];
    assert_eq!((m.iou, m.boundary_iou, m.iou_other, m.localization_error), (1.0, 1.0, 0.0, false));
    // low IoU but nothing else there: not a localization error
    let s_alone = sample("s", 10, 10, &[("apple", a.clone(), 0)], &[("apple", a.clone())]);
    let r =
        score_sample(&cfg, &s_alone, &prediction("s", 10, 10, "x <seg>", vec![wrong.clone()]), &lex(), None).unwrap();
    assert_eq!((r.matched[0].iou_other, r.matched[0].localization_error), (0.0, false));
    // proposals instead of instances: one is the target (IoU >= 0.5, left out), one is B
    let props = vec![rect(10, 10, 0, 5, 0, 4), b.clone()];
    let r =
        score_sample(&cfg, &s_alone, &prediction("s", 10, 10, "x <seg>", vec![wrong.clone()]), &lex(), Some(&props))
            .unwrap();
    assert!((r.matched[0].iou_other - 25.0 / 35.0).abs() < 1e-15);
    assert!(r.matched[0].localization_error);
    // thresholds are configurable
    let lenient =
        EvalConfig { localization: LocalizationConfig { iou_target_below: 0.1, ..Default::default() }, ..cfg };
    let r = score_sample(&lenient, &s, &prediction("s", 10, 10, "x <seg>", vec![wrong]), &lex(), None).unwrap();
    assert!(!r.matched[0].localization_error);
}

/// Issue 24 item 6: the rate `p` divides by all ground-truth objects (paper, supplementary:
/// "among all objects"; SPEC 10.20), the matched-pair share is reported beside it.
/// Hand-computed: sample "miss" has 2 targets (A, and C = the bottom half) and one prediction
/// covering 10 px of A and all of the non-target B: matched to A (C has no overlap), a
/// localization error (IoU_g 0.2, IoU_o 25/35 with B); C stays unmatched. Sample "ok" has 1
/// target, predicted exactly. Errors 1, targets 3, matched pairs 2: p = 1/3, of matched = 1/2. (Before issue 24
/// `localization_error_rate` was 1/2.)
#[test]
fn localization_error_rate_divides_by_all_targets() {
    let (a, b) = two_objects();
    let wrong = rect(10, 10, 0, 5, 3, 10);
    let c = rect(10, 10, 5, 10, 0, 10);
    let samples = vec![
        sample(
            "miss",
            10,
            10,
            &[("apple", a.clone(), 0), ("cup", c.clone(), 2)],
            &[("apple", a.clone()), ("box", b.clone()), ("cup", c.clone())],
        ),
        sample("ok", 10, 10, &[("apple", a.clone(), 0)], &[("apple", a.clone()), ("box", b.clone())]),
    ];
    let preds = vec![
        prediction("miss", 10, 10, "the apple <seg>", vec![wrong]),
        prediction("ok", 10, 10, "the apple <seg>", vec![a.clone()]),
    ];
    let lexicon = lex();
    let r = evaluate(
        &EvalConfig::default(),
        EvalInputs { samples: &samples, predictions: &preds, lexicon: &lexicon, proposals: None, judge: None },
    )
    .unwrap();
    assert_eq!((r.counts.localization_errors, r.counts.target_objects, r.counts.matched_pairs), (1, 3, 2));
    assert_eq!(r.metrics.localization_error_rate, Some(1.0 / 3.0));
    assert_eq!(r.metrics.localization_error_rate_matched, Some(0.5));
    let md = r.markdown();
    assert!(md.contains("| localization error rate p, of all targets (paper) % (lower is better) | 33.33 |"), "{md}");
    assert!(md.contains("| localization error rate, of matched pairs % (lower is better) | 50.00 |"), "{md}");
    // A report written before the matched-pair field existed still reads (the field is None).
    let mut v = serde_json::to_value(&r).unwrap();
    v["metrics"].as_object_mut().unwrap().remove("localization_error_rate_matched");
    let old: Report = serde_json::from_value(v).unwrap();
    assert_eq!(old.metrics.localization_error_rate_matched, None);
}

#[test]
fn baselines() {
    let (a, b) = two_objects();
    let big = rect(10, 10, 5, 10, 0, 10); // 50 px
    let s = sample("s", 10, 10, &[("apple", a.clone(), 0)], &[("apple", a.clone()), ("box", big.clone()), ("cup", b)]);
    let p = Baseline::LargestInstance.predict(&s).unwrap();
    assert_eq!((p.answer.as_str(), p.masks.clone()), ("box <seg>", vec![big]));
    p.validate().unwrap();
    let n = Baseline::Nothing.predict(&s).unwrap();
    assert!(n.answer.is_empty() && n.masks.is_empty());
    n.validate().unwrap();
    let empty = sample("e", 10, 10, &[], &[]);
    assert!(Baseline::LargestInstance.predict(&empty).unwrap().masks.is_empty());
    assert_eq!("largest-instance".parse::<Baseline>().unwrap(), Baseline::LargestInstance);
    assert!("biggest".parse::<Baseline>().is_err());

    // nothing scores 0 everywhere except targets-free samples; largest-instance finds the box
    let samples =
        vec![s, sample("t", 10, 10, &[("box", rect(10, 10, 5, 10, 0, 10), 0)], &[("box", rect(10, 10, 5, 10, 0, 10))])];
    let lexicon = lex();
    let run = |b: Baseline| {
        let preds = b.predict_all(&samples).unwrap();
        evaluate(
            &EvalConfig::default(),
            EvalInputs { samples: &samples, predictions: &preds, lexicon: &lexicon, proposals: None, judge: None },
        )
        .unwrap()
    };
    let r = run(Baseline::Nothing);
    assert_eq!((r.metrics.giou, r.metrics.ciou, r.metrics.chair_s), (Some(0.0), 0.0, 0.0));
    let r = run(Baseline::LargestInstance);
    // s: box vs apple target -> 0; t: exact -> 1 / (1 + 1e-5 / 50)
    let want = (0.0 + 50.0 / (50.0 + 1e-5)) / 2.0;
    assert!((r.metrics.giou.unwrap() - want).abs() < 1e-15);
    assert_eq!(r.best[0].id, "t");
    assert_eq!(r.worst[0].id, "s");
}

#[test]
fn ids_and_sizes_must_match() {
    let (a, _) = two_objects();
    let samples: Vec<_> = (0..8).map(|i| sample(&format!("s{i}"), 10, 10, &[("apple", a.clone(), -1)], &[])).collect();
    let lexicon = lex();
    let go = |preds: &[popen_core::shard::Prediction]| {
        evaluate(
            &EvalConfig::default(),
            EvalInputs { samples: &samples, predictions: preds, lexicon: &lexicon, proposals: None, judge: None },
        )
    };
    // two missing, one extra
    let mut preds: Vec<_> = samples[2..].iter().map(|s| prediction(&s.id, 10, 10, "", vec![])).collect();
    preds.push(prediction("zz", 10, 10, "", vec![]));
    let e = go(&preds).unwrap_err().to_string();
    assert!(
        e.contains("2 sample(s) have no prediction: 's0', 's1'") && e.contains("1 prediction(s) have no sample: 'zz'"),
        "{e}"
    );
    // many missing: the first five and the count
    let e = go(&preds[7..]).unwrap_err().to_string();
    assert!(e.contains("8 sample(s) have no prediction: 's0', 's1', 's2', 's3', 's4', ... (8 in all)"), "{e}");
    // duplicates
    let mut dup: Vec<_> = samples.iter().map(|s| prediction(&s.id, 10, 10, "", vec![])).collect();
    dup.push(prediction("s3", 10, 10, "", vec![]));
    assert!(go(&dup).unwrap_err().to_string().contains("repeat sample ids: 's3'"));
    // wrong image size names the sample
    let mut sized: Vec<_> = samples.iter().map(|s| prediction(&s.id, 10, 10, "", vec![])).collect();
    sized[4] = prediction("s4", 12, 10, "", vec![]);
    let e = go(&sized).unwrap_err().to_string();
    assert!(e.contains("sample 's4'") && e.contains("a 10x12 image"), "{e}");
    // an inconsistent prediction record (2 <seg>, 1 mask) names the sample and the field
    sized[4] = prediction("s4", 10, 10, "a <seg> b <seg>", vec![a.clone()]);
    let e = go(&sized).unwrap_err().to_string();
    assert!(e.contains("sample 's4'") && e.contains("'masks'"), "{e}");
    // proposals given but missing for a sample
    let ok: Vec<_> = samples.iter().map(|s| prediction(&s.id, 10, 10, "", vec![])).collect();
    let props: HashMap<String, Vec<Rle>> = HashMap::new();
    let e = evaluate(
        &EvalConfig::default(),
        EvalInputs { samples: &samples, predictions: &ok, lexicon: &lexicon, proposals: Some(&props), judge: None },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("sample 's0'") && e.contains("proposal"), "{e}");
}

#[test]
fn report_aggregates_ranks_and_writes() {
    let (a, b) = two_objects();
    let samples = vec![
        sample("good", 10, 10, &[("apple", a.clone(), 0)], &[("apple", a.clone()), ("box", b.clone())]),
        sample(
            "half",
            10,
            10,
            &[("apple", a.clone(), 0), ("box", b.clone(), 1)],
            &[("apple", a.clone()), ("box", b.clone())],
        ),
        sample("none", 10, 10, &[], &[("box", b.clone())]),
    ];
    let preds = vec![
        // hallucinates a fish in text only
        prediction("good", 10, 10, "the apple <seg> next to a fish", vec![a.clone()]),
        prediction("half", 10, 10, "the box <seg>", vec![b.clone()]),
        prediction("none", 10, 10, "nothing", vec![]),
    ];
    let lexicon = lex();
    let mut r = evaluate(
        &EvalConfig::default(),
        EvalInputs { samples: &samples, predictions: &preds, lexicon: &lexicon, proposals: None, judge: None },
    )
    .unwrap();
    let one = 25.0 / (25.0 + 1e-5);
    // pairs: good (1), half (box matched + apple unmatched)
    assert_eq!(
        (r.counts.pairs, r.counts.matched_pairs, r.counts.unmatched_targets, r.counts.samples_with_pairs),
        (3, 2, 1, 2)
    );
    assert!((r.metrics.giou.unwrap() - 2.0 * one / 3.0).abs() < 1e-15);
    assert!((r.metrics.giou_per_sample.unwrap() - (one + one / 2.0) / 2.0).abs() < 1e-15);
    assert!((r.metrics.ciou - 50.0 / (75.0 + 1e-10)).abs() < 1e-15);
    assert_eq!(r.metrics.chair_s, 1.0 / 3.0);
    assert_eq!(r.metrics.chair_i, 1.0 / 3.0); // apple, fish, box
    assert_eq!(r.metrics.boundary_iou, Some(1.0));
    assert_eq!(r.metrics.localization_error_rate, Some(0.0));
    assert_eq!(r.best.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(), vec!["good", "half"]);
    assert_eq!(r.worst[0].id, "half");
    // targets-only truth: the box of "good" would be a hallucination there; here only the fish
    let t = evaluate(
        &EvalConfig { chair_truth: ChairTruth::Targets, ..Default::default() },
        EvalInputs { samples: &samples, predictions: &preds, lexicon: &lexicon, proposals: None, judge: None },
    )
    .unwrap();
    assert_eq!(t.counts.chair.hallucinated_mentions, 1);

    r.inputs.insert("predictions".into(), "pred.parquet".into());
    let md = r.markdown();
    assert!(md.contains("| gIoU (PixelLM: mean over pairs) % | 66.67 |"), "{md}");
    assert!(md.contains("| CHAIR C_S % (lower is better) | 33.33 |"), "{md}");
    assert!(md.contains("Best by per-sample gIoU: `good` (100.0), `half` (50.0)"), "{md}");
    let dir = tempfile::tempdir().unwrap();
    let files = r.write(dir.path()).unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(Report::read(&files[0]).unwrap(), r);
    assert_eq!(std::fs::read_to_string(&files[1]).unwrap(), md);
}

/// Answers each connection with the next canned (status, content) chat completion.
fn judge_server(replies: Vec<(u16, &'static str)>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for (status, content) in replies {
            let Ok((mut s, _)) = listener.accept() else { return };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            loop {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..p]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap_or(0);
                    if buf.len() >= p + 4 + len {
                        break;
                    }
                }
            }
            let body = if status == 200 {
                serde_json::json!({"choices": [{"message": {"role": "assistant", "content": content}}]}).to_string()
            } else {
                content.to_string()
            };
            let reply =
                format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            s.write_all(reply.as_bytes()).ok();
        }
    });
    url
}

#[test]
fn llm_judge_scores_and_failures() {
    let (a, _) = two_objects();
    let samples: Vec<_> = ["j0", "j1", "j2"]
        .iter()
        .map(|id| sample(id, 10, 10, &[("apple", a.clone(), 0)], &[("apple", a.clone())]))
        .collect();
    let preds: Vec<_> = samples.iter().map(|s| prediction(&s.id, 10, 10, "the apple <seg>", vec![a.clone()])).collect();
    let url = judge_server(vec![
        (200, "Accuracy: 8\nDetailedness: 6\nGood."),
        (200, "**Accuracy**: 4/10\n**Detailedness**: 2/10"),
        (200, "I refuse to score."),
    ]);
    let chat = ChatConfig {
        timeout: Duration::from_secs(5),
        retries: 0,
        backoff: Duration::from_millis(1),
        ..ChatConfig::new(&url, "judge")
    };
    let judge = Judge::new(JudgeConfig { chat, send_image: false }).unwrap();
    let msgs = judge.messages(&samples[0], &preds[0].answer);
    let popen_core::chat::Content::Text(text) = &msgs[0].content else { panic!("text prompt expected") };
    assert!(
        text.starts_with(popen_eval::judge::PAPER_PROMPT)
            && text.contains("Text response: the apple")
            && text.contains("annotated objects are: apple")
    );
    let lexicon = lex();
    let r = evaluate(
        &EvalConfig::default(),
        EvalInputs { samples: &samples, predictions: &preds, lexicon: &lexicon, proposals: None, judge: Some(&judge) },
    )
    .unwrap();
    assert_eq!((r.counts.judged, r.counts.judge_failed), (2, 1));
    assert_eq!((r.metrics.judge_accuracy, r.metrics.judge_detail), (Some(6.0), Some(4.0)));
    let err = r.samples[2].judge_error.as_deref().unwrap();
    assert!(err.contains("sample 'j2'") && err.contains(&url) && err.contains("I refuse"), "{err}");

    // an unreachable endpoint: the error names it and the sample
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/v1", l.local_addr().unwrap())
    };
    let chat = ChatConfig {
        timeout: Duration::from_secs(2),
        retries: 1,
        backoff: Duration::from_millis(1),
        ..ChatConfig::new(&dead, "judge")
    };
    let judge = Judge::new(JudgeConfig { chat, send_image: true }).unwrap();
    let parts = judge.messages(&samples[0], "x");
    assert!(matches!(&parts[0].content, popen_core::chat::Content::Parts(p) if p.len() == 2));
    let e = judge.score(&samples[0], "x").unwrap_err().to_string();
    assert!(e.contains("sample 'j0'") && e.contains(&dead) && e.contains("2 attempt(s)"), "{e}");
}

/// A match logit that is NaN, infinite, 0 or negative is refused, naming `match_logit` and
/// its flag, by `evaluate` and by `score_sample`; before, NaN was accepted and turned every
/// matching cost into NaN.
#[test]
fn match_logit_must_be_finite_and_positive() {
    let (a, _) = two_objects();
    let s = sample("s", 10, 10, &[("apple", a.clone(), 0)], &[("apple", a.clone())]);
    let p = prediction("s", 10, 10, "the apple <seg>", vec![a.clone()]);
    let lexicon = lex();
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0, -10.0] {
        let cfg = EvalConfig { match_logit: bad, ..EvalConfig::default() };
        let inputs = EvalInputs {
            samples: std::slice::from_ref(&s),
            predictions: std::slice::from_ref(&p),
            lexicon: &lexicon,
            proposals: None,
            judge: None,
        };
        let e = evaluate(&cfg, inputs).unwrap_err().to_string();
        assert!(e.contains("match_logit") && e.contains("--match-logit"), "{bad}: {e}");
        let e = score_sample(&cfg, &s, &p, &lexicon, None).unwrap_err().to_string();
        assert!(e.contains("match_logit"), "{bad}: {e}");
    }
    let cfg = EvalConfig { match_logit: 3.0, ..EvalConfig::default() };
    assert_eq!(score_sample(&cfg, &s, &p, &lexicon, None).unwrap().matched[0].iou, 1.0);
}
