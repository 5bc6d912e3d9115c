//! The preference-optimization losses of stage 2 (`dpo`, SPEC section 5): the text DPO loss
//! on P_t (Eq. 2) over RLHF-V's dense weighted sequence log-likelihood (Eq. 3), and the
//! segmentation preference loss on P_s (Eq. 4).
//!
//! Pure, backend-generic functions: tensors in (differentiable where the policy computed
//! them), a loss tensor and plain metric values out. Checked against the PyTorch
//! transcription `tools/reference/popen_eqs_fixture.py` (values and autograd gradients).
//!
//! ```text
//! Eq. 3   log pi(y|I,x) = (sum_{i not in L_y} log p_i + lambda * sum_{i in L_y} log p_i) / Z
//!           Z = |y|                          (SeqNorm::Length, the paper's Eq. 3)
//!           Z = (|y| - |L_y|) + lambda |L_y|  (SeqNorm::WeightedCount, RLHF-V's average)
//! Eq. 2   L_t = -mean log sigma( beta_t (pi(y_c) - ref(y_c)) - beta_t (pi(y) - ref(y)) )
//! Eq. 4   r_w = beta_s (cos(f_theta^m, f_ref^w) - cos(f_ref^m, f_ref^w))
//!         r_l = beta_s (cos(f_theta^m, f_ref^l) - cos(f_ref^m, f_ref^l))
//!         L_s = -mean_batch (1/N) sum_n log sigma(r_w^n - r_l^n) * 1(score(M_ref^w) >= score(M_theta^m))
//! ```

use std::collections::BTreeSet;

use burn::prelude::*;
use burn::tensor::activation;
use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// `beta_t` of Eq. 2 (SPEC 9).
pub const BETA_T: f64 = 0.5;
/// `lambda` of Eq. 3 (SPEC 9).
pub const LAMBDA: f64 = 5.0;
/// `beta_s` of Eq. 4 (SPEC 9).
pub const BETA_S: f64 = 10.0;
/// Norm floor of [`cosine_rows`], as `torch.nn.functional.cosine_similarity`'s `eps`.
pub const COS_EPS: f64 = 1e-8;

/// The divisor of Eq. 3's weighted sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeqNorm {
    /// The paper's Eq. 3: divide by the response length `|y|`.
    #[default]
    Length,
    /// RLHF-V's `compute_weighted_logp(use_average=True)`: divide by the sum of the token
    /// weights, `(|y| - |L_y|) + lambda |L_y|`, so the result is a weighted mean log-prob.
    WeightedCount,
}

fn data_err<T>(msg: String) -> Result<T> {
    Err(TrainError::Data(msg))
}

/// Eq. 3: the dense weighted sequence log-likelihood of each row.
///
/// `logprobs` [b, max]: per-token log-probs of the response (as
/// `PixelLm::response_logprobs` returns them; differentiable for the policy, plain for the
/// reference); `lens[r]` valid entries in row r; `changed[r]` = `L_y` of row r, positions in
/// `0..lens[r]` (duplicates count once); `lambda` the weight of changed tokens. Returns [b].
pub fn weighted_logp<B: Backend>(
    logprobs: Tensor<B, 2>,
    lens: &[usize],
    changed: &[Vec<usize>],
    lambda: f64,
    norm: SeqNorm,
) -> Result<Tensor<B, 1>> {
    let [b, max] = logprobs.dims();
    if lens.len() != b || changed.len() != b {
        return data_err(format!(
            "weighted_logp: {b} rows but {} lengths and {} changed-position lists",
            lens.len(),
            changed.len()
        ));
    }
    let mut w = vec![0f32; b * max];
    let mut denom = Vec::with_capacity(b);
    for r in 0..b {
        let n = lens[r];
        if n == 0 || n > max {
            return data_err(format!("weighted_logp: row {r} has length {n}, allowed 1..={max}"));
        }
        let set: BTreeSet<usize> = changed[r].iter().copied().collect();
        if let Some(&bad) = set.iter().find(|&&i| i >= n) {
            return data_err(format!("weighted_logp: row {r}: changed position {bad} outside 0..{n}"));
        }
        for k in 0..n {
            w[r * max + k] = if set.contains(&k) { lambda as f32 } else { 1.0 };
        }
        denom.push(match norm {
            SeqNorm::Length => n as f32,
            SeqNorm::WeightedCount => ((n - set.len()) as f64 + lambda * set.len() as f64) as f32,
        });
    }
    let device = logprobs.device();
    let w = Tensor::<B, 2>::from_data(TensorData::new(w, [b, max]), &device);
    let denom = Tensor::<B, 1>::from_data(TensorData::new(denom, [b]), &device);
    Ok((logprobs * w).sum_dim(1).reshape([b]) / denom)
}

/// TRL DPOTrainer's metrics of one batch (means over its rows), under TRL's names by
/// [`DpoMetrics::pairs`]. Rewards are `beta * (log pi - log pi_ref)`; `logps_*` are the
/// policy's Eq. 3 values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpoMetrics {
    pub loss: f32,
    pub rewards_chosen: f32,
    pub rewards_rejected: f32,
    /// Share of rows whose chosen reward is strictly above the rejected one.
    pub rewards_accuracies: f32,
    pub rewards_margins: f32,
    pub logps_chosen: f32,
    pub logps_rejected: f32,
}

