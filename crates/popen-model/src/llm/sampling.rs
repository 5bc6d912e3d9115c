//! Batched generation from embedding prefixes: greedy, temperature and nucleus (top-p)
//! sampling with a KV cache, per-row stop tokens and per-row seeded RNG streams.
//!
//! POPEN samples K responses per question (SPEC 6, step 1) and decodes the refined response
//! with the gamma bias on its prefix (Eq. 5), from prefixes that PixelLM assembles as
//! embeddings (image tokens, seg embeddings, `p_hat`). Rows are left-padded into one batch;
//! positions count only real tokens, so a padded row generates exactly what it generates alone.

use burn::prelude::*;
use burn::tensor::{Bool, Int, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::llama::{AttnExtras, KvCache, Llama, LlamaError};

/// Decoding settings. Defaults: 64 new tokens, greedy (temperature 0), top_p 1, seed 0.
/// There is no top-k: this equals transformers' sampling with `top_k=0` (its generation
/// config defaults to 50), `temperature`, `top_p`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingConfig {
    /// Upper bound on emitted tokens per row, a sampled stop token included (as HF counts).
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax, lowest id on ties); > 0 divides the logits before top-p and sampling.
    pub temperature: f32,
    /// Nucleus mass in (0, 1], as transformers' `TopPLogitsWarper` (1 = off).
    pub top_p: f32,
    /// Row `r` draws from `ChaCha8Rng::seed_from_u64(seed)` on stream `r`.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { max_new_tokens: 64, temperature: 0.0, top_p: 1.0, seed: 0 }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<(), LlamaError> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(LlamaError::Input(format!(
                "sampling temperature {} must be finite and >= 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(LlamaError::Input(format!("sampling top_p {} must be in (0, 1]", self.top_p)));
        }
        Ok(())
    }
}

/// One row's generated continuation.
#[derive(Debug, Clone)]
pub struct Generation<B: Backend> {
    /// Emitted ids, without the stop token.
    pub ids: Vec<u32>,
    /// `log p(id)` of each emitted id under the model's own distribution (temperature 1, no
    /// top-p truncation), i.e. `log_softmax(logits)[id]` whatever the sampling settings: the
    /// quantity POPEN's token preference score and `p(y)` are built from.
    pub logprobs: Vec<f32>,
    /// `[ids.len(), hidden]`: the final-normed hidden state of each emitted token once fed back
    /// (the model's output at that token's position, as teacher forcing the row would give).
    pub hidden: Tensor<B, 2>,
    /// `[hidden]`: the final-normed hidden state at the prefix's last position, the one
    /// that predicted `ids[0]` (PixelLM reads a seg embedding from the state that predicts
    /// the seg token, so a group starting at `ids[0]` needs it).
    pub prefix_last: Tensor<B, 1>,
    /// The row sampled a stop id (not included in `ids`) before `max_new_tokens`.
    pub stopped: bool,
    /// The stop id it sampled, if any.
    pub stop_id: Option<u32>,
}

/// Generate continuations of a batch of embedding prefixes.
///
/// - `prefix`: input embeddings `[b, s, hidden]`, LEFT-padded (every row's last position real).
/// - `prefix_keep`: `[b, s]`, false = padding (never attended).
/// - `prefix_gamma`: optional `[b, s]` attention bias on the prefix keys (POPEN Eq. 5);
///   generated tokens get 0.
/// - `stop_ids`: a row stops at the first sampled id in this set. Stopped rows keep being fed
///   a masked padding token until every row is done.
///
/// Positions count only real tokens (`cumsum(keep) - 1`, as HF `generate` derives them from
/// the attention mask), so padding does not change a row's result; row `r` samples from its
/// own RNG stream, so batch composition does not either (given the row index).
pub fn generate<B: Backend>(
    model: &Llama<B>,
    prefix: Tensor<B, 3>,
    prefix_keep: Tensor<B, 2, Bool>,
    prefix_gamma: Option<Tensor<B, 2>>,
    cfg: &SamplingConfig,
    stop_ids: &[u32],
) -> Result<Vec<Generation<B>>, LlamaError> {
    generate_at(model, prefix, prefix_keep, None, prefix_gamma, cfg, stop_ids)
}

