//! The parts of a training stage's loop that SFT and DPO share: the AdamW optimizer,
//! `--resume` from the newest checkpoint (parameters, their ids, optimizer state), writing a
//! checkpoint, the final model folder (LoRA folded in, written atomically), and the frozen
//! SAM encoder's image embeddings computed once per distinct image (optionally kept on disk:
//! [`sam_embeddings_cached`] for a whole training set, [`SamMemo`] image by image).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::optim::AdamWConfig;
use burn::optim::Optimizer;
use burn::prelude::*;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::DType;
use popen_model::bundle;
use popen_model::pixellm::{PixelLm, PixelLmConfig};
use popen_model::preprocess::Preprocessor;
use popen_model::tokenizer::{PixelLmTokens, Tokenizer};
use popen_model::weights::Checkpoint;

use crate::checkpoint::{self, TrainState};
use crate::params;
use crate::sft::SftModel;
use crate::{io_err, Result, TrainError};

/// A stage's starting model folder, opened: the model, its tokenizer with PixelLM's tokens
/// added, those tokens, and the model's config.
pub struct Opened<B: Backend> {
    pub model: PixelLm<B>,
    pub tokenizer: Tokenizer,
    pub tokens: PixelLmTokens,
    pub config: PixelLmConfig,
}

/// Opens the model folder `init` (`popen model-init`, or an earlier stage's `out/model`).
pub fn open_init<B: Backend>(init: &Path, device: &B::Device) -> Result<Opened<B>> {
    let bundle::Bundle { model, mut tokenizer, .. } = bundle::open::<B>(init, device)?;
    let config = model.config().clone();
    let tokens = tokenizer.add_pixellm_tokens(config.seg_group_len()).map_err(|e| TrainError::Data(e.to_string()))?;
    Ok(Opened { model, tokenizer, tokens, config })
}

/// The module a stage trains: `trainable`'s selection (LoRA adapters added when asked), then
/// the `freeze` modules frozen on top.
pub fn policy<B: AutodiffBackend>(
    model: PixelLm<B>,
    trainable: crate::config::Trainable,
    lora: &crate::config::LoraConfig,
    freeze: &[String],
    device: &B::Device,
) -> Result<SftModel<B>> {
    let model = params::select_trainable(model, trainable, lora, device).map_err(TrainError::Config)?;
    Ok(SftModel { pixellm: params::freeze_modules(model, freeze).map_err(TrainError::Config)? })
}

/// burn's AdamW over the trained module.
pub type Optim<B> = burn::optim::adaptor::OptimizerAdaptor<burn::optim::AdamW, SftModel<B>, B>;

/// AdamW with the given betas, epsilon and (decoupled) weight decay.
pub fn adamw<B: AutodiffBackend>(beta1: f32, beta2: f32, eps: f32, weight_decay: f32) -> Optim<B> {
    AdamWConfig::new().with_beta_1(beta1).with_beta_2(beta2).with_epsilon(eps).with_weight_decay(weight_decay).init()
}

/// Where a run starts: the model and optimizer (from the checkpoint when resumed), the first
/// step, and the checkpoint a NaN error would name.
pub struct Start<B: AutodiffBackend> {
    pub model: SftModel<B>,
    pub optim: Optim<B>,
    pub step: usize,
    pub resumed_from: Option<usize>,
    /// The newest checkpoint's folder, or "none".
    pub last_checkpoint: String,
}

