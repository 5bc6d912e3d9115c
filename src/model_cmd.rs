//! Model commands: `model-config`, `tokenizer-tiny`, `model-init`, `infer`, `score`.
//! Thin front ends over `popen_model` (bundle, infer, pixellm, tokenizer).

use crate::backend::on_backend;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use popen_core::mask::Rle;
use popen_core::shard::{Sample, ShardReader, SEG_TOKEN};
use popen_model::bundle;
use popen_model::infer::Predictor;
use popen_model::pixellm::{Layout, PixelLmConfig};
use popen_model::sampling::SamplingConfig;
use popen_model::tokenizer::{Tokenizer, LLAVA_V1_SYSTEM, TINY_SPECIALS};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct ModelConfigArgs {
    /// tiny (the embedded benchmark's model, CLIP from scratch), tiny-sam (the same LLM on
    /// MobileSAM's frozen encoder and pretrained decoder), pixellm-7b or pixellm-13b.
    #[arg(long, default_value = "tiny", value_parser = ["tiny", "tiny-sam", "pixellm-7b", "pixellm-13b"])]
    preset: String,
    /// Vocabulary size of the tiny preset (>= the tiny tokenizer's size).
    #[arg(long, default_value_t = 1024)]
    vocab: usize,
}

#[derive(clap::Args)]
pub struct TokenizerTinyArgs {
    /// Benchmark folder: its train shard's instructions and answers are the corpus.
    #[arg(long, default_value = "data/synth")]
    data: PathBuf,
    /// Output tokenizer.json (tokenizer_config.json is written beside it).
    #[arg(long)]
    out: PathBuf,
    /// BPE vocabulary size before PixelLM's added tokens.
    #[arg(long, default_value_t = 768)]
    vocab_size: usize,
    /// Codebook tokens per object ([SEG0]..): seg_token_num x scales of the model.
    #[arg(long, default_value_t = 6)]
    seg_tokens: usize,
}

#[derive(clap::Args)]
pub struct ModelInitArgs {
    /// Model config (TOML).
    #[arg(long, default_value = "pipelines/model-tiny.toml")]
    config: PathBuf,
    /// tokenizer.json holding PixelLM's tokens (see `popen tokenizer-tiny`).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Output model folder (model.toml, model.safetensors, tokenizer.json).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the random initialization.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Official SAM checkpoint (data/assets/mobile_sam/mobile_sam.pt) that the SAM encoder
    /// and the pixel decoder of a `sam_encoder` model (pipelines/model-tiny-sam.toml) start
    /// from; required for such a model, refused for others.
    #[arg(long)]
    sam_checkpoint: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct ModelImportArgs {
    /// Checkpoint: a safetensors or PyTorch (.bin/.pt) file, or a folder with
    /// model.safetensors(.index.json) or pytorch_model.bin(.index.json), sharded or not.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Key layout: pixellm (released PixelLM), llava (original LLaVA; PixelLM's parts start
    /// fresh), llava-hf (transformers LlavaForConditionalGeneration), native.
    #[arg(long, default_value = "pixellm", value_parser = ["pixellm", "llava", "llava-hf", "native"])]
    layout: String,
    /// Model config (TOML) matching the checkpoint, e.g. pipelines/model-pixellm-7b.toml.
    #[arg(long)]
    config: PathBuf,
    /// The checkpoint's tokenizer.json; PixelLM's tokens are added if missing.
    #[arg(long)]
    tokenizer: PathBuf,
    /// CLIP vision tower checkpoint (CLIPVisionModel or CLIPModel safetensors), for
    /// checkpoints that leave the tower out (released PixelLM does).
    #[arg(long)]
    vision_tower: Option<PathBuf>,
    /// Output model folder.
    #[arg(long)]
    out: PathBuf,
}

pub const MODEL_EXPORT_LONG_ABOUT: &str = "\
Write a model folder back in the key layout of PixelLM's code or of transformers' LLaVA, so a \
POPEN-finetuned model can leave popen.

--layout pixellm: model.safetensors with PixelLM's names (PixelLMForCausalLM's state dict \
without the CLIP tower, as PixelLM's merge script writes it), vision_tower/ (the CLIP tower as \
a CLIPVisionModel folder, saved at the model's input size), config.json (LLaMA fields and \
PixelLM's settings), the tokenizer files and model.toml (popen's config). POPEN's own tensors \
(p_hat, the seg-feedback projection) are stored as popen.* in the same file: PixelLM's loader \
reports them unused, `popen model-import --layout pixellm` reads them back.