/// [`generate`] with explicit RoPE positions of the prefix (`[b][s]`; padding entries are
/// ignored): generated tokens continue from one past each row's largest real position.
/// PixelLM numbers every position of the expanded row, masked image padding included
/// (`arange`, no `position_ids` in its forward or `prepare_inputs_for_generation`), which
/// `cumsum(keep) - 1` would not reproduce.
pub fn generate_at<B: Backend>(
    model: &Llama<B>,
    prefix: Tensor<B, 3>,
    prefix_keep: Tensor<B, 2, Bool>,
    prefix_positions: Option<&[Vec<i64>]>,
    prefix_gamma: Option<Tensor<B, 2>>,
    cfg: &SamplingConfig,
    stop_ids: &[u32],
) -> Result<Vec<Generation<B>>, LlamaError> {
    cfg.validate()?;
    let p = prefill(model, prefix, prefix_keep, prefix_positions, prefix_gamma)?;
    generate_from(model, p, cfg, stop_ids)
}

/// [`generate_at`] continuing a [`Prefix`] already in the cache (POPEN's K samples share
/// their question's prefill, and the refined answer's prefix extends it).
pub fn generate_from<B: Backend>(
    model: &Llama<B>,
    prefix: Prefix<B>,
    cfg: &SamplingConfig,
    stop_ids: &[u32],
) -> Result<Vec<Generation<B>>, LlamaError> {
    cfg.validate()?;
    let [b, _, h] = prefix.last.dims();
    let device = prefix.last.device();
    let Prefix { mut keep_rows, next_pos: n_real, mut cache, last: hidden_prefix, gamma: prefix_gamma } = prefix;
    let keep_tensor = |rows: &[Vec<bool>]| keep_tensor(rows, &device);
    let mut gamma = prefix_gamma;
    let vocab = model.vocab_size();

    let mut rngs: Vec<ChaCha8Rng> = (0..b)
        .map(|r| {
            let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
            rng.set_stream(r as u64);
            rng
        })
        .collect();
    let mut ids: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut logprobs: Vec<Vec<f32>> = vec![Vec::new(); b];
    let mut stop_id: Vec<Option<u32>> = vec![None; b];
    let mut active = vec![true; b];
    let mut step_hidden: Vec<Tensor<B, 3>> = Vec::new();

    let mut logits = if cfg.max_new_tokens > 0 { Some(model.logits(hidden_prefix.clone())) } else { None };
    for step in 0..cfg.max_new_tokens {
        let Some(lg) = logits.take() else { break };
        let lg: Vec<f32> = lg
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| LlamaError::Input(format!("generate: reading logits: {e:?}")))?;
        let mut next = vec![0i64; b];
        let mut fed = vec![false; b];
        for r in (0..b).filter(|&r| active[r]) {
            let row = &lg[r * vocab..(r + 1) * vocab];
            if let Some(i) = row.iter().position(|v| v.is_nan() || *v == f32::INFINITY) {
                return Err(LlamaError::Input(format!(
                    "generate: row {r}, step {step}: logit of id {i} is {}",
                    row[i]
                )));
            }
            let t = choose(row, cfg, &mut rngs[r]);
            if stop_ids.contains(&t) {
                stop_id[r] = Some(t); // `active` becomes `fed` below, false for this row
                continue;
            }
            ids[r].push(t);
            logprobs[r].push(log_softmax_at(row, t as usize));
            next[r] = t as i64;
            fed[r] = true;
        }
        if !fed.iter().any(|&f| f) {
            break;
        }
        // Feed the emitted tokens back; stopped rows get a masked padding token.
        let positions: Vec<i64> =
            (0..b).map(|r| if fed[r] { (n_real[r] + ids[r].len() - 1) as i64 } else { 1 }).collect();
        for (r, k) in keep_rows.iter_mut().enumerate() {
            k.push(fed[r]);
        }
        gamma = gamma.map(|g| Tensor::cat(vec![g, Tensor::zeros([b, 1], &device)], 1));
        let extras = AttnExtras {
            positions: Some(Tensor::from_data(TensorData::new(positions, [b, 1]), &device)),
            key_keep: Some(keep_tensor(&keep_rows)),
            gamma: gamma.clone(),
        };
        let tok = Tensor::<B, 2, Int>::from_data(TensorData::new(next, [b, 1]), &device);
        let hid = model.forward_embeds(model.embed(tok), &extras, &mut cache)?;
        step_hidden.push(hid.clone());
        active = fed;
        if step + 1 < cfg.max_new_tokens {
            logits = Some(model.logits(hid));
        }
    }

    // Row r emitted at steps 0..len_r (a row emits every step until it stops).
    let all_hidden = (!step_hidden.is_empty()).then(|| Tensor::cat(step_hidden, 1));
    Ok(generations(hidden_prefix, ids, logprobs, stop_id, |r, n| match &all_hidden {
        Some(t) if n > 0 => t.clone().narrow(0, r, 1).narrow(1, 0, n).reshape([n, h]),
        _ => Tensor::<B, 2>::zeros([0, h], &device),
    }))
}

