//! Tests of the GGUF reader (`popen_model::gguf`).
//!
//! * Against an independent reference: `tests/fixtures/smollm2_gguf.json`, written by
//!   `tools/reference/gguf_fixture.py` with llama.cpp's own Python reader (PyPI `gguf`) from
//!   the SmolLM2-135M-Instruct Q4_1 GGUF that `make assets` fetches.
//! * On small GGUF files built here: every metadata value type, F16/BF16/Q4_0 (absent from
//!   SmolLM2), alignment, unsupported and unknown types.
//! * Hostile input: truncated files, bad magic, huge lengths and counts.
//! * `unpermute_qk` inverts convert_hf_to_gguf's `permute`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use popen_model::gguf::{llama_hf_name, unpermute_qk, GgmlType, GgufError, GgufFile, MetaValue};
use serde_json::Value;

use crate::common;
use common::smollm2_path;

fn fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_gguf.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

/// A unique temp file path (removed on drop).
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str, bytes: &[u8]) -> TempFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "popen-gguf-test-{}-{}-{tag}.gguf",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&p, bytes).unwrap();
        TempFile(p)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn close(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() <= rel * want.abs().max(1e-30)
}

fn as_usize_vec(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

#[test]
fn smollm2_matches_gguf_py_reference() {
    let fx = fixture();
    let path = smollm2_path();
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.file_len(), fx["meta"]["file_size"].as_u64().unwrap());
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 32);

    // Metadata.
    assert_eq!(g.metadata().len() as u64, fx["metadata_count"].as_u64().unwrap());
    let m = &fx["metadata"];
    assert_eq!(g.get_str("general.architecture").unwrap(), m["general.architecture"]);
    for key in [
        "llama.block_count",
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.context_length",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
    ] {
        assert_eq!(g.get_u64(key).unwrap(), m[key].as_u64().unwrap(), "{key}");
    }
    for key in ["llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon"] {
        // The fixture holds the f32 widened to f64, so this is exact.
        assert_eq!(g.get_f32(key).unwrap() as f64, m[key].as_f64().unwrap(), "{key}");
    }
    assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), m["tokenizer.ggml.model"]);
    assert_eq!(g.metadata()["tokenizer.ggml.add_bos_token"].as_bool(), m["tokenizer.ggml.add_bos_token"].as_bool());
    let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len() as u64, fx["vocab_size"].as_u64().unwrap());
    let first: Vec<&str> = fx["first_tokens"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(&tokens[..5], &first[..]);
    assert_eq!(*tokens.last().unwrap(), fx["last_token"].as_str().unwrap());
    let merges = g.get_str_array("tokenizer.ggml.merges").unwrap();
    assert_eq!(merges.len() as u64, fx["merges_count"].as_u64().unwrap());
    for (i, want) in fx["first_merges"].as_array().unwrap().iter().enumerate() {
        assert_eq!(merges[i], want.as_str().unwrap());
    }
    let tt = g.metadata()["tokenizer.ggml.token_type"].as_array().unwrap();
    let tt_sum: i64 = tt.iter().map(|v| v.as_i64().unwrap()).sum();
    assert_eq!(tt_sum, fx["token_type_sum"].as_i64().unwrap());
    assert_eq!(
        g.get_str("tokenizer.chat_template").unwrap().chars().count() as u64,
        fx["chat_template_len"].as_u64().unwrap()
    );
    // Wrong-type and missing-key errors name the file and key.
    let e = g.get_u64("general.architecture").unwrap_err().to_string();
    assert!(e.contains("general.architecture") && e.contains("STRING"), "{e}");
    let e = g.get_str("no.such.key").unwrap_err().to_string();
    assert!(e.contains("no.such.key") && e.contains("missing") && e.contains("SmolLM2"), "{e}");

    // Every tensor info.
    let want = fx["tensors"].as_array().unwrap();
    assert_eq!(g.tensors().len() as u64, fx["tensor_count"].as_u64().unwrap());
    assert_eq!(g.tensors().len(), want.len());
    for (t, w) in g.tensors().iter().zip(want) {
        assert_eq!(t.name, w["name"].as_str().unwrap());
        assert_eq!(t.ggml_type.name(), w["type"].as_str().unwrap(), "{}", t.name);
        let dims: Vec<u64> = as_usize_vec(&w["dims"]).iter().map(|&d| d as u64).collect();
        assert_eq!(t.dims, dims, "{}", t.name);
        assert_eq!(t.offset, w["offset"].as_u64().unwrap(), "{}", t.name);
        assert_eq!(t.size, w["n_bytes"].as_u64().unwrap(), "{}", t.name);
    }

    // Dequantized values.
    for c in fx["checked"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let info = g.tensor_info(name).unwrap();
        assert_eq!(info.ggml_type.name(), c["type"].as_str().unwrap(), "{name}");
        let (shape, data) = g.tensor_f32(name).unwrap();
        assert_eq!(shape, as_usize_vec(&c["shape"]), "{name}");
        assert_eq!(data.len(), shape.iter().product::<usize>(), "{name}");
        let sum: f64 = data.iter().map(|&x| x as f64).sum();
        let sum_sq: f64 = data.iter().map(|&x| (x as f64) * (x as f64)).sum();
        let (ws, wss) = (c["sum"].as_f64().unwrap(), c["sum_sq"].as_f64().unwrap());
        assert!(close(sum, ws, 1e-6), "{name}: sum {sum} vs {ws}");
        assert!(close(sum_sq, wss, 1e-6), "{name}: sum_sq {sum_sq} vs {wss}");
        let mid = c["mid_index"].as_u64().unwrap() as usize;
        for (key, start) in [("first16", 0usize), ("mid16", mid)] {
            for (k, w) in c[key].as_array().unwrap().iter().enumerate() {
                let (got, w) = (data[start + k] as f64, w.as_f64().unwrap());
                assert!(close(got, w, 1e-6), "{name}[{}]: {got} vs {w}", start + k);
            }
        }
    }
}

