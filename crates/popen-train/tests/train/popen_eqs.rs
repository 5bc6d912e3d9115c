//! POPEN's preference and ensemble equations (`popen_train::{dpo_loss, ensemble_loss}`).
//!
//! Reference: `tests/fixtures/popen_eqs.json`, written by
//! `tools/reference/popen_eqs_fixture.py` (an independent PyTorch transcription of SPEC
//! sections 5, 6 and 10; float64 on float32 inputs; gradients by torch autograd, torch 2.9.1).
//! Values and gradients must match to 1e-5 (relative to 1 + |reference|) on
//! `Autodiff<NdArray<f32>>`. Behavioural tests (SGD on a toy DPO setup, the Eq. 4 indicator)
//! and hand-computed edge cases follow.

use std::path::Path;

use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use popen_train::dpo_loss::{self, SegDpoInput, SeqNorm};
use popen_train::ensemble_loss::{self, SiSample};
use serde_json::Value;

type AB = Autodiff<NdArray<f32>>;

const TOL: f64 = 1e-5;

fn fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/popen_eqs.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Flattens nested JSON arrays of numbers (row-major) and returns the shape.
fn flat(v: &Value) -> (Vec<f32>, Vec<usize>) {
    fn walk(v: &Value, depth: usize, out: &mut Vec<f32>, shape: &mut Vec<usize>) {
        match v {
            Value::Array(a) => {
                if shape.len() <= depth {
                    shape.push(a.len());
                }
                for x in a {
                    walk(x, depth + 1, out, shape);
                }
            }
            x => out.push(x.as_f64().unwrap() as f32),
        }
    }
    let (mut out, mut shape) = (Vec::new(), Vec::new());
    walk(v, 0, &mut out, &mut shape);
    (out, shape)
}

fn tensor<const D: usize>(v: &Value) -> Tensor<AB, D> {
    let (data, shape) = flat(v);
    assert_eq!(shape.len(), D, "fixture rank");
    Tensor::from_data(TensorData::new(data, shape), &Default::default())
}

fn floats(v: &Value) -> Vec<f32> {
    flat(v).0
}

fn usizes(v: &Value) -> Vec<usize> {
    serde_json::from_value(v.clone()).unwrap()
}

fn nested_usizes(v: &Value) -> Vec<Vec<usize>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn vals<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().unwrap()
}

fn close(a: f32, b: f64, what: &str) {
    assert!((a as f64 - b).abs() <= TOL * (1.0 + b.abs()), "{what}: {a} vs reference {b}");
}

fn all_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        close(g, w as f64, &format!("{what}[{i}]"));
    }
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

