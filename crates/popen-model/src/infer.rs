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

use crate::pixellm::{ImageFeatures, Padding, Part, PixelLm, PixelLmError, Segment};
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

impl Prediction {
    /// The prediction of a teacher-forced `answer` (its ids, log-probs and masks; complete
    /// by construction: no seg issues, stopped).
    pub fn forced(answer: String, f: Forced) -> Self {
        Prediction {
            answer,
            ids: f.ids,
            logprobs: f.logprobs,
            masks: f.masks,
            mask_scores: f.mask_scores,
            seg_issues: vec![],
            stopped: true,
        }
    }
}

/// Per-token log-probabilities of a given answer (teacher forcing).
#[derive(Debug, Clone)]
pub struct Scored {
    pub ids: Vec<u32>,
    pub tokens: Vec<String>,
    pub logprobs: Vec<f32>,
}

/// A teacher-forced answer ([`Predictor::teacher_force`]).
#[derive(Debug, Clone)]
pub struct Forced {
    /// The answer's ids (" " + expanded answer + EOS).
    pub ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// Per object, `f` = the per-scale embeddings concatenated.
    pub f: Vec<Vec<f32>>,
    pub masks: Vec<Mask>,
    pub mask_scores: Vec<f32>,
}

/// A model with its tokenizer and preprocessing, ready to answer.
pub struct Predictor<'a, B: Backend> {
    pub model: &'a PixelLm<B>,
    pub tokenizer: &'a Tokenizer,
    pub tokens: PixelLmTokens,
    pub preprocessor: Preprocessor,
    /// Where the frozen SAM encoder's embeddings come from (a cache kept between runs);
    /// None: computed by [`PixelLm::encode_images`].
    pub sam: Option<&'a dyn SamSource<B>>,
}

/// Embeddings of the frozen SAM encoder of a tiny-sam model from elsewhere than a fresh
/// forward: `[n, c, g, g]` for `images`, or None to let the model compute them.
pub trait SamSource<B: Backend> {
    fn embeddings(&self, model: &PixelLm<B>, images: &[Preprocessed]) -> Result<Option<Tensor<B, 4>>>;
}

impl<'a, B: Backend> Predictor<'a, B> {
    /// The tokenizer must already hold PixelLM's tokens (`add_pixellm_tokens` at model
    /// creation) with ids inside the model's vocabulary.
    pub fn new(model: &'a PixelLm<B>, tokenizer: &'a mut Tokenizer) -> Result<Self> {
        let cfg = model.config();
        let before = tokenizer.vocab_size();
        let tokens = tokenizer.add_pixellm_tokens(cfg.seg_group_len()).map_err(tok_err)?;
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
        Ok(Predictor { model, tokenizer, tokens, preprocessor: Preprocessor::pixellm(cfg.image_size), sam: None })
    }

    /// The prompt of one instruction as sequence parts (text, image, text); the instruction
    /// is read literally ([`Tokenizer::pixellm_prompt_pieces`]).
    pub fn prompt_parts(&self, instruction: &str, image: usize) -> Result<Vec<Part<B>>> {
        let pieces = self.tokenizer.pixellm_prompt_pieces(instruction).map_err(tok_err)?;
        Ok(pieces
            .into_iter()
            .map(|p| match p {
                tokenizer::Piece::Tokens(ids) => Part::new(Segment::Tokens(ids)),
                tokenizer::Piece::Image => Part::new(Segment::Image(image)),
            })
            .collect())
    }

    /// Checks that the prompt of `instruction` fits the model BEFORE anything is allocated
    /// for it (one 34,000-token instruction made a 7B batch allocate 148 GB of attention
    /// scores): its text tokens (template + instruction, without image tokens) at most
    /// [`PixelLmConfig::max_length`](crate::pixellm::PixelLmConfig::max_length) (PixelLM's
    /// `model_max_length`, the text length it trains on), and its positions (text + image
    /// tokens + POPEN's prompt embeddings) plus `new_tokens` to generate or force at most
    /// the LLM's `max_position_embeddings`. Returns the prompt's positions; the error
    /// message names the field and the limit.
    pub fn check_prompt(&self, instruction: &str, new_tokens: usize) -> std::result::Result<usize, String> {
        let cfg = self.model.config();
        // The pieces inference encodes (the instruction literally: control-token text in it
        // is text, not one more image).
        let pieces = self.tokenizer.pixellm_prompt_pieces(instruction).map_err(|e| format!("instruction: {e}"))?;
        let mut text_tokens = 0usize;
        let mut images = 0usize;
        for p in &pieces {
            match p {
                tokenizer::Piece::Tokens(ids) => text_tokens += ids.len(),
                tokenizer::Piece::Image => images += 1,
            }
        }
        if text_tokens > cfg.max_length {
            return Err(format!(
                "instruction: prompt of {text_tokens} text tokens > the model's max_length {}",
                cfg.max_length
            ));
        }
        let positions = text_tokens + images * cfg.image_tokens() + cfg.prompt_embeddings;
        let max = cfg.llm.max_position_embeddings;
        if positions + new_tokens > max {
            return Err(format!(
                "instruction: prompt of {positions} positions ({text_tokens} text + {images} x {} image tokens) + \
                 {new_tokens} new tokens > the model's max_position_embeddings {max}",
                cfg.image_tokens()
            ));
        }
        Ok(positions)
    }

