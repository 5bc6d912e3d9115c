//! POPEN's additions to the LLaMA decoder, checked on a tiny random `LlamaForCausalLM`:
//! sharded safetensors loading, embedding-level forward with positions / padding / gamma,
//! teacher-forced log-probs, batched generation.
//!
//! Reference: tests/fixtures/llama/ written by tools/reference/llama_fixture.py with
//! transformers 4.57.1 (eager attention) and torch 2.9.1. Fixture tolerance: 1e-4 relative,
//! |a - b| <= 1e-4 * max(1, |b|) per element. Padding query rows are don't-care there (HF
//! computes garbage for them too); they are only required to be finite.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use burn::tensor::{Bool, Int, TensorData};
use popen_model::llama::{token_logprobs, AttnExtras, KvCache, Llama, LlamaConfig, LlamaError};
use popen_model::sampling::{generate, Generation, SamplingConfig};
use popen_model::weights::{self, Remap};
use serde_json::Value;

type B = NdArray<f32>;
type AB = Autodiff<NdArray<f32>>;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixture_dir().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load<Bk: Backend>() -> Llama<Bk> {
    let cfg = LlamaConfig::from_json_file(fixture_dir().join("config.json")).unwrap();
    Llama::load(&cfg, fixture_dir(), &Remap::none(), &Default::default()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn ints(v: &Value) -> Vec<Vec<i64>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()).collect()
}

fn u32s(v: &Value) -> Vec<Vec<u32>> {
    ints(v).into_iter().map(|r| r.into_iter().map(|x| x as u32).collect()).collect()
}

fn vec_of<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

fn int2(rows: &[Vec<i64>]) -> Tensor<B, 2, Int> {
    let (b, s) = (rows.len(), rows[0].len());
    Tensor::from_data(TensorData::new(rows.concat(), [b, s]), &Default::default())
}

fn bool2(rows: &[Vec<bool>]) -> Tensor<B, 2, Bool> {
    let (b, s) = (rows.len(), rows[0].len());
    Tensor::from_data(TensorData::new(rows.concat(), [b, s]), &Default::default())
}

fn float2(data: Vec<f32>, b: usize, s: usize) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(data, [b, s]), &Default::default())
}

/// Max of |a - b| / max(1, |b|) over the positions `(row, pos)` in `sel` of `[b, s, w]` data.
fn rel_err(a: &[f32], b: &[f32], s: usize, w: usize, sel: &[(usize, usize)]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for &(r, p) in sel {
        for k in 0..w {
            let i = (r * s + p) * w + k;
            worst = worst.max((a[i] - b[i]).abs() / b[i].abs().max(1.0));
        }
    }
    worst
}

fn all_positions(b: usize, s: usize) -> Vec<(usize, usize)> {
    (0..b).flat_map(|r| (0..s).map(move |p| (r, p))).collect()
}

struct Padded {
    ids: Vec<Vec<i64>>,
    keep: Vec<Vec<bool>>,
    pos: Vec<Vec<i64>>,
    real: Vec<(usize, usize)>,
}

fn padded_inputs(e: &Value) -> Padded {
    let ids = ints(&e["input_ids"]);
    let mask = ints(&e["attention_mask"]);
    let keep: Vec<Vec<bool>> = mask.iter().map(|r| r.iter().map(|&m| m != 0).collect()).collect();
    let real = keep
        .iter()
        .enumerate()
        .flat_map(|(r, k)| k.iter().enumerate().filter(|(_, &x)| x).map(move |(p, _)| (r, p)))
        .collect();
    Padded { ids, keep, pos: ints(&e["position_ids"]), real }
}

const TOL: f32 = 1e-4;

