//! The ensemble's preference scores (SPEC section 6, Eqs. 5-6): tau per token and eta per
//! `<seg>` group of the K sampled responses of one sample, and the attention bias gamma they
//! become. Pure host maths on token probabilities; the ensemble's inference
//! ([`crate::ensemble`]) and popen-train's `ensemble-train` both read them.
//!
//! Checked against the PyTorch transcription `tools/reference/popen_eqs_fixture.py`
//! (popen-train's `popen_eqs` tests, through `popen_train::ensemble_loss`).
//!
//! ```text
//! tau_k^i = p_k^i + mean_{j in sentence(i)} p_k^j         (SPEC 6.2, 10.7, 10.12)
//! eta_k^n = mean_{j in sentence(<seg> group n)} p_k^j       (SPEC 6.4, 10.15)
//! both min-max normalized to [-1, 1] over all values of the K responses of one sample
//! gamma   = sigmoid(score) - 0.5                            (Eqs. 5-6)
//! ```
//!
//! The gamma of Eq. 5 enters the model through `popen_model::pixellm::Part::with_gamma` (a
//! per-key bias, SPEC 10.6); the biased attention itself is `popen_model::llama`'s and is
//! checked there against transformers (fixture "gamma" of the model tests).

use crate::{InferError, Result};

fn data_err<T>(msg: String) -> Result<T> {
    Err(InferError::Data(msg))
}

/// Characters that end a sentence (SPEC 10.12).
fn is_terminator(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '\n')
}

/// Sentence index of each token of one response (SPEC 10.12), from the decoded text of each
/// token (`pieces[i]` = the tokenizer's decoding of token i alone).
///
/// A token containing '.', '!', '?' or a newline closes the current sentence; the next token
/// holding any other non-whitespace character opens the next sentence. Tokens made only of
/// terminators and whitespace (".", "\n\n") stay with the sentence they close, so a `<seg>`
/// group before the full stop belongs to the sentence it ends.
pub fn sentence_ids<S: AsRef<str>>(pieces: &[S]) -> Vec<usize> {
    let (mut cur, mut closed) = (0usize, false);
    let mut ids = Vec::with_capacity(pieces.len());
    for p in pieces {
        let p = p.as_ref();
        if closed && p.chars().any(|c| !is_terminator(c) && !c.is_whitespace()) {
            cur += 1;
            closed = false;
        }
        ids.push(cur);
        if p.chars().any(is_terminator) {
            closed = true;
        }
    }
    ids
}

/// Min-max normalization to [-1, 1]: `2 (v - min) / (max - min) - 1`; all values equal
/// (or a single value) -> 0 (no preference), empty -> empty (SPEC 10.7).
pub fn minmax_signed(values: &[f32]) -> Vec<f32> {
    let (lo, hi) =
        values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v as f64), hi.max(v as f64)));
    if values.is_empty() || hi <= lo {
        return vec![0.0; values.len()];
    }
    values.iter().map(|&v| (2.0 * (v as f64 - lo) / (hi - lo) - 1.0) as f32).collect()
}

/// The attention bias of a normalized score: `sigmoid(score) - 0.5` (Eqs. 5-6).
pub fn gamma_of(score: f32) -> f32 {
    (1.0 / (1.0 + (-(score as f64)).exp()) - 0.5) as f32
}

/// Mean probability of each sentence of one response: (sentence id -> mean), by id.
fn sentence_means(probs: &[f32], sentences: &[usize]) -> Vec<f64> {
    let n = sentences.iter().copied().max().map_or(0, |m| m + 1);
    let (mut sum, mut cnt) = (vec![0f64; n], vec![0usize; n]);
    for (&p, &s) in probs.iter().zip(sentences) {
        sum[s] += p as f64;
        cnt[s] += 1;
    }
    sum.iter().zip(&cnt).map(|(s, &c)| if c == 0 { 0.0 } else { s / c as f64 }).collect()
}

fn check_rows(probs: &[Vec<f32>], sentences: &[Vec<usize>]) -> Result<()> {
    if probs.len() != sentences.len() {
        return data_err(format!("{} probability rows, {} sentence-id rows", probs.len(), sentences.len()));
    }
    for (k, (p, s)) in probs.iter().zip(sentences).enumerate() {
        if p.len() != s.len() {
            return data_err(format!("response {k}: {} probabilities, {} sentence ids", p.len(), s.len()));
        }
    }
    Ok(())
}

/// Normalized token preference scores tau (SPEC 6.2, 10.7) of the K responses of one sample.
///
/// `probs[k][i]` = the predicted probability (not log) of token i of response k;
/// `sentences[k]` = [`sentence_ids`] of response k. `tau_k^i = p_k^i + mean p over the
/// sentence holding token i` (the token itself included), then min-max normalized to [-1, 1]
/// over all tokens of all K responses. The gamma of Eq. 5 is [`gamma_of`] of each value.
pub fn token_scores(probs: &[Vec<f32>], sentences: &[Vec<usize>]) -> Result<Vec<Vec<f32>>> {
    check_rows(probs, sentences)?;
    let mut raw = Vec::new();
    for (p, s) in probs.iter().zip(sentences) {
        let means = sentence_means(p, s);
        raw.extend(p.iter().zip(s).map(|(&pi, &si)| (pi as f64 + means[si]) as f32));
    }
    Ok(split_like(&minmax_signed(&raw), probs.iter().map(Vec::len)))
}

/// Normalized sentence preference scores eta (SPEC 6.4, 10.7, 10.15) of the `<seg>` groups
/// of the K responses of one sample.
///
/// `groups[k]` = the token positions of each `<seg>` group of response k
/// (`popen_model::tokenizer::seg_group_positions`); a group belongs to the sentence of its
/// first token. `eta` = mean probability of that sentence (all its tokens, the group's
/// included), min-max normalized to [-1, 1] over all groups of all K responses. The gamma
/// of Eq. 6 is [`gamma_of`] of each value.
pub fn sentence_scores(
    probs: &[Vec<f32>],
    sentences: &[Vec<usize>],
    groups: &[Vec<Vec<usize>>],
) -> Result<Vec<Vec<f32>>> {
    check_rows(probs, sentences)?;
    if groups.len() != probs.len() {
        return data_err(format!("{} responses, {} group lists", probs.len(), groups.len()));
    }
    let mut raw = Vec::new();
    for (k, ((p, s), gs)) in probs.iter().zip(sentences).zip(groups).enumerate() {
        let means = sentence_means(p, s);
        for (g, grp) in gs.iter().enumerate() {
            match grp.first() {
                Some(&i) if i < s.len() => raw.push(means[s[i]] as f32),
                _ => return data_err(format!("response {k} group {g}: positions {grp:?} outside 0..{}", s.len())),
            }
        }
    }
    Ok(split_like(&minmax_signed(&raw), groups.iter().map(Vec::len)))
}

fn split_like(flat: &[f32], lens: impl Iterator<Item = usize>) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    let mut k = 0;
    for n in lens {
        out.push(flat[k..k + n].to_vec());
        k += n;
    }
    out
}
