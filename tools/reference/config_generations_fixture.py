#!/usr/bin/env python3
"""Write crates/popen-model/tests/fixtures/config_generations/: the config.json files that
transformers 4.x and 5.x write for the same models, which crates/popen-model/tests/model/
config_generations.rs reads with popen's readers (LlamaConfig, ClipVisionConfig, LlavaHfConfig).

transformers 5 nests the RoPE settings (`rope_theta`, 4.x's `rope_scaling`) under
`rope_parameters`; a reader that only knows the 4.x names silently takes theta = 10000 there.
No torch is needed: only the configs are written; the weights are those of the existing
fixtures (tests/fixtures/llama, llava, clip), whose configs are rebuilt here with the same
arguments as tools/reference/{llama,llava,clip}_fixture.py.

Steps (`make config-fixtures` runs them, each in its own virtual environment):
    <env with transformers 4.57.1>/bin/python tools/reference/config_generations_fixture.py write
    <env with transformers 5.25.0>/bin/python tools/reference/config_generations_fixture.py write
    <env with transformers 5.25.0>/bin/python tools/reference/config_generations_fixture.py interpret

`write` puts into tf<major>/ (the version is recorded in each file's "transformers_version"):
- llama.json: tests/fixtures/llama's config (rope_theta 5e4, GQA, untied).
- llama_linear.json, llama_llama3.json: the same model with RoPE scaling (4.x: `rope_scaling`;
  5.x: `rope_parameters`; llama3's original context 200 puts one of the 4 frequencies in the
  smoothed band, one above and two below it), llama_yarn.json and llama_dynamic.json: scalings popen rejects.
- llama_gelu.json: hidden_act gelu (rejected by popen's LLaMA).
- llava.json: tests/fixtures/llava's LlavaConfig (text_config + vision_config).
- clip.json: tests/fixtures/clip's CLIPVisionConfig; clip_gelu_new.json (rejected activation);
  tf5 only: clip_list_sizes.json (5.x accepts image_size / patch_size as [h, w]).
`interpret` writes interpreted.json: for every file of tf4/ and tf5/, the `rope_parameters`
that transformers 5.25.0 derives from it when loading (its backward-compatible reading of 4.x
files), and hidden_act; the tests check popen derives the same values.
`rope_reference.json` (written by `interpret`): RoPE inverse frequencies of llama_linear and
llama_llama3, computed in float64 by a line-by-line transcription of transformers 5.25.0's
`_compute_linear_scaling_rope_parameters` / `_compute_llama3_parameters`
(src/transformers/modeling_rope_utils.py; those functions need torch, which this step avoids).
"""
import importlib.metadata
import json
import math
import os
import sys

import transformers
from transformers import AutoConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "crates/popen-model/tests/fixtures/config_generations")
MAJOR = int(transformers.__version__.split(".")[0])

LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
             max_position_embeddings=256, tie_word_embeddings=False)
THETA = 5e4
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 200},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}
CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            num_channels=3, image_size=16, patch_size=4, hidden_act="quick_gelu",
            layer_norm_eps=1e-5)


def llama(scaling=None, **extra):
    """The LlamaConfig of tests/fixtures/llama, RoPE settings spelled as this version wants."""
    kw = dict(LLAMA, **extra)
    if MAJOR >= 5:
        rp = {"rope_type": "default", "rope_theta": THETA}
        if scaling:
            rp.update(SCALINGS[scaling])
        kw["rope_parameters"] = rp
    else:
        kw["rope_theta"] = THETA
        if scaling:
            kw["rope_scaling"] = dict(SCALINGS[scaling])
    return LlamaConfig(**kw)


def save(cfg, name, d):
    cfg.save_pretrained(d)
    os.replace(os.path.join(d, "config.json"), os.path.join(d, name))