/// Eq. 3 (both normalizations) and Eq. 2 with TRL's metrics; gradients w.r.t. the policy's
/// token log-probs. Reference: popen_eqs_fixture.py `text_dpo_case` (RLHF-V's
/// compute_weighted_logp, TRL's sigmoid DPO loss).
#[test]
fn text_dpo_eq2_eq3_match_reference() {
    let fx = fixture();
    for case in fx["text_dpo"].as_array().unwrap() {
        let norm = match case["norm"].as_str().unwrap() {
            "length" => SeqNorm::Length,
            "weighted_count" => SeqNorm::WeightedCount,
            other => panic!("norm {other}"),
        };
        let (beta, lambda) = (num(&case["beta"]), num(&case["lambda"]));
        let side = |s: &Value, key: &str| {
            let t = tensor::<2>(&s[key]);
            (t, usizes(&s["lens"]), nested_usizes(&s["changed"]))
        };
        let (pc_tok, lens_c, ch_c) = side(&case["chosen"], "logprobs");
        let (pr_tok, lens_r, ch_r) = side(&case["rejected"], "logprobs");
        let (rc_tok, _, _) = side(&case["chosen"], "ref_logprobs");
        let (rr_tok, _, _) = side(&case["rejected"], "ref_logprobs");
        let (pc_tok, pr_tok) = (pc_tok.require_grad(), pr_tok.require_grad());
        let seq = |t: Tensor<AB, 2>, lens: &[usize], ch: &[Vec<usize>]| {
            dpo_loss::weighted_logp(t, lens, ch, lambda, norm).unwrap()
        };
        let pc = seq(pc_tok.clone(), &lens_c, &ch_c);
        let pr = seq(pr_tok.clone(), &lens_r, &ch_r);
        let rc = seq(rc_tok, &lens_c, &ch_c);
        let rr = seq(rr_tok, &lens_r, &ch_r);
        let tag = |x: &str| format!("{:?} {x}", norm);
        all_close(&vals(pc.clone()), &floats(&case["policy_chosen"]), &tag("policy chosen"));
        all_close(&vals(pr.clone()), &floats(&case["policy_rejected"]), &tag("policy rejected"));
        all_close(&vals(rc.clone()), &floats(&case["ref_chosen"]), &tag("ref chosen"));
        all_close(&vals(rr.clone()), &floats(&case["ref_rejected"]), &tag("ref rejected"));

        let out = dpo_loss::text_dpo(pc, pr, rc, rr, beta).unwrap();
        close(out.loss.clone().into_scalar(), num(&case["loss"]), &tag("loss"));
        all_close(&out.chosen_rewards, &floats(&case["chosen_rewards"]), &tag("chosen rewards"));
        all_close(&out.rejected_rewards, &floats(&case["rejected_rewards"]), &tag("rejected rewards"));
        let m = &case["metrics"];
        for (name, value) in out.metrics.pairs() {
            let want = if name == "loss" { num(&case["loss"]) } else { num(&m[name]) };
            close(value, want, &tag(name));
        }
        let grads = out.loss.backward();
        let g = |t: &Tensor<AB, 2>| t.grad(&grads).unwrap().into_data().into_vec::<f32>().unwrap();
        all_close(&g(&pc_tok), &floats(&case["grad_chosen_logprobs"]), &tag("d loss / d chosen logprobs"));
        all_close(&g(&pr_tok), &floats(&case["grad_rejected_logprobs"]), &tag("d loss / d rejected logprobs"));
    }
}

/// Eq. 4 (beta_s 10, cos over concatenated scales, indicator on given scores, mean over N then
/// batch) and d loss / d f_theta. Reference: popen_eqs_fixture.py `seg_dpo_case`
/// (torch.nn.functional.cosine_similarity, logsigmoid).
#[test]
fn seg_dpo_eq4_matches_reference() {
    let fx = fixture();
    let c = &fx["seg_dpo"];
    let ft = tensor::<3>(&c["f_theta_m"]).require_grad();
    let (rb, pm) = (floats(&c["ref_best_score"]), floats(&c["policy_median_score"]));
    let counts = usizes(&c["counts"]);
    let out = dpo_loss::seg_dpo(
        SegDpoInput {
            f_theta_m: ft.clone(),
            f_ref_w: tensor(&c["f_ref_w"]),
            f_ref_m: tensor(&c["f_ref_m"]),
            f_ref_l: tensor(&c["f_ref_l"]),
            ref_best_score: &rb,
            policy_median_score: &pm,
            counts: &counts,
        },
        num(&c["beta"]),
    )
    .unwrap();
    let ind: Vec<f32> = out.indicator.iter().map(|&b| b as u8 as f32).collect();
    assert_eq!(ind, floats(&c["indicator"]));
    let active = ind.iter().filter(|&&x| x == 1.0).count();
    assert!(active > 0 && active < ind.len(), "the fixture must switch some targets off, not all");
    assert_eq!((out.metrics.active, out.metrics.targets), (active, 6));
    all_close(&out.r_w, &floats(&c["r_w"]), "r_w");
    all_close(&out.r_l, &floats(&c["r_l"]), "r_l");
    close(out.loss.clone().into_scalar(), num(&c["loss"]), "L_s");
    close(out.metrics.loss, num(&c["loss"]), "metrics.loss");
    let grads = out.loss.backward();
    all_close(&vals(ft.grad(&grads).unwrap()), &floats(&c["grad_f_theta_m"]), "d L_s / d f_theta");
}