/// Both decoders' results: row r's ids, log-probs and stop, its prefix state
/// (`hidden_prefix` `[b, 1, h]`) and `hidden(r, n)`, the `[n, h]` states of its n emitted
/// tokens.
fn generations<B: Backend>(
    hidden_prefix: Tensor<B, 3>,
    ids: Vec<Vec<u32>>,
    logprobs: Vec<Vec<f32>>,
    stop_id: Vec<Option<u32>>,
    mut hidden: impl FnMut(usize, usize) -> Tensor<B, 2>,
) -> Vec<Generation<B>> {
    let h = hidden_prefix.dims()[2];
    ids.into_iter()
        .zip(logprobs)
        .zip(stop_id)
        .enumerate()
        .map(|(r, ((ids, logprobs), stop_id))| Generation {
            prefix_last: hidden_prefix.clone().narrow(0, r, 1).reshape([h]),
            hidden: hidden(r, ids.len()),
            ids,
            logprobs,
            stopped: stop_id.is_some(),
            stop_id,
        })
        .collect()
}

/// Greedy decoding that checks drafts instead of decoding token by token: the same ids as
/// [`generate_at`] with temperature 0 (up to floating-point rounding: several positions go
/// through the model at once), in fewer sequential forwards when a draft is right.
///
/// `drafts[r]` holds row r's draft continuations, in order of preference (POPEN's refined
/// answer y_tilde mostly repeats one of the K sampled answers). Each round feeds, per row,
/// the last emitted token followed by the rest of the first draft that agrees with all the ids
/// emitted so far (none: the token alone); the logits at every fed position give the greedy
/// token there, and the draft tokens are accepted while they equal it. The first greedy token
/// that differs is emitted and fed in the next round; the cache entries of the rejected draft
/// tokens are masked out for good (their keys are never attended again). Stop ids end a row
/// as in [`generate_at`]; every emitted id is fed once, so `hidden` is the same per token.
///
/// Returns the generations and the number of forwards after the prefix.
#[allow(clippy::too_many_arguments)]
pub fn greedy_with_drafts<B: Backend>(
    model: &Llama<B>,
    prefix: Tensor<B, 3>,
    prefix_keep: Tensor<B, 2, Bool>,
    prefix_positions: Option<&[Vec<i64>]>,
    prefix_gamma: Option<Tensor<B, 2>>,
    drafts: &[Vec<Vec<u32>>],
    max_new_tokens: usize,
    stop_ids: &[u32],
) -> Result<(Vec<Generation<B>>, usize), LlamaError> {
    let b = prefix.dims()[0];
    if drafts.len() != b {
        return Err(LlamaError::Input(format!("greedy_with_drafts: {} draft lists for {b} rows", drafts.len())));
    }
    let p = prefill(model, prefix, prefix_keep, prefix_positions, prefix_gamma)?;
    greedy_with_drafts_from(model, p, drafts, max_new_tokens, stop_ids)
}