#[test]
fn smollm2_hf_names_and_qk() {
    let g = GgufFile::open(smollm2_path()).unwrap();
    let mut names: Vec<String> = g
        .tensors()
        .iter()
        .map(|t| llama_hf_name(&t.name).unwrap_or_else(|| panic!("no HF name for {}", t.name)))
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), g.tensors().len());
    // Tied embeddings: no output.weight, 30 layers x 9 + 2.
    assert_eq!(names.len(), 30 * 9 + 2);

    // Q: 9 heads of 64; K: 3 KV heads of 64. llama_tensor_hf = tensor_f32 + unpermute_qk.
    for (gguf, hf, rows, n_head) in [
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 576, 9),
        ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", 192, 3),
    ] {
        let (name, shape, data) = g.llama_tensor_hf(gguf).unwrap();
        assert_eq!(name, hf);
        assert_eq!(shape, vec![rows, 576]);
        let (_, raw) = g.tensor_f32(gguf).unwrap();
        assert_eq!(data, unpermute_qk(&raw, n_head, 576).unwrap());
        assert_ne!(data, raw);
        assert_eq!(permute(&data, n_head, 576), raw);
    }
    // Other tensors pass through unchanged.
    let (name, _, data) = g.llama_tensor_hf("blk.0.attn_v.weight").unwrap();
    assert_eq!(name, "model.layers.0.self_attn.v_proj.weight");
    assert_eq!(data, g.tensor_f32("blk.0.attn_v.weight").unwrap().1);
}

