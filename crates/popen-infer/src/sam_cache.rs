//! The frozen SAM encoder's image embeddings (tiny-sam models), computed once per distinct
//! image and optionally kept on disk between runs: [`sam_embeddings_cached`] for a whole
//! training set in one file, [`SamMemo`] image by image (one file per image, shared by
//! `popen predict`, dpo and ensemble-train: [`sam_embedding_of`]). The encoder never trains,
//! so every stage and every prediction run on the same images and encoder can reuse them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::prelude::*;
use popen_model::pixellm::PixelLm;
use popen_model::preprocess::Preprocessor;

use crate::{io_err, InferError, Result};

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
                flat = Some(le_f32(&bytes));
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
                write_f32(f, &v)?;
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
            images.push(pre.apply(&img).map_err(|e| InferError::Data(format!("image {i}: {e}")))?);
        }
        flat.extend(encode(model, &images, shape)?);
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
                got = Some(le_f32(&bytes));
            }
        }
    }
    let v = match got {
        Some(v) => v,
        None => {
            let v = encode(model, std::slice::from_ref(image), shape)?;
            if let Some(f) = &file {
                write_f32(f, &v)?;
            }
            v
        }
    };
    let a: Arc<[f32]> = Arc::from(v);
    memo.borrow_mut().insert(image_key.to_string(), a.clone());
    Ok((a, shape))
}

/// The SAM encoder on preprocessed `images`: flat `[n, c, g, g]` values, each image's
/// `[c, g, g]` checked against `shape`.
fn encode<B: Backend>(
    model: &PixelLm<B>,
    images: &[popen_model::preprocess::Preprocessed],
    shape: [usize; 3],
) -> Result<Vec<f32>> {
    let emb = model
        .sam_embeddings(images)
        .map_err(|e| InferError::Data(e.to_string()))?
        .ok_or_else(|| InferError::Data("the model has no SAM encoder".into()))?;
    let [_, c, h, w] = emb.dims();
    if [c, h, w] != shape {
        return Err(InferError::Data(format!("SAM embeddings are {:?} per image, expected {shape:?}", [c, h, w])));
    }
    emb.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| InferError::Data(format!("SAM embeddings: {e:?}")))
}

/// Raw little-endian f32 values.
fn le_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// Writes `values` to `file` (raw little-endian f32) through a temporary sibling renamed into
/// place, creating its folder.
fn write_f32(file: &Path, values: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let tmp = file.with_extension(format!("f32.tmp{}", std::process::id()));
    std::fs::write(&tmp, &bytes).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, file).map_err(|e| io_err(file, e))
}
