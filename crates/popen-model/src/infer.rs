//! Plain PixelLM inference and scoring on (image, instruction) pairs: what `popen infer`,
//! `popen score` and the later stages (predict, collect-pt, collect-ps) call.
//!
//! An answer is produced by sampling (greedy by default) from PixelLM's prompt; its seg
//! groups are found in the generated ids ([`crate::tokenizer::seg_groups`]), the
//! segmentation embedding of each complete group is read from the hidden states that
//! predicted its tokens (kept from generation, no second forward), and the pixel decoder
//! turns them into masks at the image's original size. Malformed groups are reported, never
//! guessed at.

use burn::prelude::*;
use image::RgbImage;
use popen_core::mask::Mask;

use crate::pixellm::{Assembled, ImageFeatures, Padding, Part, PixelLm, PixelLmError, Segment};
use crate::preprocess::{Preprocessed, Preprocessor};
use crate::sampling::SamplingConfig;
use crate::tokenizer::{self, PixelLmTokens, Tokenizer};

type Result<T> = std::result::Result<T, PixelLmError>;

fn tok_err(e: tokenizer::TokenizerError) -> PixelLmError {
    PixelLmError::Input(e.to_string())
}

/// One answer with its masks.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// The answer in our shard format (each complete seg group collapsed to `<seg>`).
    pub answer: String,
    /// The generated ids (without the stop token).
    pub ids: Vec<u32>,
    /// log p of each generated id (temperature 1).
    pub logprobs: Vec<f32>,
    /// One binary mask per complete seg group, at the image's original size.
    pub masks: Vec<Mask>,
    /// PixelLM's mask confidence per mask (mean sigmoid over positive logits).
    pub mask_scores: Vec<f32>,
    /// Malformed seg groups in the answer, as text.
    pub seg_issues: Vec<String>,
    /// Whether generation ended on a stop token (false: hit max_new_tokens).
    pub stopped: bool,
}

/// Per-token log-probabilities of a given answer (teacher forcing).
#[derive(Debug, Clone)]
pub struct Scored {
    pub ids: Vec<u32>,
    pub tokens: Vec<String>,
    pub logprobs: Vec<f32>,
}

/// A model with its tokenizer and preprocessing, ready to answer.
pub struct Predictor<'a, B: Backend> {
    pub model: &'a PixelLm<B>,
    pub tokenizer: &'a Tokenizer,
    pub tokens: PixelLmTokens,
    pub preprocessor: Preprocessor,
}

impl<'a, B: Backend> Predictor<'a, B> {
    /// The tokenizer must already hold PixelLM's tokens (`add_pixellm_tokens` at model
    /// creation) with ids inside the model's vocabulary.
    pub fn new(model: &'a PixelLm<B>, tokenizer: &'a mut Tokenizer) -> Result<Self> {
        let cfg = model.config();
        let before = tokenizer.vocab_size();
        let tokens = tokenizer
            .add_pixellm_tokens(cfg.seg_group_len())
            .map_err(tok_err)?;
        if tokenizer.vocab_size() != before {
            return Err(PixelLmError::Input(
                "the tokenizer lacks PixelLM's tokens (<im_start>, <im_end>, [SEG*]); it must be the one saved with the model".into(),
            ));
        }
        let tokenizer: &'a Tokenizer = tokenizer;
        if tokenizer.vocab_size() > cfg.llm.vocab_size {
            return Err(PixelLmError::Input(format!(
                "tokenizer has {} tokens but the model's vocabulary is {}",
                tokenizer.vocab_size(),
                cfg.llm.vocab_size
            )));
        }
        Ok(Predictor {
            model,
            tokenizer,
            tokens,
            preprocessor: Preprocessor::pixellm(cfg.image_size),
        })
    }

    /// The prompt of one instruction as sequence parts (text, image, text).
    pub fn prompt_parts(&self, instruction: &str, image: usize) -> Result<Vec<Part<B>>> {
        let text = self.tokenizer.pixellm_prompt(instruction);
        let pieces = self.tokenizer.encode_with_image(&text).map_err(tok_err)?;
        Ok(pieces
            .into_iter()
            .map(|p| match p {
                tokenizer::Piece::Tokens(ids) => Part::new(Segment::Tokens(ids)),
                tokenizer::Piece::Image => Part::new(Segment::Image(image)),
            })
            .collect())
    }

    pub fn preprocess(&self, images: &[RgbImage]) -> Result<Vec<Preprocessed>> {
        images
            .iter()
            .enumerate()
            .map(|(i, im)| {
                self.preprocessor
                    .apply(im)
                    .map_err(|e| PixelLmError::Input(format!("image {i}: {e}")))
            })
            .collect()
    }

    /// Answer a batch of (image, instruction) pairs.
    pub fn predict(
        &self,
        items: &[(&RgbImage, &str)],
        sampling: &SamplingConfig,
    ) -> Result<Vec<Prediction>> {
        let images: Vec<RgbImage> = items.iter().map(|(im, _)| (*im).clone()).collect();
        let pre = self.preprocess(&images)?;
        let feats = self.model.encode_images(&pre)?;
        let rows: Vec<Vec<Part<B>>> = items
            .iter()
            .enumerate()
            .map(|(i, (_, instr))| self.prompt_parts(instr, i))
            .collect::<Result<_>>()?;
        let asm = self.model.assemble(&rows, Some(&feats), Padding::Left)?;
        let stop = [self.tokens.eos];
        let gens = self.model.generate(&asm, sampling, &stop)?;
        self.finish(&feats, &asm, gens)
    }

