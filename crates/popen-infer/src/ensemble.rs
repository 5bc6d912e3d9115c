//! POPEN's preference-based ensemble (SPEC 6 steps 1-6, SPEC 7): inference, and the pieces
//! popen-train's `ensemble-train` reuses, so training and inference build the same sequences.
//!
//! Sequence layout (one function each, [`text_rows`] and [`seg_rows`]):
//!
//! ```text
//! text pass:  [chat prompt: system, USER: <im_start> I <im_end> x ASSISTANT:]
//!             [y_1 </s>] [y_2 </s>] .. [y_K </s>]   gamma = sigma(tau_k^i) - 0.5 on y_k's tokens, 0 on </s>
//!             [p_hat]                               (absent when the model has none)
//!             -> greedy y_tilde
//! seg pass:   text pass prefix without gamma, then
//!             [f_1^1 .. f_K^N]                       seg_feedback(f), gamma = sigma(eta_k^n) - 0.5
//!             [y_tilde </s>]                         teacher-forced; f_tilde read at its <seg> groups
//! ```
//!
//! Each y_k is the sampled ids exactly as generated (after the prompt's "ASSISTANT:"), closed
//! by the stop token `</s>` as the model emits it, so the K answers read as K finished turns.
//! The seg pass keeps tau's gamma off (SPEC 6 step 5: gamma is non-zero only on `f_k^n`).
//! Step 1 samples the K answers of every item of a batch in ONE `generate` call (rows
//! `item * K + k`, KV cache, row `r` on RNG stream `r`); the text pass generates all items'
//! `y_tilde` in one greedy call; the seg pass is one teacher-forced forward.
//!
//! All three passes start with the same chat prompt, and its keys and values do not depend
//! on what follows (causal attention; gamma only biases the keys of later pieces). With
//! [`EnsembleSettings::share_prompt`] (the default) the prompt is prefilled once per item
//! ([`Questions`]): the K samples continue copies of its cache, the text pass and the seg
//! pass extend it with their own pieces. The states equal re-reading the prompt in every pass
//! up to floating-point rounding (test `shared_prompt_equals_rereading`).

use burn::prelude::*;
use burn::tensor::TensorData;
use image::RgbImage;
use popen_core::mask::Mask;
use popen_model::infer::{binarize, Prediction, Predictor};
use popen_model::pixellm::{ImageFeatures, Padding, Part, PixelLmError, Segment};
use popen_model::sampling::{self, Prefix, SamplingConfig};
use popen_model::tokenizer;
use serde::{Deserialize, Serialize};

use crate::scores::{gamma_of, sentence_ids, sentence_scores, token_scores};

type MResult<T> = std::result::Result<T, PixelLmError>;

fn inp(e: impl std::fmt::Display) -> PixelLmError {
    PixelLmError::Input(e.to_string())
}

/// Ensemble inference settings (also the `[ensemble]` part of `EnsembleConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnsembleSettings {
    /// K sampled responses (paper: 3).
    pub k: usize,
    /// Temperature of the K samples (paper silent; project default 0.7).
    pub temperature: f32,
    /// Nucleus mass of the K samples (1 = off).
    pub top_p: f32,
    /// RNG seed of the K samples (row r of a batch draws stream r).
    pub seed: u64,
    /// Longest sampled and refined answer in tokens.
    pub max_new_tokens: usize,
    /// Apply the gamma biases (Eqs. 5-6); false = the paper's "without gamma" ablation.
    pub gamma: bool,
    /// Not in the paper (off by default): when the refined answer y_tilde has no complete seg
    /// group, or a malformed one, while a candidate has groups, output the candidate with the
    /// highest mean token log-probability (its text and masks) instead. A model too small to
    /// read K answers in context (the CPU demo's tiny LLM) otherwise returns broken y_tilde.
    pub fallback: bool,
    /// Decode y_tilde by checking the K answers as drafts, several tokens per forward (the
    /// same greedy ids up to floating-point rounding, fewer sequential steps: y_tilde mostly
    /// repeats one of them). false = token by token.
    pub draft: bool,
    /// Prefill each item's chat prompt (image tokens and question) once and let the K samples,
    /// the text pass and the seg pass continue its KV cache (the same states up to
    /// floating-point rounding). false = every pass re-reads the prompt.
    pub share_prompt: bool,
    /// Feed every `f_k^n` back in the seg pass (Eq. 6, the default); false = the paper's
    /// "without segmentation embedding ensemble" ablation: the seg pass reads the K answers
    /// and p_hat but not their seg embeddings.
    pub seg_feedback: bool,
}

