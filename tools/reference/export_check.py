#!/usr/bin/env python3
"""PyTorch loads what `popen model-export` writes, and computes the same log-probs and masks.

Reads the two exports that crates/popen-model/tests/model/export.rs writes on every run
(target/tmp/export-fixture/, or the folder given as the first argument):

  pixellm/   popen's export (--layout pixellm) of the PixelLM fixture
             (tests/fixtures/pixellm, itself written by tools/reference/pixellm_fixture.py)
             with POPEN's p_hat and seg-feedback projection on top. Loaded the way PixelLM's
             code loads a checkpoint: config.json through transformers' LlamaConfig (the LLM
             part of PixelLM's LlavaConfig), the tower through
             CLIPVisionModel.from_pretrained(vision_tower/) + PixelLM's position-table resize,
             and the weights with load_state_dict(strict=True) into transformers'
             LlamaForCausalLM and the PixelLM modules under PixelLM's attribute names
             (pixellm_fixture.Glue: mm_projector, out_mm_projector, text_hidden_fcs,
             image_feature_neck, prompt_encoder, mask_decoder). Every tensor of the file must
             land, except POPEN's popen.* (which PixelLM's model has no place for).
             PixelLM's forward (pixellm_fixture.forward) must reproduce the committed
             expectations of tests/fixtures/pixellm/io.safetensors: answer log-probs, seg
             embeddings, low-res and full-size masks, mask scores.
  llava-hf/  popen's export (--layout llava-hf) of the LLaVA fixture (tests/fixtures/llava,
             written by transformers' save_pretrained, tools/reference/llava_fixture.py).
             Loaded with LlavaForConditionalGeneration.from_pretrained (no missing or
             unexpected keys); its logits on the fixture's image + tokens must reproduce
             tests/fixtures/llava/expected.json.

Writes crates/popen-model/tests/fixtures/export/check.json: the sha256 of every file it
loaded and the worst errors. export.rs checks that the export it writes has exactly those
hashes, so the bytes popen writes today are the bytes PyTorch loaded.

When the export format changes: run the test (it writes the exports, then fails on the
hashes), run this script, rerun the test.

    cargo test --workspace --test model export   # writes target/tmp/export-fixture
    target/refenv/bin/python tools/reference/export_check.py
"""
import hashlib
import importlib.metadata
import json
import os
import sys

import torch
from safetensors import safe_open
from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clip_fixture as cf  # noqa: E402
import pixellm_fixture as pf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "crates/popen-model/tests/fixtures")
TOL = 1e-4


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read())
    return h.hexdigest()


def load_file(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).abs() / want.abs().clamp(min=1.0)).max().item()


def check_pixellm(d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert cfg["architectures"] == ["PixelLMForCausalLM"], cfg["architectures"]
    lcfg = LlamaConfig.from_pretrained(d)
    lcfg._attn_implementation = "eager"
    llm = LlamaForCausalLM(lcfg).eval()
    gen = torch.Generator().manual_seed(0)
    glue = pf.Glue(cfg["mm_hidden_size"], lcfg.hidden_size, cfg["out_dim"], gen).eval()
    tower, info = CLIPVisionModel.from_pretrained(
        os.path.join(d, cfg["mm_vision_tower"]), output_loading_info=True,
        attn_implementation="eager", dtype=torch.float32)
    assert not any(info.values()), f"vision tower: {info}"
    assert tower.config.image_size == cfg["resize_vision_tower_size"]
    tower.eval()
    # PixelLM's CLIPVisionTower.load_model resize (the identity on a tower saved at size).
    before = tower.vision_model.embeddings.position_embedding.weight.detach().clone()
    cf.pixellm_resize_vision_tower(tower, cfg["resize_vision_tower_size"])
    assert torch.equal(before, tower.vision_model.embeddings.position_embedding.weight.detach())

    sd = load_file(os.path.join(d, "model.safetensors"))
    popen_keys = sorted(k for k in sd if k.startswith("popen."))
    llm_sd = {k: v for k, v in sd.items() if not k.startswith("popen.") and (
        k.startswith("lm_head.") or k[len("model."):] in llm.model.state_dict())}
    glue_sd = {k[len("model."):]: v for k, v in sd.items()
               if k.startswith("model.") and k not in llm_sd}
    leftover = set(sd) - set(llm_sd) - {"model." + k for k in glue_sd} - set(popen_keys)
    assert not leftover, leftover
    llm.load_state_dict(llm_sd, strict=True)
    glue.load_state_dict(glue_sd, strict=True)

    inputs = pf.build_inputs()
    r = pf.forward(tower, llm, glue, inputs)
    want = load_file(os.path.join(FIX, "pixellm/io.safetensors"))
    errs = {
        "answer_logprobs": rel_err(r["lp"], want["answer_logprobs"]),
        "f": rel_err(r["f"], want["f"]),
        "low_res_masks": rel_err(torch.stack(r["low"]), want["low_res_masks"]),
        "mask_scores": rel_err(torch.stack(r["scores"]), want["mask_scores"]),
        "masks": max(rel_err(m, want[f"masks.{o}"]) for o, m in enumerate(r["post"])),
    }
    print("pixellm export:", errs, "popen tensors:", popen_keys)
    assert all(e <= TOL for e in errs.values()), errs
    files = ["model.safetensors", "config.json", "vision_tower/model.safetensors",
             "vision_tower/config.json"]
    return {"files": {f: sha256(os.path.join(d, f)) for f in files}, "max_rel_err": errs,
            "popen_tensors": popen_keys}


def check_llava_hf(d):
    exp = json.load(open(os.path.join(FIX, "llava/expected.json")))
    torch.set_default_dtype(torch.float32)
    model, info = LlavaForConditionalGeneration.from_pretrained(
        d, output_loading_info=True, dtype=torch.float32)
    assert not any(info.values()), f"llava-hf: {info}"
    model.eval()
    n_img = exp["image_tokens"]
    image_token = model.config.image_token_index
    ids = torch.tensor([exp["before"] + [image_token] * n_img + exp["after"]])
    s = model.config.vision_config.image_size
    pixels = torch.tensor(exp["pixels"], dtype=torch.float32).reshape(1, 3, s, s)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    want = torch.tensor(exp["logits"]).reshape(exp["logits_shape"])
    err = rel_err(out.logits, want)
    print("llava-hf export: logits", err)
    assert err <= TOL, err
    files = ["model.safetensors", "config.json"]
    return {"files": {f: sha256(os.path.join(d, f)) for f in files},
            "max_rel_err": {"logits": err}}


def main():
    base = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/tmp/export-fixture")
    torch.set_num_threads(1)
    out = {
        "generator": "tools/reference/export_check.py",
        "versions": {p: importlib.metadata.version(p)
                     for p in ("torch", "transformers", "safetensors")},
        "pixellm": check_pixellm(os.path.join(base, "pixellm")),
        "llava-hf": check_llava_hf(os.path.join(base, "llava-hf")),
    }
    os.makedirs(os.path.join(FIX, "export"), exist_ok=True)
    path = os.path.join(FIX, "export/check.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
        fh.write("\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