/// tau and eta (SPEC 6, 10.7, 10.12, 10.15) and their gammas. Reference: popen_eqs_fixture.py
/// `scores_case`.
#[test]
fn token_and_sentence_scores_match_reference() {
    let fx = fixture();
    let c = &fx["scores"];
    let pieces: Vec<Vec<String>> = serde_json::from_value(c["pieces"].clone()).unwrap();
    let probs: Vec<Vec<f32>> = c["probs"].as_array().unwrap().iter().map(floats).collect();
    let groups: Vec<Vec<Vec<usize>>> = serde_json::from_value(c["groups"].clone()).unwrap();
    let sents: Vec<Vec<usize>> = pieces.iter().map(|p| ensemble_loss::sentence_ids(p)).collect();
    assert_eq!(sents, nested_usizes(&c["sentence_ids"]));
    let tau = ensemble_loss::token_scores(&probs, &sents).unwrap();
    let eta = ensemble_loss::sentence_scores(&probs, &sents, &groups).unwrap();
    let rows = |v: &Value| -> Vec<Vec<f32>> { v.as_array().unwrap().iter().map(floats).collect() };
    for (k, (got, want)) in tau.iter().zip(rows(&c["tau"])).enumerate() {
        all_close(got, &want, &format!("tau of response {k}"));
        let gam: Vec<f32> = got.iter().map(|&t| ensemble_loss::gamma_of(t)).collect();
        all_close(&gam, &rows(&c["tau_gamma"])[k], &format!("tau gamma of response {k}"));
    }
    for (k, (got, want)) in eta.iter().zip(rows(&c["eta"])).enumerate() {
        all_close(got, &want, &format!("eta of response {k}"));
        let gam: Vec<f32> = got.iter().map(|&t| ensemble_loss::gamma_of(t)).collect();
        all_close(&gam, &rows(&c["eta_gamma"])[k], &format!("eta gamma of response {k}"));
    }
    // Normalized over all K responses: the extremes are exactly -1 and 1.
    let flat: Vec<f32> = tau.concat();
    assert_eq!(flat.iter().cloned().fold(f32::INFINITY, f32::min), -1.0);
    assert_eq!(flat.iter().cloned().fold(f32::NEG_INFINITY, f32::max), 1.0);
}

/// L_ti (Appendix B; p(y~) = exp(mean log p), SPEC 10.8) and its gradient w.r.t. the refined
/// response's token log-probs. Reference: popen_eqs_fixture.py `ti_case`.
#[test]
fn ti_loss_matches_reference() {
    let fx = fixture();
    let c = &fx["ti"];
    let lp = tensor::<2>(&c["logprobs"]).require_grad();
    let lens = usizes(&c["lens"]);
    let rows = |v: &Value| -> Vec<Vec<f32>> { v.as_array().unwrap().iter().map(floats).collect() };
    let (h_t, h_g) = (rows(&c["h_tilde"]), rows(&c["h_g"]));
    let h_k: Vec<Vec<Vec<f32>>> = c["h_k"].as_array().unwrap().iter().map(rows).collect();
    let gains: Vec<Vec<f32>> =
        (0..lens.len()).map(|r| ensemble_loss::sentence_gains(&h_t[r], &h_g[r], &h_k[r]).unwrap()).collect();
    for (r, (g, want)) in gains.iter().zip(rows(&c["gains"])).enumerate() {
        all_close(g, &want, &format!("gains of row {r}"));
    }
    let out = ensemble_loss::ti_loss(lp.clone(), &lens, &gains, num(&c["scale"])).unwrap();
    all_close(&out.p_tilde, &floats(&c["p_tilde"]), "p(y~)");
    close(out.loss.clone().into_scalar(), num(&c["loss"]), "L_ti");
    let grads = out.loss.backward();
    all_close(&vals(lp.grad(&grads).unwrap()), &floats(&c["grad_logprobs"]), "d L_ti / d log p");
}

