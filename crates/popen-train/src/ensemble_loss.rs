//! The preference-based ensemble's training losses `L_ti` and `L_si` (stage 3, SPEC
//! section 6, Appendix B). The token and sentence preference scores tau and eta that become
//! the attention bias gamma (Eqs. 5-6) live in `popen_infer::scores` (inference needs them
//! too) and are re-exported here.
//!
//! Checked against the PyTorch transcription `tools/reference/popen_eqs_fixture.py`
//! (values and autograd gradients).
//!
//! ```text
//! L_ti = -mean_batch (1/K) sum_k log sigma( s * p(y~) * (cos(h~, h_g) - cos(h_k, h_g)) ),  p(y~) = exp(mean log p)
//! L_si = -mean_batch (1/(K N)) sum_k sum_n log sigma( s * (softIoU(M~^n, M_g^n) - IoU(M_k^n, M_g^n)) )
//! ```
//! with `s = 10` (the paper's constant, [`SCALE`]). `M~^n` and `M_k^n` are the refined and the
//! k-th response's masks paired with target n: by default by Hungarian matching on mask IoU,
//! as the evaluator pairs predictions with targets (SPEC 10.17, [`Pairing`], [`si_sample`]),
//! so an answer naming the right objects in another order is not scored as wrong; the n-th
//! `<seg>` with the n-th target is the option [`Pairing::Positional`].

use burn::prelude::*;
use burn::tensor::activation;
use popen_core::mask::Mask;
use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

// The Eq. 5-6 scores live in popen-infer (the ensemble's inference reads them); old paths kept.
pub use popen_infer::scores::{gamma_of, minmax_signed, sentence_ids, sentence_scores, token_scores};

/// The factor 10 inside both sigmoids of Appendix B.
pub const SCALE: f64 = 10.0;
/// Floor of the soft-IoU denominator (reached only when the ground truth is empty and every
/// probability underflows to 0; keeps the loss finite).
pub const SOFT_IOU_FLOOR: f64 = 1e-6;

fn data_err<T>(msg: String) -> Result<T> {
    Err(TrainError::Data(msg))
}

/// Cosine similarity of two host vectors (in f64; norms clamped at `COS_EPS`).
pub(crate) fn cos(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt().max(crate::dpo_loss::COS_EPS);
    let nb = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt().max(crate::dpo_loss::COS_EPS);
    dot / (na * nb)
}

/// `cos(h~, h_g) - cos(h_k, h_g)` for each of the K responses: the (constant) sentence
/// feature gain of L_ti, from sentence features `h` (the paper: BERT) of the refined
/// response `h_tilde`, the ground truth `h_g` and the K responses `h_k`.
pub fn sentence_gains(h_tilde: &[f32], h_g: &[f32], h_k: &[Vec<f32>]) -> Result<Vec<f32>> {
    if h_tilde.len() != h_g.len() || h_k.iter().any(|h| h.len() != h_g.len()) {
        return data_err("sentence_gains: features of different lengths".into());
    }
    let base = cos(h_tilde, h_g);
    Ok(h_k.iter().map(|h| (base - cos(h, h_g)) as f32).collect())
}

/// L_ti's result: the loss [1] (mean over the batch) and `p(y~)` of each row.
#[derive(Clone, Debug)]
pub struct TiLoss<B: Backend> {
    pub loss: Tensor<B, 1>,
    pub p_tilde: Vec<f32>,
}