    /// The image features of preprocessed images, with the SAM embeddings from
    /// [`Self::sam`] when it has them.
    pub fn encode(&self, pre: &[Preprocessed]) -> Result<ImageFeatures<B>> {
        let sam = match self.sam {
            Some(src) if self.model.sam_encoder.is_some() => src.embeddings(self.model, pre)?,
            _ => None,
        };
        self.model.encode_images_with(pre, sam)
    }

    pub fn preprocess(&self, images: &[&RgbImage]) -> Result<Vec<Preprocessed>> {
        images
            .iter()
            .enumerate()
            .map(|(i, im)| self.preprocessor.apply(im).map_err(|e| PixelLmError::Input(format!("image {i}: {e}"))))
            .collect()
    }

    /// Answer a batch of (image, instruction) pairs.
    pub fn predict(&self, items: &[(&RgbImage, &str)], sampling: &SamplingConfig) -> Result<Vec<Prediction>> {
        let images: Vec<&RgbImage> = items.iter().map(|(im, _)| *im).collect();
        let pre = self.preprocess(&images)?;
        let feats = self.encode(&pre)?;
        let rows: Vec<Vec<Part<B>>> =
            items.iter().enumerate().map(|(i, (_, instr))| self.prompt_parts(instr, i)).collect::<Result<_>>()?;
        let asm = self.model.assemble(&rows, Some(&feats), Padding::Left)?;
        let stop = [self.tokens.eos];
        let gens = self.model.generate(&asm, sampling, &stop)?;
        self.finish(&feats, gens)
    }