/// L_si (Appendix B; soft IoU on sigmoid probabilities, hard IoU for the fixed masks,
/// SPEC 10.9) and its gradient w.r.t. the refined logits. Reference: popen_eqs_fixture.py
/// `si_case` (includes an empty target with an empty candidate: hard IoU 1).
#[test]
fn si_loss_matches_reference() {
    let fx = fixture();
    let c = &fx["si"];
    let scale = num(&c["scale"]);
    let cases = c["samples"].as_array().unwrap();
    let logits: Vec<Tensor<AB, 3>> = cases.iter().map(|s| tensor::<3>(&s["logits"]).require_grad()).collect();
    let mut samples = Vec::new();
    for (s, l) in cases.iter().zip(&logits) {
        let gt = tensor::<3>(&s["gt"]);
        let cand = tensor::<4>(&s["candidates"]);
        let hard = ensemble_loss::hard_iou(cand.clone(), gt.clone()).concat();
        all_close(&hard, &floats(&s["hard_iou"]), "hard IoU");
        let soft = ensemble_loss::soft_iou(burn::tensor::activation::sigmoid(l.clone()), gt.clone());
        all_close(&vals(soft), &floats(&s["soft_iou"]), "soft IoU");
        let one = ensemble_loss::si_loss(
            vec![SiSample { refined_logits: l.clone(), gt: gt.clone(), candidates: cand.clone() }],
            scale,
        )
        .unwrap();
        close(one.into_scalar(), num(&s["loss"]), "L_si of one sample");
        samples.push(SiSample { refined_logits: l.clone(), gt, candidates: cand });
    }
    let loss = ensemble_loss::si_loss(samples, scale).unwrap();
    close(loss.clone().into_scalar(), num(&c["loss"]), "L_si");
    let grads = loss.backward();
    for (k, (s, l)) in cases.iter().zip(&logits).enumerate() {
        all_close(&vals(l.grad(&grads).unwrap()), &floats(&s["grad_logits"]), &format!("d L_si / d logits {k}"));
    }
}

/// Behaviour: plain SGD on Eq. 2 over a toy policy (per-position logits over a vocabulary of
/// 5; chosen and rejected responses of 4 tokens, 2 of them changed) raises the chosen-minus-
/// rejected margin of Eq. 3 log-likelihoods at every step and lowers the loss.
#[test]
fn sgd_on_text_dpo_raises_the_margin() {
    let d = Default::default();
    let (len, vocab) = (4usize, 5usize);
    let chosen_ids = [1i64, 2, 3, 0];
    let rejected_ids = [1i64, 4, 4, 0]; // differs at positions 1 and 2
    let changed = vec![vec![1usize, 2]];
    let logits0: Vec<f32> = (0..len * vocab).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1).collect();
    let ids = |v: &[i64]| Tensor::<AB, 2, Int>::from_data(TensorData::new(v.to_vec(), [len, 1]), &d);
    let seq = |logits: Tensor<AB, 2>, v: &[i64]| {
        let lp = burn::tensor::activation::log_softmax(logits, 1).gather(1, ids(v)).reshape([1, len]);
        dpo_loss::weighted_logp(lp, &[len], &changed, dpo_loss::LAMBDA, SeqNorm::Length).unwrap()
    };
    let reference = Tensor::<AB, 2>::from_data(TensorData::new(logits0.clone(), [len, vocab]), &d);
    let (ref_c, ref_r) = (seq(reference.clone(), &chosen_ids).detach(), seq(reference, &rejected_ids).detach());
    let mut w = Tensor::<AB, 2>::from_data(TensorData::new(logits0, [len, vocab]), &d).require_grad();
    let mut last: Option<(f32, f32)> = None;
    let mut first = f32::NAN;
    for step in 0..6 {
        let (pc, pr) = (seq(w.clone(), &chosen_ids), seq(w.clone(), &rejected_ids));
        let out = dpo_loss::text_dpo(pc, pr, ref_c.clone(), ref_r.clone(), dpo_loss::BETA_T).unwrap();
        let margin = out.metrics.logps_chosen - out.metrics.logps_rejected;
        if let Some((m, l)) = last {
            assert!(margin > m, "step {step}: margin {margin} not above {m}");
            assert!(out.metrics.loss < l, "step {step}: loss {} not below {l}", out.metrics.loss);
        } else {
            first = margin;
            assert_eq!(out.metrics.rewards_margins, 0.0, "the policy starts as the reference");
            assert!((out.metrics.loss - std::f32::consts::LN_2).abs() < 1e-6);
        }
        last = Some((margin, out.metrics.loss));
        let grads = out.loss.backward();
        let g = w.grad(&grads).unwrap();
        w = Tensor::from_inner(w.inner() - g.mul_scalar(1.0)).require_grad();
    }
    let (m, _) = last.unwrap();
    assert!(m - first > 0.1, "5 steps moved the margin from {first} to {m} only");
}

