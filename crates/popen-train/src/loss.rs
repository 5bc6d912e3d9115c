//! PixelLM's SFT losses (PIXELLM.md "Losses and training recipe"; transcribed from its
//! `model/PixelLM.py` and checked against that PyTorch code in
//! `tools/reference/sft_loss_fixture.py`):
//!
//! ```text
//! loss = ce_weight * CE(text) + bce_weight * sum_m BCE_m / (M + 1e-8) + dice_weight * sum_m DICE_m / (M + 1e-8)
//! BCE_m  = mean over pixels of binary_cross_entropy_with_logits(logit, target)
//! DICE_m = 1 - (2 * sum(s/1000 * t) + 1e-6) / (sum(s/1000) + sum(t/1000) + 1e-6),  s = sigmoid(logit)
//! ```
//!
//! CE is the mean token cross-entropy over every answer token of the batch (Hugging Face's
//! causal-LM loss: prompt positions are ignored, padding too).

use burn::prelude::*;
use burn::tensor::activation;

/// Per-mask binary cross-entropy with logits, mean over pixels: [1].
pub fn bce_mean<B: Backend>(logits: Tensor<B, 2>, target: Tensor<B, 2>) -> Tensor<B, 1> {
    // max(x, 0) - x t + log(1 + exp(-|x|)), PyTorch's stable form.
    let pos = logits.clone().clamp_min(0.0);
    let soft = activation::softplus(logits.clone().abs().neg(), 1.0);
    (pos - logits * target + soft).mean()
}

/// Per-mask DICE loss on sigmoid probabilities with PixelLM's scale 1000 and eps 1e-6: [1].
pub fn dice<B: Backend>(logits: Tensor<B, 2>, target: Tensor<B, 2>) -> Tensor<B, 1> {
    const SCALE: f64 = 1000.0;
    const EPS: f64 = 1e-6;
    let s = activation::sigmoid(logits).div_scalar(SCALE);
    let t = target.div_scalar(SCALE);
    let num = (s.clone() * t.clone().mul_scalar(SCALE)).sum().mul_scalar(2.0);
    let den = s.sum() + t.sum();
    (num.add_scalar(EPS) / den.add_scalar(EPS)).neg().add_scalar(1.0)
}

/// Mean negative log-likelihood of the answer tokens: `logprobs` [b, max] as
/// `PixelLm::response_logprobs` returns them, `lens[r]` valid entries in row r. Returns the
/// mean [1] and the token count.
pub fn text_ce<B: Backend>(logprobs: Tensor<B, 2>, lens: &[usize]) -> (Tensor<B, 1>, usize) {
    let [b, max] = logprobs.dims();
    let device = logprobs.device();
    let mut w = Vec::with_capacity(b * max);
    for r in 0..b {
        for k in 0..max {
            w.push(if k < lens.get(r).copied().unwrap_or(0) { 1.0f32 } else { 0.0 });
        }
    }
    let count: usize = lens.iter().map(|&l| l.min(max)).sum();
    let mask = Tensor::<B, 2>::from_data(TensorData::new(w, [b, max]), &device);
    let total = (logprobs * mask).sum().neg();
    (total.div_scalar(count.max(1) as f64), count)
}

/// The three parts of PixelLM's loss, already weighted, and their sum.
#[derive(Debug, Clone)]
pub struct LossParts<B: Backend> {
    pub total: Tensor<B, 1>,
    pub ce: Tensor<B, 1>,
    pub bce: Tensor<B, 1>,
    pub dice: Tensor<B, 1>,
    pub tokens: usize,
    pub masks: usize,
}

/// PixelLM's combined loss from answer log-probs and (logit, target) mask pairs.
pub fn pixellm_loss<B: Backend>(
    logprobs: Tensor<B, 2>,
    lens: &[usize],
    masks: Vec<(Tensor<B, 2>, Tensor<B, 2>)>,
    weights: (f32, f32, f32),
) -> LossParts<B> {
    let device = logprobs.device();
    let (ce, tokens) = text_ce(logprobs, lens);
    let n = masks.len();
    let zero = || Tensor::<B, 1>::zeros([1], &device);
    let (mut bce, mut dc) = (zero(), zero());
    for (logit, target) in masks {
        bce = bce + bce_mean(logit.clone(), target.clone());
        dc = dc + dice(logit, target);
    }
    let denom = n as f64 + 1e-8;
    let ce = ce.mul_scalar(weights.0);
    let bce = bce.div_scalar(denom).mul_scalar(weights.1);
    let dice = dc.div_scalar(denom).mul_scalar(weights.2);
    LossParts { total: ce.clone() + bce.clone() + dice.clone(), ce, bce, dice, tokens, masks: n }
}