impl Default for EnsembleSettings {
    fn default() -> Self {
        EnsembleSettings {
            k: 3,
            temperature: 0.7,
            top_p: 1.0,
            seed: 0,
            max_new_tokens: 96,
            gamma: true,
            fallback: false,
            draft: true,
            share_prompt: true,
            seg_feedback: true,
        }
    }
}

impl EnsembleSettings {
    /// The gamma biases of the text pass's K answers (from tau), when gamma is on.
    pub fn tau<'a>(&self, scores: &'a Scores) -> Option<&'a [Vec<f32>]> {
        self.gamma.then_some(scores.tau.as_slice())
    }
    /// The gamma biases of the seg pass's fed-back `f_k^n` (from eta), when gamma is on.
    pub fn eta<'a>(&self, scores: &'a Scores) -> Option<&'a [Vec<f32>]> {
        self.gamma.then_some(scores.eta.as_slice())
    }
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.k == 0 {
            return Err("ensemble k must be >= 1".into());
        }
        self.sampling().validate().map_err(|e| e.to_string())
    }
    pub fn sampling(&self) -> SamplingConfig {
        SamplingConfig {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
        }
    }
    fn greedy(&self) -> SamplingConfig {
        SamplingConfig { max_new_tokens: self.max_new_tokens, temperature: 0.0, top_p: 1.0, seed: self.seed }
    }
}

/// One sampled response y_k (host data only, so it can be moved between backends).
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Generated ids (without the stop token).
    pub ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// Positions in `ids` of each complete seg group.
    pub groups: Vec<Vec<usize>>,
    /// Per group `f_k^n`, scales concatenated (`scales * out_dim`).
    pub f: Vec<Vec<f32>>,
    /// Per group its binary mask at the image's size.
    pub masks: Vec<Mask>,
    /// Per mask the decoder's predicted IoU.
    pub mask_scores: Vec<f32>,
    /// The answer in shard format (`<seg>`).
    pub answer: String,
}

/// tau per token and eta per seg group of one item's K responses (SPEC 6.2, 6.4, 10.7,
/// 10.12, 10.15).
#[derive(Debug, Clone)]
pub struct Scores {
    pub tau: Vec<Vec<f32>>,
    pub eta: Vec<Vec<f32>>,
}

/// A batch's questions (item `i` asks `instructions[i]` about image `i`) as the ensemble's
/// passes start them: with `share_prompt`, the chat prompts prefilled once (left-padded, one
/// row per item), which every pass continues; without, every pass re-reads them.
pub struct Questions<'a, B: Backend> {
    pub instructions: Vec<&'a str>,
    pub prompt: Option<Prefix<B>>,
}