/// [`greedy_with_drafts`] continuing a [`Prefix`] already in the cache.
pub fn greedy_with_drafts_from<B: Backend>(
    model: &Llama<B>,
    prefix: Prefix<B>,
    drafts: &[Vec<Vec<u32>>],
    max_new_tokens: usize,
    stop_ids: &[u32],
) -> Result<(Vec<Generation<B>>, usize), LlamaError> {
    let [b, _, h] = prefix.last.dims();
    if drafts.len() != b {
        return Err(LlamaError::Input(format!("greedy_with_drafts: {} draft lists for {b} rows", drafts.len())));
    }
    let device = prefix.last.device();
    let vocab = model.vocab_size();
    let Prefix { mut keep_rows, next_pos: n_real, mut cache, last: hidden_prefix, gamma: prefix_gamma } = prefix;
    let mut gamma = prefix_gamma;

    let host = |t: Tensor<B, 3>, what: &str| -> Result<Vec<f32>, LlamaError> {
        t.into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| LlamaError::Input(format!("greedy_with_drafts: reading {what}: {e:?}")))
    };
    let mut ids: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut logprobs: Vec<Vec<f32>> = vec![Vec::new(); b];
    let mut hiddens: Vec<Vec<Tensor<B, 1>>> = (0..b).map(|_| Vec::new()).collect();
    let mut stop_id: Vec<Option<u32>> = vec![None; b];
    // The emitted token each row still has to feed.
    let mut pending: Vec<Option<u32>> = vec![None; b];
    // Emit the greedy token of `row` unless the row is full or it is a stop id.
    let emit = |r: usize,
                row: &[f32],
                ids: &mut Vec<Vec<u32>>,
                logprobs: &mut Vec<Vec<f32>>,
                stop_id: &mut Vec<Option<u32>>|
     -> Result<Option<u32>, LlamaError> {
        if ids[r].len() >= max_new_tokens {
            return Ok(None);
        }
        if let Some(i) = row.iter().position(|v| v.is_nan() || *v == f32::INFINITY) {
            return Err(LlamaError::Input(format!(
                "greedy_with_drafts: row {r}, token {}: logit of id {i} is {}",
                ids[r].len(),
                row[i]
            )));
        }
        let t = argmax(row) as u32;
        if stop_ids.contains(&t) {
            stop_id[r] = Some(t);
            return Ok(None);
        }
        ids[r].push(t);
        logprobs[r].push(log_softmax_at(row, t as usize));
        Ok(Some(t))
    };
    if max_new_tokens > 0 {
        let lg = host(model.logits(hidden_prefix.clone()), "logits")?;
        for r in 0..b {
            pending[r] = emit(r, &lg[r * vocab..(r + 1) * vocab], &mut ids, &mut logprobs, &mut stop_id)?;
        }
    }
    let mut forwards = 0usize;
    while pending.iter().any(Option::is_some) {
        // Per row: the pending token, then the draft's next tokens (at most what the row may
        // still emit after the pending one).
        let blocks: Vec<Vec<u32>> = (0..b)
            .map(|r| {
                let Some(t) = pending[r] else { return vec![] };
                let n = ids[r].len();
                let room = max_new_tokens - n;
                let rest =
                    drafts[r].iter().find(|d| d.len() > n && d[..n] == ids[r][..]).map(|d| &d[n..]).unwrap_or(&[]);
                std::iter::once(t).chain(rest.iter().copied().take(room)).collect()
            })
            .collect();
        let width = blocks.iter().map(Vec::len).max().unwrap_or(0);
        let offset = keep_rows[0].len();
        let mut tokens = Vec::with_capacity(b * width);
        let mut positions = Vec::with_capacity(b * width);
        for (r, blk) in blocks.iter().enumerate() {
            for j in 0..width {
                let real = j < blk.len();
                tokens.push(if real { blk[j] as i64 } else { 0 });
                // The pending token is the row's (n - 1)-th emitted id.
                positions.push(if real { (n_real[r] + ids[r].len() - 1 + j) as i64 } else { 1 });
                keep_rows[r].push(real);
            }
        }
        gamma = gamma.map(|g| Tensor::cat(vec![g, Tensor::zeros([b, width], &device)], 1));
        let extras = AttnExtras {
            positions: Some(Tensor::from_data(TensorData::new(positions, [b, width]), &device)),
            key_keep: Some(keep_tensor(&keep_rows, &device)),
            gamma: gamma.clone(),
        };
        let tok = Tensor::<B, 2, Int>::from_data(TensorData::new(tokens, [b, width]), &device);
        let hid = model.forward_embeds(model.embed(tok), &extras, &mut cache)?;
        forwards += 1;
        let lg = host(model.logits(hid.clone()), "logits")?;
        for (r, blk) in blocks.iter().enumerate() {
            if blk.is_empty() {
                continue;
            }
            pending[r] = None;
            for j in 0..blk.len() {
                // blk[j] was fed at j: keep its state, then read the greedy token after it.
                hiddens[r].push(hid.clone().narrow(0, r, 1).narrow(1, j, 1).reshape([h]));
                let at = (r * width + j) * vocab;
                let next = emit(r, &lg[at..at + vocab], &mut ids, &mut logprobs, &mut stop_id)?;
                match next {
                    Some(t) if j + 1 < blk.len() && blk[j + 1] == t => continue, // the draft was right
                    Some(t) => {
                        pending[r] = Some(t);
                        // The rest of the block followed a wrong draft: never attend to it.
                        for k in j + 1..blk.len() {
                            keep_rows[r][offset + k] = false;
                        }
                        break;
                    }
                    None => {
                        for k in j + 1..blk.len() {
                            keep_rows[r][offset + k] = false;
                        }
                        break;
                    }
                }
            }
        }
    }
    let gens = generations(hidden_prefix, ids, logprobs, stop_id, |r, n| {
        if n > 0 {
            Tensor::stack(std::mem::take(&mut hiddens[r]), 0)
        } else {
            Tensor::<B, 2>::zeros([0, h], &device)
        }
    });
    Ok((gens, forwards))
}