    fn finish(
        &self,
        feats: &ImageFeatures<B>,
        _asm: &Assembled<B>,
        gens: Vec<crate::sampling::Generation<B>>,
    ) -> Result<Vec<Prediction>> {
        let cfg = self.model.config();
        let mut out = Vec::with_capacity(gens.len());
        for (row, g) in gens.into_iter().enumerate() {
            let scan = tokenizer::seg_groups(&g.ids, &self.tokens);
            let seg_issues: Vec<String> = scan.issues.iter().map(|i| i.to_string()).collect();
            let text = self.tokenizer.decode(&g.ids, false).map_err(tok_err)?;
            let answer = tokenizer::collapse_seg(&clean(&text, self.tokenizer, &self.tokens), cfg.seg_group_len())
                .unwrap_or_else(|_| text.clone());
            let (masks, mask_scores) = if scan.groups.is_empty() {
                (vec![], vec![])
            } else {
                // States [prefix last, generated 0, 1, ...]: the one at index k predicts
                // generated token k, which is what seg_embeddings reads at "position - 1"
                // when handed position k + 1.
                let hidden = predicting_states(&g);
                let objects: Vec<(usize, Vec<usize>)> = scan
                    .groups
                    .iter()
                    .map(|pos| (0usize, pos.iter().map(|p| p + 1).collect()))
                    .collect();
                let f = self.model.seg_embeddings(hidden, &objects)?;
                let idx = vec![row; objects.len()];
                let (logits, _) = self.model.decode_masks(feats, f, &idx)?;
                let mut masks = Vec::new();
                let mut scores = Vec::new();
                for m in logits {
                    let [hh, ww] = m.dims();
                    let v = m.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| {
                        PixelLmError::Decoder(format!("{e:?}"))
                    })?;
                    let (mut s, mut c) = (0f64, 0usize);
                    let bits: Vec<u8> = v
                        .iter()
                        .map(|&x| {
                            if x > 0.0 {
                                s += 1.0 / (1.0 + (-x as f64).exp());
                                c += 1;
                                1
                            } else {
                                0
                            }
                        })
                        .collect();
                    scores.push(if c == 0 { 0.0 } else { (s / c as f64) as f32 });
                    masks.push(
                        Mask::from_row_major(hh as u32, ww as u32, bits)
                            .map_err(|e| PixelLmError::Decoder(e.to_string()))?,
                    );
                }
                (masks, scores)
            };
            out.push(Prediction {
                answer,
                ids: g.ids,
                logprobs: g.logprobs,
                masks,
                mask_scores,
                seg_issues,
                stopped: g.stopped,
            });
        }
        Ok(out)
    }

    /// Teacher-forced per-token log-probs of `answer` (our format, `<seg>` markers) given
    /// the image and instruction.
    pub fn score(&self, image: &RgbImage, instruction: &str, answer: &str) -> Result<Scored> {
        let cfg = self.model.config();
        let pre = self.preprocess(std::slice::from_ref(image))?;
        let feats = self.model.encode_images(&pre)?;
        let mut parts = self.prompt_parts(instruction, 0)?;
        let ids = self.answer_ids(answer, cfg.seg_group_len())?;
        parts.push(Part::new(Segment::Tokens(ids.clone())));
        let asm = self.model.assemble(&[parts.clone()], Some(&feats), Padding::Right)?;
        let start = asm.piece_starts[0][parts.len() - 1];
        let hidden = self.model.forward_hidden(&asm)?;
        let lp = self.model.response_logprobs(hidden, &[(start, ids.clone())])?;
        let logprobs = lp
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| PixelLmError::Input(format!("{e:?}")))?;
        let tokens = ids
            .iter()
            .map(|&i| self.tokenizer.id_to_token(i).unwrap_or_default())
            .collect();
        Ok(Scored {
            ids,
            tokens,
            logprobs,
        })
    }

    /// Answer text (with `<seg>`) -> ids as PixelLM trains on them: " " + expanded answer +
    /// EOS (the conversation's `sep2`).
    pub fn answer_ids(&self, answer: &str, group: usize) -> Result<Vec<u32>> {
        let expanded = tokenizer::expand_seg(answer, group).map_err(tok_err)?;
        let mut ids = self
            .tokenizer
            .encode(&format!(" {expanded}"), false)
            .map_err(tok_err)?;
        ids.push(self.tokens.eos);
        Ok(ids)
    }
}

/// [1, n_generated + 1, H]: the prefix's last final hidden state, then each generated
/// token's.
fn predicting_states<B: Backend>(g: &crate::sampling::Generation<B>) -> Tensor<B, 3> {
    let [h] = g.prefix_last.dims();
    let all = Tensor::cat(vec![g.prefix_last.clone().reshape([1, h]), g.hidden.clone()], 0);
    let [n, _] = all.dims();
    all.reshape([1, n, h])
}

/// Decoded text without the leading space the prompt's " ASSISTANT:" leaves.
fn clean(text: &str, _tok: &Tokenizer, _t: &PixelLmTokens) -> String {
    text.trim().to_string()
}