def write():
    d = os.path.join(OUT, f"tf{MAJOR}")
    os.makedirs(d, exist_ok=True)
    save(llama(), "llama.json", d)
    for s in SCALINGS:
        save(llama(s), f"llama_{s}.json", d)
    save(llama(hidden_act="gelu"), "llama_gelu.json", d)
    save(CLIPVisionConfig(**CLIP), "clip.json", d)
    save(CLIPVisionConfig(**dict(CLIP, hidden_act="gelu_new")), "clip_gelu_new.json", d)
    if MAJOR >= 5:
        save(CLIPVisionConfig(**dict(CLIP, image_size=[16, 16], patch_size=[4, 4])),
             "clip_list_sizes.json", d)
    # tools/reference/llava_fixture.py's config.
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                              num_attention_heads=4, image_size=16, patch_size=4,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text_kw = dict(vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                   tie_word_embeddings=False, max_position_embeddings=128)
    if MAJOR >= 5:
        text_kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    else:
        text_kw["rope_theta"] = 10000.0
    cfg = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**text_kw),
                      image_token_index=99, projector_hidden_act="gelu",
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=16)
    save(cfg, "llava.json", d)
    meta = {"script": "tools/reference/config_generations_fixture.py",
            "python": sys.version.split()[0],
            "transformers": transformers.__version__,
            "tokenizers": importlib.metadata.version("tokenizers"),
            "huggingface_hub": importlib.metadata.version("huggingface_hub")}
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"wrote {d} with transformers {transformers.__version__}")


def inv_freq(rp, head_dim, max_pos):
    """transformers 5.25.0 modeling_rope_utils.py, transcribed (float64)."""
    base = rp["rope_theta"]
    dim = head_dim
    inv = [1.0 / (base ** (i / dim)) for i in range(0, dim, 2)]
    if rp["rope_type"] == "linear":
        return [f / rp["factor"] for f in inv]
    assert rp["rope_type"] == "llama3"
    factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
    old = rp.get("original_max_position_embeddings", max_pos)
    low_wl, high_wl = old / lo, old / hi
    out = []
    for f in inv:
        wl = 2 * math.pi / f
        g = f / factor if wl > low_wl else f
        if not (wl < high_wl) and not (wl > low_wl):
            s = (old / wl - lo) / (hi - lo)
            g = (1 - s) * g / factor + s * g
        out.append(g)
    return out


def interpret():
    assert MAJOR >= 5, "interpret reads the files the way transformers 5 does"
    res, ref = {}, {}
    for gen in ("tf4", "tf5"):
        d = os.path.join(OUT, gen)
        for name in sorted(os.listdir(d)):
            if name == "meta.json":
                continue
            with open(os.path.join(d, name)) as f:
                raw = json.load(f)
            try:
                cfg = AutoConfig.for_model(**raw)
            except Exception as e:  # noqa: BLE001 - recorded as what transformers says
                res[f"{gen}/{name}"] = {"error": f"{type(e).__name__}: {e}"}
                continue
            text = cfg.get_text_config() if hasattr(cfg, "text_config") else cfg
            entry = {"hidden_act": getattr(getattr(cfg, "vision_config", cfg), "hidden_act", None)}
            if hasattr(text, "rope_parameters"):
                entry["rope_parameters"] = dict(text.rope_parameters)
                entry["hidden_act"] = text.hidden_act
            res[f"{gen}/{name}"] = entry
            rp = entry.get("rope_parameters")
            if rp and rp["rope_type"] in ("linear", "llama3"):
                hd = text.head_dim or text.hidden_size // text.num_attention_heads
                ref[f"{gen}/{name}"] = {"head_dim": hd,
                                        "inv_freq": inv_freq(rp, hd, text.max_position_embeddings)}
    meta = {"script": "tools/reference/config_generations_fixture.py interpret",
            "transformers": transformers.__version__}
    for fname, body in (("interpreted.json", res), ("rope_reference.json", ref)):
        with open(os.path.join(OUT, fname), "w") as f:
            json.dump({"meta": meta, "files": body}, f, indent=1, sort_keys=True)
            f.write("\n")
    print(f"wrote {OUT}/interpreted.json, rope_reference.json")


if __name__ == "__main__":
    {"write": write, "interpret": interpret}[sys.argv[1] if len(sys.argv) > 1 else "write"]()