/// A prefix in the KV cache, which the decoders continue ([`generate_from`],
/// [`greedy_with_drafts_from`]) and [`Prefix::extend`] lengthens: POPEN's ensemble prefills
/// the question once, repeats it for the K samples ([`Prefix::repeat_rows`]) and extends it
/// with the K answers for the refined one, instead of re-reading the question in every pass.
#[derive(Debug, Clone)]
pub struct Prefix<B: Backend> {
    /// The cached keys and values `[b, heads, t, head_dim]` per layer.
    pub cache: KvCache<B>,
    /// Per row, the keep flag of every cached position (false = padding, never attended).
    pub keep_rows: Vec<Vec<bool>>,
    /// Per row, the RoPE position of the next token (one past its largest real position).
    pub next_pos: Vec<usize>,
    /// `[b, t]` attention bias of the cached keys (Eq. 5), when any was given.
    pub gamma: Option<Tensor<B, 2>>,
    /// `[b, 1, h]`: the final-normed state at the last cached position.
    pub last: Tensor<B, 3>,
}

impl<B: Backend> Prefix<B> {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.keep_rows.len()
    }

    /// Number of cached positions (padding included).
    pub fn len(&self) -> usize {
        self.keep_rows.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each row `k` times in a row (row `r` becomes rows `r * k .. r * k + k`), as if the
    /// batch had held `k` copies of every row: one prefill serves K samples.
    pub fn repeat_rows(&self, k: usize) -> Self {
        let b = self.rows();
        let idx: Vec<i64> = (0..b as i64).flat_map(|r| std::iter::repeat_n(r, k)).collect();
        let device = self.last.device();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [b * k]), &device);
        let layers = self
            .cache
            .layers
            .iter()
            .map(|l| crate::llama::LayerCache {
                kv: l
                    .kv
                    .as_ref()
                    .map(|(kk, vv)| (kk.clone().select(0, idx.clone()), vv.clone().select(0, idx.clone()))),
            })
            .collect();
        Prefix {
            cache: KvCache { layers },
            keep_rows: self.keep_rows.iter().flat_map(|r| std::iter::repeat_n(r.clone(), k)).collect(),
            next_pos: self.next_pos.iter().flat_map(|&p| std::iter::repeat_n(p, k)).collect(),
            gamma: self.gamma.as_ref().map(|g| g.clone().select(0, idx.clone())),
            last: self.last.clone().select(0, idx),
        }
    }

    /// The prefix followed by `ext` (`[b, e, hidden]` input embeddings, `keep` `[b, e]`,
    /// RoPE `positions[r][j]` absolute, padding entries ignored, optional `gamma` `[b, e]`):
    /// one forward over the new positions against the cached ones. Returns the longer prefix
    /// and the final-normed states of the new positions `[b, e, h]`. Generation continues
    /// from the last position, so a prefix to decode from must end with a real position in
    /// every row (left-pad `ext`); a teacher-forced pass may right-pad it.
    pub fn extend(
        &self,
        model: &Llama<B>,
        ext: Tensor<B, 3>,
        keep: Tensor<B, 2, Bool>,
        positions: &[Vec<i64>],
        gamma: Option<Tensor<B, 2>>,
    ) -> Result<(Self, Tensor<B, 3>), LlamaError> {
        let [b, e, h] = ext.dims();
        if b != self.rows() {
            return Err(LlamaError::Input(format!("Prefix::extend: {b} rows for a prefix of {}", self.rows())));
        }
        if keep.dims() != [b, e] {
            return Err(LlamaError::Input(format!(
                "Prefix::extend: keep has shape {:?}, the extension is [{b}, {e}, {h}]",
                keep.dims()
            )));
        }
        if let Some(g) = &gamma {
            if g.dims() != [b, e] {
                return Err(LlamaError::Input(format!(
                    "Prefix::extend: gamma has shape {:?}, the extension is [{b}, {e}, {h}]",
                    g.dims()
                )));
            }
        }
        let device = ext.device();
        let keep_host = bool_flat(&keep, "Prefix::extend: keep")?;
        let (pos, next_pos) = explicit_positions(&keep_host, positions, &self.next_pos, e, "Prefix::extend")?;
        let mut keep_rows = self.keep_rows.clone();
        for (r, row) in keep_rows.iter_mut().enumerate() {
            row.extend_from_slice(&keep_host[r * e..(r + 1) * e]);
        }
        let t = self.len();
        let full_gamma = match (&self.gamma, gamma) {
            (None, None) => None,
            (old, new) => Some(Tensor::cat(
                vec![
                    old.clone().unwrap_or_else(|| Tensor::zeros([b, t], &device)),
                    new.unwrap_or_else(|| Tensor::zeros([b, e], &device)),
                ],
                1,
            )),
        };
        let mut cache = self.cache.clone();
        let extras = AttnExtras {
            positions: Some(Tensor::from_data(TensorData::new(pos, [b, e]), &device)),
            key_keep: Some(keep_tensor(&keep_rows, &device)),
            gamma: full_gamma.clone(),
        };
        let hidden = model.forward_embeds(ext, &extras, &mut cache)?;
        let last = if e > 0 { hidden.clone().narrow(1, e - 1, 1) } else { self.last.clone() };
        Ok((Prefix { cache, keep_rows, next_pos, gamma: full_gamma, last }, hidden))
    }
}