#[test]
fn hf_name_mapping() {
    let cases = [
        ("token_embd.weight", Some("model.embed_tokens.weight")),
        ("output_norm.weight", Some("model.norm.weight")),
        ("output.weight", Some("lm_head.weight")),
        ("blk.0.attn_q.weight", Some("model.layers.0.self_attn.q_proj.weight")),
        ("blk.12.attn_k.weight", Some("model.layers.12.self_attn.k_proj.weight")),
        ("blk.3.attn_v.weight", Some("model.layers.3.self_attn.v_proj.weight")),
        ("blk.3.attn_q.bias", Some("model.layers.3.self_attn.q_proj.bias")),
        ("blk.29.attn_output.weight", Some("model.layers.29.self_attn.o_proj.weight")),
        ("blk.1.ffn_gate.weight", Some("model.layers.1.mlp.gate_proj.weight")),
        ("blk.1.ffn_up.weight", Some("model.layers.1.mlp.up_proj.weight")),
        ("blk.1.ffn_down.weight", Some("model.layers.1.mlp.down_proj.weight")),
        ("blk.7.attn_norm.weight", Some("model.layers.7.input_layernorm.weight")),
        ("blk.7.ffn_norm.weight", Some("model.layers.7.post_attention_layernorm.weight")),
        ("rope_freqs.weight", None),
        ("blk.x.attn_q.weight", None),
        ("blk..attn_q.weight", None),
        ("blk.0.attn_qq.weight", None),
        ("blk.0.attn_q.scale", None),
        ("token_embd", None),
    ];
    for (g, hf) in cases {
        assert_eq!(llama_hf_name(g).as_deref(), hf, "{g}");
    }
}

/// convert_hf_to_gguf's `permute`, index for index:
/// `w.reshape(n_head, 2, dim // n_head // 2, row_len).swapaxes(1, 2).reshape(dim, row_len)`.
/// After the swap the array has shape (n_head, half, 2, row_len) and element [h, i, j, c]
/// is the source's [h, j, i, c].
fn permute(w: &[f32], n_head: usize, row_len: usize) -> Vec<f32> {
    let dim = w.len() / row_len;
    let half = dim / n_head / 2;
    let src_at = |h: usize, a: usize, b: usize, c: usize| w[((h * 2 + a) * half + b) * row_len + c];
    let mut out = Vec::with_capacity(w.len());
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                for c in 0..row_len {
                    out.push(src_at(h, j, i, c));
                }
            }
        }
    }
    out
}

#[test]
fn unpermute_inverts_permute() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    for (n_head, head_dim, row_len) in [(3, 8, 5), (9, 4, 7), (1, 2, 1), (2, 6, 1), (4, 16, 3)] {
        let dim = n_head * head_dim;
        let w: Vec<f32> = (0..dim * row_len).map(|_| rand()).collect();
        let p = permute(&w, n_head, row_len);
        if head_dim > 2 {
            assert_ne!(p, w, "permute is not the identity for {n_head}x{head_dim}");
        }
        assert_eq!(unpermute_qk(&p, n_head, row_len).unwrap(), w);
        assert_eq!(permute(&unpermute_qk(&w, n_head, row_len).unwrap(), n_head, row_len), w);
    }
    // Head dim 4, one head: GGUF rows (0, 1, 2, 3) hold HF rows (0, 2, 1, 3).
    let p = permute(&[0.0, 1.0, 2.0, 3.0], 1, 1);
    assert_eq!(p, vec![0.0, 2.0, 1.0, 3.0]);
    // Bad shapes are errors, not panics.
    assert!(unpermute_qk(&[0.0; 6], 2, 1).is_err());
    assert!(unpermute_qk(&[0.0; 7], 1, 2).is_err());
    assert!(unpermute_qk(&[0.0; 8], 0, 1).is_err());
    assert!(unpermute_qk(&[0.0; 8], 1, 0).is_err());
}

// ---------------------------------------------------------------------------------------------
// Small GGUF files built in the test.

#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
}

struct T<'a> {
    name: &'a str,
    dims: &'a [u64],
    type_id: u32,
    data: Vec<u8>,
}