#[test]
fn config_json_defaults_and_rejections() {
    let cfg = LlamaConfig::from_json_file(fixture_dir().join("config.json")).unwrap();
    assert_eq!(cfg.num_key_value_heads, 2);
    assert!(!cfg.tie_word_embeddings);
    assert_eq!(cfg.rope_theta, 50000.0);
    // HF defaults for absent fields; unknown fields (LLaVA's mm_*) ignored.
    let c: LlamaConfig = serde_json::from_str(r#"{"model_type": "llava_llama", "mm_hidden_size": 1024}"#).unwrap();
    assert_eq!((c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers), (32000, 4096, 11008, 32));
    assert_eq!((c.num_attention_heads, c.num_key_value_heads), (32, 32));
    assert_eq!((c.rms_norm_eps, c.rope_theta), (1e-6, 10000.0));
    assert_eq!(c.max_position_embeddings, 2048);
    assert!(!c.tie_word_embeddings);
    assert_eq!(c, LlamaConfig::default());
    // Round trip through our own serialization.
    let back: LlamaConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
    for bad in [
        r#"{"rope_scaling": {"type": "yarn", "factor": 2.0}}"#,
        r#"{"hidden_act": "gelu"}"#,
        r#"{"attention_bias": true}"#,
        r#"{"hidden_size": 30, "num_attention_heads": 4}"#,
        r#"{"num_key_value_heads": 5}"#,
    ] {
        let err = serde_json::from_str::<LlamaConfig>(bad).unwrap_err().to_string();
        assert!(!err.is_empty(), "{bad}");
    }
}

/// Burn parameter paths equal `LlamaForCausalLM`'s state-dict keys (the fixture's index minus
/// the rotary buffer, which the loader drops).
#[test]
fn param_paths_are_hf_state_dict_keys() {
    let model = load::<B>();
    let ours: BTreeSet<String> = weights::named_tensors(&model).into_iter().map(|(n, _, _)| n).collect();
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let theirs: BTreeSet<String> = index["weight_map"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| !k.ends_with("rotary_emb.inv_freq"))
        .cloned()
        .collect();
    assert_eq!(ours, theirs);
    assert!(ours.contains("lm_head.weight") && ours.contains("model.layers.1.mlp.down_proj.weight"));
}

/// Matches transformers 4.57.1 `LlamaForCausalLM(input_ids, attention_mask, position_ids,
/// output_hidden_states=True)` on a left-padded batch (fixture "padded"), and the 4D additive
/// mask with gamma (fixture "gamma").
#[test]
fn fixture_padded_batch_and_gamma_match_transformers() {
    let e = expected();
    let (b, s) = (2, e["seq"].as_u64().unwrap() as usize);
    let (v, h) = (96, 32);
    let p = padded_inputs(&e);
    let model = load::<B>();
    let embeds = model.embed(int2(&p.ids));
    let extras = AttnExtras { positions: Some(int2(&p.pos)), key_keep: Some(bool2(&p.keep)), gamma: None };
    let mut cache = model.new_cache();
    let hs = model.forward_embeds_all(embeds.clone(), &extras, &mut cache).unwrap();
    assert_eq!(cache.len(), s);
    let want_hs = e["padded"]["hidden_states"].as_array().unwrap();
    assert_eq!(hs.len(), want_hs.len());
    for (i, (got, want)) in hs.iter().zip(want_hs).enumerate() {
        let got = vec_of(got.clone());
        assert!(got.iter().all(|x| x.is_finite()), "hidden state {i} not finite");
        let err = rel_err(&got, &floats(want), s, h, &p.real);
        eprintln!("hidden_states[{i}] rel err {err:e}");
        assert!(err <= TOL, "hidden_states[{i}]: {err}");
    }
    let logits = vec_of(model.logits(hs.last().unwrap().clone()));
    let err = rel_err(&logits, &floats(&e["padded"]["logits"]), s, v, &p.real);
    eprintln!("logits rel err {err:e}");
    assert!(err <= TOL, "logits: {err}");
    // forward_embeds gives the same final-normed state as the last of forward_embeds_all.
    let last = model.forward_embeds(embeds.clone(), &extras, &mut model.new_cache()).unwrap();
    let d = rel_err(&vec_of(last), &vec_of(hs[2].clone()), s, h, &all_positions(b, s));
    assert!(d < 1e-6, "{d}");

    // Gamma through transformers' 4D additive mask.
    let gamma = floats(&e["gamma"]["gamma"]);
    let extras_g = AttnExtras { gamma: Some(float2(gamma, b, s)), ..extras.clone() };
    let hid = model.forward_embeds(embeds.clone(), &extras_g, &mut model.new_cache()).unwrap();
    let err_h = rel_err(&vec_of(hid.clone()), &floats(&e["gamma"]["last_hidden"]), s, h, &p.real);
    let got = vec_of(model.logits(hid));
    assert!(got.iter().all(|x| x.is_finite()));
    let err = rel_err(&got, &floats(&e["gamma"]["logits"]), s, v, &p.real);
    eprintln!("gamma: last hidden rel err {err_h:e}, logits {err:e}");
    assert!(err_h <= TOL && err <= TOL, "gamma: {err_h} {err}");

    // gamma all zeros == no gamma.
    let extras_0 = AttnExtras { gamma: Some(Tensor::zeros([b, s], &Default::default())), ..extras.clone() };
    let z = vec_of(model.forward_embeds(embeds, &extras_0, &mut model.new_cache()).unwrap());
    let d = rel_err(&z, &vec_of(hs[2].clone()), s, h, &all_positions(b, s));
    assert!(d < 1e-6, "zero gamma changed the output by {d}");
}

/// Teacher-forced log-probs match transformers run on each row alone (fixture "score").
#[test]
fn fixture_score_matches_transformers() {
    let e = expected();
    let prompts = u32s(&e["score"]["prompts"]);
    let responses = u32s(&e["score"]["responses"]);
    let want = e["score"]["logprobs"].as_array().unwrap();
    let model = load::<B>();
    let got = model.score(&prompts, &responses).unwrap();
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        let w = floats(w);
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(&w) {
            assert!((a - b).abs() <= TOL * b.abs().max(1.0), "row {r}: {g:?} vs {w:?}");
        }
    }
    let (lp, mask) = model.score_tensor(&prompts, &responses).unwrap();
    assert_eq!(lp.dims(), [2, 5]);
    let m: Vec<bool> = mask.into_data().into_vec::<bool>().unwrap();
    assert_eq!(m, vec![true, true, true, true, true, true, true, false, false, false]);
    assert!(vec_of(lp)[7..].iter().all(|&x| x == 0.0));

    // Bad inputs are errors, not panics.
    assert!(matches!(model.score(&[vec![]], &[vec![1]]), Err(LlamaError::Input(_))));
    assert!(matches!(model.score(&[vec![1]], &[vec![96]]), Err(LlamaError::Input(_))));
    assert!(matches!(model.score(&[vec![1]], &[]), Err(LlamaError::Input(_))));
    assert_eq!(model.score(&[vec![1]], &[vec![]]).unwrap(), vec![Vec::<f32>::new()]);

    // token_logprobs equals log_softmax gathered, stable for huge logits.
    let logits = Tensor::<B, 3>::from_data(
        TensorData::new(vec![1000.0f32, 0.0, -1000.0, 3.0, 1.0, 2.0], [1, 2, 3]),
        &Default::default(),
    );
    let lp = vec_of(token_logprobs(logits, int2(&[vec![0, 2]])));
    let lse = 3.0f64 + (1.0 + (-2.0f64).exp() + (-1.0f64).exp()).ln();
    assert!(lp[0].abs() < 1e-6 && (lp[1] as f64 - (2.0 - lse)).abs() < 1e-6, "{lp:?}");
}