/// A bool tensor's flags on the host, row-major.
fn bool_flat<B: Backend>(t: &Tensor<B, 2, Bool>, what: &str) -> Result<Vec<bool>, LlamaError> {
    let flat: Vec<i64> = t
        .clone()
        .int()
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .map_err(|e| LlamaError::Input(format!("reading {what}: {e:?}")))?;
    Ok(flat.into_iter().map(|v| v != 0).collect())
}

/// Run a prefix through the model into a fresh cache: [`generate_at`]'s first step, public so
/// that several decodes can share it (see [`Prefix`]). Rows must be left-padded (each row's
/// last position real); positions as in [`generate_at`].
pub fn prefill<B: Backend>(
    model: &Llama<B>,
    prefix: Tensor<B, 3>,
    prefix_keep: Tensor<B, 2, Bool>,
    prefix_positions: Option<&[Vec<i64>]>,
    prefix_gamma: Option<Tensor<B, 2>>,
) -> Result<Prefix<B>, LlamaError> {
    let [b, s, _] = prefix.dims();
    let device = prefix.device();
    let (keep_host, n_real, pos) = prefix_positions_of(&prefix, &prefix_keep, prefix_positions, prefix_gamma.as_ref())?;
    let keep_rows = (0..b).map(|r| keep_host[r * s..(r + 1) * s].to_vec()).collect();
    let mut cache = model.new_cache();
    let extras = AttnExtras {
        positions: Some(Tensor::from_data(TensorData::new(pos, [b, s]), &device)),
        key_keep: Some(prefix_keep),
        gamma: prefix_gamma.clone(),
    };
    let hidden = model.forward_embeds(prefix, &extras, &mut cache)?;
    Ok(Prefix { keep_rows, next_pos: n_real, cache, gamma: prefix_gamma, last: hidden.narrow(1, s - 1, 1) })
}

