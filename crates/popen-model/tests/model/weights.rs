//! `popen_model::weights`: safetensors reading (single file, sharded folder), strict
//! application to burn modules, our own atomic checkpoints. Orientation against real
//! PyTorch checkpoints is covered by the transformers fixtures of the model tests (llama,
//! clip, pixel decoder); here the container format and the error paths.

use std::collections::BTreeMap;
use std::path::Path;

use burn::backend::NdArray;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use popen_model::weights::{self, Checkpoint, Remap, WeightsError};

type B = NdArray<f32>;

#[derive(Module, Debug)]
struct Block<B: Backend> {
    proj: Linear<B>,
    norm: LayerNorm<B>,
}

#[derive(Module, Debug)]
struct Toy<B: Backend> {
    embed: Embedding<B>,
    layers: Vec<Block<B>>,
    head: Linear<B>,
}

fn toy(device: &burn::backend::ndarray::NdArrayDevice) -> Toy<B> {
    Toy {
        embed: EmbeddingConfig::new(5, 4).init(device),
        layers: (0..2)
            .map(|_| Block { proj: LinearConfig::new(4, 3).init(device), norm: LayerNormConfig::new(3).init(device) })
            .collect(),
        head: LinearConfig::new(4, 2).with_bias(false).init(device),
    }
}

fn flat(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().unwrap()
}

/// Writes a safetensors file by hand (the format spec: u64 LE header length, JSON header,
/// raw little-endian data), independent of our writer.
fn write_raw(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut off = 0;
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + bytes.len()]}),
        );
        off += bytes.len();
        data.extend_from_slice(bytes);
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

#[test]
fn save_then_load_round_trips_in_pytorch_layout() {
    let dev = Default::default();
    let dir = tempfile::tempdir().unwrap();
    let a = toy(&dev);
    let path = dir.path().join("toy.safetensors");
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    weights::save(&a, &path, &meta).unwrap();

    let ck = Checkpoint::open(&path).unwrap();
    assert_eq!(ck.metadata.get("format").map(String::as_str), Some("pt"));
    // PyTorch layout: Linear weight [out, in], LayerNorm weight/bias.
    assert_eq!(ck.tensors["layers.0.proj.weight"].shape, vec![3, 4]);
    assert!(ck.tensors.contains_key("layers.1.norm.weight"));
    assert!(ck.tensors.contains_key("layers.1.norm.bias"));
    assert!(!ck.tensors.contains_key("head.bias"));
    // The stored [out, in] matrix is the transpose of burn's [in, out].
    let stored = ck.tensors["layers.0.proj.weight"].read_f32().unwrap();
    let burn_w = flat(a.layers[0].proj.weight.val());
    for i in 0..4 {
        for o in 0..3 {
            assert_eq!(stored[o * 4 + i], burn_w[i * 3 + o]);
        }
    }

    let b = weights::load(toy(&dev), &path, &Remap::none()).unwrap();
    assert_eq!(flat(a.layers[1].proj.weight.val()), flat(b.layers[1].proj.weight.val()));
    assert_eq!(flat(a.embed.weight.val()), flat(b.embed.weight.val()));
    assert_eq!(
        a.layers[0].norm.gamma.val().into_data().into_vec::<f32>().unwrap(),
        b.layers[0].norm.gamma.val().into_data().into_vec::<f32>().unwrap()
    );
}

#[test]
fn missing_unexpected_and_misshaped_tensors_are_listed_by_name() {
    let dev = Default::default();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("toy.safetensors");
    let mut named = weights::named_tensors(&toy(&dev));
    named.retain(|(n, _, _)| n != "layers.1.norm.bias");
    named.push(("extra.weight".into(), vec![2], vec![0.0, 1.0]));
    for t in named.iter_mut() {
        if t.0 == "head.weight" {
            *t = ("head.weight".into(), vec![3, 4], vec![0.0; 12]);
        }
    }
    weights::write_safetensors(&path, &named, &BTreeMap::new()).unwrap();
    let err = weights::load(toy(&dev), &path, &Remap::none()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightsError::Mismatch { .. }), "{msg}");
    assert!(msg.contains("missing layers.1.norm.bias"), "{msg}");
    assert!(msg.contains("unexpected extra.weight"), "{msg}");
    assert!(msg.contains("head.weight"), "{msg}");
    assert!(msg.contains("toy.safetensors"), "{msg}");
}

