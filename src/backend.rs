//! Backend selection and the `popen device` check: which burn backend runs, and whether it
//! computes a matmul correctly and how fast.

use anyhow::{bail, Context, Result};
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use std::time::Instant;

/// Every `--backend` value (`cuda` needs a build with the `cuda` feature).
pub const BACKENDS: [&str; 3] = ["flex", "ndarray", "cuda"];

/// The backends this build can run.
pub fn available() -> Vec<&'static str> {
    let mut v = vec!["flex", "ndarray"];
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    v
}

#[derive(Debug, serde::Serialize)]
pub struct DeviceReport {
    pub backend: String,
    pub device: String,
    pub size: usize,
    pub iters: usize,
    /// Largest absolute difference of a 64x64x64 matmul against an f64 CPU reference
    /// (values in [-1, 1]; ~2e-6 in plain f32, ~2e-3 where the GPU multiplies in TF32).
    pub max_abs_err: f64,
    pub seconds_per_matmul: f64,
    pub gflops: f64,
}

/// The error for a `--backend` name this build cannot run.
pub fn unavailable(name: &str) -> anyhow::Error {
    anyhow::anyhow!("backend '{name}' is not available in this build (available: {})", available().join(", "))
}

/// The binary's one map from a `--backend` name to a burn backend type: evaluates `$body`
/// with the type `$B` bound to that backend (f32; `cuda` only in a build with the feature)
/// and `$dev` to its default device; an unknown name returns [`unavailable`]'s error from
/// the calling function. (Training stages add autodiff, precision and several devices on
/// top of it in `train_cmd::run_stage`.)
macro_rules! on_backend {
    ($name:expr, $B:ident, $dev:ident => $body:expr) => {
        match $name {
            "flex" => {
                type $B = burn::backend::Flex;
                let $dev: burn::tensor::Device<$B> = Default::default();
                $body
            }
            "ndarray" => {
                type $B = burn::backend::NdArray<f32>;
                let $dev: burn::tensor::Device<$B> = Default::default();
                $body
            }
            #[cfg(feature = "cuda")]
            "cuda" => {
                type $B = burn::backend::Cuda<f32, i32>;
                let $dev: burn::tensor::Device<$B> = Default::default();
                $body
            }
            other => return Err($crate::backend::unavailable(other).into()),
        }
    };
}
pub(crate) use on_backend;

pub fn check(backend: &str, size: usize, iters: usize) -> Result<DeviceReport> {
    on_backend!(backend, B, dev => run::<B>(backend, &dev, size, iters))
}

fn run<B: Backend>(name: &str, device: &B::Device, size: usize, iters: usize) -> Result<DeviceReport> {
    if size == 0 || size > 32768 || iters == 0 || iters > 10_000 {
        bail!("--size must be in 1..=32768 and --iters in 1..=10000");
    }
    // Correctness: a fixed 64x64 product against an f64 reference computed here.
    let n = 64;
    let a: Vec<f32> = (0..n * n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    let b: Vec<f32> = (0..n * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
    let ta = Tensor::<B, 2>::from_data(TensorData::new(a.clone(), [n, n]), device);
    let tb = Tensor::<B, 2>::from_data(TensorData::new(b.clone(), [n, n]), device);
    let got: Vec<f32> = ta.matmul(tb).into_data().convert::<f32>().into_vec().context("reading the product back")?;
    let mut max_abs_err = 0f64;
    for i in 0..n {
        for j in 0..n {
            let want: f64 = (0..n).map(|k| a[i * n + k] as f64 * b[k * n + j] as f64).sum();
            max_abs_err = max_abs_err.max((want - got[i * n + j] as f64).abs());
        }
    }
    if !(max_abs_err < 1e-2) {
        bail!("matmul on {} is wrong: max abs error {max_abs_err}", B::name(device));
    }

    // Throughput: size x size x size matmuls, after one warm-up.
    let x = Tensor::<B, 2>::random([size, size], Distribution::Normal(0.0, 1.0), device);
    let y = Tensor::<B, 2>::random([size, size], Distribution::Normal(0.0, 1.0), device);
    let _ = x.clone().matmul(y.clone());
    B::sync(device).map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))?;
    let t = Instant::now();
    let mut last = Vec::with_capacity(iters);
    for _ in 0..iters {
        last.push(x.clone().matmul(y.clone()));
    }
    B::sync(device).map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))?;
    let secs = t.elapsed().as_secs_f64() / iters as f64;
    drop(last);
    let flops = 2.0 * (size as f64).powi(3);
    Ok(DeviceReport {
        backend: name.to_string(),
        device: B::name(device),
        size,
        iters,
        max_abs_err,
        seconds_per_matmul: secs,
        gflops: flops / secs / 1e9,
    })
}
