//! Warmup then decay, as PixelLM trains (DeepSpeed `WarmupDecayLR`, `warmup_type: linear`,
//! `warmup_min_lr` = `min_lr`, `warmup_max_lr` = `lr`): with i the 0-based optimizer step,
//!
//! - i < warmup: `min_lr + (lr - min_lr) * i / warmup` (so the very first step has `min_lr`);
//! - after: `min_lr + (lr - min_lr) * g`, g = `(total - i) / (total - warmup)` for linear
//!   decay, `(1 + cos(pi * (i - warmup) / (total - warmup))) / 2` for cosine, 1 for constant.
//!
//! A pure function of the step, so a resumed run gets exactly the same rates.

use crate::config::Decay;

/// Learning rate of optimizer step `step` (0-based) of `total` steps.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64, min_lr: f64, decay: Decay) -> f64 {
    let delta = peak - min_lr;
    if step < warmup {
        return min_lr + delta * step as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let gamma = match decay {
        Decay::Constant => 1.0,
        Decay::Linear => (total.saturating_sub(step) as f64 / span).max(0.0),
        Decay::Cosine => {
            let t = ((step - warmup) as f64 / span).clamp(0.0, 1.0);
            0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        }
    };
    min_lr + delta * gamma
}