/// Behaviour: Eq. 4's indicator. When the policy's median score beats the reference's best,
/// that target's term and its gradient are exactly 0; a tie keeps the term (">=").
#[test]
fn seg_dpo_indicator_switches_the_term_off() {
    let d = Default::default();
    let t3 = |v: Vec<f32>| Tensor::<AB, 3>::from_data(TensorData::new(v, [2, 2, 3]), &d);
    let ft = t3(vec![0.3, -0.2, 0.5, 1.0, 0.1, -0.4, 0.2, 0.2, -0.7, 0.0, 0.9, 0.3]).require_grad();
    let fw = t3(vec![1.0, 0.0, 0.2, 0.3, -0.5, 0.1, -0.3, 0.8, 0.1, 0.4, 0.4, -0.2]);
    let fm = t3(vec![0.2, -0.1, 0.6, 0.9, 0.2, -0.3, 0.1, 0.3, -0.6, 0.1, 0.8, 0.2]);
    let fl = t3(vec![-0.5, 0.7, 0.1, 0.0, 0.3, 0.9, 0.6, -0.4, 0.2, -0.8, 0.1, 0.5]);
    let run = |ref_best: [f32; 2], pol_med: [f32; 2]| {
        let out = dpo_loss::seg_dpo(
            SegDpoInput {
                f_theta_m: ft.clone(),
                f_ref_w: fw.clone(),
                f_ref_m: fm.clone(),
                f_ref_l: fl.clone(),
                ref_best_score: &ref_best,
                policy_median_score: &pol_med,
                counts: &[2],
            },
            dpo_loss::BETA_S,
        )
        .unwrap();
        let ind = out.indicator.clone();
        let loss = out.loss.clone().into_scalar();
        let g = vals(ft.grad(&out.loss.backward()).unwrap());
        (ind, loss, g)
    };
    // Both policy medians beat the reference's best: no term, no gradient.
    let (ind, loss, g) = run([0.4, 0.5], [0.6, 0.51]);
    assert_eq!(ind, vec![false, false]);
    assert_eq!(loss, 0.0);
    assert!(g.iter().all(|&x| x == 0.0), "gradient {g:?}");
    // Target 0 on (tie), target 1 off: the gradient of target 1's rows is exactly 0, target
    // 0's is not, and the loss is half of target 0's term alone (N = 2).
    let (ind, loss_half, g) = run([0.6, 0.5], [0.6, 0.9]);
    assert_eq!(ind, vec![true, false]);
    assert!(g[..6].iter().any(|&x| x != 0.0));
    assert!(g[6..].iter().all(|&x| x == 0.0), "switched-off target has gradient {:?}", &g[6..]);
    let (_, loss_both, _) = run([0.6, 0.9], [0.6, 0.5]);
    assert!(loss_half > 0.0 && loss_both > loss_half);
}

