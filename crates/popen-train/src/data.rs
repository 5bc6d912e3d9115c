//! Training examples from a samples shard, and the data order.
//!
//! Each sample is checked and tokenized once: the prompt pieces (PixelLM's llava_v1
//! conversation with `<image>`), the answer ids (" " + answer with each `<seg>` expanded to
//! the codebook group + EOS), the positions of every object's codebook group in the
//! answer. A sample that cannot be used (seg groups that do not line up with its masks, a
//! sequence longer than `max_len`, an undecodable image) is skipped with its reason, never
//! silently. Images stay encoded in memory and are decoded per batch.
//!
//! The order is a ChaCha8 permutation per epoch seeded by `(seed, epoch)`: micro-batch m is
//! a pure function of (seed, m), which is what makes `--resume` exact.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use popen_core::mask::Mask;
use popen_core::shard::Sample;
use popen_model::tokenizer::{self, Piece, PixelLmTokens, Tokenizer};

/// One usable training example.
#[derive(Debug, Clone)]
pub struct Example {
    pub id: String,
    pub image: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// The prompt as pieces (text ids and the image slot).
    pub prompt: Vec<Piece>,
    /// " " + expanded answer + EOS.
    pub answer_ids: Vec<u32>,
    /// Per object, the positions of its codebook tokens within `answer_ids`.
    pub groups: Vec<Vec<usize>>,
    /// Ground-truth masks, one per object, as RLE (decoded per batch).
    pub masks: Vec<popen_core::mask::Rle>,
    /// Tokens of prompt (image tokens counted) + answer.
    pub seq_len: usize,
    /// The frozen SAM encoder's embedding of the image (values, `[c, g, g]`), when the model
    /// has one (filled once by the trainer, [`crate::sft::cache_sam_embeddings`]; shared by
    /// the examples of one image).
    pub sam_embedding: Option<(std::sync::Arc<[f32]>, [usize; 3])>,
    /// Candidate answers (ids, each closed by `</s>`) shown between the prompt and the
    /// target in the ensemble layout ([`with_candidates`]); empty = PixelLM's layout.
    pub candidates: Vec<Vec<u32>>,
}

impl Example {
    pub fn decode_image(&self) -> Result<image::RgbImage, String> {
        popen_core::imageio::decode_rgb(&self.image, Some(&format!("sample '{}'", self.id))).map_err(|e| e.to_string())
    }

    pub fn decode_masks(&self) -> Result<Vec<Mask>, String> {
        self.masks
            .iter()
            .enumerate()
            .map(|(i, m)| m.decode().map_err(|e| format!("sample '{}': target mask {i}: {e}", self.id)))
            .collect()
    }
}

/// A skipped sample and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    pub id: String,
    pub reason: String,
}

/// Tokenizes and checks samples (their images and masks move into the examples). `image_tokens` is the number of LLM tokens one image
/// takes (for the length check).
pub fn prepare(
    samples: Vec<Sample>,
    tok: &Tokenizer,
    tokens: &PixelLmTokens,
    group_len: usize,
    image_tokens: usize,
    max_len: usize,
) -> (Vec<Example>, Vec<Skipped>) {
    let mut out = Vec::with_capacity(samples.len());
    let mut skipped = Vec::new();
    for s in samples {
        match prepare_one(&s, tok, tokens, group_len, image_tokens, max_len) {
            Ok(mut e) => {
                // Moved, not copied: the encoded images are the bulk of the shard.
                e.image = s.image;
                e.masks = s.target_masks;
                out.push(e)
            }
            Err(reason) => skipped.push(Skipped { id: s.id.clone(), reason }),
        }
    }
    (out, skipped)
}

/// PixelLM's prompt for an instruction (llava_v1 conversation with `<image>`), as pieces;
/// the instruction is read literally ([`Tokenizer::pixellm_prompt_pieces`]).
pub fn prompt_pieces(tok: &Tokenizer, instruction: &str) -> Result<Vec<Piece>, String> {
    tok.pixellm_prompt_pieces(instruction).map_err(|e| format!("instruction: {e}"))
}

/// An answer (our format, `<seg>` after each object) as the model reads it: " " + answer with
/// each `<seg>` expanded to the codebook group + EOS, and the positions of every group in
/// those ids. Malformed groups are an error.
pub fn answer_with_groups(
    tok: &Tokenizer,
    tokens: &PixelLmTokens,
    answer: &str,
    group_len: usize,
) -> Result<(Vec<u32>, Vec<Vec<usize>>), String> {
    let expanded = tokenizer::expand_seg(answer, group_len).map_err(|e| format!("answer: {e}"))?;
    let mut answer_ids = tok.encode(&format!(" {expanded}"), false).map_err(|e| format!("answer: {e}"))?;
    answer_ids.push(tokens.eos);
    let scan = tokenizer::seg_groups(&answer_ids, tokens);
    if !scan.issues.is_empty() {
        return Err(format!(
            "answer: malformed seg groups after tokenization: {}",
            scan.issues.iter().map(|i| i.to_string()).collect::<Vec<_>>().join("; ")
        ));
    }
    Ok((answer_ids, scan.groups))
}

/// Tokens one prompt takes, an image counted as `image_tokens`.
pub fn prompt_len(prompt: &[Piece], image_tokens: usize) -> usize {
    prompt
        .iter()
        .map(|p| match p {
            Piece::Tokens(t) => t.len(),
            Piece::Image => image_tokens,
        })
        .sum()
}