impl DpoMetrics {
    /// `(TRL name, value)` pairs: `loss`, `rewards/chosen`, `rewards/rejected`,
    /// `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`.
    pub fn pairs(&self) -> [(&'static str, f32); 7] {
        [
            ("loss", self.loss),
            ("rewards/chosen", self.rewards_chosen),
            ("rewards/rejected", self.rewards_rejected),
            ("rewards/accuracies", self.rewards_accuracies),
            ("rewards/margins", self.rewards_margins),
            ("logps/chosen", self.logps_chosen),
            ("logps/rejected", self.logps_rejected),
        ]
    }
}

/// Eq. 2's result: the loss [1] (mean over rows), TRL's metrics and the per-row rewards.
#[derive(Clone, Debug)]
pub struct TextDpo<B: Backend> {
    pub loss: Tensor<B, 1>,
    pub metrics: DpoMetrics,
    pub chosen_rewards: Vec<f32>,
    pub rejected_rewards: Vec<f32>,
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().expect("f32 tensor data")
}

fn mean(v: &[f32]) -> f32 {
    v.iter().map(|&x| x as f64).sum::<f64>() as f32 / v.len().max(1) as f32
}

/// Eq. 2, the text DPO loss: `-mean log sigma(beta ((pi_c - ref_c) - (pi_r - ref_r)))`.
///
/// All four inputs are [b] sequence log-likelihoods (Eq. 3 via [`weighted_logp`]); chosen =
/// the corrected response `y_c`, rejected = the model's `y`. The reference values are
/// detached here (pi_ref is frozen), so gradients reach only the policy's.
pub fn text_dpo<B: Backend>(
    policy_chosen: Tensor<B, 1>,
    policy_rejected: Tensor<B, 1>,
    ref_chosen: Tensor<B, 1>,
    ref_rejected: Tensor<B, 1>,
    beta: f64,
) -> Result<TextDpo<B>> {
    let b = policy_chosen.dims()[0];
    for (name, t) in
        [("policy_rejected", &policy_rejected), ("ref_chosen", &ref_chosen), ("ref_rejected", &ref_rejected)]
    {
        if t.dims()[0] != b {
            return data_err(format!("text_dpo: {name} has {} rows, policy_chosen {b}", t.dims()[0]));
        }
    }
    if b == 0 {
        return data_err("text_dpo: empty batch".into());
    }
    let chosen = (policy_chosen.clone() - ref_chosen.detach()).mul_scalar(beta);
    let rejected = (policy_rejected.clone() - ref_rejected.detach()).mul_scalar(beta);
    let loss = activation::log_sigmoid(chosen.clone() - rejected.clone()).mean().neg();
    let cr = values(chosen.detach());
    let rr = values(rejected.detach());
    let acc: Vec<f32> = cr.iter().zip(&rr).map(|(c, r)| if c > r { 1.0 } else { 0.0 }).collect();
    let margins: Vec<f32> = cr.iter().zip(&rr).map(|(c, r)| c - r).collect();
    let metrics = DpoMetrics {
        loss: values(loss.clone().detach())[0],
        rewards_chosen: mean(&cr),
        rewards_rejected: mean(&rr),
        rewards_accuracies: mean(&acc),
        rewards_margins: mean(&margins),
        logps_chosen: mean(&values(policy_chosen.detach())),
        logps_rejected: mean(&values(policy_rejected.detach())),
    };
    Ok(TextDpo { loss, metrics, chosen_rewards: cr, rejected_rewards: rr })
}

/// Row-wise cosine similarity of two [t, d] matrices: `a.b / (max(|a|, eps) max(|b|, eps))`
/// with `eps` = [`COS_EPS`]. Returns [t].
pub fn cosine_rows<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 1> {
    let t = a.dims()[0];
    let dot = (a.clone() * b.clone()).sum_dim(1);
    let na = a.powi_scalar(2).sum_dim(1).sqrt().clamp_min(COS_EPS);
    let nb = b.powi_scalar(2).sum_dim(1).sqrt().clamp_min(COS_EPS);
    (dot / (na * nb)).reshape([t])
}

/// [t, scales, dim] -> [t, scales * dim]: one vector per object, the concatenation of its
/// per-scale embeddings (SPEC 10.14), as `PixelLm::seg_embeddings` lays them out.
fn concat_scales<B: Backend>(f: Tensor<B, 3>) -> Tensor<B, 2> {
    let [t, s, c] = f.dims();
    f.reshape([t, s * c])
}

/// Eq. 4's inputs for a batch of P_s records, targets of all records in order.
///
/// `f_*` are [T, scales, dim] segmentation embeddings (T = total targets of the batch):
/// `f_theta_m` the policy's on each target's median image (differentiable), `f_ref_w`,
/// `f_ref_m`, `f_ref_l` the recorded reference embeddings on the best, median and worst
/// images of `L_s^n`. `ref_best_score[n]` is the phase's score (Eq. 1 term or boundary IoU,
/// SPEC 10.10) of the reference's best mask, `policy_median_score[n]` that of the policy's
/// mask on the median image; `counts[s]` is the number N of targets of record s.
pub struct SegDpoInput<'a, B: Backend> {
    pub f_theta_m: Tensor<B, 3>,
    pub f_ref_w: Tensor<B, 3>,
    pub f_ref_m: Tensor<B, 3>,
    pub f_ref_l: Tensor<B, 3>,
    pub ref_best_score: &'a [f32],
    pub policy_median_score: &'a [f32],
    pub counts: &'a [usize],
}