/// Eq. 3 by hand: log-probs [-1, -2, -3], L_y = {1}, lambda 5: the weighted sum is
/// -1 - 10 - 3 = -14; length 3 -> -14/3; weighted count 2 + 5 = 7 -> -2. Errors on bad input.
#[test]
fn weighted_logp_hand_computed_and_errors() {
    let d = Default::default();
    let lp = Tensor::<AB, 2>::from_data(TensorData::new(vec![-1.0f32, -2.0, -3.0, -9.0], [1, 4]), &d);
    let at = |norm| dpo_loss::weighted_logp(lp.clone(), &[3], &[vec![1, 1]], 5.0, norm).unwrap().into_scalar();
    assert!((at(SeqNorm::Length) - (-14.0 / 3.0)).abs() < 1e-6);
    assert!((at(SeqNorm::WeightedCount) - (-2.0)).abs() < 1e-6);
    assert!(dpo_loss::weighted_logp(lp.clone(), &[3], &[vec![3]], 5.0, SeqNorm::Length).is_err());
    assert!(dpo_loss::weighted_logp(lp.clone(), &[5], &[vec![]], 5.0, SeqNorm::Length).is_err());
    assert!(dpo_loss::weighted_logp(lp, &[3, 1], &[vec![]], 5.0, SeqNorm::Length).is_err());
}

/// Sentence splitting (SPEC 10.12), min-max normalization edge cases, gamma by hand.
#[test]
fn scores_edge_cases() {
    let ids = ensemble_loss::sentence_ids(&["Hi", "!", "?", " ", "Yes", ".\n", "\n", "[SEG0]", " ok"]);
    assert_eq!(ids, vec![0, 0, 0, 0, 1, 1, 1, 2, 2]);
    assert_eq!(ensemble_loss::minmax_signed(&[0.3, 0.3]), vec![0.0, 0.0]);
    assert_eq!(ensemble_loss::minmax_signed(&[]), Vec::<f32>::new());
    assert_eq!(ensemble_loss::minmax_signed(&[1.0, 2.0, 3.0]), vec![-1.0, 0.0, 1.0]);
    assert_eq!(ensemble_loss::gamma_of(0.0), 0.0);
    assert!((ensemble_loss::gamma_of(1.0) - (1.0 / (1.0 + (-1f32).exp()) - 0.5)).abs() < 1e-7);
    // One response, one sentence, equal probabilities: every score 0, every gamma 0.
    let tau = ensemble_loss::token_scores(&[vec![0.5, 0.5]], &[vec![0, 0]]).unwrap();
    assert_eq!(tau, vec![vec![0.0, 0.0]]);
    assert!(ensemble_loss::token_scores(&[vec![0.5]], &[vec![0, 0]]).is_err());
    assert!(ensemble_loss::sentence_scores(&[vec![0.5]], &[vec![0]], &[vec![vec![3]]]).is_err());
}