/// Greedy `generate` on the left-padded batch reproduces transformers' `generate`
/// (do_sample=False), ids and per-step log-probs (fixture "greedy").
#[test]
fn fixture_greedy_matches_transformers_generate() {
    let e = expected();
    let p = padded_inputs(&e);
    let model = load::<B>();
    let cfg = SamplingConfig { max_new_tokens: 6, ..Default::default() };
    let gens = generate(&model, model.embed(int2(&p.ids)), bool2(&p.keep), None, &cfg, &[]).unwrap();
    let want_ids = u32s(&e["greedy"]["ids"]);
    let want_lp = e["greedy"]["logprobs"].as_array().unwrap();
    for (r, g) in gens.iter().enumerate() {
        assert_eq!(g.ids, want_ids[r], "row {r}");
        assert!(!g.stopped);
        for (a, b) in g.logprobs.iter().zip(floats(&want_lp[r])) {
            assert!((a - b).abs() <= TOL * b.abs().max(1.0), "row {r}: {a} vs {b}");
        }
        assert_eq!(g.hidden.dims(), [6, 32]);
    }

    // `hidden` = the teacher-forced final-normed state at each emitted token: run row 1's
    // real prefix plus its ids in one forward and compare.
    let mut seq: Vec<u32> = p.ids[1][3..].iter().map(|&x| x as u32).collect();
    let n0 = seq.len();
    seq.extend(&gens[1].ids);
    let full = model
        .forward_embeds(
            model.embed(model.ids_tensor(&[seq.clone()]).unwrap()),
            &AttnExtras::default(),
            &mut model.new_cache(),
        )
        .unwrap();
    let tf = vec_of(full.narrow(1, n0, 6).reshape([6, 32]));
    let got = vec_of(gens[1].hidden.clone());
    let d = got.iter().zip(&tf).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(d < 1e-4, "generate hidden vs teacher forcing: {d}");

    // Per-row stop: row 0 stops at its second token; row 1 runs on unchanged.
    let stop = want_ids[0][1];
    assert!(!want_ids[1].contains(&stop));
    let gens = generate(&model, model.embed(int2(&p.ids)), bool2(&p.keep), None, &cfg, &[stop]).unwrap();
    assert_eq!(gens[0].ids, want_ids[0][..1].to_vec());
    assert!(gens[0].stopped && gens[0].stop_id == Some(stop));
    assert_eq!(gens[0].hidden.dims(), [1, 32]);
    assert_eq!(gens[1].ids, want_ids[1]);
    assert!(!gens[1].stopped);

    // Llama::greedy keeps its old contract (stop id included).
    let row0: Vec<u32> = p.ids[0].iter().map(|&x| x as u32).collect();
    assert_eq!(model.greedy(&row0, 6, &[stop]).unwrap(), vec![want_ids[0][0], stop]);
    assert_eq!(model.greedy(&row0, 6, &[]).unwrap(), want_ids[0]);
}

/// Prefill + cached single steps == one full forward, with left padding and gamma; extras of
/// the steps cover the full key length.
#[test]
fn kv_cache_steps_equal_full_recompute_with_padding_and_gamma() {
    let e = expected();
    let (b, s, h) = (2, 7, 32);
    let p = padded_inputs(&e);
    let model = load::<B>();
    let gamma = float2(floats(&e["gamma"]["gamma"]), b, s);
    let ids = int2(&p.ids);
    let keep = bool2(&p.keep);
    let pos = int2(&p.pos);
    for with_gamma in [false, true] {
        let g = with_gamma.then(|| gamma.clone());
        let full = model
            .forward_embeds(
                model.embed(ids.clone()),
                &AttnExtras { positions: Some(pos.clone()), key_keep: Some(keep.clone()), gamma: g.clone() },
                &mut model.new_cache(),
            )
            .unwrap();
        let mut cache = model.new_cache();
        let mut parts = Vec::new();
        let split = 4;
        let mut start = 0;
        for len in std::iter::once(split).chain(std::iter::repeat_n(1, s - split)) {
            let total = start + len;
            let extras = AttnExtras {
                positions: Some(pos.clone().narrow(1, start, len)),
                key_keep: Some(keep.clone().narrow(1, 0, total)),
                gamma: g.clone().map(|g| g.narrow(1, 0, total)),
            };
            parts.push(
                model.forward_embeds(model.embed(ids.clone().narrow(1, start, len)), &extras, &mut cache).unwrap(),
            );
            start = total;
        }
        assert_eq!(cache.len(), s);
        let stepped = vec_of(Tensor::cat(parts, 1));
        let d = rel_err(&stepped, &vec_of(full), s, h, &p.real);
        eprintln!("cache vs full (gamma {with_gamma}): {d:e}");
        assert!(d < 1e-5, "cache vs full (gamma {with_gamma}): {d}");
    }
}