/// A GGUF v3 file: header, `kv_raw` (already encoded key/type/value entries, `n_kv` of them),
/// tensor infos, data section aligned to `alignment` with each tensor aligned too.
fn build(n_kv: u64, kv_raw: &[u8], tensors: &[T], alignment: usize) -> Vec<u8> {
    let mut w = W::default();
    w.bytes(b"GGUF").u32(3).u64(tensors.len() as u64).u64(n_kv).bytes(kv_raw);
    let mut off = 0usize;
    let mut offsets = vec![];
    for t in tensors {
        offsets.push(off);
        off = (off + t.data.len()).div_ceil(alignment) * alignment;
    }
    for (t, &o) in tensors.iter().zip(&offsets) {
        w.str(t.name).u32(t.dims.len() as u32);
        for &d in t.dims {
            w.u64(d);
        }
        w.u32(t.type_id).u64(o as u64);
    }
    while w.0.len() % alignment != 0 {
        w.u8(0);
    }
    let base = w.0.len();
    for (t, &o) in tensors.iter().zip(&offsets) {
        w.0.resize(base + o, 0);
        w.bytes(&t.data);
    }
    w.0
}

fn f16b(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_le_bytes()
}

/// Metadata with every value type, nested arrays and a 64-byte alignment.
fn all_types_kv() -> (u64, Vec<u8>) {
    let mut w = W::default();
    w.str("t.u8").u32(0).u8(200);
    w.str("t.i8").u32(1).u8((-5i8) as u8);
    w.str("t.u16").u32(2).bytes(&60000u16.to_le_bytes());
    w.str("t.i16").u32(3).bytes(&(-300i16).to_le_bytes());
    w.str("t.u32").u32(4).u32(4_000_000_000);
    w.str("t.i32").u32(5).bytes(&(-70000i32).to_le_bytes());
    w.str("t.f32").u32(6).bytes(&1.25f32.to_le_bytes());
    w.str("t.bool").u32(7).u8(1);
    w.str("t.str").u32(8).str("héllo");
    w.str("t.u64").u32(10).u64(1 << 40);
    w.str("t.i64").u32(11).bytes(&(-1i64 << 40).to_le_bytes());
    w.str("t.f64").u32(12).bytes(&0.1f64.to_le_bytes());
    w.str("t.strs").u32(9).u32(8).u64(3).str("a").str("").str("ccc");
    w.str("t.ints").u32(9).u32(5).u64(2).bytes(&7i32.to_le_bytes()).bytes(&(-7i32).to_le_bytes());
    // [[1u16, 2u16], []]
    w.str("t.nested").u32(9).u32(9).u64(2);
    w.u32(2).u64(2).bytes(&1u16.to_le_bytes()).bytes(&2u16.to_le_bytes());
    w.u32(2).u64(0);
    w.str("general.alignment").u32(4).u32(64);
    (16, w.0)
}

fn small_tensors() -> Vec<T<'static>> {
    // F32 [2 rows, 3 cols] (GGUF dims [3, 2]).
    let f32_data: Vec<u8> = [1.0f32, -2.0, 3.5, 0.0, 1e-3, -7.25].iter().flat_map(|x| x.to_le_bytes()).collect();
    let f16_data: Vec<u8> = [1.5f32, -2.0, 0.099975586, 65504.0].iter().flat_map(|&x| f16b(x)).collect();
    let bf16_data: Vec<u8> =
        [1.0f32, -3.0, 0.5, 256.0].iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
    // Q8_0: d = 2, q_i = i - 16.
    let mut q8 = f16b(2.0).to_vec();
    q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
    // Q4_0: d = 0.5; byte j: low nibble j, high nibble 15 - j.
    let mut q40 = f16b(0.5).to_vec();
    q40.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    // Q4_1: two blocks; d = 0.25, m = -1 then d = 1, m = 3; same nibbles.
    let mut q41 = vec![];
    for (d, m) in [(0.25f32, -1.0f32), (1.0, 3.0)] {
        q41.extend(f16b(d));
        q41.extend(f16b(m));
        q41.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    }
    vec![
        T { name: "a.f32", dims: &[3, 2], type_id: 0, data: f32_data },
        T { name: "b.f16", dims: &[4], type_id: 1, data: f16_data },
        T { name: "c.bf16", dims: &[2, 2], type_id: 30, data: bf16_data },
        T { name: "d.q8_0", dims: &[32], type_id: 8, data: q8 },
        T { name: "e.q4_0", dims: &[32, 1], type_id: 2, data: q40 },
        T { name: "f.q4_1", dims: &[32, 2], type_id: 3, data: q41 },
        T { name: "g.q4_k", dims: &[256], type_id: 12, data: vec![0u8; 144] },
    ]
}