/// Means over all targets of the batch (switched-off targets included), and counts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SegDpoMetrics {
    pub loss: f32,
    pub reward_w: f32,
    pub reward_l: f32,
    /// Mean of `r_w - r_l`.
    pub margin: f32,
    /// Share of targets with `r_w > r_l`.
    pub accuracy: f32,
    /// Targets whose indicator is 1, out of `targets`.
    pub active: usize,
    pub targets: usize,
}

/// Eq. 4's result: the loss [1], metrics, and per target `r_w`, `r_l` and the indicator.
#[derive(Clone, Debug)]
pub struct SegDpo<B: Backend> {
    pub loss: Tensor<B, 1>,
    pub metrics: SegDpoMetrics,
    pub r_w: Vec<f32>,
    pub r_l: Vec<f32>,
    pub indicator: Vec<bool>,
}

/// Eq. 4, the segmentation preference loss with `beta_s = beta`:
/// `-mean_records (1/N) sum_n log sigma(r_w^n - r_l^n) 1(ref_best_score >= policy_median_score)`.
///
/// The cosines run over the concatenation of all scales (SPEC 10.14); the reference
/// embeddings are detached, so the gradient reaches only `f_theta_m`. A switched-off target
/// still counts in its record's N, and contributes exactly 0 to the loss and the gradient.
pub fn seg_dpo<B: Backend>(input: SegDpoInput<'_, B>, beta: f64) -> Result<SegDpo<B>> {
    let SegDpoInput { f_theta_m, f_ref_w, f_ref_m, f_ref_l, ref_best_score, policy_median_score, counts } = input;
    let dims = f_theta_m.dims();
    let t = dims[0];
    for (name, d) in [("f_ref_w", f_ref_w.dims()), ("f_ref_m", f_ref_m.dims()), ("f_ref_l", f_ref_l.dims())] {
        if d != dims {
            return data_err(format!("seg_dpo: {name} is {d:?}, f_theta_m {dims:?}"));
        }
    }
    if ref_best_score.len() != t || policy_median_score.len() != t {
        return data_err(format!(
            "seg_dpo: {t} targets but {} reference and {} policy scores",
            ref_best_score.len(),
            policy_median_score.len()
        ));
    }
    if counts.is_empty() || counts.contains(&0) || counts.iter().sum::<usize>() != t {
        return data_err(format!("seg_dpo: target counts {counts:?} must be >= 1 each and sum to {t}"));
    }
    let device = f_theta_m.device();
    let indicator: Vec<bool> = ref_best_score.iter().zip(policy_median_score).map(|(r, p)| r >= p).collect();
    // Weight of target n of record s: 1(n active) / (N_s * records).
    let records = counts.len() as f32;
    let mut weights = Vec::with_capacity(t);
    for &n in counts {
        for _ in 0..n {
            let k = weights.len();
            weights.push(if indicator[k] { 1.0 / (n as f32 * records) } else { 0.0 });
        }
    }
    let weights = Tensor::<B, 1>::from_data(TensorData::new(weights, [t]), &device);

    let ft = concat_scales(f_theta_m);
    let (fw, fm, fl) =
        (concat_scales(f_ref_w).detach(), concat_scales(f_ref_m).detach(), concat_scales(f_ref_l).detach());
    let r_w = (cosine_rows(ft.clone(), fw.clone()) - cosine_rows(fm.clone(), fw)).mul_scalar(beta);
    let r_l = (cosine_rows(ft, fl.clone()) - cosine_rows(fm, fl)).mul_scalar(beta);
    let loss = (activation::log_sigmoid(r_w.clone() - r_l.clone()) * weights).sum().neg();

    let rw = values(r_w.detach());
    let rl = values(r_l.detach());
    let margins: Vec<f32> = rw.iter().zip(&rl).map(|(w, l)| w - l).collect();
    let acc: Vec<f32> = margins.iter().map(|&m| if m > 0.0 { 1.0 } else { 0.0 }).collect();
    let metrics = SegDpoMetrics {
        loss: values(loss.clone().detach())[0],
        reward_w: mean(&rw),
        reward_l: mean(&rl),
        margin: mean(&margins),
        accuracy: mean(&acc),
        active: indicator.iter().filter(|&&a| a).count(),
        targets: t,
    };
    Ok(SegDpo { loss, metrics, r_w: rw, r_l: rl, indicator })
}
