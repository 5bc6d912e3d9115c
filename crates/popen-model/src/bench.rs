//! Timing of a LLaMA's prefill and greedy decoding with the KV cache (`popen bench-decode`,
//! `make bench-cpu`): the workload `tools/reference/bench_decode.py` runs in transformers, with
//! the same prompt ids, so that the two can be compared in one round on one machine.
//!
//! - A prompt of `prompt` ids ([`prompt_ids`], the same formula on both sides), repeated over
//!   `batch` rows, no padding.
//! - `generate(n)` = prefill + `n` greedy tokens (no stop token; every step computes the
//!   log-probabilities and hidden states POPEN needs, as [`crate::sampling::generate`] does).
//! - Per decoded token: `(T(n) - T(1)) / (n - 1)`; prefill: `T(1)` (one forward over the
//!   prompt and the first token's logits). transformers is timed the same way
//!   (`generate(max_new_tokens = min_new_tokens = n)`), so both include what each framework
//!   does per step.

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::{Bool, Int, TensorData};
use serde::Serialize;

use crate::llama::{Llama, LlamaError};
use crate::sampling::{generate, SamplingConfig};

/// The benchmark's prompt: `n` ids spread over the vocabulary (skipping the first and last
/// 100 ids, where special tokens live, when the vocabulary has more than 200).
/// tools/reference/bench_decode.py uses the same formula.
pub fn prompt_ids(n: usize, vocab: usize) -> Vec<u32> {
    let (offset, span) = if vocab > 200 { (100, vocab - 200) } else { (0, vocab.max(1)) };
    (0..n).map(|i| ((i * 7919 + 13) % span + offset) as u32).collect()
}

/// Milliseconds of `generate` with `new_tokens` greedy tokens on `batch` copies of the prompt.
pub fn time_generate<B: Backend>(
    model: &Llama<B>,
    batch: usize,
    prompt: usize,
    new_tokens: usize,
) -> Result<f64, LlamaError> {
    let device = model.device();
    let ids: Vec<i64> = prompt_ids(prompt, model.vocab_size()).into_iter().map(i64::from).collect();
    let flat: Vec<i64> = (0..batch).flat_map(|_| ids.iter().copied()).collect();
    let t0 = Instant::now();
    let x = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [batch, prompt]), &device);
    let emb = model.model.embed_tokens.forward(x);
    let keep = Tensor::<B, 2, Bool>::from_data(TensorData::new(vec![true; batch * prompt], [batch, prompt]), &device);
    let cfg = SamplingConfig { max_new_tokens: new_tokens, temperature: 0.0, top_p: 1.0, seed: 0 };
    let out = generate(model, emb, keep, None, &cfg, &[])?;
    // Everything the caller gets is on the host (ids, log-probs) or synced by reading a value.
    let _ = out.last().map(|g| g.hidden.clone().into_data());
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

/// One workload's timings (milliseconds, one entry per timed iteration).
#[derive(Debug, Clone, Serialize)]
pub struct DecodeTiming {
    pub workload: String,
    pub batch: usize,
    pub prompt: usize,
    pub new_tokens: usize,
    /// Per iteration: ms per decoded token ((T(n) - T(1)) / (n - 1)), or the prefill's ms.
    pub ms: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).expect("finite timings"));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

impl DecodeTiming {
    pub fn median_ms(&self) -> f64 {
        median(&self.ms)
    }
}

/// Decode workload: ms per greedy token after a `prompt`-token prompt, `batch` rows; `iters`
/// timed iterations after one warm-up.
pub fn decode<B: Backend>(
    model: &Llama<B>,
    batch: usize,
    prompt: usize,
    new_tokens: usize,
    iters: usize,
) -> Result<DecodeTiming, LlamaError> {
    if new_tokens < 2 {
        return Err(LlamaError::Input("bench decode needs new_tokens >= 2".into()));
    }
    time_generate(model, batch, prompt, new_tokens)?;
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let one = time_generate(model, batch, prompt, 1)?;
        let n = time_generate(model, batch, prompt, new_tokens)?;
        ms.push(((n - one) / (new_tokens - 1) as f64).max(0.0));
    }
    Ok(DecodeTiming { workload: format!("decode b{batch} p{prompt}"), batch, prompt, new_tokens, ms })
}

/// Prefill workload: ms of one forward over a `prompt`-token prompt (+ the first token).
pub fn prefill<B: Backend>(
    model: &Llama<B>,
    batch: usize,
    prompt: usize,
    iters: usize,
) -> Result<DecodeTiming, LlamaError> {
    time_generate(model, batch, prompt, 1)?;
    let ms = (0..iters).map(|_| time_generate(model, batch, prompt, 1)).collect::<Result<Vec<_>, _>>()?;
    Ok(DecodeTiming { workload: format!("prefill b{batch} p{prompt}"), batch, prompt, new_tokens: 1, ms })
}