/// L_ti (Appendix B): `-mean_rows (1/K) sum_k log sigma(scale * p(y~) * gains[r][k])`.
///
/// `logprobs` [b, max]: the token log-probs of each refined response `y~` (differentiable),
/// `lens[r]` valid entries; `p(y~) = exp(mean log p)` (SPEC 10.8) is the only differentiable
/// part. `gains[r]` = [`sentence_gains`] of row r (K may differ between rows).
pub fn ti_loss<B: Backend>(
    logprobs: Tensor<B, 2>,
    lens: &[usize],
    gains: &[Vec<f32>],
    scale: f64,
) -> Result<TiLoss<B>> {
    let [b, max] = logprobs.dims();
    if lens.len() != b || gains.len() != b || b == 0 {
        return data_err(format!("ti_loss: {b} rows, {} lengths, {} gain rows", lens.len(), gains.len()));
    }
    let kmax = gains.iter().map(Vec::len).max().unwrap_or(0);
    let (mut mask, mut g, mut w) = (vec![0f32; b * max], vec![0f32; b * kmax], vec![0f32; b * kmax]);
    for r in 0..b {
        let n = lens[r];
        if n == 0 || n > max || gains[r].is_empty() {
            return data_err(format!("ti_loss: row {r} has {n} tokens (max {max}) and {} responses", gains[r].len()));
        }
        for k in 0..n {
            mask[r * max + k] = 1.0 / n as f32;
        }
        let kk = gains[r].len();
        for (k, &v) in gains[r].iter().enumerate() {
            g[r * kmax + k] = v;
            w[r * kmax + k] = 1.0 / (kk as f32 * b as f32);
        }
    }
    let device = logprobs.device();
    let t2 = |v: Vec<f32>, c: usize| Tensor::<B, 2>::from_data(TensorData::new(v, [b, c]), &device);
    let p = (logprobs * t2(mask, max)).sum_dim(1).exp(); // [b, 1]
    let p_tilde = p.clone().detach().into_data().convert::<f32>().into_vec::<f32>().expect("f32 data");
    let z = p.expand([b, kmax]) * t2(g, kmax).mul_scalar(scale);
    let loss = (activation::log_sigmoid(z) * t2(w, kmax)).sum().neg();
    Ok(TiLoss { loss, p_tilde })
}

/// Soft IoU per mask of probabilities `probs` [N, H, W] against 0/1 `gt` [N, H, W]:
/// `sum(p g) / max(sum(p) + sum(g) - sum(p g), SOFT_IOU_FLOOR)` (SPEC 10.9). Equals hard IoU
/// on 0/1 inputs (except both empty: 0 here, 1 for hard IoU). Returns [N].
pub fn soft_iou<B: Backend>(probs: Tensor<B, 3>, gt: Tensor<B, 3>) -> Tensor<B, 1> {
    let n = probs.dims()[0];
    let flat = |t: Tensor<B, 3>| t.flatten::<2>(1, 2);
    let (p, g) = (flat(probs), flat(gt));
    let inter = (p.clone() * g.clone()).sum_dim(1);
    let union = p.sum_dim(1) + g.sum_dim(1) - inter.clone();
    (inter / union.clamp_min(SOFT_IOU_FLOOR)).reshape([n])
}

/// Hard IoU of 0/1 masks (values > 0.5 are in the mask) `masks` [K, N, H, W] against `gt`
/// [N, H, W]: [K][N]; both empty -> 1 (the project's convention, as `popen_core::mask::iou`).
pub fn hard_iou<B: Backend>(masks: Tensor<B, 4>, gt: Tensor<B, 3>) -> Vec<Vec<f32>> {
    let [k, n, h, w] = masks.dims();
    let m = masks.into_data().convert::<f32>().into_vec::<f32>().expect("f32 data");
    let g = gt.into_data().convert::<f32>().into_vec::<f32>().expect("f32 data");
    let px = h * w;
    (0..k)
        .map(|kk| {
            (0..n)
                .map(|nn| {
                    let (mut inter, mut union) = (0usize, 0usize);
                    for i in 0..px {
                        let a = m[(kk * n + nn) * px + i] > 0.5;
                        let b = g[nn * px + i] > 0.5;
                        inter += (a && b) as usize;
                        union += (a || b) as usize;
                    }
                    if union == 0 {
                        1.0
                    } else {
                        inter as f32 / union as f32
                    }
                })
                .collect()
        })
        .collect()
}