fn row_alone(p: &Padded, r: usize) -> Vec<u32> {
    (0..p.ids[r].len()).filter(|&j| p.keep[r][j]).map(|j| p.ids[r][j] as u32).collect()
}

/// A left-padded row computes (logits) and generates (greedy and sampled ids) exactly what
/// it does alone.
#[test]
fn left_padded_row_equals_row_alone() {
    let e = expected();
    let p = padded_inputs(&e);
    let model = load::<B>();
    let alone = row_alone(&p, 1); // 4 real tokens after 3 padding
    let n = alone.len();
    let logits_alone =
        vec_of(model.forward(model.ids_tensor(std::slice::from_ref(&alone)).unwrap(), &mut model.new_cache()).unwrap());
    let padded = vec_of(
        model
            .forward_with(
                int2(&p.ids),
                &AttnExtras { positions: Some(int2(&p.pos)), key_keep: Some(bool2(&p.keep)), gamma: None },
                &mut model.new_cache(),
            )
            .unwrap(),
    );
    let v = 96;
    let row1 = &padded[(7 + 3) * v..14 * v];
    let d = row1.iter().zip(&logits_alone).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert_eq!(logits_alone.len(), n * v);
    assert!(d < 1e-5, "padded row vs alone logits: {d}");

    // Generation: put the padded row first (row index 0, so the same RNG stream as alone).
    let swapped_ids = vec![p.ids[1].clone(), p.ids[0].clone()];
    let swapped_keep = vec![p.keep[1].clone(), p.keep[0].clone()];
    for cfg in [
        SamplingConfig { max_new_tokens: 8, ..Default::default() },
        SamplingConfig { max_new_tokens: 8, temperature: 1.0, top_p: 0.9, seed: 7 },
    ] {
        let batch = generate(&model, model.embed(int2(&swapped_ids)), bool2(&swapped_keep), None, &cfg, &[]).unwrap();
        let single = generate(
            &model,
            model.embed(model.ids_tensor(std::slice::from_ref(&alone)).unwrap()),
            bool2(&[vec![true; n]]),
            None,
            &cfg,
            &[],
        )
        .unwrap();
        assert_eq!(batch[0].ids, single[0].ids, "{cfg:?}");
        for (a, b) in batch[0].logprobs.iter().zip(&single[0].logprobs) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}

fn sample(model: &Llama<B>, p: &Padded, cfg: &SamplingConfig) -> Vec<Generation<B>> {
    generate(model, model.embed(int2(&p.ids)), bool2(&p.keep), None, cfg, &[]).unwrap()
}

#[test]
fn sampling_seeds_and_top_p() {
    let e = expected();
    let p = padded_inputs(&e);
    let model = load::<B>();
    let cfg = |seed: u64, top_p: f32| SamplingConfig { max_new_tokens: 10, temperature: 1.0, top_p, seed };
    let ids = |g: Vec<Generation<B>>| g.into_iter().map(|g| g.ids).collect::<Vec<_>>();
    let a = ids(sample(&model, &p, &cfg(1, 1.0)));
    let a2 = ids(sample(&model, &p, &cfg(1, 1.0)));
    assert_eq!(a, a2, "same seed, different samples");
    let others: Vec<_> = (2..5).map(|s| ids(sample(&model, &p, &cfg(s, 1.0)))).collect();
    assert!(others.iter().all(|o| *o != a), "seeds 2..5 reproduce seed 1: {a:?}");
    // Rows of one batch draw from different streams.
    assert_ne!(a[0], a[1]);

    // top_p -> 0 keeps only the most likely token: greedy.
    let greedy = ids(sample(&model, &p, &SamplingConfig { max_new_tokens: 10, ..Default::default() }));
    assert_eq!(ids(sample(&model, &p, &cfg(3, 1e-7))), greedy);

    // Invalid settings are errors.
    for bad in [cfg(0, 0.0), cfg(0, 1.5), SamplingConfig { temperature: -1.0, ..cfg(0, 1.0) }] {
        assert!(matches!(
            generate(&model, model.embed(int2(&p.ids)), bool2(&p.keep), None, &bad, &[]),
            Err(LlamaError::Input(_))
        ));
    }
    // Right padding (last position padding) is refused.
    let right = vec![p.keep[0].clone(), p.keep[1].iter().rev().copied().collect()];
    assert!(matches!(
        generate(&model, model.embed(int2(&p.ids)), bool2(&right), None, &cfg(0, 1.0), &[]),
        Err(LlamaError::Input(_))
    ));
    // max_new_tokens 0: empty generations.
    let g = sample(&model, &p, &SamplingConfig { max_new_tokens: 0, ..cfg(0, 1.0) });
    assert!(g.iter().all(|g| g.ids.is_empty() && g.hidden.dims() == [0, 32]));

    let c: SamplingConfig = serde_json::from_str(r#"{"temperature": 0.7}"#).unwrap();
    assert_eq!((c.max_new_tokens, c.top_p, c.seed), (64, 1.0, 0));
}

/// Gradients reach the weights through `score_tensor`, and a tracked gamma gets one.
#[test]
fn gradients_through_score_and_gamma() {
    let model = load::<AB>();
    let (lp, _) = model.score_tensor(&[vec![5, 17, 42], vec![23, 9]], &[vec![8, 77], vec![30]]).unwrap();
    let grads = lp.sum().backward();
    let g = model.model.layers[0].self_attn.q_proj.weight.grad(&grads).unwrap();
    assert!(g.abs().sum().into_scalar() > 0.0);

    let dev = Default::default();
    let gamma = Tensor::<AB, 2>::from_data(TensorData::new(vec![0.0f32; 4], [1, 4]), &dev).require_grad();
    let ids = model.ids_tensor(&[vec![5, 17, 42, 8]]).unwrap();
    let extras = AttnExtras { gamma: Some(gamma.clone()), ..Default::default() };
    let hid = model.forward_embeds(model.embed(ids), &extras, &mut model.new_cache()).unwrap();
    let grads = model.logits(hid).narrow(1, 3, 1).sum().backward();
    let gg = gamma.grad(&grads).unwrap();
    assert!(gg.abs().sum().into_scalar() > 0.0);
}

#[test]
fn wrong_inputs_are_errors_and_leave_the_cache() {
    let model = load::<B>();
    let ids = model.ids_tensor(&[vec![1, 2, 3], vec![4, 5, 6]]).unwrap();
    let mut wrong = KvCache::<B>::new(1);
    assert!(matches!(
        model.forward(ids.clone(), &mut wrong),
        Err(LlamaError::Input(m)) if m.contains("layers")
    ));
    assert!(wrong.is_empty());

    let mut cache = model.new_cache();
    model.forward(ids.clone(), &mut cache).unwrap();
    // Batch 1 against a batch-2 cache.
    let one = model.ids_tensor(&[vec![7]]).unwrap();
    assert!(matches!(model.forward(one, &mut cache), Err(LlamaError::Input(_))));
    assert_eq!(cache.len(), 3);
    // key_keep / gamma / positions of the wrong length.
    let step = model.ids_tensor(&[vec![7], vec![8]]).unwrap();
    for extras in [
        AttnExtras { key_keep: Some(bool2(&[vec![true; 3], vec![true; 3]])), ..Default::default() },
        AttnExtras { gamma: Some(Tensor::zeros([2, 1], &Default::default())), ..Default::default() },
        AttnExtras { positions: Some(int2(&[vec![3, 4], vec![3, 4]])), ..Default::default() },
    ] {
        assert!(matches!(model.forward_with(step.clone(), &extras, &mut cache), Err(LlamaError::Input(_))));
        assert_eq!(cache.len(), 3);
    }
    // Embeddings of the wrong width.
    let bad = Tensor::<B, 3>::zeros([2, 1, 16], &Default::default());
    assert!(model.forward_embeds(bad, &AttnExtras::default(), &mut cache).is_err());
    // Ids outside the vocabulary.
    assert!(model.ids_tensor(&[vec![96]]).is_err());
    assert!(model.greedy(&[200], 2, &[]).is_err());
    // A fully padded row produces finite values, no NaN.
    let keep = bool2(&[vec![true; 3], vec![false; 3]]);
    let out = model
        .forward_with(ids, &AttnExtras { key_keep: Some(keep), ..Default::default() }, &mut model.new_cache())
        .unwrap();
    assert!(vec_of(out).iter().all(|x| x.is_finite()));
}

fn copy_fixture(dst: &Path) {
    for entry in std::fs::read_dir(fixture_dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
}

#[test]
fn broken_checkpoints_fail_listing_names() {
    let cfg = LlamaConfig::from_json_file(fixture_dir().join("config.json")).unwrap();
    let dev = Default::default();

    // A missing shard.
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    std::fs::remove_file(dir.path().join("model-00002-of-00005.safetensors")).unwrap();
    let msg = match Llama::<B>::load(&cfg, dir.path(), &Remap::none(), &dev) {
        Ok(_) => panic!("load should fail"),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains("model-00002-of-00005.safetensors"), "{msg}");

    // A missing tensor and an unexpected one, in a single-file checkpoint.
    let model = load::<B>();
    let mut named = weights::named_tensors(&model);
    named.retain(|(n, _, _)| n != "model.layers.1.self_attn.k_proj.weight");
    named.push(("model.layers.9.extra.weight".into(), vec![2], vec![0.0, 1.0]));
    let file = dir.path().join("one.safetensors");
    weights::write_safetensors(&file, &named, &Default::default()).unwrap();
    let msg = match Llama::<B>::load(&cfg, &file, &Remap::none(), &dev) {
        Ok(_) => panic!("load should fail"),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains("model.layers.1.self_attn.k_proj.weight"), "{msg}");
    assert!(msg.contains("model.layers.9.extra.weight"), "{msg}");

    // A prefixed layout (as LLaVA nests the LLM) loads through a Remap; with tied embeddings a
    // stored lm_head.weight is dropped, as transformers re-ties it.
    let named: Vec<_> =
        weights::named_tensors(&model).into_iter().map(|(n, s, d)| (format!("llm.{n}"), s, d)).collect();
    let file = dir.path().join("prefixed.safetensors");
    weights::write_safetensors(&file, &named, &Default::default()).unwrap();
    let remap = Remap::none().prefix("llm.", "");
    let again = Llama::<B>::load(&cfg, &file, &remap, &dev).unwrap();
    let ids = model.ids_tensor(&[vec![1, 2, 3]]).unwrap();
    let a = vec_of(model.forward(ids.clone(), &mut model.new_cache()).unwrap());
    let b = vec_of(again.forward(ids.clone(), &mut again.new_cache()).unwrap());
    assert_eq!(a, b);
    let tied = LlamaConfig { tie_word_embeddings: true, ..cfg.clone() };
    let t = Llama::<B>::load(&tied, &file, &remap, &dev).unwrap();
    assert!(t.lm_head.is_none());
}

/// Greedy decoding that checks drafts (`greedy_with_drafts`) gives what plain greedy
/// `generate` gives (the reference: itself matched to transformers' greedy `generate` in
/// `fixture_greedy_matches_transformers_generate`), ids exactly, log-probs and fed hidden
/// states to 1e-4, on the left-padded fixture batch with a gamma bias and with and without a
/// stop id: with right drafts (the greedy answers), wrong ones, half-right ones, none, and a
/// wrong one listed before a right one. A right draft takes 1 forward instead of one per token.
#[test]
fn greedy_with_drafts_equals_greedy() {
    use popen_model::sampling::greedy_with_drafts;
    let e = expected();
    let p = padded_inputs(&e);
    let model = load::<B>();
    let (b, s) = (p.ids.len(), p.ids[0].len());
    let vocab = model.vocab_size() as u32;
    let n = 12;
    let gamma = float2((0..b * s).map(|i| ((i * 7) % 5) as f32 * 0.1 - 0.2).collect(), b, s);
    let greedy = |stop: &[u32]| {
        generate(
            &model,
            model.embed(int2(&p.ids)),
            bool2(&p.keep),
            Some(gamma.clone()),
            &SamplingConfig { max_new_tokens: n, ..Default::default() },
            stop,
        )
        .unwrap()
    };
    let free = greedy(&[]);
    let stop = vec![free[0].ids[4]];
    for stop in [vec![], stop] {
        let want = greedy(&stop);
        let right: Vec<Vec<u32>> = want.iter().map(|g| g.ids.clone()).collect();
        let wrong: Vec<Vec<u32>> = right.iter().map(|ids| ids.iter().map(|&t| (t + 1) % vocab).collect()).collect();
        let half: Vec<Vec<u32>> = right
            .iter()
            .zip(&wrong)
            .map(|(r, w)| r[..r.len() / 2].iter().chain(&w[r.len() / 2..]).copied().collect())
            .collect();
        let cases: Vec<(&str, Vec<Vec<Vec<u32>>>)> = vec![
            ("right", right.iter().map(|d| vec![d.clone()]).collect()),
            ("wrong", wrong.iter().map(|d| vec![d.clone()]).collect()),
            ("half", half.iter().map(|d| vec![d.clone()]).collect()),
            ("none", vec![vec![]; b]),
            ("wrong then right", wrong.iter().zip(&right).map(|(w, r)| vec![w.clone(), r.clone()]).collect()),
        ];
        for (name, drafts) in cases {
            let (got, forwards) = greedy_with_drafts(
                &model,
                model.embed(int2(&p.ids)),
                bool2(&p.keep),
                None,
                Some(gamma.clone()),
                &drafts,
                n,
                &stop,
            )
            .unwrap();
            for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.ids, w.ids, "{name}, stop {stop:?}, row {r}");
                assert_eq!((g.stopped, g.stop_id), (w.stopped, w.stop_id), "{name}, row {r}");
                for (a, c) in g.logprobs.iter().zip(&w.logprobs) {
                    assert!((a - c).abs() <= 1e-4, "{name}, row {r}: log-prob {a} vs {c}");
                }
                assert_eq!(g.hidden.dims(), w.hidden.dims(), "{name}, row {r}");
                let d = vec_of(g.hidden.clone())
                    .iter()
                    .zip(vec_of(w.hidden.clone()))
                    .map(|(a, c)| (a - c).abs())
                    .fold(0f32, f32::max);
                assert!(d <= 1e-4, "{name}, row {r}: hidden differs by {d}");
                let d = vec_of(g.prefix_last.clone())
                    .iter()
                    .zip(vec_of(w.prefix_last.clone()))
                    .map(|(a, c)| (a - c).abs())
                    .fold(0f32, f32::max);
                assert!(d <= 1e-5, "{name}, row {r}: prefix state differs by {d}");
            }
            let longest = want.iter().map(|g| g.ids.len()).max().unwrap();
            match name {
                "right" | "wrong then right" => assert_eq!(forwards, 1, "{name}: every draft right, one forward"),
                "wrong" | "none" => assert_eq!(forwards, longest, "{name}: one forward per token"),
                _ => assert!(forwards < longest, "{name}: {forwards} forwards for {longest} tokens"),
            }
        }
    }
}

/// Decoding from a shared [`Prefix`] gives what one prefill of the whole input gives (the
/// reference: `generate`, itself matched to transformers' greedy `generate` in
/// `fixture_greedy_matches_transformers_generate`): the left-padded fixture batch with a
/// gamma bias, prefilled without its last two columns, then [`Prefix::extend`]ed by them
/// behind a masked column (a padding key in the middle of the cache), decodes the same ids
/// (exactly), log-probs and fed states (1e-4) and prefix state (1e-5), by greedy `generate`
/// and by `greedy_with_drafts`; [`Prefix::repeat_rows`] gives every row twice, as a batch
/// holding each row twice does. Shape errors name the argument.
#[test]
fn shared_prefix_extend_and_repeat_equal_one_prefill() {
    use popen_model::sampling::{generate_from, greedy_with_drafts_from, prefill, Prefix};
    let e = expected();
    let p = padded_inputs(&e);
    let model = load::<B>();
    let (b, s) = (p.ids.len(), p.ids[0].len());
    assert!(p.keep.iter().all(|k| k[s - 3]), "every row needs 3 real tokens");
    let n = 10;
    let g: Vec<f32> = (0..b * s).map(|i| ((i * 7) % 5) as f32 * 0.1 - 0.2).collect();
    let greedy = SamplingConfig { max_new_tokens: n, ..Default::default() };
    let want = generate(&model, model.embed(int2(&p.ids)), bool2(&p.keep), Some(float2(g.clone(), b, s)), &greedy, &[])
        .unwrap();

    let c = s - 2;
    let cut = |rows: &[Vec<i64>], a: usize, z: usize| rows.iter().map(|r| r[a..z].to_vec()).collect::<Vec<_>>();
    let base_keep: Vec<Vec<bool>> = p.keep.iter().map(|r| r[..c].to_vec()).collect();
    let base_g: Vec<f32> = (0..b).flat_map(|r| g[r * s..r * s + c].to_vec()).collect();
    let base =
        prefill(&model, model.embed(int2(&cut(&p.ids, 0, c))), bool2(&base_keep), None, Some(float2(base_g, b, c)))
            .unwrap();
    assert_eq!((base.rows(), base.len()), (b, c));
    // The extension: a masked column (token 0, gamma 5: must not count), then the last two.
    let ext_ids: Vec<Vec<i64>> = p.ids.iter().map(|r| [vec![0], r[c..].to_vec()].concat()).collect();
    let ext_keep: Vec<Vec<bool>> = (0..b).map(|_| vec![false, true, true]).collect();
    let ext_pos: Vec<Vec<i64>> = base.next_pos.iter().map(|&q| vec![99, q as i64, q as i64 + 1]).collect();
    let ext_g: Vec<f32> = (0..b).flat_map(|r| [vec![5.0], g[r * s + c..r * s + s].to_vec()].concat()).collect();
    let (ext, hidden) = base
        .extend(&model, model.embed(int2(&ext_ids)), bool2(&ext_keep), &ext_pos, Some(float2(ext_g, b, 3)))
        .unwrap();
    assert_eq!(hidden.dims()[..2], [b, 3]);
    assert_eq!(ext.len(), c + 3);

    let close = |got: &[Generation<B>], want: &[&Generation<B>], what: &str| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (r, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.ids, w.ids, "{what}, row {r}");
            for (a, c) in g.logprobs.iter().zip(&w.logprobs) {
                assert!((a - c).abs() <= 1e-4, "{what}, row {r}: log-prob {a} vs {c}");
            }
            let d = vec_of(g.hidden.clone())
                .iter()
                .zip(vec_of(w.hidden.clone()))
                .map(|(a, c)| (a - c).abs())
                .fold(0f32, f32::max);
            assert!(d <= 1e-4, "{what}, row {r}: hidden differs by {d}");
            let d = vec_of(g.prefix_last.clone())
                .iter()
                .zip(vec_of(w.prefix_last.clone()))
                .map(|(a, c)| (a - c).abs())
                .fold(0f32, f32::max);
            assert!(d <= 1e-5, "{what}, row {r}: prefix state differs by {d}");
        }
    };
    let want_refs: Vec<&Generation<B>> = want.iter().collect();
    close(&generate_from(&model, ext.clone(), &greedy, &[]).unwrap(), &want_refs, "extend + generate_from");
    let drafts: Vec<Vec<Vec<u32>>> = want.iter().map(|w| vec![w.ids.clone()]).collect();
    let (got, forwards) = greedy_with_drafts_from(&model, ext.clone(), &drafts, n, &[]).unwrap();
    close(&got, &want_refs, "extend + greedy_with_drafts_from");
    assert_eq!(forwards, 1, "right drafts: one forward");
    let twice: Vec<&Generation<B>> = want.iter().flat_map(|w| [w, w]).collect();
    let rep: Prefix<B> = ext.repeat_rows(2);
    assert_eq!(rep.rows(), 2 * b);
    close(&generate_from(&model, rep, &greedy, &[]).unwrap(), &twice, "repeat_rows(2)");

    // Wrong shapes: errors, not panics.
    let msg = base
        .extend(&model, model.embed(int2(&ext_ids)), bool2(&ext_keep[..1]), &ext_pos, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("keep"), "{msg}");
    let msg = base
        .extend(&model, model.embed(int2(&ext_ids)), bool2(&ext_keep), &ext_pos[..1], None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("positions"), "{msg}");
    let msg = base
        .extend(&model, model.embed(int2(&ext_ids[..1])), bool2(&ext_keep[..1]), &ext_pos[..1], None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("rows"), "{msg}");
}