fn prepare_one(
    s: &Sample,
    tok: &Tokenizer,
    tokens: &PixelLmTokens,
    group_len: usize,
    image_tokens: usize,
    max_len: usize,
) -> Result<Example, String> {
    let prompt = prompt_pieces(tok, &s.instruction)?;
    let (answer_ids, groups) = answer_with_groups(tok, tokens, &s.answer, group_len)?;
    if groups.len() != s.target_masks.len() {
        return Err(format!(
            "answer has {} seg groups but the sample has {} target masks",
            groups.len(),
            s.target_masks.len()
        ));
    }
    let prompt_len = prompt_len(&prompt, image_tokens);
    let seq_len = prompt_len + answer_ids.len();
    if seq_len > max_len {
        return Err(format!(
            "{seq_len} tokens (prompt {prompt_len} + answer {}) exceed max_len {max_len}",
            answer_ids.len()
        ));
    }
    Ok(Example {
        id: s.id.clone(),
        image: Vec::new(),
        width: s.width,
        height: s.height,
        prompt,
        answer_ids,
        groups,
        masks: Vec::new(),
        seq_len,
        sam_embedding: None,
        candidates: Vec::new(),
    })
}

/// Examples that show one image (equal image bytes; the benchmark asks several questions per
/// image): the first example of each distinct image, in order, and each example's image
/// (an index into the first list).
pub fn image_groups(examples: &[Example]) -> (Vec<usize>, Vec<usize>) {
    let mut seen: std::collections::HashMap<&[u8], usize> = std::collections::HashMap::new();
    let mut first = Vec::new();
    let of = examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            *seen.entry(e.image.as_slice()).or_insert_with(|| {
                first.push(i);
                first.len() - 1
            })
        })
        .collect();
    (first, of)
}

/// For each example, the other examples about the same image ([`image_groups`]).
pub fn siblings(examples: &[Example]) -> Vec<Vec<usize>> {
    let (first, of) = image_groups(examples);
    let mut members = vec![Vec::new(); first.len()];
    for (i, &g) in of.iter().enumerate() {
        members[g].push(i);
    }
    of.iter().enumerate().map(|(i, &g)| members[g].iter().copied().filter(|&j| j != i).collect()).collect()
}

/// Ensemble-aware SFT (SPEC 10.18, [`crate::config::SftConfig::ensemble_share`]): which
/// examples of micro-batch `m` (indices `idx`) are shown in the ensemble layout, and with
/// which candidates. Returns, per index, `None` (PixelLM's layout) or a copy of the example
/// with `candidates` set: `k` answers, each the example's own (ground-truth) answer with
/// probability `truth`, else the answer of a random sibling (another question about the
/// same image; the own answer when there is none). A pure function of (`seed`, `m`), so a
/// resumed run draws the same. An example whose sequence would exceed `max_len` with the
/// candidates and `extra` (p_hat) positions stays in PixelLM's layout.
#[allow(clippy::too_many_arguments)]
pub fn with_candidates(
    examples: &[Example],
    siblings: &[Vec<usize>],
    idx: &[usize],
    m: usize,
    seed: u64,
    share: f64,
    k: usize,
    truth: f64,
    extra: usize,
    max_len: usize,
) -> Vec<Option<Example>> {
    use rand::Rng;
    if share <= 0.0 {
        return vec![None; idx.len()];
    }
    let mut rng = ChaCha8Rng::seed_from_u64(
        seed.wrapping_mul(0x5851_F42D_4C95_7F2D)
            ^ (m as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ 0xE45E,
    );
    idx.iter()
        .map(|&i| {
            if !rng.random_bool(share) {
                return None;
            }
            let ex = &examples[i];
            let cands: Vec<Vec<u32>> = (0..k)
                .map(|_| {
                    let own = rng.random_bool(truth);
                    let sib = &siblings[i];
                    if own || sib.is_empty() {
                        ex.answer_ids.clone()
                    } else {
                        examples[sib[rng.random_range(0..sib.len())]].answer_ids.clone()
                    }
                })
                .collect();
            let added: usize = cands.iter().map(Vec::len).sum::<usize>() + extra;
            if ex.seq_len + added > max_len {
                return None;
            }
            let mut e = ex.clone();
            e.seq_len += added;
            e.candidates = cands;
            Some(e)
        })
        .collect()
}

/// The data order: micro-batches of `batch_size` indices, a fresh permutation per epoch.
#[derive(Debug, Clone)]
pub struct Order {
    pub n: usize,
    pub batch_size: usize,
    pub seed: u64,
}

impl Order {
    /// Micro-batches per epoch (the last one may be smaller).
    pub fn batches_per_epoch(&self) -> usize {
        self.n.div_ceil(self.batch_size)
    }

    /// The permutation of epoch `epoch`.
    pub fn permutation(&self, epoch: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.n).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        idx.shuffle(&mut rng);
        idx
    }

    /// Example indices of global micro-batch `m` (epoch = m / batches_per_epoch).
    pub fn batch(&self, m: usize) -> Vec<usize> {
        let per = self.batches_per_epoch().max(1);
        let (epoch, k) = (m / per, m % per);
        let perm = self.permutation(epoch);
        let end = ((k + 1) * self.batch_size).min(self.n);
        perm[k * self.batch_size..end].to_vec()
    }
}