/// One sample of L_si: the refined masks' logits `refined_logits` [N, H, W] (differentiable),
/// the 0/1 ground truth `gt` [N, H, W], and the K responses' fixed 0/1 masks
/// `candidates` [K, N, H, W].
pub struct SiSample<B: Backend> {
    pub refined_logits: Tensor<B, 3>,
    pub gt: Tensor<B, 3>,
    pub candidates: Tensor<B, 4>,
}

/// L_si (Appendix B): per sample `-(1/(K N)) sum_k sum_n log sigma(scale (softIoU(sigmoid(M~^n), M_g^n)
/// - IoU(M_k^n, M_g^n)))`, mean over the samples. Soft IoU ([`soft_iou`]) on the refined
/// masks' sigmoid probabilities, hard IoU ([`hard_iou`]) for the fixed candidates
/// (SPEC 10.9); the gradient reaches only `refined_logits`.
pub fn si_loss<B: Backend>(samples: Vec<SiSample<B>>, scale: f64) -> Result<Tensor<B, 1>> {
    let count = samples.len();
    if count == 0 {
        return data_err("si_loss: no samples".into());
    }
    let mut total: Option<Tensor<B, 1>> = None;
    for (s, SiSample { refined_logits, gt, candidates }) in samples.into_iter().enumerate() {
        let [n, h, w] = refined_logits.dims();
        let [k, cn, ch, cw] = candidates.dims();
        if gt.dims() != [n, h, w] || [cn, ch, cw] != [n, h, w] || k == 0 || n == 0 {
            return data_err(format!(
                "si_loss: sample {s}: refined {:?}, gt {:?}, candidates {:?}",
                [n, h, w],
                gt.dims(),
                [k, cn, ch, cw]
            ));
        }
        let device = refined_logits.device();
        let gt = gt.detach();
        let hard: Vec<f32> = hard_iou(candidates, gt.clone()).concat();
        let hard = Tensor::<B, 2>::from_data(TensorData::new(hard, [k, n]), &device);
        let soft = soft_iou(activation::sigmoid(refined_logits), gt).reshape([1, n]).expand([k, n]);
        let loss = activation::log_sigmoid((soft - hard).mul_scalar(scale)).mean().neg();
        total = Some(match total {
            None => loss,
            Some(t) => t + loss,
        });
    }
    Ok(total.expect("at least one sample").div_scalar(count as f64))
}

/// How L_si pairs the `<seg>` groups of `y_tilde` and of each `y_k` with the ground-truth
/// targets (SPEC 10.17; the paper's L_si writes `M~^n`, `M_k^n`, `M_g^n` without saying how
/// an answer's n-th object meets the n-th target).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pairing {
    /// Hungarian matching on mask IoU ([`pair_with_targets`]), each answer on its own: the
    /// way the evaluator pairs predicted with ground-truth masks.
    #[default]
    Hungarian,
    /// The n-th `<seg>` group with the n-th target (the behaviour before issue 24).
    Positional,
}

/// For each of the `gts` targets, the index of the mask of `preds` paired with it (None: no
/// mask left for it). [`Pairing::Hungarian`]: the assignment maximizing the total IoU
/// (cost `1 - IoU`, `popen_core::mask::iou`, two empty masks = 1) solved by
/// `popen_core::assign::linear_sum_assignment` (SciPy's algorithm and tie-breaking: with all
/// IoUs equal, e.g. all 0, it keeps the positional pairs); `min(P, G)` targets are paired.
/// [`Pairing::Positional`]: target n gets mask n when there is one.
pub fn pair_with_targets(preds: &[Mask], gts: &[Mask], pairing: Pairing) -> Result<Vec<Option<usize>>> {
    match pairing {
        Pairing::Positional => Ok((0..gts.len()).map(|n| (n < preds.len()).then_some(n)).collect()),
        Pairing::Hungarian => {
            let mut cost = Vec::with_capacity(preds.len() * gts.len());
            for (p, pm) in preds.iter().enumerate() {
                for (g, gm) in gts.iter().enumerate() {
                    let iou = popen_core::mask::iou(pm, gm)
                        .map_err(|e| TrainError::Data(format!("mask {p} vs target {g}: {e}")))?;
                    cost.push(1.0 - iou);
                }
            }
            let pairs = popen_core::assign::linear_sum_assignment(&cost, preds.len(), gts.len())
                .map_err(|e| TrainError::Data(e.to_string()))?;
            let mut out = vec![None; gts.len()];
            for (p, g) in pairs {
                out[g] = Some(p);
            }
            Ok(out)
        }
    }
}

