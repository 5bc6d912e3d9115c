#!/usr/bin/env python3
"""Write crates/popen-model/tests/fixtures/llama/, the transformers reference that
crates/popen-model/tests/llama_ext.rs checks the Rust LLaMA (crates/popen-model/src/llama.rs,
crates/popen-model/src/sampling.rs) against.

Reference: transformers 4.57.1 `LlamaForCausalLM` (src/transformers/models/llama/modeling_llama.py
of that release, eager attention), torch 2.9.1 on CPU, safetensors 0.8.0
(versions pinned in tools/reference/requirements.txt and recorded in expected.json "meta").

What is written:
- A random tiny LlamaForCausalLM (GQA: hidden 32, 4 heads, 2 KV heads, intermediate 48,
  2 layers, vocab 96, rope_theta 5e4, untied lm_head), weights drawn wider than HF's default
  init (std 0.3, RMSNorm weights in [0.5, 1.5]) so attention patterns and the gamma bias visibly
  change the outputs. Saved with `save_pretrained(max_shard_size="20KB")`, so it is SHARDED with
  model.safetensors.index.json (the sharded loader is tested), plus config.json. One extra tensor
  `model.layers.0.self_attn.rotary_emb.inv_freq` is appended to the last shard and the index,
  as older LLaMA/LLaVA checkpoints carry it: the Rust loader must drop it.
- expected.json:
  * "padded": a batch of 2 rows, row 1 LEFT-padded; 2D attention_mask and position_ids =
    cumsum(mask) - 1 (padding -> 1), as `generate` builds them. Logits [2, S, V] and all
    hidden_states (L + 1 entries: embeddings, layer outputs, final-normed last) [2, S, H].
  * "gamma": the same inputs with a 4D float additive attention_mask
    [b, 1, S, S] = (causal and not padding) ? gamma[b, key] : finfo(float32).min, which eager
    attention adds to QK^T/sqrt(d) before softmax in every layer and head (POPEN Eq. 5).
    Logits and last hidden state.
  * "score": per-row teacher-forced log p(response_i | prompt, response_<i), each row run alone
    without padding: log_softmax(logits[len(prompt) - 1 + i])[response[i]].
  * "greedy": `generate(do_sample=False, max_new_tokens=6)` on the padded batch (no stop token),
    new ids and log_softmax of the raw per-step logits at the chosen ids.
  Padding query rows are don't-care (their outputs are not compared); `real` marks the others.

Rerun (writes the folder from scratch; fixed seed):
    /tmp/refenv/bin/python tools/reference/llama_fixture.py
"""
import importlib.metadata
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "crates/popen-model/tests/fixtures/llama")

torch.manual_seed(20241126)


def rounded(t):
    """Nested lists of floats with 7 significant digits (f32 precision is ~7.2 digits)."""
    return [float(f"{v:.7g}") for v in t.detach().double().flatten().tolist()]


def main():
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=5e4,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)

    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    model.save_pretrained(OUT, max_shard_size="20KB", safe_serialization=True)
    gen_cfg = os.path.join(OUT, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)

    # Append a rotary inv_freq buffer to the last shard, as older checkpoints carry it.
    index_path = os.path.join(OUT, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1, "the fixture must be sharded"
    last = os.path.join(OUT, shards[-1])
    tensors = load_file(last)
    inv_name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    tensors[inv_name] = model.model.rotary_emb.inv_freq.clone()
    save_file(tensors, last, metadata={"format": "pt"})
    index["weight_map"][inv_name] = shards[-1]
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)

    S = 7
    ids = torch.tensor(
        [[5, 17, 42, 8, 77, 3, 60], [0, 0, 0, 23, 9, 91, 14]], dtype=torch.long
    )
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]], dtype=torch.long)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)

    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    padded = {
        "logits": rounded(out.logits),
        "hidden_states": [rounded(h) for h in out.hidden_states],
    }

    # Gamma: additive bias per key position, same for every query row, head and layer.
    gamma = (torch.rand(2, S) - 0.5) * 4.0
    causal = torch.tril(torch.ones(S, S, dtype=torch.bool))
    allowed = causal[None, :, :] & mask.bool()[:, None, :]  # [b, q, k]
    minv = torch.finfo(torch.float32).min
    mask4 = torch.where(allowed, gamma[:, None, :].expand(2, S, S), torch.tensor(minv))[:, None]
    with torch.no_grad():
        gout = model(input_ids=ids, attention_mask=mask4, position_ids=pos, output_hidden_states=True)
        # Sanity: a zero gamma through the same 4D path reproduces the 2D-mask outputs.
        zmask = torch.where(allowed, torch.zeros(2, S, S), torch.tensor(minv))[:, None]
        zout = model(input_ids=ids, attention_mask=zmask, position_ids=pos)
    real = mask.bool()
    assert torch.allclose(zout.logits[real], out.logits[real], atol=1e-5)
    assert (gout.logits[real] - out.logits[real]).abs().max() > 1e-2, "gamma has no effect"
    gamma_case = {
        "gamma": rounded(gamma),
        "logits": rounded(gout.logits),
        "last_hidden": rounded(gout.hidden_states[-1]),
    }

    # Teacher-forced log-probs, each row alone.
    prompts = [[5, 17, 42], [23, 9, 91, 14, 2]]
    responses = [[8, 77, 3, 60, 11], [30, 1]]
    score = []
    for p, r in zip(prompts, responses):
        seq = torch.tensor([p + r])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
        score.append([float(lp[len(p) - 1 + i, t]) for i, t in enumerate(r)])

    # Greedy generation on the padded batch, no stop token.
    with torch.no_grad():
        g = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = g.sequences[:, S:]
    steps = torch.stack(g.logits, 1).double().log_softmax(-1)  # [b, T, V]
    greedy = {
        "ids": new.tolist(),
        "logprobs": [
            [float(steps[b, t, new[b, t]]) for t in range(new.shape[1])] for b in range(2)
        ],
    }

    meta = {
        "script": "tools/reference/llama_fixture.py",
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "safetensors": importlib.metadata.version("safetensors"),
        "attn_implementation": "eager",
    }
    expected = {
        "meta": meta,
        "batch": 2,
        "seq": S,
        "vocab": cfg.vocab_size,
        "hidden": cfg.hidden_size,
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "position_ids": pos.tolist(),
        "padded": padded,
        "gamma": gamma_case,
        "score": {"prompts": prompts, "responses": responses, "logprobs": score},
        "greedy": greedy,
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f)
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"wrote {OUT}: {sorted(os.listdir(OUT))}, {total} bytes")


if __name__ == "__main__":
    main()