#[test]
fn remap_prefixes_and_drops() {
    let dev = Default::default();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested.safetensors");
    let mut named = weights::named_tensors(&toy(&dev));
    for t in named.iter_mut() {
        t.0 = format!("model.inner.{}", t.0);
    }
    named.push(("model.inner.rotary.inv_freq".into(), vec![2], vec![1.0, 2.0]));
    weights::write_safetensors(&path, &named, &BTreeMap::new()).unwrap();
    let remap = Remap::none().drop("model.inner.rotary.*").prefix("model.inner.", "");
    weights::load(toy(&dev), &path, &remap).unwrap();
    // Without the drop rule the buffer is an unexpected tensor.
    let err = weights::load(toy(&dev), &path, &Remap::none().prefix("model.inner.", "")).unwrap_err().to_string();
    assert!(err.contains("rotary.inv_freq"), "{err}");
}

#[test]
fn half_precision_files_are_converted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("half.safetensors");
    let vals = [0.5f32, -1.25, 3.0];
    let f16: Vec<u8> = vals.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
    let bf16: Vec<u8> = vals.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
    write_raw(&path, &[("a", "F16", vec![3], f16), ("b", "BF16", vec![1, 3], bf16)]);
    let ck = Checkpoint::open(&path).unwrap();
    assert_eq!(ck.tensors["a"].read_f32().unwrap(), vals);
    assert_eq!(ck.tensors["b"].read_f32().unwrap(), vals);
    assert_eq!(ck.tensors["b"].shape, vec![1, 3]);
}

#[test]
fn truncated_and_foreign_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    write_raw(&path, &[("a", "F32", vec![4], vec![0u8; 16])]);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    let e = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(e.contains("t.safetensors") && e.contains("truncated"), "{e}");

    std::fs::write(&path, b"PK\x03\x04 definitely a zip").unwrap();
    let e = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(e.contains("t.safetensors"), "{e}");

    std::fs::write(&path, [1u8, 2]).unwrap();
    assert!(Checkpoint::open(&path).is_err());

    // Offsets that disagree with shape x dtype.
    write_raw(&path, &[("a", "F32", vec![5], vec![0u8; 16])]);
    let e = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(e.contains("tensor a"), "{e}");
    write_raw(&path, &[("a", "Q4", vec![4], vec![0u8; 16])]);
    let e = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(e.contains("unsupported dtype Q4"), "{e}");
}

#[test]
fn sharded_folders_load_and_report_missing_shards() {
    let dev = Default::default();
    let dir = tempfile::tempdir().unwrap();
    let named = weights::named_tensors(&toy(&dev));
    let (first, second): (Vec<_>, Vec<_>) = named.into_iter().partition(|(n, _, _)| n.starts_with("layers."));
    let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    weights::write_safetensors(&dir.path().join(names[0]), &first, &BTreeMap::new()).unwrap();
    weights::write_safetensors(&dir.path().join(names[1]), &second, &BTreeMap::new()).unwrap();
    let mut map = serde_json::Map::new();
    for (n, _, _) in &first {
        map.insert(n.clone(), names[0].into());
    }
    for (n, _, _) in &second {
        map.insert(n.clone(), names[1].into());
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    weights::load(toy(&dev), dir.path(), &Remap::none()).unwrap();

    std::fs::remove_file(dir.path().join(names[1])).unwrap();
    let e = weights::load(toy(&dev), dir.path(), &Remap::none()).unwrap_err().to_string();
    assert!(e.contains(names[1]) && e.contains("missing"), "{e}");

    let empty = tempfile::tempdir().unwrap();
    let e = Checkpoint::open(empty.path()).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}

/// PyTorch pickles (torch.save as transformers' `pytorch_model.bin`, bf16, the legacy
/// non-zip format, sharded with `pytorch_model.bin.index.json`): values equal what torch
/// 2.9.1 wrote (tools/reference/torch_pickle_fixture.py).
#[test]
fn pytorch_pickles_read_like_torch() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/weights");
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let values = |k: &str, field: &str| -> Vec<f32> {
        exp[k][field].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
    };
    for (file, field) in [
        (dir.join("toy.bin"), "values"),
        (dir.join("toy_bf16.bin"), "bf16"),
        (dir.join("toy_legacy.pt"), "values"),
        (dir.join("sharded"), "values"),
    ] {
        let ck = Checkpoint::open(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert_eq!(ck.tensors.len(), 3, "{}", file.display());
        for name in ["model.layers.0.w", "model.layers.0.b", "lm_head.weight"] {
            let t = &ck.tensors[name];
            let shape: Vec<usize> =
                exp[name]["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            assert_eq!(t.shape, shape, "{} {name}", file.display());
            assert_eq!(t.read_f32().unwrap(), values(name, field), "{} {name}", file.display());
        }
    }
    let bad = tempfile::tempdir().unwrap();
    let p = bad.path().join("broken.bin");
    std::fs::write(&p, b"not a pickle at all").unwrap();
    let e = Checkpoint::open(&p).unwrap_err().to_string();
    assert!(e.contains("broken.bin"), "{e}");
}
