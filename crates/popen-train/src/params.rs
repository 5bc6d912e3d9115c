//! Parameters by name: which ones train (full, LoRA, heads), their count, the global
//! gradient norm and its clipping, and the name <-> id bookkeeping that lets a resumed run
//! hand the optimizer its saved state.
//!
//! burn keys gradients and optimizer state by `ParamId`, which is fresh each time a model
//! is loaded from safetensors. A checkpoint therefore stores `{name: id}` beside the
//! optimizer state, and [`assign_ids`] gives the reloaded model its old ids back.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use popen_model::pixellm::PixelLm;

use crate::config::{LoraConfig, Trainable};

pub use popen_model::lora::TARGETS as LORA_TARGETS;

struct Path(Vec<String>);

impl Path {
    fn push(&mut self, name: &str, container: &str) {
        // Option wrappers add no path component in burn's naming; everything else does.
        let _ = container;
        self.0.push(name.to_string());
    }
    fn name(&self) -> String {
        self.0.join(".")
    }
}

/// Every float parameter: name -> (id, element count, requires grad).
pub fn float_params<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, (ParamId, usize, bool)> {
    struct V(Path, BTreeMap<String, (ParamId, usize, bool)>);
    impl<B: Backend> ModuleVisitor<B> for V {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.0.push(name, container);
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.0 .0.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let n = param.val().shape().num_elements();
            self.1.insert(self.0.name(), (param.id, n, param.is_require_grad()));
        }
    }
    let mut v = V(Path(Vec::new()), BTreeMap::new());
    module.visit(&mut v);
    v.1
}

/// Gives the parameters named in `ids` those ids (see the module docs). Returns the names
/// of `ids` the module does not have.
pub fn assign_ids<B: Backend, M: Module<B>>(module: M, ids: &BTreeMap<String, u64>) -> (M, Vec<String>) {
    struct Mp<'a>(Path, &'a BTreeMap<String, u64>, Vec<String>);
    impl<B: Backend> ModuleMapper<B> for Mp<'_> {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.0.push(name, container);
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.0 .0.pop();
        }
        fn map_float<const D: usize>(&mut self, mut param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let name = self.0.name();
            if let Some(&id) = self.1.get(&name) {
                param.id = ParamId::from(id);
                self.2.push(name);
            }
            param
        }
    }
    let mut m = Mp(Path(Vec::new()), ids, Vec::new());
    let module = module.map(&mut m);
    let seen: std::collections::BTreeSet<&String> = m.2.iter().collect();
    let missing = ids.keys().filter(|k| !seen.contains(k)).cloned().collect();
    (module, missing)
}

/// Top-level modules that `freeze` may name.
pub const FREEZABLE: [&str; 8] = [
    "llm",
    "vision_tower",
    "mm_projector",
    "out_mm_projector",
    "image_feature_neck",
    "text_hidden_fcs",
    "decoder",
    "seg_locator",
];

/// Freezes the named top-level modules ([`FREEZABLE`]).
pub fn freeze_modules<B: Backend>(mut model: PixelLm<B>, names: &[String]) -> Result<PixelLm<B>, String> {
    for n in names {
        match n.as_str() {
            "llm" => model.llm = model.llm.no_grad(),
            "vision_tower" => model.vision_tower = model.vision_tower.no_grad(),
            "mm_projector" => model.mm_projector = model.mm_projector.no_grad(),
            "out_mm_projector" => model.out_mm_projector = model.out_mm_projector.no_grad(),
            "image_feature_neck" => model.image_feature_neck = model.image_feature_neck.no_grad(),
            "text_hidden_fcs" => model.text_hidden_fcs = model.text_hidden_fcs.no_grad(),
            "decoder" => model.decoder = model.decoder.no_grad(),
            "seg_locator" => model.seg_locator = model.seg_locator.no_grad(),
            other => return Err(format!("freeze: unknown module '{other}' (one of {})", FREEZABLE.join(", "))),
        }
    }
    Ok(model)
}

/// Applies the `trainable` choice (a SAM encoder is frozen in all of them): `full` leaves
/// everything else trainable; `lora` and `heads`
/// freeze the CLIP tower and every LLM layer (embed_tokens, the final norm and lm_head stay
/// trainable, as PixelLM's `modules_to_save`), and `lora` then adds adapters, which train.
pub fn select_trainable<B: Backend>(
    mut model: PixelLm<B>,
    trainable: Trainable,
    lora: &LoraConfig,
    device: &B::Device,
) -> Result<PixelLm<B>, String> {
    // A SAM encoder (the tiny-sam preset) is pretrained and always frozen.
    model.sam_encoder = model.sam_encoder.no_grad();
    if trainable == Trainable::Full {
        return Ok(model);
    }
    model.vision_tower = model.vision_tower.no_grad();
    let layers = std::mem::take(&mut model.llm.model.layers);
    model.llm.model.layers = layers.into_iter().map(|l| l.no_grad()).collect();
    if trainable == Trainable::Lora {
        let llm = model.llm;
        model.llm = popen_model::lora::add(llm, &lora.targets, lora.r, lora.alpha, lora.dropout, device)?;
    }
    Ok(model)
}

/// (trainable, total) element counts.
pub fn count<B: Backend, M: Module<B>>(module: &M) -> (usize, usize) {
    let p = float_params(module);
    let total = p.values().map(|v| v.1).sum();
    let train = p.values().filter(|v| v.2).map(|v| v.1).sum();
    (train, total)
}

/// The global L2 norm of all gradients of `module`'s parameters (PyTorch's
/// `clip_grad_norm_` norm), one device read.
pub fn grad_norm<B: AutodiffBackend, M: Module<B>>(module: &M, grads: &GradientsParams) -> f32 {
    struct V<'a, B: AutodiffBackend>(&'a GradientsParams, Option<Tensor<B::InnerBackend, 1>>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for V<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.0.get::<B::InnerBackend, D>(param.id) {
                let s = g.powi_scalar(2).sum();
                self.1 = Some(match self.1.take() {
                    None => s,
                    Some(acc) => acc + s,
                });
            }
        }
    }
    let mut v = V::<B>(grads, None);
    module.visit(&mut v);
    match v.1 {
        None => 0.0,
        Some(t) => t.into_scalar().elem::<f32>().sqrt(),
    }
}

/// Scales every gradient by `factor` (global-norm clipping: `max_norm / (norm + 1e-6)`, as
/// `torch.nn.utils.clip_grad_norm_`).
pub fn scale_grads<B: AutodiffBackend, M: Module<B>>(module: &M, grads: &mut GradientsParams, factor: f32) {
    struct V<'a, B: AutodiffBackend>(&'a mut GradientsParams, f32, std::marker::PhantomData<B>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for V<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.0.remove::<B::InnerBackend, D>(param.id) {
                self.0.register::<B::InnerBackend, D>(param.id, g.mul_scalar(self.1));
            }
        }
    }
    module.visit(&mut V::<B>(grads, factor, std::marker::PhantomData));
}

/// Global-norm clipping; returns the norm before clipping.
pub fn clip_global_norm<B: AutodiffBackend, M: Module<B>>(
    module: &M,
    grads: &mut GradientsParams,
    max_norm: f32,
) -> f32 {
    let norm = grad_norm::<B, M>(module, grads);
    if max_norm > 0.0 && norm.is_finite() && norm > max_norm {
        scale_grads::<B, M>(module, grads, max_norm / (norm + 1e-6));
    }
    norm
}