impl<'a, B: Backend> Questions<'a, B> {
    pub fn new(
        pred: &Predictor<B>,
        feats: &ImageFeatures<B>,
        instructions: &[&'a str],
        share_prompt: bool,
    ) -> MResult<Self> {
        let prompt = if share_prompt {
            let rows: Vec<Vec<Part<B>>> =
                instructions.iter().enumerate().map(|(i, x)| pred.prompt_parts(x, i)).collect::<MResult<_>>()?;
            Some(pred.model.prefill(&pred.model.assemble(&rows, Some(feats), Padding::Left)?)?)
        } else {
            None
        };
        Ok(Questions { instructions: instructions.to_vec(), prompt })
    }

    /// Per item, the chat prompt `k` times in a row (rows `item * k + j`), to sample from.
    pub fn repeated(&self, pred: &Predictor<B>, feats: &ImageFeatures<B>, k: usize) -> MResult<Prefix<B>> {
        match &self.prompt {
            Some(p) => Ok(p.repeat_rows(k)),
            None => {
                let rows = self.full_rows(pred, vec![Vec::new(); self.instructions.len()])?;
                let rows: Vec<Vec<Part<B>>> = rows.iter().flat_map(|r| std::iter::repeat_n(r.clone(), k)).collect();
                Ok(pred.model.prefill(&pred.model.assemble(&rows, Some(feats), Padding::Left)?)?)
            }
        }
    }

    /// Per item, the chat prompt followed by `tails[i]`, as a prefix to decode from.
    pub fn prefix(
        &self,
        pred: &Predictor<B>,
        feats: &ImageFeatures<B>,
        tails: Vec<Vec<Part<B>>>,
    ) -> MResult<Prefix<B>> {
        match &self.prompt {
            Some(p) if tails.iter().all(Vec::is_empty) => Ok(p.clone()),
            Some(p) => Ok(pred.model.extend(p, &tails, None, Padding::Left)?.0),
            None => {
                let rows = self.full_rows(pred, tails)?;
                Ok(pred.model.prefill(&pred.model.assemble(&rows, Some(feats), Padding::Left)?)?)
            }
        }
    }

    /// Per item, the chat prompt followed by `tails[i]`, teacher-forced (right-padded): the
    /// final-normed states of the tails' positions and the assembly whose `piece_starts`
    /// index them, per row `[tail pieces]` (the prompt's pieces first when not shared).
    pub fn forward(
        &self,
        pred: &Predictor<B>,
        feats: &ImageFeatures<B>,
        tails: Vec<Vec<Part<B>>>,
    ) -> MResult<(Tensor<B, 3>, Vec<Vec<usize>>)> {
        match &self.prompt {
            Some(p) => {
                let (_, hidden, asm) = pred.model.extend(p, &tails, None, Padding::Right)?;
                Ok((hidden, asm.piece_starts))
            }
            None => {
                let n_tail: Vec<usize> = tails.iter().map(Vec::len).collect();
                let rows = self.full_rows(pred, tails)?;
                let asm = pred.model.assemble(&rows, Some(feats), Padding::Right)?;
                let hidden = pred.model.forward_hidden(&asm)?;
                let starts = asm.piece_starts.iter().zip(n_tail).map(|(st, n)| st[st.len() - n..].to_vec()).collect();
                Ok((hidden, starts))
            }
        }
    }

    fn full_rows(&self, pred: &Predictor<B>, tails: Vec<Vec<Part<B>>>) -> MResult<Vec<Vec<Part<B>>>> {
        self.instructions
            .iter()
            .zip(tails)
            .enumerate()
            .map(|(i, (x, t))| {
                let mut r = pred.prompt_parts(x, i)?;
                r.extend(t);
                Ok(r)
            })
            .collect()
    }
}

/// Step 1: K responses per item in one batched `generate` call, with each group's `f_k^n`
/// and mask.
pub fn sample_candidates<B: Backend>(
    pred: &Predictor<B>,
    feats: &ImageFeatures<B>,
    questions: &Questions<'_, B>,
    s: &EnsembleSettings,
) -> MResult<Vec<Vec<Candidate>>> {
    let model = pred.model;
    let cfg = model.config();
    let n_items = questions.instructions.len();
    let prefix = questions.repeated(pred, feats, s.k)?;
    let gens =
        sampling::generate_from(&model.llm, prefix, &s.sampling(), &[pred.tokens.eos]).map_err(PixelLmError::from)?;
    // Every row's groups at once: one seg_embeddings + one decoder call.
    let mut objects = Vec::new();
    let mut hidden_rows = Vec::new();
    let mut scans = Vec::with_capacity(gens.len());
    let h = cfg.llm.hidden_size;
    let longest = gens.iter().map(|g| g.ids.len()).max().unwrap_or(0) + 1;
    for (r, g) in gens.iter().enumerate() {
        let scan = tokenizer::seg_groups(&g.ids, &pred.tokens);
        // States [prefix last, generated 0..]: index k predicts generated token k.
        let st = Tensor::cat(vec![g.prefix_last.clone().reshape([1, h]), g.hidden.clone()], 0);
        let n = st.dims()[0];
        let st = if n < longest {
            let dev = st.device();
            Tensor::cat(vec![st, Tensor::zeros([longest - n, h], &dev)], 0)
        } else {
            st
        };
        hidden_rows.push(st.reshape([1, longest, h]));
        for grp in &scan.groups {
            objects.push((r, grp.iter().map(|p| p + 1).collect::<Vec<_>>()));
        }
        scans.push(scan.groups);
    }
    let (fs, masks) = if objects.is_empty() {
        (vec![], (vec![], vec![]))
    } else {
        let hidden = Tensor::cat(hidden_rows, 0);
        let f = model.seg_embeddings(hidden, &objects)?;
        let idx: Vec<usize> = objects.iter().map(|o| o.0 / s.k).collect();
        let (logits, _) = model.decode_masks(feats, f.clone(), &idx)?;
        let masks = binarize(logits)?;
        let [n, sc, d] = f.dims();
        let fv =
            f.reshape([n, sc * d]).into_data().convert::<f32>().into_vec::<f32>().map_err(|e| inp(format!("{e:?}")))?;
        (fv.chunks(sc * d).map(<[f32]>::to_vec).collect::<Vec<_>>(), masks)
    };
    let (masks, mask_scores) = masks;
    let (mut f_it, mut m_it, mut s_it) = (fs.into_iter(), masks.into_iter(), mask_scores.into_iter());
    let mut out: Vec<Vec<Candidate>> = (0..n_items).map(|_| Vec::with_capacity(s.k)).collect();
    for ((r, g), groups) in gens.into_iter().enumerate().zip(scans) {
        let n = groups.len();
        let text = pred.tokenizer.decode(&g.ids, false).map_err(inp)?;
        let answer = tokenizer::answer_text(&text, cfg.seg_group_len());
        out[r / s.k].push(Candidate {
            ids: g.ids,
            logprobs: g.logprobs,
            groups,
            f: f_it.by_ref().take(n).collect(),
            masks: m_it.by_ref().take(n).collect(),
            mask_scores: s_it.by_ref().take(n).collect(),
            answer,
        });
    }
    Ok(out)
}

/// Steps 2 and 4: tau (token probability + its sentence's mean, min-max to [-1, 1] over the
/// K responses) and eta (the group's sentence mean, min-max over the item's groups).
pub fn scores<B: Backend>(pred: &Predictor<B>, cands: &[Candidate]) -> MResult<Scores> {
    let probs: Vec<Vec<f32>> = cands.iter().map(|c| c.logprobs.iter().map(|l| l.exp()).collect()).collect();
    let mut sents = Vec::with_capacity(cands.len());
    for c in cands {
        let pieces: Vec<String> = c
            .ids
            .iter()
            .map(|&i| pred.tokenizer.decode(&[i], false))
            .collect::<std::result::Result<_, _>>()
            .map_err(inp)?;
        sents.push(sentence_ids(&pieces));
    }
    let groups: Vec<Vec<Vec<usize>>> = cands.iter().map(|c| c.groups.clone()).collect();
    let tau = token_scores(&probs, &sents).map_err(inp)?;
    let eta = sentence_scores(&probs, &sents, &groups).map_err(inp)?;
    Ok(Scores { tau, eta })
}

/// Step 3's input sequence for one item (see the module docs); `tau = None` (or
/// `gamma = false`) leaves the bias off.
pub fn text_rows<B: Backend>(
    pred: &Predictor<B>,
    instruction: &str,
    image: usize,
    cands: &[Candidate],
    tau: Option<&[Vec<f32>]>,
) -> MResult<Vec<Part<B>>> {
    let mut parts = pred.prompt_parts(instruction, image)?;
    parts.extend(answer_parts(pred, cands, tau));
    Ok(parts)
}

/// [`text_rows`] after the chat prompt: the K answers (gamma from tau) and `p_hat`.
pub fn answer_parts<B: Backend>(pred: &Predictor<B>, cands: &[Candidate], tau: Option<&[Vec<f32>]>) -> Vec<Part<B>> {
    let mut parts = Vec::with_capacity(cands.len() + 1);
    for (k, c) in cands.iter().enumerate() {
        let mut ids = c.ids.clone();
        ids.push(pred.tokens.eos);
        match tau {
            Some(t) => {
                let mut g: Vec<f32> = t[k].iter().map(|&v| gamma_of(v)).collect();
                g.push(0.0);
                parts.push(Part::with_gamma(Segment::Tokens(ids), g));
            }
            None => parts.push(Part::new(Segment::Tokens(ids))),
        }
    }
    if pred.model.prompt_embeddings.is_some() {
        parts.push(Part::new(Segment::Prompt));
    }
    parts
}

/// Step 5's input sequence for one item: the text rows without gamma, every `f_k^n` fed back
/// (gamma from eta), then `y_tilde` + `</s>`. Returns the parts; y_tilde is the last piece.
pub fn seg_rows<B: Backend>(
    pred: &Predictor<B>,
    instruction: &str,
    image: usize,
    cands: &[Candidate],
    eta: Option<&[Vec<f32>]>,
    y_tilde: &[u32],
    feedback: bool,
) -> MResult<Vec<Part<B>>> {
    let mut parts = pred.prompt_parts(instruction, image)?;
    parts.extend(seg_tail(pred, cands, eta, y_tilde, feedback));
    Ok(parts)
}

/// [`seg_rows`] after the chat prompt; y_tilde is the last piece. `feedback` false leaves
/// the `f_k^n` out ([`EnsembleSettings::seg_feedback`]).
pub fn seg_tail<B: Backend>(
    pred: &Predictor<B>,
    cands: &[Candidate],
    eta: Option<&[Vec<f32>]>,
    y_tilde: &[u32],
    feedback: bool,
) -> Vec<Part<B>> {
    let mut parts = answer_parts(pred, cands, None);
    let fs: Vec<&Vec<f32>> = cands.iter().flat_map(|c| c.f.iter()).collect();
    if feedback && !fs.is_empty() && pred.model.seg_feedback.is_some() {
        let d = fs[0].len();
        let flat: Vec<f32> = fs.iter().flat_map(|v| v.iter().copied()).collect();
        let dev = pred.model.llm.model.embed_tokens.weight.device();
        let t = Tensor::<B, 2>::from_data(TensorData::new(flat, [fs.len(), d]), &dev);
        match eta {
            Some(e) => {
                let g: Vec<f32> = e.iter().flatten().map(|&v| gamma_of(v)).collect();
                parts.push(Part::with_gamma(Segment::SegFeedback(t), g));
            }
            None => parts.push(Part::new(Segment::SegFeedback(t))),
        }
    }
    let mut ids = y_tilde.to_vec();
    ids.push(pred.tokens.eos);
    parts.push(Part::new(Segment::Tokens(ids)));
    parts
}

/// What the ensemble produced for one item.
#[derive(Debug, Clone)]
pub struct EnsembleOutput {
    pub prediction: Prediction,
    pub candidates: Vec<Candidate>,
    pub scores: Scores,
    /// With [`EnsembleSettings::fallback`]: the candidate output instead of y_tilde.
    pub fell_back: Option<usize>,
}

/// The candidate [`EnsembleSettings::fallback`] outputs: among those with at least one
/// complete seg group and a mask per group, the highest mean token log-probability (first on
/// ties); None when no candidate has one.
pub fn best_candidate(cands: &[Candidate]) -> Option<usize> {
    let mean = |c: &Candidate| {
        if c.logprobs.is_empty() {
            f32::NEG_INFINITY
        } else {
            c.logprobs.iter().sum::<f32>() / c.logprobs.len() as f32
        }
    };
    let mut best: Option<(usize, f32)> = None;
    for (k, c) in cands.iter().enumerate() {
        if c.groups.is_empty() || c.masks.len() != c.groups.len() {
            continue;
        }
        let m = mean(c);
        if best.is_none_or(|(_, b)| m > b) {
            best = Some((k, m));
        }
    }
    best.map(|(k, _)| k)
}

/// The whole ensemble (SPEC 6 steps 1-6) on a batch of (image, instruction) pairs.
pub fn predict<B: Backend>(
    pred: &Predictor<B>,
    items: &[(&RgbImage, &str)],
    s: &EnsembleSettings,
) -> MResult<Vec<EnsembleOutput>> {
    s.validate().map_err(inp)?;
    let images: Vec<&RgbImage> = items.iter().map(|(im, _)| *im).collect();
    let pre = pred.preprocess(&images)?;
    let feats = pred.encode(&pre)?;
    let instrs: Vec<&str> = items.iter().map(|(_, i)| *i).collect();
    let questions = Questions::new(pred, &feats, &instrs, s.share_prompt)?;
    let cands = sample_candidates(pred, &feats, &questions, s)?;
    let scores: Vec<Scores> = cands.iter().map(|c| scores(pred, c)).collect::<MResult<_>>()?;
    let refined = refine(pred, &feats, &questions, &cands, &scores, s)?;
    let tails: Vec<Vec<Part<B>>> =
        (0..items.len()).map(|i| seg_tail(pred, &cands[i], s.eta(&scores[i]), &refined[i].0, s.seg_feedback)).collect();
    let (hidden, piece_starts) = questions.forward(pred, &feats, tails)?;
    let mut objects = Vec::new();
    let mut per_row = Vec::new();
    let mut issues = Vec::new();
    for (r, g) in refined.iter().enumerate() {
        let scan = tokenizer::seg_groups(&g.0, &pred.tokens);
        issues.push(scan.issues.iter().map(|i| i.to_string()).collect::<Vec<_>>());
        per_row.push(scan.groups.len());
        let st = *piece_starts[r].last().expect("y_tilde is the last piece");
        for grp in scan.groups {
            objects.push((r, grp.iter().map(|p| p + st).collect::<Vec<_>>()));
        }
    }
    let (masks, mscores) = if objects.is_empty() {
        (vec![], vec![])
    } else {
        let f = pred.model.seg_embeddings(hidden, &objects)?;
        let idx: Vec<usize> = objects.iter().map(|o| o.0).collect();
        let (logits, _) = pred.model.decode_masks(&feats, f, &idx)?;
        binarize(logits)?
    };
    let (mut m_it, mut s_it) = (masks.into_iter(), mscores.into_iter());
    let group = pred.model.config().seg_group_len();
    let mut out = Vec::with_capacity(items.len());
    for (((r, (ids, logprobs, stopped)), cands), sc) in refined.into_iter().enumerate().zip(cands).zip(scores) {
        let text = pred.tokenizer.decode(&ids, false).map_err(inp)?;
        let answer = tokenizer::answer_text(&text, group);
        let mut prediction = Prediction {
            answer,
            ids,
            logprobs,
            masks: m_it.by_ref().take(per_row[r]).collect(),
            mask_scores: s_it.by_ref().take(per_row[r]).collect(),
            seg_issues: std::mem::take(&mut issues[r]),
            stopped,
        };
        let mut fell_back = None;
        if s.fallback && (prediction.masks.is_empty() || !prediction.seg_issues.is_empty()) {
            if let Some(k) = best_candidate(&cands) {
                let c = &cands[k];
                prediction = Prediction {
                    answer: c.answer.clone(),
                    ids: c.ids.clone(),
                    logprobs: c.logprobs.clone(),
                    masks: c.masks.clone(),
                    mask_scores: c.mask_scores.clone(),
                    seg_issues: vec![],
                    stopped: true,
                };
                fell_back = Some(k);
            }
        }
        out.push(EnsembleOutput { prediction, candidates: cands, scores: sc, fell_back });
    }
    Ok(out)
}

/// Step 3 for a batch: greedy `y_tilde` from the text rows, one generate call.
/// Returns (ids, logprobs, stopped) per item.
pub fn refine<B: Backend>(
    pred: &Predictor<B>,
    feats: &ImageFeatures<B>,
    questions: &Questions<'_, B>,
    cands: &[Vec<Candidate>],
    scores: &[Scores],
    s: &EnsembleSettings,
) -> MResult<Vec<(Vec<u32>, Vec<f32>, bool)>> {
    let tails = (0..cands.len()).map(|i| answer_parts(pred, &cands[i], s.tau(&scores[i]))).collect();
    let prefix = questions.prefix(pred, feats, tails)?;
    let gens = if s.draft {
        // Drafts: the K answers, likeliest (mean token log-prob) first, each closed by EOS so
        // that a y_tilde repeating one can also stop in the same forward.
        let drafts: Vec<Vec<Vec<u32>>> = cands
            .iter()
            .map(|cs| {
                let mut order: Vec<usize> = (0..cs.len()).collect();
                let mean = |c: &Candidate| {
                    if c.logprobs.is_empty() {
                        f32::NEG_INFINITY
                    } else {
                        c.logprobs.iter().sum::<f32>() / c.logprobs.len() as f32
                    }
                };
                order.sort_by(|&a, &b| mean(&cs[b]).total_cmp(&mean(&cs[a])));
                order
                    .iter()
                    .map(|&k| cs[k].ids.iter().copied().chain(std::iter::once(pred.tokens.eos)).collect())
                    .collect()
            })
            .collect();
        sampling::greedy_with_drafts_from(&pred.model.llm, prefix, &drafts, s.max_new_tokens, &[pred.tokens.eos])
            .map_err(PixelLmError::from)?
            .0
    } else {
        sampling::generate_from(&pred.model.llm, prefix, &s.greedy(), &[pred.tokens.eos]).map_err(PixelLmError::from)?
    };
    Ok(gens.into_iter().map(|g| (g.ids, g.logprobs, g.stopped)).collect())
}

/// Step 5's rows for a batch and, per row, the index of the y_tilde piece.
pub fn seg_batch<B: Backend>(
    pred: &Predictor<B>,
    instrs: &[&str],
    cands: &[Vec<Candidate>],
    scores: &[Scores],
    refined: &[(Vec<u32>, Vec<f32>, bool)],
    s: &EnsembleSettings,
) -> MResult<(Vec<Vec<Part<B>>>, Vec<usize>)> {
    let mut rows = Vec::with_capacity(instrs.len());
    let mut last = Vec::with_capacity(instrs.len());
    for (i, x) in instrs.iter().enumerate() {
        let r = seg_rows(pred, x, i, &cands[i], s.eta(&scores[i]), &refined[i].0, s.seg_feedback)?;
        last.push(r.len() - 1);
        rows.push(r);
    }
    Ok((rows, last))
}