/// Issue 24 item 5, SPEC 10.17: L_si pairs the `<seg>` groups of y_tilde and of each y_k with
/// the targets by Hungarian matching on mask IoU (as the evaluator), not by position.
/// Hand-computed on a 4x4 image, targets A (left half) and B (right half): y_tilde lists them
/// as B, A (logits +-20), y_0 = [B, A], y_1 = [A, B].
/// - Hungarian: every paired IoU is 1 (soft IoU 1 - O(e^-20)), each term -log sigma(0) = ln 2,
///   L_si = ln 2.
/// - Positional (the behaviour before issue 24, now the option): y_tilde's IoUs are 0; y_0's
///   are 0 (terms ln 2), y_1's are 1 (terms -log sigma(-10) = softplus(10)), so
///   L_si = (2 ln 2 + 2 softplus(10)) / 4.
#[test]
fn si_pairs_by_hungarian_matching_on_iou() {
    use ensemble_loss::Pairing;
    use popen_core::mask::Mask;
    let a = Mask::from_fn(4, 4, |_, x| x < 2);
    let b = Mask::from_fn(4, 4, |_, x| x >= 2);
    let gts = vec![a.clone(), b.clone()];
    let d = Default::default();
    let logits = |m: &Mask| {
        let v: Vec<f32> = m.data().iter().map(|&p| if p == 1 { 20.0 } else { -20.0 }).collect();
        Tensor::<AB, 2>::from_data(TensorData::new(v, [4, 4]), &d).require_grad()
    };
    let refined = vec![logits(&b), logits(&a)];
    let (y0, y1) = (vec![b.clone(), a.clone()], vec![a.clone(), b.clone()]);
    let cands: Vec<&[Mask]> = vec![&y0, &y1];
    let loss = |p: Pairing| {
        let s = ensemble_loss::si_sample(refined.clone(), &cands, &gts, p).unwrap().unwrap();
        ensemble_loss::si_loss(vec![s], ensemble_loss::SCALE).unwrap().into_scalar() as f64
    };
    let ln2 = std::f64::consts::LN_2;
    let softplus10 = 10.0 + (-10.0f64).exp().ln_1p();
    assert!((loss(Pairing::Hungarian) - ln2).abs() < 1e-5, "{}", loss(Pairing::Hungarian));
    assert!(
        (loss(Pairing::Positional) - (2.0 * ln2 + 2.0 * softplus10) / 4.0).abs() < 1e-5,
        "{}",
        loss(Pairing::Positional)
    );
    // The default (config and enum) is the paper-aligned Hungarian pairing.
    assert_eq!(Pairing::default(), Pairing::Hungarian);
    assert_eq!(popen_train::ensemble_train::EnsembleConfig::default().si_pairing, Pairing::Hungarian);
    // The gradient reaches the refined logits through the Hungarian pairs.
    let s = ensemble_loss::si_sample(refined.clone(), &cands, &gts, Pairing::Hungarian).unwrap().unwrap();
    let g = ensemble_loss::si_loss(vec![s], ensemble_loss::SCALE).unwrap().backward();
    assert!(refined.iter().all(|l| l.grad(&g).is_some()));

    // pair_with_targets by hand: fewer masks than targets; all IoUs 0 keeps the positional
    // pairs (SciPy's tie-breaking); a target a response leaves unpaired has an empty M_k^n.
    let pair = ensemble_loss::pair_with_targets;
    assert_eq!(pair(std::slice::from_ref(&b), &gts, Pairing::Hungarian).unwrap(), vec![None, Some(0)]);
    assert_eq!(pair(std::slice::from_ref(&b), &gts, Pairing::Positional).unwrap(), vec![Some(0), None]);
    assert_eq!(pair(&[b.clone(), a.clone()], &gts, Pairing::Hungarian).unwrap(), vec![Some(1), Some(0)]);
    let (top, bottom) = (Mask::from_fn(4, 4, |y, _| y < 2), Mask::from_fn(4, 4, |y, _| y >= 2));
    let far = vec![Mask::zeros(4, 4), Mask::zeros(4, 4)];
    assert_eq!(pair(&far, &[top, bottom], Pairing::Hungarian).unwrap(), vec![Some(0), Some(1)]);
    // y_2 = [B] only: target A gets an empty mask (hard IoU 0), B its own (1).
    let y2 = [b.clone()];
    let s = ensemble_loss::si_sample(refined.clone(), &[&y2[..]], &gts, Pairing::Hungarian).unwrap().unwrap();
    assert_eq!(ensemble_loss::hard_iou(s.candidates, s.gt), vec![vec![0.0, 1.0]]);
    // No group in y_tilde, or no target: no L_si term.
    assert!(ensemble_loss::si_sample::<AB>(vec![], &cands, &gts, Pairing::Hungarian).unwrap().is_none());
    assert!(ensemble_loss::si_sample(refined.clone(), &cands, &[], Pairing::Hungarian).unwrap().is_none());
}