/// The key mask `[b, t]` of per-row keep flags (all rows of length t).
fn keep_tensor<B: Backend>(rows: &[Vec<bool>], device: &B::Device) -> Tensor<B, 2, Bool> {
    let (b, t) = (rows.len(), rows[0].len());
    let flat: Vec<bool> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [b, t]), device)
}

/// The checks and positions both decoders start from: `prefix_keep` per row (host), each row's
/// next position, and the prefix positions `[b * s]` (HF's `cumsum(keep) - 1`, or the
/// caller's; padding entries 1).
fn prefix_positions_of<B: Backend>(
    prefix: &Tensor<B, 3>,
    prefix_keep: &Tensor<B, 2, Bool>,
    prefix_positions: Option<&[Vec<i64>]>,
    prefix_gamma: Option<&Tensor<B, 2>>,
) -> Result<(Vec<bool>, Vec<usize>, Vec<i64>), LlamaError> {
    let [b, s, h] = prefix.dims();
    if prefix_keep.dims() != [b, s] {
        return Err(LlamaError::Input(format!(
            "generate: prefix_keep has shape {:?}, prefix is [{b}, {s}, {h}]",
            prefix_keep.dims()
        )));
    }
    if let Some(g) = prefix_gamma {
        if g.dims() != [b, s] {
            return Err(LlamaError::Input(format!(
                "generate: prefix_gamma has shape {:?}, prefix is [{b}, {s}, {h}]",
                g.dims()
            )));
        }
    }
    let keep_host = bool_flat(prefix_keep, "generate: prefix_keep")?;
    if b > 0 && s > 0 {
        if let Some(r) = (0..b).find(|&r| !keep_host[r * s + s - 1]) {
            return Err(LlamaError::Input(format!(
                "generate: prefix row {r} ends with padding; rows must be left-padded"
            )));
        }
    }

    // Per-row next position and the prefix positions: HF-style `cumsum(keep) - 1` by
    // default (padding positions get 1: never seen), or the caller's.
    let mut n_real = vec![0usize; b];
    let mut pos = Vec::with_capacity(b * s);
    match prefix_positions {
        None => {
            for r in 0..b {
                for j in 0..s {
                    if keep_host[r * s + j] {
                        pos.push(n_real[r] as i64);
                        n_real[r] += 1;
                    } else {
                        pos.push(1);
                    }
                }
            }
        }
        Some(p) => {
            (pos, n_real) = explicit_positions(&keep_host, p, &vec![0; b], s, "generate: prefix")?;
        }
    }
    Ok((keep_host, n_real, pos))
}