#[test]
fn synthetic_all_metadata_types_and_dequant() {
    let (n_kv, kv) = all_types_kv();
    let bytes = build(n_kv, &kv, &small_tensors(), 64);
    let f = TempFile::new("all", &bytes);
    let g = GgufFile::open(&f.0).unwrap();
    assert_eq!(g.alignment(), 64);
    assert_eq!(g.data_offset() % 64, 0);
    let m = g.metadata();
    assert_eq!(m["t.u8"], MetaValue::U8(200));
    assert_eq!(m["t.i8"], MetaValue::I8(-5));
    assert_eq!(m["t.u16"], MetaValue::U16(60000));
    assert_eq!(m["t.i16"], MetaValue::I16(-300));
    assert_eq!(m["t.u32"], MetaValue::U32(4_000_000_000));
    assert_eq!(m["t.i32"], MetaValue::I32(-70000));
    assert_eq!(m["t.f32"], MetaValue::F32(1.25));
    assert_eq!(m["t.bool"], MetaValue::Bool(true));
    assert_eq!(m["t.str"], MetaValue::String("héllo".into()));
    assert_eq!(m["t.u64"], MetaValue::U64(1 << 40));
    assert_eq!(m["t.i64"], MetaValue::I64(-1 << 40));
    assert_eq!(m["t.f64"], MetaValue::F64(0.1));
    assert_eq!(
        m["t.nested"],
        MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::U16(1), MetaValue::U16(2)]), MetaValue::Array(vec![]),])
    );
    assert_eq!(g.get_str_array("t.strs").unwrap(), vec!["a", "", "ccc"]);
    assert!(g.get_str_array("t.ints").is_err());
    for (k, v) in [("t.u8", 200), ("t.u16", 60000), ("t.u32", 4_000_000_000), ("t.u64", 1 << 40)] {
        assert_eq!(g.get_u64(k).unwrap(), v, "{k}");
    }
    assert!(g.get_u64("t.i8").is_err(), "negative integer accepted as u64");
    assert!(g.get_u64("t.f32").is_err());
    assert_eq!(g.get_f32("t.f32").unwrap(), 1.25);
    assert_eq!(g.get_f32("t.f64").unwrap(), 0.1f32);
    assert_eq!(g.get_str("t.str").unwrap(), "héllo");

    let f32v = |name: &str| g.tensor_f32(name).unwrap();
    assert_eq!(f32v("a.f32"), (vec![2, 3], vec![1.0, -2.0, 3.5, 0.0, 1e-3, -7.25]));
    assert_eq!(f32v("b.f16"), (vec![4], vec![1.5, -2.0, 0.099975586, 65504.0]));
    assert_eq!(f32v("c.bf16"), (vec![2, 2], vec![1.0, -3.0, 0.5, 256.0]));
    let q8: Vec<f32> = (0..32).map(|i| 2.0 * (i as f32 - 16.0)).collect();
    assert_eq!(f32v("d.q8_0"), (vec![32], q8));
    let nib: Vec<f32> = (0..16).chain((0..16).map(|j| 15 - j)).map(|q| q as f32).collect();
    let q40: Vec<f32> = nib.iter().map(|q| (q - 8.0) * 0.5).collect();
    assert_eq!(f32v("e.q4_0"), (vec![1, 32], q40));
    let mut q41: Vec<f32> = nib.iter().map(|q| q * 0.25 - 1.0).collect();
    q41.extend(nib.iter().map(|q| q + 3.0));
    assert_eq!(f32v("f.q4_1"), (vec![2, 32], q41));

    // A K-quant: parsed (size known), raw bytes readable, but not dequantized.
    let info = g.tensor_info("g.q4_k").unwrap();
    assert_eq!((info.ggml_type, info.size), (GgmlType::Q4_K, 144));
    assert_eq!(g.tensor_bytes("g.q4_k").unwrap().len(), 144);
    let e = g.tensor_f32("g.q4_k").unwrap_err();
    assert!(matches!(e, GgufError::UnsupportedType { type_id: 12, .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("g.q4_k") && msg.contains("Q4_K") && msg.contains("12"), "{msg}");
    assert!(msg.contains(&f.0.display().to_string()), "{msg}");

    let e = g.tensor_f32("nope").unwrap_err().to_string();
    assert!(e.contains("nope"), "{e}");

    // Every truncation of this file is an error, never a panic.
    for len in 0..bytes.len() {
        let t = TempFile::new("cut", &bytes[..len]);
        let r = GgufFile::open(&t.0);
        assert!(r.is_err(), "file cut to {len} bytes opened");
    }
}

#[test]
fn truncated_smollm2_header() {
    let src = std::fs::read(smollm2_path()).unwrap();
    let f = TempFile::new("trunc1000", &src[..1000]);
    let e = GgufFile::open(&f.0).unwrap_err();
    assert!(matches!(e, GgufError::Truncated { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(&f.0.display().to_string()) && msg.contains("truncated"), "{msg}");

    // Cut inside the data section: the header parses, the tensors past the end are caught.
    let g = GgufFile::open(smollm2_path()).unwrap();
    let cut = g.data_offset() as usize + 1000;
    let f = TempFile::new("truncdata", &src[..cut]);
    let e = GgufFile::open(&f.0).unwrap_err();
    assert!(matches!(e, GgufError::TensorPastEnd { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("extends past end of file") && msg.contains("token_embd"), "{msg}");

    // A few more cut points through the header (in the vocabulary, merges, tensor infos).
    for cut in [0, 3, 4, 8, 23, 24, 100_000, 1_500_000, g.data_offset() as usize - 1] {
        let f = TempFile::new("cut", &src[..cut]);
        assert!(GgufFile::open(&f.0).is_err(), "cut at {cut} opened");
    }
}

#[test]
fn bad_magic_and_version() {
    let (n_kv, kv) = all_types_kv();
    let mut bytes = build(n_kv, &kv, &small_tensors(), 64);
    bytes[..4].copy_from_slice(b"GGML");
    let f = TempFile::new("magic", &bytes);
    let e = GgufFile::open(&f.0).unwrap_err();
    assert!(matches!(e, GgufError::BadMagic { .. }), "{e:?}");
    assert!(e.to_string().contains("bad magic"), "{e}");

    bytes[..4].copy_from_slice(b"GGUF");
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    let f = TempFile::new("bigendian", &bytes);
    let e = GgufFile::open(&f.0).unwrap_err().to_string();
    assert!(e.contains("version") && e.contains("big-endian"), "{e}");

    let f = TempFile::new("missing", b"");
    std::fs::remove_file(&f.0).unwrap();
    let e = GgufFile::open(&f.0).unwrap_err();
    assert!(matches!(e, GgufError::Io { .. }), "{e:?}");
}

#[test]
fn hostile_lengths_and_types() {
    let header = |n_tensors: u64, n_kv: u64| {
        let mut w = W::default();
        w.bytes(b"GGUF").u32(3).u64(n_tensors).u64(n_kv);
        w
    };
    let open_err = |bytes: &[u8]| {
        let f = TempFile::new("hostile", bytes);
        GgufFile::open(&f.0).unwrap_err().to_string()
    };
    // Huge counts.
    let e = open_err(&header(u64::MAX, 0).0);
    assert!(e.contains("tensor infos"), "{e}");
    let e = open_err(&header(0, u64::MAX / 2).0);
    assert!(e.contains("metadata entries"), "{e}");
    // Huge string length (key).
    let mut w = header(0, 1);
    w.u64(u64::MAX).bytes(&[b'a'; 16]);
    let e = open_err(&w.0);
    assert!(e.contains("truncated") && e.contains("metadata key #0"), "{e}");
    // Huge array count.
    let mut w = header(0, 1);
    w.str("arr").u32(9).u32(8).u64(1 << 60).str("x");
    let e = open_err(&w.0);
    assert!(e.contains("arr") && e.contains("array of"), "{e}");
    // Deeply nested arrays.
    let mut w = header(0, 1);
    w.str("deep").u32(9);
    for _ in 0..100 {
        w.u32(9).u64(1);
    }
    w.u32(0).u64(0);
    let e = open_err(&w.0);
    assert!(e.contains("nested"), "{e}");
    // Unknown value type, bad bool, invalid UTF-8.
    let mut w = header(0, 1);
    w.str("k").u32(13).u64(0);
    assert!(open_err(&w.0).contains("unknown value type 13"));
    let mut w = header(0, 1);
    w.str("k").u32(7).u8(2);
    assert!(open_err(&w.0).contains("bool"));
    let mut w = header(0, 1);
    w.str("k").u32(8).u64(2).bytes(&[0xff, 0xfe]);
    assert!(open_err(&w.0).contains("UTF-8"));
    // Duplicate key.
    let mut w = header(0, 2);
    w.str("k").u32(0).u8(1).str("k").u32(0).u8(2);
    assert!(open_err(&w.0).contains("duplicate"));
    // Bad alignment.
    let mut w = header(0, 1);
    w.str("general.alignment").u32(4).u32(24);
    assert!(open_err(&w.0).contains("general.alignment"));

    let one = |name: &'static str, dims: &'static [u64], type_id: u32, len: usize| {
        build(0, &[], &[T { name, dims, type_id, data: vec![0; len] }], 32)
    };
    // Unknown ggml type id.
    let e = open_err(&one("w", &[32], 99, 32));
    assert!(e.contains("unknown ggml type id 99") && e.contains("'w'"), "{e}");
    // Block size mismatch.
    let e = open_err(&one("w", &[31], 8, 34));
    assert!(e.contains("block size"), "{e}");
    // Too many dims; dims overflowing.
    let e = open_err(&one("w", &[1, 1, 1, 1, 1], 0, 4));
    assert!(e.contains("dimensions"), "{e}");
    let e = open_err(&one("w", &[u64::MAX, 3], 0, 4));
    assert!(e.contains("overflow"), "{e}");
    // Tensor data past the end of the file.
    let mut bytes = one("w", &[8], 0, 32);
    bytes.truncate(bytes.len() - 1);
    let e = open_err(&bytes);
    assert!(e.contains("extends past end of file") && e.contains("'w'"), "{e}");
    // Offset beyond the file / not aligned.
    let mut w = header(1, 0);
    w.str("w").u32(1).u64(1).u32(0).u64(u64::MAX - 31);
    assert!(open_err(&w.0).contains("past end of file"));
    let mut w = header(1, 0);
    w.str("w").u32(1).u64(1).u32(0).u64(4);
    w.bytes(&[0; 64]);
    assert!(open_err(&w.0).contains("alignment"));
}