--layout llava-hf: the LLaVA part (CLIP tower, projector, LLaMA) as transformers' \
LlavaForConditionalGeneration.save_pretrained writes it, with its config.json and tokenizer \
files; PixelLM's decoder side and POPEN's tensors cannot be held there and are listed as left \
out. Needs a projector of LLaVA's shape (mm_projector_hidden = the LLM width).

Models with parts neither code has (the tiny-sam preset's SAM image encoder, the seg locator) \
are refused, naming the config field.

Import back: popen model-import --layout pixellm --checkpoint OUT --config OUT/model.toml \
--tokenizer OUT/tokenizer.json --out MODEL (OUT/vision_tower is found by itself).";

#[derive(clap::Args)]
pub struct ModelExportArgs {
    /// popen model folder to export.
    #[arg(long)]
    model: PathBuf,
    /// Target layout.
    #[arg(long, value_parser = ["pixellm", "llava-hf"])]
    layout: String,
    /// llava-hf: the vocabulary id transformers' LLaVA replaces by image features
    /// (config `image_token_index`). Default: the tokenizer's `<image>` token.
    #[arg(long)]
    image_token_id: Option<u32>,
    /// Output folder (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn config(&self) -> SamplingConfig {
        SamplingConfig {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

#[derive(clap::Args)]
pub struct InferArgs {
    /// Model folder (model.toml, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Input image (PNG or JPEG).
    #[arg(long)]
    image: PathBuf,
    /// The instruction.
    #[arg(long)]
    instruction: String,
    /// Segment the objects of this answer instead of generating one (teacher forcing; put
    /// `<seg>` after each object, e.g. "the red ball <seg>").
    #[arg(long)]
    answer: Option<String>,
    /// Folder for overlay.png and prediction.json (default: print JSON only).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// POPEN's ensemble (SPEC 6-7) with K sampled answers (paper: 3; 0 = off): K answers
    /// sampled at --ensemble-temperature, then the refined answer and masks. The candidates
    /// and their tau/eta scores are printed too.
    #[arg(long, default_value_t = 0)]
    ensemble: usize,
    /// Temperature of the K ensemble samples.
    #[arg(long, default_value_t = 0.7)]
    ensemble_temperature: f32,
    /// Not in the paper: when the refined answer has no complete <seg> group (or a malformed
    /// one), output the candidate with the highest mean token log-probability instead.
    #[arg(long)]
    ensemble_fallback: bool,
    /// Backend: flex (CPU, fastest here), ndarray (CPU), or cuda in builds with the `cuda`
    /// feature.
    #[arg(long, default_value = "flex", value_parser = crate::backend::BACKENDS)]
    backend: String,
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// Model folder.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    image: PathBuf,
    #[arg(long)]
    instruction: String,
    /// The answer to score, with `<seg>` after each object (our shard format).
    #[arg(long)]
    answer: String,
    /// Backend: flex (CPU, fastest here), ndarray (CPU), or cuda in builds with the `cuda`
    /// feature.
    #[arg(long, default_value = "flex", value_parser = crate::backend::BACKENDS)]
    backend: String,
}

pub fn model_config(a: ModelConfigArgs) -> Result<()> {
    let cfg = match a.preset.as_str() {
        "tiny" => PixelLmConfig::tiny(a.vocab),
        "tiny-sam" => PixelLmConfig::tiny_sam(a.vocab),
        "pixellm-7b" => PixelLmConfig::pixellm_7b(),
        "pixellm-13b" => PixelLmConfig::pixellm_13b(),
        other => bail!("unknown preset '{other}' (tiny, tiny-sam, pixellm-7b, pixellm-13b)"),
    };
    cfg.validate()?;
    print!("{}", popen_core::config_text::config_toml(&cfg)?);
    Ok(())
}

/// The benchmark's train texts as the model reads them: each instruction inside PixelLM's
/// conversation template (LLaVA's system prompt, `USER:`, `ASSISTANT:`), so that the template's
/// words become whole tokens as they would in a real LLM's vocabulary rather than ~100 byte
/// pieces per sample, and each answer without the `<seg>` markers.
fn corpus(data: &Path) -> Result<Vec<String>> {
    let shard = data.join("train.parquet");
    let mut texts = Vec::new();
    for batch in ShardReader::<Sample>::open(&shard)? {
        for s in batch? {
            texts.push(format!("{LLAVA_V1_SYSTEM} USER: {} ASSISTANT:", s.instruction));
            texts.push(s.answer.replace(SEG_TOKEN, ""));
        }
    }
    if texts.is_empty() {
        bail!("{}: no samples to learn a vocabulary from", shard.display());
    }
    Ok(texts)
}

pub fn tokenizer_tiny(a: TokenizerTinyArgs) -> Result<()> {
    let texts = corpus(&a.data)?;
    let mut tok = Tokenizer::train_tiny(texts.iter().map(String::as_str), a.vocab_size, TINY_SPECIALS)?;
    tok.add_pixellm_tokens(a.seg_tokens)?;
    let _lock = popen_core::guard::claim_output(&a.out, &[("--data", &a.data)])?;
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    tok.save(&a.out)?;
    println!("{} tokens -> {}", tok.vocab_size(), a.out.display());
    Ok(())
}

pub fn model_init(a: ModelInitArgs) -> Result<()> {
    let cfg = PixelLmConfig::from_toml_file(&a.config)?;
    let tok = Tokenizer::from_file(&a.tokenizer)?;
    type B = burn::backend::NdArray<f32>;
    let dev = Default::default();
    B::seed(&dev, a.seed);
    let model = cfg.init::<B>(&dev)?;
    let model = match (&a.sam_checkpoint, cfg.sam_encoder.is_some()) {
        (Some(p), true) => model.init_from_sam(p)?,
        (None, false) => model,
        (None, true) => bail!(
            "{}: the model has a SAM encoder: pass its pretrained weights with --sam-checkpoint (e.g. data/assets/mobile_sam/mobile_sam.pt)",
            a.config.display()
        ),
        (Some(p), false) => bail!(
            "--sam-checkpoint {}: the model of {} has no SAM encoder (sam_encoder); use a config such as pipelines/model-tiny-sam.toml",
            p.display(),
            a.config.display()
        ),
    };
    let _lock = popen_core::guard::claim_output(&a.out, &[("--tokenizer", &a.tokenizer), ("--config", &a.config)])?;
    bundle::save(&a.out, &model, &tok)?;
    let counts = popen_model::weights::param_counts(&model);
    let total: usize = counts.values().sum();
    println!("{} ({} parameters) -> {}", cfg.name, total, a.out.display());
    Ok(())
}

pub fn model_import(a: ModelImportArgs) -> Result<()> {
    let layout = match a.layout.as_str() {
        "pixellm" => Layout::Pixellm,
        "llava" => Layout::Llava,
        "llava-hf" => Layout::LlavaHf,
        "native" => Layout::Native,
        other => bail!("unknown layout '{other}' (pixellm, llava, llava-hf, native)"),
    };
    let cfg = PixelLmConfig::from_toml_file(&a.config)?;
    type B = burn::backend::NdArray<f32>;
    let dev = Default::default();
    // A `model-export --layout pixellm` folder carries its tower in vision_tower/.
    let beside = a.checkpoint.join("vision_tower");
    let tower = a.vision_tower.clone().or_else(|| {
        (layout == Layout::Pixellm && cfg.sam_encoder.is_none() && beside.join("model.safetensors").is_file())
            .then_some(beside)
    });
    let (b, fresh) = bundle::open_foreign::<B>(&cfg, &a.checkpoint, layout, &a.tokenizer, tower.as_deref(), &dev)?;
    if !fresh.is_empty() {
        eprintln!(
            "note: {} tensor(s) the {} layout cannot hold start from their initialization: {}",
            fresh.len(),
            a.layout,
            summarize(&fresh)
        );
    }
    let _lock =
        popen_core::guard::claim_output(&a.out, &[("--checkpoint", &a.checkpoint), ("--tokenizer", &a.tokenizer)])?;
    bundle::save(&a.out, &b.model, &b.tokenizer)?;
    println!("{} -> {}", a.checkpoint.display(), a.out.display());
    Ok(())
}

pub fn model_export(a: ModelExportArgs) -> Result<()> {
    use popen_model::export::{self, ExportLayout};
    let layout = match a.layout.as_str() {
        "pixellm" => ExportLayout::Pixellm,
        "llava-hf" => ExportLayout::LlavaHf,
        other => bail!("unknown layout '{other}' (pixellm, llava-hf)"),
    };
    if a.out.exists() && std::fs::read_dir(&a.out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{}: exists and is not empty (model-export writes a new folder)", a.out.display());
    }
    type B = burn::backend::NdArray<f32>;
    let b = bundle::open::<B>(&a.model, &Default::default())?;
    let _lock = popen_core::guard::claim_output(&a.out, &[("--model", &a.model)])?;
    let name = a.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "export".into());
    // Written beside the output and renamed into place, as `stage::save_model` writes a model
    // folder; export_weights refuses (checks the config, the image token) before writing.
    let tmp = a.out.with_file_name(format!("{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let image_token = a.image_token_id.or_else(|| b.tokenizer.token_to_id(popen_model::tokenizer::IMAGE_TOKEN));
    let written = (|| -> Result<export::ExportReport> {
        let mut r = export::export_weights(&b.model, &tmp, layout, image_token)?;
        r.files.extend(export::export_tokenizer(&b.tokenizer, &tmp)?);
        Ok(r)
    })();
    let report = match written {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if a.out.exists() {
        std::fs::remove_dir(&a.out).with_context(|| format!("replacing the empty folder {}", a.out.display()))?;
    }
    std::fs::rename(&tmp, &a.out).with_context(|| format!("moving {} to {}", tmp.display(), a.out.display()))?;
    if !report.left_out.is_empty() {
        eprintln!(
            "note: the {} layout cannot hold {} tensor(s), left out: {}",
            a.layout,
            report.left_out.len(),
            summarize(&report.left_out)
        );
    }
    println!(
        "{} -> {} ({} layout: {} tensors; {})",
        a.model.display(),
        a.out.display(),
        a.layout,
        report.tensors,
        report.files.join(", ")
    );
    Ok(())
}

/// Names grouped by their first two path segments, for messages.
fn summarize(names: &[String]) -> String {
    let mut groups: Vec<String> = names.iter().map(|n| n.split('.').take(2).collect::<Vec<_>>().join(".")).collect();
    groups.dedup();
    groups.join(", ")
}

fn read_image(path: &Path) -> Result<image::RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(popen_core::imageio::decode_rgb(&bytes, Some(&path.display().to_string()))?)
}

pub fn infer(a: InferArgs) -> Result<()> {
    on_backend!(a.backend.as_str(), B, dev => infer_on::<B>(&a, &dev))
}

fn infer_on<B: Backend>(a: &InferArgs, dev: &B::Device) -> Result<()> {
    let img = read_image(&a.image)?;
    let mut b = bundle::open::<B>(&a.model, dev)?;
    let p = Predictor::new(&b.model, &mut b.tokenizer)?;
    let mut candidates = serde_json::Value::Null;
    let pred = match &a.answer {
        None if a.ensemble > 0 => {
            let sc = a.sampling.config();
            let s = popen_infer::ensemble::EnsembleSettings {
                k: a.ensemble,
                temperature: a.ensemble_temperature,
                seed: sc.seed,
                max_new_tokens: sc.max_new_tokens,
                fallback: a.ensemble_fallback,
                ..Default::default()
            };
            let o = popen_infer::ensemble::predict(&p, &[(&img, a.instruction.as_str())], &s)?
                .pop()
                .expect("one output per item");
            candidates = serde_json::json!(o
                .candidates
                .iter()
                .enumerate()
                .map(|(k, c)| serde_json::json!({"answer": c.answer, "tau": o.scores.tau[k], "eta": o.scores.eta[k], "output_instead_of_y_tilde": o.fell_back == Some(k)}))
                .collect::<Vec<_>>());
            o.prediction
        }
        None => {
            p.predict(&[(&img, a.instruction.as_str())], &a.sampling.config())?.pop().expect("one prediction per item")
        }
        Some(answer) => {
            let f = p
                .teacher_force(&[(&img, a.instruction.as_str(), answer.as_str())])?
                .pop()
                .expect("one result per item");
            popen_model::infer::Prediction::forced(answer.clone(), f)
        }
    };
    let masks: Vec<serde_json::Value> = pred
        .masks
        .iter()
        .zip(&pred.mask_scores)
        .map(|(m, s)| {
            let rle = Rle::encode(m);
            serde_json::json!({"height": m.height(), "width": m.width(), "counts": rle.to_coco_string(), "area": m.area(), "score": s})
        })
        .collect();
    let json = serde_json::json!({
        "image": a.image.display().to_string(),
        "instruction": a.instruction,
        "answer": pred.answer,
        "stopped": pred.stopped,
        "token_logprobs": pred.logprobs,
        "masks": masks,
        "seg_issues": pred.seg_issues,
        "ensemble_candidates": candidates,
    });
    let text = serde_json::to_string_pretty(&json)?;
    if let Some(out) = &a.out {
        let colored: Vec<_> =
            pred.masks.iter().enumerate().map(|(i, m)| (m.clone(), popen_data::render::palette(i))).collect();
        let overlay = popen_data::render::overlay_masks(&img, &colored, 1)?;
        popen_core::shard::atomic_write(out.join("overlay.png"), &popen_core::imageio::encode_png(&overlay)?)?;
        popen_core::shard::atomic_write(out.join("prediction.json"), text.as_bytes())?;
        eprintln!("wrote {}/overlay.png and prediction.json", out.display());
    }
    println!("{text}");
    Ok(())
}

pub fn score(a: ScoreArgs) -> Result<()> {
    on_backend!(a.backend.as_str(), B, dev => score_on::<B>(&a, &dev))
}

fn score_on<B: Backend>(a: &ScoreArgs, dev: &B::Device) -> Result<()> {
    let img = read_image(&a.image)?;
    let mut b = bundle::open::<B>(&a.model, dev)?;
    let p = Predictor::new(&b.model, &mut b.tokenizer)?;
    let s = p.score(&img, &a.instruction, &a.answer)?;
    let total: f32 = s.logprobs.iter().sum();
    let tokens: Vec<serde_json::Value> = s
        .ids
        .iter()
        .zip(&s.tokens)
        .zip(&s.logprobs)
        .map(|((id, t), lp)| serde_json::json!({"id": id, "token": t, "logprob": lp}))
        .collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "answer": a.answer,
            "tokens": tokens,
            "sum_logprob": total,
            "mean_logprob": total / s.logprobs.len().max(1) as f32,
        }))?
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct BenchDecodeArgs {
    /// A LLaMA in GGUF (default: the SmolLM2-135M-Instruct of `make assets`), dequantized to f32.
    #[arg(long, default_value = "data/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")]
    gguf: PathBuf,
    /// Batch sizes of the decode workload (comma-separated).
    #[arg(long, default_value = "1,3", value_delimiter = ',')]
    batch: Vec<usize>,
    /// Prompt length of the decode workload.
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    /// Greedy tokens per decode (per-token time = (T(n) - T(1)) / (n - 1)).
    #[arg(long, default_value_t = 33)]
    new_tokens: usize,
    /// Prompt length of the prefill workload (batch 1); 0 = skip it.
    #[arg(long, default_value_t = 512)]
    prefill: usize,
    /// Timed iterations per workload (after one warm-up).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Backend: flex (CPU), ndarray (CPU), or cuda in builds with the `cuda` feature.
    #[arg(long, default_value = "flex", value_parser = crate::backend::BACKENDS)]
    backend: String,
}

pub fn bench_decode(a: BenchDecodeArgs) -> Result<()> {
    on_backend!(a.backend.as_str(), B, dev => bench_decode_on::<B>(&a, &dev))
}

fn bench_decode_on<B: Backend>(a: &BenchDecodeArgs, dev: &B::Device) -> Result<()> {
    let g = popen_model::gguf::GgufFile::open(&a.gguf)
        .with_context(|| format!("{} (run make assets)", a.gguf.display()))?;
    let cfg = popen_model::llama::LlamaConfig::from_gguf(&g)?;
    let model = popen_model::llama::load_gguf::<B>(&cfg, &g, dev)?;
    let mut rows = Vec::new();
    for &b in &a.batch {
        rows.push(popen_model::bench::decode(&model, b, a.prompt, a.new_tokens, a.iters)?);
    }
    if a.prefill > 0 {
        rows.push(popen_model::bench::prefill(&model, 1, a.prefill, a.iters)?);
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let out: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| serde_json::json!({"workload": r.workload, "batch": r.batch, "prompt": r.prompt, "new_tokens": r.new_tokens, "ms": r.ms, "median_ms": r.median_ms()}))
        .collect();
    println!(
        "{}",
        serde_json::to_string_pretty(
            &serde_json::json!({"side": "popen", "backend": a.backend, "threads": threads, "model": a.gguf, "results": out})
        )?
    );
    Ok(())
}