/// Resumes from the newest checkpoint under `out` when `resume` (the checkpoint must have
/// been written with the same `config`), or starts at step 0; without `resume`, a folder
/// that already holds checkpoints is refused (`--resume` or another `--out`).
pub fn start<B: AutodiffBackend>(
    out: &Path,
    resume: bool,
    config: &serde_json::Value,
    model: SftModel<B>,
    optim: Optim<B>,
    dtype: DType,
    device: &B::Device,
) -> Result<Start<B>> {
    if !resume {
        if checkpoint::latest(out)?.is_some() {
            return Err(TrainError::Checkpoint {
                path: out.join("checkpoints"),
                message: "holds checkpoints of an earlier run: pass --resume to continue it, or choose another --out"
                    .into(),
            });
        }
        return Ok(Start { model, optim, step: 0, resumed_from: None, last_checkpoint: "none".into() });
    }
    let Some((dir, state)) = checkpoint::latest(out)? else {
        tracing::info!("--resume: no checkpoint under {}, starting at step 0", out.display());
        return Ok(Start { model, optim, step: 0, resumed_from: None, last_checkpoint: "none".into() });
    };
    if &state.config != config {
        return Err(TrainError::Checkpoint {
            path: dir,
            message: "was written with a different config; resume with the same config or start a new --out".into(),
        });
    }
    let model_file = dir.join(checkpoint::MODEL_FILE);
    let ck = Checkpoint::open(&model_file)
        .map_err(|e| TrainError::Checkpoint { path: model_file.clone(), message: e.to_string() })?;
    let pix = popen_model::weights::apply_checkpoint(model.pixellm, &ck, dtype, false)
        .map_err(|e| TrainError::Checkpoint { path: model_file.clone(), message: e.to_string() })?;
    let (model, missing) = params::assign_ids(SftModel { pixellm: pix }, &state.param_ids);
    if !missing.is_empty() {
        return Err(TrainError::Checkpoint {
            path: dir.join(checkpoint::STATE_FILE),
            message: format!("parameters not in the model: {}", missing.join(", ")),
        });
    }
    let opt_path = dir.join(checkpoint::OPTIMIZER_FILE);
    let rec = BinFileRecorder::<FullPrecisionSettings>::new()
        .load(opt_path.clone(), device)
        .map_err(|e| TrainError::Checkpoint { path: opt_path, message: format!("optimizer state: {e}") })?;
    let optim = optim.load_record(rec);
    tracing::info!("resuming from {} (step {})", dir.display(), state.step);
    Ok(Start {
        model,
        optim,
        step: state.step,
        resumed_from: Some(state.step),
        last_checkpoint: dir.display().to_string(),
    })
}

/// Writes the checkpoint of `step` optimizer steps (`grad_accum` micro-batches each) under
/// `out`, keeping the newest `keep`.
#[allow(clippy::too_many_arguments)]
pub fn write_checkpoint<B: AutodiffBackend>(
    out: &Path,
    model: &SftModel<B>,
    optim: &Optim<B>,
    step: usize,
    grad_accum: usize,
    config: &serde_json::Value,
    keep: usize,
    last_loss: Option<f32>,
) -> Result<PathBuf> {
    let ids = params::float_params(model).into_iter().map(|(n, (id, _, _))| (n, id.val())).collect();
    let state =
        TrainState { step, micro_batches: step * grad_accum, config: config.clone(), param_ids: ids, last_loss };
    checkpoint::write(out, &state, keep, |dir| {
        popen_model::pixellm::save(&model.pixellm, dir.join(checkpoint::MODEL_FILE))?;
        BinFileRecorder::<FullPrecisionSettings>::new()
            .record(optim.to_record(), dir.join(checkpoint::OPTIMIZER_FILE))
            .map_err(|e| io_err(dir.join(checkpoint::OPTIMIZER_FILE), format!("{e}")))?;
        Ok(())
    })
}

