//! LoRA adapters on the LLM's projections (Hu et al. 2021; PixelLM trains with r 8,
//! alpha 16, dropout 0.05 on q_proj and v_proj through PEFT).
//!
//! `y = W x + (alpha / r) * B(A(dropout(x)))`, A initialised like PEFT (Kaiming-uniform, the
//! same as a default `nn.Linear`), B with zeros, so an adapted model starts equal to the
//! base. Adapters are added after a checkpoint is loaded ([`add`]) and folded into the base
//! weights before a model is saved ([`merge`]), so saved models keep the plain
//! `LlamaForCausalLM` layout and load anywhere.

use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::prelude::*;

use crate::llama::Llama;

/// The projections an adapter can sit on.
pub const TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// One adapter: `scale * lora_b(lora_a(dropout(x)))`.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    pub lora_a: Linear<B>,
    pub lora_b: Linear<B>,
    pub dropout: Dropout,
    pub scale: f64,
}

impl<B: Backend> Lora<B> {
    pub fn new(d_in: usize, d_out: usize, r: usize, alpha: f32, dropout: f64, device: &B::Device) -> Self {
        let lora_a = LinearConfig::new(d_in, r).with_bias(false).init(device);
        let lora_b =
            LinearConfig::new(r, d_out).with_bias(false).with_initializer(burn::nn::Initializer::Zeros).init(device);
        Lora { lora_a, lora_b, dropout: DropoutConfig::new(dropout).init(), scale: alpha as f64 / r as f64 }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.lora_b.forward(self.lora_a.forward(self.dropout.forward(x))).mul_scalar(self.scale)
    }

    /// The weight change in burn's Linear layout [d_in, d_out].
    pub fn delta(&self) -> Tensor<B, 2> {
        self.lora_a.weight.val().matmul(self.lora_b.weight.val()).mul_scalar(self.scale)
    }
}

/// `base(x)` plus the adapter's contribution when there is one.
pub fn apply<B: Backend, const D: usize>(base: &Linear<B>, lora: &Option<Lora<B>>, x: Tensor<B, D>) -> Tensor<B, D> {
    match lora {
        None => base.forward(x),
        Some(l) => base.forward(x.clone()) + l.forward(x),
    }
}

fn shape(lin: &Linear<impl Backend>) -> (usize, usize) {
    let [i, o] = lin.weight.dims();
    (i, o)
}

/// Adds adapters on `targets` (names from [`TARGETS`]) in every layer. Unknown names are an
/// error listing the valid ones.
pub fn add<B: Backend>(
    mut llm: Llama<B>,
    targets: &[String],
    r: usize,
    alpha: f32,
    dropout: f64,
    device: &B::Device,
) -> Result<Llama<B>, String> {
    if r == 0 {
        return Err("LoRA rank must be > 0".into());
    }
    for t in targets {
        if !TARGETS.contains(&t.as_str()) {
            return Err(format!("unknown LoRA target '{t}' (one of {})", TARGETS.join(", ")));
        }
    }
    let want = |n: &str| targets.iter().any(|t| t == n);
    let mk = |lin: &Linear<B>| {
        let (i, o) = shape(lin);
        Some(Lora::new(i, o, r, alpha, dropout, device))
    };
    for layer in llm.model.layers.iter_mut() {
        let a = &mut layer.self_attn;
        if want("q_proj") {
            a.q_lora = mk(&a.q_proj);
        }
        if want("k_proj") {
            a.k_lora = mk(&a.k_proj);
        }
        if want("v_proj") {
            a.v_lora = mk(&a.v_proj);
        }
        if want("o_proj") {
            a.o_lora = mk(&a.o_proj);
        }
        let m = &mut layer.mlp;
        if want("gate_proj") {
            m.gate_lora = mk(&m.gate_proj);
        }
        if want("up_proj") {
            m.up_lora = mk(&m.up_proj);
        }
        if want("down_proj") {
            m.down_lora = mk(&m.down_proj);
        }
    }
    Ok(llm)
}

fn fold<B: Backend>(base: Linear<B>, lora: Option<Lora<B>>) -> Linear<B> {
    match lora {
        None => base,
        Some(l) => {
            let delta = l.delta();
            let Linear { weight, bias } = base;
            let w = weight.val() + delta;
            Linear { weight: burn::module::Param::initialized(weight.id, w), bias }
        }
    }
}

/// Folds every adapter into its base weight (`W + scale * A B` in burn's layout) and removes
/// the adapters. Parameter ids of the base weights are kept.
pub fn merge<B: Backend>(mut llm: Llama<B>) -> Llama<B> {
    for layer in llm.model.layers.iter_mut() {
        let a = &mut layer.self_attn;
        a.q_proj = fold(a.q_proj.clone(), a.q_lora.take());
        a.k_proj = fold(a.k_proj.clone(), a.k_lora.take());
        a.v_proj = fold(a.v_proj.clone(), a.v_lora.take());
        a.o_proj = fold(a.o_proj.clone(), a.o_lora.take());
        let m = &mut layer.mlp;
        m.gate_proj = fold(m.gate_proj.clone(), m.gate_lora.take());
        m.up_proj = fold(m.up_proj.clone(), m.up_lora.take());
        m.down_proj = fold(m.down_proj.clone(), m.down_lora.take());
    }
    llm
}

/// Number of adapters in the model.
pub fn count<B: Backend>(llm: &Llama<B>) -> usize {
    llm.model
        .layers
        .iter()
        .map(|l| {
            let a = &l.self_attn;
            let m = &l.mlp;
            [a.q_lora.is_some(), a.k_lora.is_some(), a.v_lora.is_some(), a.o_lora.is_some()]
                .into_iter()
                .chain([m.gate_lora.is_some(), m.up_lora.is_some(), m.down_lora.is_some()])
                .filter(|x| *x)
                .count()
        })
        .sum()
}