    fn finish(&self, feats: &ImageFeatures<B>, gens: Vec<crate::sampling::Generation<B>>) -> Result<Vec<Prediction>> {
        let cfg = self.model.config();
        let mut out = Vec::with_capacity(gens.len());
        for (row, g) in gens.into_iter().enumerate() {
            let scan = tokenizer::seg_groups(&g.ids, &self.tokens);
            let seg_issues: Vec<String> = scan.issues.iter().map(|i| i.to_string()).collect();
            let text = self.tokenizer.decode(&g.ids, false).map_err(tok_err)?;
            let answer = tokenizer::answer_text(&text, cfg.seg_group_len());
            let (masks, mask_scores) = if scan.groups.is_empty() {
                (vec![], vec![])
            } else {
                // States [prefix last, generated 0, 1, ...]: the one at index k predicts
                // generated token k, which is what seg_embeddings reads at "position - 1"
                // when handed position k + 1.
                let hidden = predicting_states(&g);
                let objects: Vec<(usize, Vec<usize>)> =
                    scan.groups.iter().map(|pos| (0usize, pos.iter().map(|p| p + 1).collect())).collect();
                let f = self.model.seg_embeddings(hidden, &objects)?;
                let idx = vec![row; objects.len()];
                let (logits, _) = self.model.decode_masks(feats, f, &idx)?;
                let (masks, scores) = binarize(logits)?;
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

    /// Teacher-force given answers (our format, `<seg>` after each object) on a batch of
    /// images in ONE forward: per row the answer's token log-probs, the segmentation
    /// embedding `f` of every object ([n_objects, scales * out_dim], scales concatenated as
    /// SPEC 10.14 compares them) and its mask. This is how collect-ps reads `f^{n,i}` on
    /// perturbed images (SPEC 10.2) and how `popen infer --answer` segments named objects.
    pub fn teacher_force(&self, items: &[(&RgbImage, &str, &str)]) -> Result<Vec<Forced>> {
        let cfg = self.model.config();
        let images: Vec<&RgbImage> = items.iter().map(|(im, _, _)| *im).collect();
        let pre = self.preprocess(&images)?;
        let feats = self.encode(&pre)?;
        let mut rows = Vec::with_capacity(items.len());
        let mut answers = Vec::with_capacity(items.len());
        for (i, (_, instr, answer)) in items.iter().enumerate() {
            let mut parts = self.prompt_parts(instr, i)?;
            let ids = self.answer_ids(answer, cfg.seg_group_len())?;
            parts.push(Part::new(Segment::Tokens(ids.clone())));
            rows.push(parts);
            answers.push(ids);
        }
        let asm = self.model.assemble(&rows, Some(&feats), Padding::Right)?;
        let hidden = self.model.forward_hidden(&asm)?;
        let starts: Vec<usize> = asm.piece_starts.iter().map(|s| *s.last().expect("parts")).collect();
        let targets: Vec<(usize, Vec<u32>)> = starts.iter().zip(&answers).map(|(s, a)| (*s, a.clone())).collect();
        let lp = self.model.response_logprobs(hidden.clone(), &targets)?;
        let [_, max] = lp.dims();
        let lp =
            lp.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| PixelLmError::Input(format!("{e:?}")))?;
        let mut objects = Vec::new();
        let mut per_row = Vec::with_capacity(items.len());
        for (r, ids) in answers.iter().enumerate() {
            let scan = tokenizer::seg_groups(ids, &self.tokens);
            if !scan.issues.is_empty() {
                return Err(PixelLmError::Input(format!(
                    "item {r}: the answer's seg groups are malformed: {}",
                    scan.issues.iter().map(|i| i.to_string()).collect::<Vec<_>>().join("; ")
                )));
            }
            per_row.push(scan.groups.len());
            for g in scan.groups {
                objects.push((r, g.iter().map(|p| p + starts[r]).collect::<Vec<_>>()));
            }
        }
        let n_obj = objects.len();
        let (f, masks, scores) = if n_obj == 0 {
            (vec![], vec![], vec![])
        } else {
            let f = self.model.seg_embeddings(hidden, &objects)?;
            let idx: Vec<usize> = objects.iter().map(|o| o.0).collect();
            let (logits, _) = self.model.decode_masks(&feats, f.clone(), &idx)?;
            let (masks, scores) = binarize(logits)?;
            let [_, sc, d] = f.dims();
            let fv = f
                .reshape([n_obj, sc * d])
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .map_err(|e| PixelLmError::Input(format!("{e:?}")))?;
            let f_rows = fv.chunks(sc * d).map(|c| c.to_vec()).collect();
            (f_rows, masks, scores)
        };
        let mut out = Vec::with_capacity(items.len());
        let (mut f_it, mut m_it, mut s_it) = (f.into_iter(), masks.into_iter(), scores.into_iter());
        for (r, ids) in answers.into_iter().enumerate() {
            let k = per_row[r];
            out.push(Forced {
                logprobs: lp[r * max..r * max + ids.len()].to_vec(),
                ids,
                f: f_it.by_ref().take(k).collect(),
                masks: m_it.by_ref().take(k).collect(),
                mask_scores: s_it.by_ref().take(k).collect(),
            });
        }
        Ok(out)
    }

    /// Teacher-forced per-token log-probs of `answer` (our format, `<seg>` markers) given
    /// the image and instruction.
    pub fn score(&self, image: &RgbImage, instruction: &str, answer: &str) -> Result<Scored> {
        let cfg = self.model.config();
        let pre = self.preprocess(&[image])?;
        let feats = self.encode(&pre)?;
        let mut parts = self.prompt_parts(instruction, 0)?;
        let ids = self.answer_ids(answer, cfg.seg_group_len())?;
        parts.push(Part::new(Segment::Tokens(ids.clone())));
        let asm = self.model.assemble(&[parts.clone()], Some(&feats), Padding::Right)?;
        let start = asm.piece_starts[0][parts.len() - 1];
        let hidden = self.model.forward_hidden(&asm)?;
        let lp = self.model.response_logprobs(hidden, &[(start, ids.clone())])?;
        let logprobs =
            lp.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| PixelLmError::Input(format!("{e:?}")))?;
        let tokens = ids.iter().map(|&i| self.tokenizer.id_to_token(i).unwrap_or_default()).collect();
        Ok(Scored { ids, tokens, logprobs })
    }

    /// Answer text (with `<seg>`) -> ids as PixelLM trains on them: " " + expanded answer +
    /// EOS (the conversation's `sep2`).
    pub fn answer_ids(&self, answer: &str, group: usize) -> Result<Vec<u32>> {
        let expanded = tokenizer::expand_seg(answer, group).map_err(tok_err)?;
        let mut ids = self.tokenizer.encode(&format!(" {expanded}"), false).map_err(tok_err)?;
        ids.push(self.tokens.eos);
        Ok(ids)
    }
}

/// Masks at logit > 0 and PixelLM's confidence
/// ([`crate::pixel_decoder::mask_confidence`]) from postprocessed logit maps.
pub fn binarize<B: Backend>(logits: Vec<Tensor<B, 2>>) -> Result<(Vec<Mask>, Vec<f32>)> {
    let mut masks = Vec::with_capacity(logits.len());
    let mut scores = Vec::with_capacity(logits.len());
    for m in logits {
        let [hh, ww] = m.dims();
        let score = crate::pixel_decoder::mask_confidence(m.clone().reshape([1, hh, ww]));
        scores.push(score.into_scalar().elem::<f32>());
        let bits: Vec<u8> = m
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| PixelLmError::Decoder(format!("{e:?}")))?
            .iter()
            .map(|&x| u8::from(x > 0.0))
            .collect();
        masks.push(Mask::from_row_major(hh as u32, ww as u32, bits).map_err(|e| PixelLmError::Decoder(e.to_string()))?);
    }
    Ok((masks, scores))
}

/// [1, n_generated + 1, H]: the prefix's last final hidden state, then each generated
/// token's.
fn predicting_states<B: Backend>(g: &crate::sampling::Generation<B>) -> Tensor<B, 3> {
    let [h] = g.prefix_last.dims();
    let all = Tensor::cat(vec![g.prefix_last.clone().reshape([1, h]), g.hidden.clone()], 0);
    let [n, _] = all.dims();
    all.reshape([1, n, h])
}