/// The trained model folder `dir` (LoRA adapters merged into the weights): written into a
/// sibling `<dir>.partial-<pid>` and renamed into place, so `dir` is either the previous
/// folder or the complete new one.
pub fn save_model<B: Backend>(dir: &Path, mut model: PixelLm<B>, tokenizer: &Tokenizer) -> Result<()> {
    if popen_model::lora::count(&model.llm) > 0 {
        model.llm = popen_model::lora::merge(model.llm);
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "model".into());
    let tmp = dir.with_file_name(format!("{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    bundle::save(&tmp, &model, tokenizer)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| io_err(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| io_err(dir, e))?;
    Ok(())
}

/// The frozen SAM encoder's embedding (`[c, g, g]` values) of `n` distinct images, in
/// batches of `batch`: `decode(i)` gives image i, `key(i, hasher)` feeds what identifies it
/// (its bytes, a noise recipe...) to the cache key. With `cache_dir`, the embeddings are kept
/// in `cache_dir/sam-<key>.f32` (raw little-endian f32, `[n, c, g, g]`), the key a sha256 of
/// the input size, every image's key and the encoder's weights: another run on the same
/// images and encoder (a second seed, a resumed job) reads them instead. None for a model
/// without a SAM encoder.
#[allow(clippy::too_many_arguments)]
pub fn sam_embeddings_cached<B: Backend>(
    model: &PixelLm<B>,
    n: usize,
    decode: &dyn Fn(usize) -> Result<image::RgbImage>,
    key: &dyn Fn(usize, &mut sha2::Sha256),
    pre: &Preprocessor,
    batch: usize,
    progress: bool,
    cache_dir: Option<&Path>,
) -> Result<Option<(Vec<Arc<[f32]>>, [usize; 3])>> {
    if model.sam_encoder.is_none() || n == 0 {
        return Ok(None);
    }
    let t0 = Instant::now();
    let g = model.config().patch_grid();
    let c = model.config().vision_width();
    let shape = [c, g, g];
    let per = c * g * g;
    let file = cache_dir.map(|d| d.join(format!("sam-{}.f32", sam_cache_key(model, n, key))));
    let mut flat: Option<Vec<f32>> = None;
    if let Some(f) = &file {
        if let Ok(bytes) = std::fs::read(f) {
            if bytes.len() == n * per * 4 {
                flat = Some(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect());
                tracing::info!("sam embeddings: {n} images read from {}", f.display());
            } else {
                tracing::warn!("{}: unexpected size {} bytes, recomputing", f.display(), bytes.len());
            }
        }
    }
    let flat = match flat {
        Some(v) => v,
        None => {
            let v = compute_sam_embeddings(model, n, decode, pre, batch, progress, shape)?;
            if let Some(f) = &file {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                let dir = f.parent().unwrap_or(Path::new("."));
                std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
                let tmp = f.with_extension(format!("f32.tmp{}", std::process::id()));
                std::fs::write(&tmp, &bytes).map_err(|e| io_err(&tmp, e))?;
                std::fs::rename(&tmp, f).map_err(|e| io_err(f, e))?;
            }
            tracing::info!("sam embeddings: {n} images in {:.1} s", t0.elapsed().as_secs_f64());
            v
        }
    };
    Ok(Some((flat.chunks_exact(per).map(Arc::from).collect(), shape)))
}

/// The SAM encoder on images `0..n`, in batches: flat `[n, c, g, g]` values.
fn compute_sam_embeddings<B: Backend>(
    model: &PixelLm<B>,
    n: usize,
    decode: &dyn Fn(usize) -> Result<image::RgbImage>,
    pre: &Preprocessor,
    batch: usize,
    progress: bool,
    shape: [usize; 3],
) -> Result<Vec<f32>> {
    let bar = progress.then(|| popen_core::progress::bar(n as u64, "sam embeddings"));
    let mut flat = Vec::with_capacity(n * shape.iter().product::<usize>());
    let all: Vec<usize> = (0..n).collect();
    for chunk in all.chunks(batch.max(1)) {
        let mut images = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let img = decode(i)?;
            images.push(pre.apply(&img).map_err(|e| TrainError::Data(format!("image {i}: {e}")))?);
        }
        let emb = model
            .sam_embeddings(&images)
            .map_err(|e| TrainError::Data(e.to_string()))?
            .expect("the model has a SAM encoder");
        let [_, c, h, w] = emb.dims();
        if [c, h, w] != shape {
            return Err(TrainError::Data(format!("SAM embeddings are {:?} per image, expected {shape:?}", [c, h, w])));
        }
        flat.extend(
            emb.into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .map_err(|e| TrainError::Data(format!("SAM embeddings: {e:?}")))?,
        );
        if let Some(b) = &bar {
            b.inc(chunk.len() as u64);
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    Ok(flat)
}

/// The key of [`sam_embeddings_cached`]' file: sha256 over the input size, every image's
/// key in order and every value of the SAM encoder.
fn sam_cache_key<B: Backend>(model: &PixelLm<B>, n: usize, key: &dyn Fn(usize, &mut sha2::Sha256)) -> String {
    use burn::module::{ModuleVisitor, Param};
    use sha2::{Digest, Sha256};
    struct V(Sha256);
    impl<B: Backend> ModuleVisitor<B> for V {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let data = param.val().into_data().convert::<f32>();
            self.0.update(data.as_bytes());
        }
    }
    let mut h = Sha256::new();
    h.update((model.config().image_size as u64).to_le_bytes());
    for i in 0..n {
        key(i, &mut h);
    }
    let mut v = V(h);
    if let Some(enc) = &model.sam_encoder {
        enc.visit(&mut v);
    }
    hex::encode(&v.0.finalize()[..12])
}

/// What names the SAM encoder in a per-image cache file: sha256 over the input size and the
/// encoder's weights (hex, 24 characters).
pub fn sam_encoder_key<B: Backend>(model: &PixelLm<B>) -> String {
    sam_cache_key(model, 0, &|_, _| {})
}

/// The key of an image in the per-image SAM cache ([`SamMemo`]): sha256 over the sha256 of
/// its encoded bytes and, for a perturbed copy, its noise recipe (JSON); hex, 32 characters.
/// A clean image has the same key in every stage, so dpo, ensemble-train and predict share
/// its cached embedding.
pub fn sam_image_key(bytes: &[u8], recipe_json: Option<&[u8]>) -> String {
    use sha2::{Digest, Sha256};
    let d: [u8; 32] = Sha256::digest(bytes).into();
    let mut h = Sha256::new();
    h.update(d);
    if let Some(r) = recipe_json {
        h.update(r);
    }
    hex::encode(&h.finalize()[..16])
}

/// The frozen SAM encoder's embeddings of the images a stage meets, one image at a time (so
/// the values do not depend on the batch an image first appears in), memoized by the stage's
/// image index and, with a folder, kept on disk for later runs ([`sam_embedding_of`]).
pub struct SamMemo {
    /// Names the encoder and input size in the disk cache's file names.
    encoder_key: String,
    dir: Option<PathBuf>,
    memo: std::cell::RefCell<std::collections::HashMap<String, Arc<[f32]>>>,
}

impl SamMemo {
    /// None for a model without a SAM encoder (CLIP: nothing to cache).
    pub fn new<B: Backend>(model: &PixelLm<B>, dir: Option<&Path>) -> Option<Self> {
        model.sam_encoder.as_ref()?;
        Some(SamMemo { encoder_key: sam_encoder_key(model), dir: dir.map(Path::to_path_buf), memo: Default::default() })
    }

    /// The embeddings of a batch: `images[k]` (preprocessed) has the cache key `keys[k]`
    /// ([`sam_image_key`]). Flat values and `[n, c, g, g]`.
    pub fn batch<B: Backend>(
        &self,
        model: &PixelLm<B>,
        images: &[popen_model::preprocess::Preprocessed],
        keys: &[&str],
    ) -> Result<(Vec<f32>, [usize; 4])> {
        let mut v = Vec::new();
        let mut shape = [0usize; 3];
        for (im, key) in images.iter().zip(keys) {
            let e = sam_embedding_of(model, im, key, &self.encoder_key, self.dir.as_deref(), &self.memo)?;
            shape = e.1;
            v.extend_from_slice(&e.0);
        }
        Ok((v, [images.len(), shape[0], shape[1], shape[2]]))
    }
}

/// For `popen predict` and the ensemble: an image is keyed by its preprocessed pixels
/// (sha256 of the f32 values and the resized size), which is all the encoder sees.
impl<B: Backend> popen_model::infer::SamSource<B> for SamMemo {
    fn embeddings(
        &self,
        model: &PixelLm<B>,
        images: &[popen_model::preprocess::Preprocessed],
    ) -> std::result::Result<Option<Tensor<B, 4>>, popen_model::pixellm::PixelLmError> {
        use sha2::{Digest, Sha256};
        let keys: Vec<String> = images
            .iter()
            .map(|im| {
                let mut h = Sha256::new();
                h.update(b"preprocessed");
                h.update((im.resized_hw.0 as u64).to_le_bytes());
                h.update((im.resized_hw.1 as u64).to_le_bytes());
                for x in &im.pixels {
                    h.update(x.to_le_bytes());
                }
                hex::encode(&h.finalize()[..16])
            })
            .collect();
        let ks: Vec<&str> = keys.iter().map(String::as_str).collect();
        let (v, shape) =
            self.batch(model, images, &ks).map_err(|e| popen_model::pixellm::PixelLmError::Input(e.to_string()))?;
        let Some(device) = model.devices().into_iter().next() else { return Ok(None) };
        Ok(Some(Tensor::from_data(TensorData::new(v, shape), &device)))
    }
}

/// The frozen SAM encoder's embedding of one preprocessed image (values and `[c, g, g]`),
/// computed alone (batch of one, so it does not depend on the batch it first appeared in)
/// and memoized under `image_key`; with `dir`, also kept in `dir/sam1-<encoder_key>-<image_key>.f32`
/// and read from there by later runs.
pub fn sam_embedding_of<B: Backend>(
    model: &PixelLm<B>,
    image: &popen_model::preprocess::Preprocessed,
    image_key: &str,
    encoder_key: &str,
    dir: Option<&Path>,
    memo: &std::cell::RefCell<std::collections::HashMap<String, Arc<[f32]>>>,
) -> Result<(Arc<[f32]>, [usize; 3])> {
    let g = model.config().patch_grid();
    let c = model.config().vision_width();
    let shape = [c, g, g];
    if let Some(v) = memo.borrow().get(image_key) {
        return Ok((v.clone(), shape));
    }
    let per = c * g * g;
    let file = dir.map(|d| d.join(format!("sam1-{encoder_key}-{image_key}.f32")));
    let mut got: Option<Vec<f32>> = None;
    if let Some(f) = &file {
        if let Ok(bytes) = std::fs::read(f) {
            if bytes.len() == per * 4 {
                got = Some(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect());
            }
        }
    }
    let v = match got {
        Some(v) => v,
        None => {
            let emb = model
                .sam_embeddings(std::slice::from_ref(image))
                .map_err(|e| TrainError::Data(e.to_string()))?
                .ok_or_else(|| TrainError::Data("the model has no SAM encoder".into()))?;
            let [_, cc, h, w] = emb.dims();
            if [cc, h, w] != shape {
                return Err(TrainError::Data(format!(
                    "SAM embeddings are {:?} per image, expected {shape:?}",
                    [cc, h, w]
                )));
            }
            let v = emb
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .map_err(|e| TrainError::Data(format!("SAM embeddings: {e:?}")))?;
            if let Some(f) = &file {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                let d = f.parent().unwrap_or(Path::new("."));
                std::fs::create_dir_all(d).map_err(|e| io_err(d, e))?;
                let tmp = f.with_extension(format!("f32.tmp{}", std::process::id()));
                std::fs::write(&tmp, &bytes).map_err(|e| io_err(&tmp, e))?;
                std::fs::rename(&tmp, f).map_err(|e| io_err(f, e))?;
            }
            v
        }
    };
    let a: Arc<[f32]> = Arc::from(v);
    memo.borrow_mut().insert(image_key.to_string(), a.clone());
    Ok((a, shape))
}