/// Caller-given positions `p[r][j]` of `[b, s]` new positions with host keep flags (row-major):
/// the flat positions (padding entries clamped to >= 0, never seen) and each row's next
/// position, one past its largest real one (at least `start[r]`). Errors on a wrong shape or
/// a negative real position, prefixed by `what`.
fn explicit_positions(
    keep: &[bool],
    p: &[Vec<i64>],
    start: &[usize],
    s: usize,
    what: &str,
) -> Result<(Vec<i64>, Vec<usize>), LlamaError> {
    let b = start.len();
    if p.len() != b || p.iter().any(|row| row.len() != s) {
        return Err(LlamaError::Input(format!("{what}: positions must be [{b}][{s}]")));
    }
    let mut next = start.to_vec();
    let mut pos = Vec::with_capacity(b * s);
    for r in 0..b {
        for j in 0..s {
            let v = p[r][j];
            if keep[r * s + j] {
                if v < 0 {
                    return Err(LlamaError::Input(format!("{what}: negative position {v} in row {r}")));
                }
                next[r] = next[r].max(v as usize + 1);
            }
            pos.push(v.max(0));
        }
    }
    Ok((pos, next))
}

/// `log_softmax(row)[i]`, in f64 (max-shifted log-sum-exp).
fn log_softmax_at(row: &[f32], i: usize) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    (row[i] as f64 - lse) as f32
}

/// Argmax, lowest id on ties (torch's argmax convention).
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Pick the next id of one row: greedy at temperature 0; otherwise logits / temperature, then
/// transformers' `TopPLogitsWarper` (sort ascending, drop tokens whose cumulative probability
/// is <= 1 - top_p, always keep the most likely), then one draw from the renormalised softmax.
fn choose(row: &[f32], cfg: &SamplingConfig, rng: &mut ChaCha8Rng) -> u32 {
    if cfg.temperature == 0.0 {
        return argmax(row) as u32;
    }
    let t = cfg.temperature as f64;
    let scaled: Vec<f64> = row.iter().map(|&v| v as f64 / t).collect();
    let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scaled.iter().map(|&v| (v - max).exp()).collect();
    let total: f64 = weights.iter().sum();

    // Ascending by logit; on ties the higher id first, so the last (always kept) entry is the
    // greedy choice and top_p -> 0 reproduces greedy decoding exactly.
    let mut order: Vec<usize> = (0..row.len()).collect();
    let mut kept: Vec<usize> = if cfg.top_p < 1.0 {
        order.sort_by(|&a, &b| scaled[a].total_cmp(&scaled[b]).then(b.cmp(&a)));
        let cut = 1.0 - cfg.top_p as f64;
        let mut cum = 0.0;
        let mut first_kept = order.len() - 1;
        for (k, &i) in order.iter().enumerate() {
            cum += weights[i] / total;
            if cum > cut {
                first_kept = k;
                break;
            }
        }
        order.split_off(first_kept)
    } else {
        order
    };
    kept.retain(|&i| weights[i] > 0.0);
    if kept.is_empty() {
        return argmax(row) as u32;
    }
    let mass: f64 = kept.iter().map(|&i| weights[i]).sum();
    let mut u = rng.random::<f64>() * mass;
    for &i in &kept {
        u -= weights[i];
        if u < 0.0 {
            return i as u32;
        }
    }
    *kept.last().expect("non-empty") as u32
}