/// `grow_vocab` (transformers' `resize_token_embeddings` growing the vocabulary, new rows at
/// the mean of the old ones): hand-checked on the fixture model, tied and untied. The logits
/// of the old ids are unchanged, a new id's logit is `hidden . mean(rows)` (untied: of
/// lm_head's columns), a new id embeds to the mean row; shrinking is an error.
#[test]
fn grow_vocab_keeps_old_logits_and_adds_mean_rows() {
    let untied = load::<B>();
    assert!(untied.lm_head.is_some());
    let tied = Llama { model: untied.model.clone(), lm_head: None };
    for model in [untied, tied] {
        grow_vocab_case(model);
    }
}

fn grow_vocab_case(model: Llama<B>) {
    let old = model.vocab_size();
    let ids = model.ids_tensor(&[vec![1, 2, 3]]).unwrap();
    let hid = model.forward_embeds(model.embed(ids.clone()), &AttnExtras::default(), &mut model.new_cache()).unwrap();
    let before = vec_of(model.logits(hid.clone()));
    let h = model.hidden_size();
    let rows = vec_of(model.model.embed_tokens.weight.val());
    let mean: Vec<f32> = (0..h).map(|j| (0..old).map(|r| rows[r * h + j]).sum::<f32>() / old as f32).collect();
    let head_mean: Option<Vec<f32>> = model.lm_head.as_ref().map(|l| {
        let w = vec_of(l.weight.val()); // [h, vocab]
        (0..h).map(|j| w[j * old..(j + 1) * old].iter().sum::<f32>() / old as f32).collect()
    });
    let hv = vec_of(hid.clone());
    let big = model.clone().grow_vocab(old + 3).unwrap();
    assert_eq!(big.vocab_size(), old + 3);
    let after =
        vec_of(big.logits(big.forward_embeds(big.embed(ids), &AttnExtras::default(), &mut big.new_cache()).unwrap()));
    let want_new = head_mean.as_ref().unwrap_or(&mean);
    for t in 0..3 {
        for v in 0..old {
            assert!((after[t * (old + 3) + v] - before[t * old + v]).abs() <= 1e-5, "token {t}, id {v}");
        }
        let dot: f32 = (0..h).map(|j| hv[t * h + j] * want_new[j]).sum();
        for v in old..old + 3 {
            assert!(
                (after[t * (old + 3) + v] - dot).abs() <= 1e-4,
                "token {t}, new id {v}: {} vs {dot}",
                after[t * (old + 3) + v]
            );
        }
    }
    let e = vec_of(big.embed(big.ids_tensor(&[vec![old as u32 + 1]]).unwrap()));
    for j in 0..h {
        assert!((e[j] - mean[j]).abs() <= 1e-6);
    }
    let msg = model.clone().grow_vocab(old - 1).unwrap_err().to_string();
    assert!(msg.contains("grow_vocab"), "{msg}");
}