/// One sample's L_si terms ([`SiSample`]) from all its masks, paired by `pairing`:
/// `refined_logits` = the decoder's logits [H, W] of every `<seg>` group of `y_tilde`
/// (differentiable); `candidates[k]` = the K responses' 0/1 masks, one per group; `gts` the
/// ground-truth targets. The refined groups are paired with the targets on their hard masks
/// (logit > 0, i.e. probability > 0.5, what inference outputs); the terms run over the paired
/// targets (`min(#groups, #targets)` of them, in target order). Each response is paired with
/// the targets on its own; a target it leaves unpaired has an empty `M_k^n`. None when
/// `y_tilde` has no group or the sample no target (no L_si term).
pub fn si_sample<B: Backend>(
    refined_logits: Vec<Tensor<B, 2>>,
    candidates: &[&[Mask]],
    gts: &[Mask],
    pairing: Pairing,
) -> Result<Option<SiSample<B>>> {
    if refined_logits.is_empty() || gts.is_empty() {
        return Ok(None);
    }
    let [h, w] = refined_logits[0].dims();
    let sized = |m: &Mask| (m.height() as usize, m.width() as usize) == (h, w);
    if let Some(m) = gts.iter().chain(candidates.iter().flat_map(|c| c.iter())).find(|m| !sized(m)) {
        return data_err(format!("si_sample: a {}x{} mask for {h}x{w} logits", m.height(), m.width()));
    }
    if refined_logits.iter().any(|l| l.dims() != [h, w]) {
        return data_err("si_sample: refined logits of different sizes".into());
    }
    let device = refined_logits[0].device();
    let (targets, groups): (Vec<usize>, Vec<usize>) = match pairing {
        Pairing::Positional => (0..refined_logits.len().min(gts.len())).map(|n| (n, n)).unzip(),
        Pairing::Hungarian => {
            let hard: Vec<Mask> = refined_logits
                .iter()
                .map(|l| {
                    let v = l.clone().detach().into_data().convert::<f32>().into_vec::<f32>().expect("f32 data");
                    Mask::from_row_major(h as u32, w as u32, v.iter().map(|&x| (x > 0.0) as u8).collect())
                        .map_err(|e| TrainError::Data(e.to_string()))
                })
                .collect::<Result<_>>()?;
            pair_with_targets(&hard, gts, pairing)?
                .into_iter()
                .enumerate()
                .filter_map(|(t, g)| g.map(|g| (t, g)))
                .unzip()
        }
    };
    let n = targets.len();
    let px = h * w;
    let mut gt = Vec::with_capacity(n * px);
    for &t in &targets {
        gt.extend(gts[t].data().iter().map(|&b| b as f32));
    }
    let k = candidates.len();
    let mut cm = vec![0f32; k * n * px];
    for (kk, masks) in candidates.iter().enumerate() {
        let paired = pair_with_targets(masks, gts, pairing)?;
        for (nn, &t) in targets.iter().enumerate() {
            if let Some(i) = paired[t] {
                let o = (kk * n + nn) * px;
                for (j, &b) in masks[i].data().iter().enumerate() {
                    cm[o + j] = b as f32;
                }
            }
        }
    }
    let picked: Vec<Tensor<B, 2>> = groups.iter().map(|&g| refined_logits[g].clone()).collect();
    Ok(Some(SiSample {
        refined_logits: Tensor::stack::<3>(picked, 0),
        gt: Tensor::<B, 3>::from_data(TensorData::new(gt, [n, h, w]), &device),
        candidates: Tensor::<B, 4>::from_data(TensorData::new(cm, [k, n, h, w]), &device),
    }))
}