/// `popen bench-decode` (`popen_model::bench`): the prompt formula is the one
/// tools/reference/bench_decode.py uses (values by hand), and the workloads run and return one
/// non-negative timing per iteration on a random tiny LLaMA.
#[test]
fn bench_decode_prompt_and_workloads() {
    use popen_model::bench;
    // i * 7919 + 13 mod (vocab - 200) + 100: 13 + 100, 7932 + 100, (15851 mod 800) + 100.
    assert_eq!(bench::prompt_ids(3, 1000), vec![113, (7932 % 800) + 100, (15851 % 800) + 100]);
    assert!(bench::prompt_ids(50, 1000).iter().all(|&i| (100..900).contains(&i)));
    // A vocabulary of 200 or fewer ids is used whole: 13, 7932 mod 64, 15851 mod 64.
    assert_eq!(bench::prompt_ids(3, 64), vec![13, 7932 % 64, 15851 % 64]);
    let model = LlamaConfig::tiny().init::<B>(&Default::default());
    let d = bench::decode(&model, 2, 8, 4, 2).unwrap();
    assert_eq!((d.batch, d.prompt, d.new_tokens, d.ms.len()), (2, 8, 4, 2));
    assert!(d.ms.iter().all(|m| *m >= 0.0) && d.median_ms().is_finite());
    let p = bench::prefill(&model, 1, 16, 2).unwrap();
    assert_eq!((p.workload.as_str(), p.ms.len()), ("prefill b1 p16", 2));
    assert!(bench::decode(&model, 1, 8, 1, 1).is_err(), "one new token cannot give a per-token time");
}
