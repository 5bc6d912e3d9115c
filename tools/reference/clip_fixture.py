#!/usr/bin/env python3
"""Write crates/popen-model/tests/fixtures/clip/, the reference that
crates/popen-model/tests/clip.rs checks the Rust CLIP vision tower (crates/popen-model/src/clip.rs)
and PixelLM's image preprocessing (crates/popen-model/src/preprocess.rs) against.

What it computes and where each piece comes from:

* `model/` (config.json + model.safetensors): a random tiny `transformers.CLIPVisionModel`
  (transformers 4.57.1, torch 2.9.1; seed 0; eager attention) written by `save_pretrained`.
  Every parameter is re-drawn (LayerNorm weights around 1) so that no layer is an identity.
* `expected.safetensors` + `cases.json`:
  - case "base": HF `CLIPVisionModel(pixel_values, output_hidden_states=True)` at the model's own
    16x16 input: `hidden_states[i]` for several i, `last_hidden_state`, `pooler_output`;
  - case "gelu": the same weights with `hidden_act="gelu"`;
  - case "resized": the position embeddings resized 16 -> 24 px (4x4 -> 6x6 patch grid) by a
    transcription of PixelLM's `CLIPVisionTower.load_model` (`resize_vision_tower` branch),
    https://github.com/MaverickRen/PixelLM/blob/c43c0aff64e0bf4ab65023667e58eb2329b54f7b/model/llava/model/multimodal_encoder/clip_encoder.py
    then the tower run without a mask (plain HF forward) and with PixelLM's padded-image ViT
    attention mask, transcribed from `LlavaMetaForCausalLM.encode_images`
    (model/llava/model/llava_arch.py, same commit) and `_CLIPVisionTransformer.forward` /
    `_expand_mask` (model/llava/model/multimodal_encoder/custom_clip.py, same commit).
* `image.png` + preprocessing expectations: a synthetic, photo-like 37x23 RGB image (smooth
  gradients, a soft disc, hard edges, noise) and PixelLM's CLIP-input preprocessing with
  `pad_val_clip_images` (utils/multi_reason_seg_val_dataset.py and chat.py, same commit):
  SAM's `ResizeLongestSide.apply_image` (model/segment_anything/utils/transforms.py, same
  commit: `np.array(torchvision resize(to_pil_image(image), target_size))`, which for a PIL
  image is `PIL.Image.resize((w, h), BILINEAR)`; torchvision is not installed here, so the PIL
  call is made directly), then `(x - pixel_mean) / pixel_std` on the uint8->float32 tensor and
  zero padding bottom/right (`preprocess`). Sizes 32 (down-scaling) and 48 (up-scaling), plus
  plain Pillow 12.0.0 BICUBIC resizes for the Rust PIL-resampling port.

Rerun (CPU only; versions pinned in tools/reference/requirements.txt):

    /tmp/refenv/bin/python tools/reference/clip_fixture.py
"""
import importlib.metadata
import json
import os
import shutil

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "crates/popen-model/tests/fixtures/clip")

PIXEL_MEAN = torch.Tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
PIXEL_STD = torch.Tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)


# ---------------------------------------------------------------- PixelLM transcriptions


def pixellm_resize_vision_tower(vision_tower, resize_vision_tower_size):
    """PixelLM clip_encoder.py `CLIPVisionTower.load_model`, `if self.resize_vision_tower:`
    branch, verbatim in behaviour. Note what it does: the LAST row of the table (the last
    patch's position in HF's layout, whose row 0 is CLS) is kept as the "cls" row and appended
    at the end, while rows [0, N) (CLS + all patches but the last) are viewed as the grid and
    resized bilinearly (align_corners=False, no antialias)."""
    emb = vision_tower.vision_model.embeddings
    origin_p_num = int(emb.num_patches ** 0.5)
    embed_dim = emb.embed_dim
    emb.image_size = resize_vision_tower_size
    emb.num_patches = (resize_vision_tower_size // emb.patch_size) ** 2
    emb.num_positions = emb.num_patches + 1
    emb.register_buffer("position_ids", torch.arange(emb.num_positions).expand((1, -1)), persistent=False)
    new_p_num = int(emb.num_patches ** 0.5)
    w = emb.position_embedding.weight
    w_cls = w[-1:]
    w = w[:-1].permute(1, 0).view(1, embed_dim, origin_p_num, origin_p_num)
    new_w = F.interpolate(w, (new_p_num, new_p_num), mode="bilinear", align_corners=False)[0]
    new_w = new_w.flatten(-2).permute(1, 0)
    new_w = torch.cat((new_w, w_cls), dim=0)
    emb.position_embedding = nn.Embedding(emb.num_positions, embed_dim)
    emb.position_embedding.weight = nn.Parameter(new_w)
    vision_tower.config.image_size = resize_vision_tower_size
    return vision_tower


def pixellm_vit_attention_mask(images, clip_resize_list, patch_size):
    """llava_arch.py `encode_images` (the `_CLIPVisionModel` branch): pixel mask of the
    un-padded region, nearest-resized to the patch grid, CLS column prepended. PixelLM hard-codes
    patch_size = 14 (ViT-L/14); it is a parameter here for the tiny model."""
    vit_attention_mask = torch.zeros_like(images[:, 0, :, :])
    for i, size in enumerate(clip_resize_list):
        vit_attention_mask[i, : size[0], : size[1]] = 1
    patch_num = vit_attention_mask.shape[-1] // patch_size
    vit_attention_mask = F.interpolate(vit_attention_mask[:, None], size=(patch_num, patch_num), mode="nearest")[:, 0]
    flat = vit_attention_mask.flatten(1)
    return torch.cat((torch.ones(flat.shape[0], 1).to(flat), flat), dim=-1)


def expand_mask(mask, dtype):
    """custom_clip.py `_expand_mask`: [bsz, src] -> additive [bsz, 1, tgt, src]."""
    bsz, src_len = mask.size()
    expanded = mask[:, None, None, :].expand(bsz, 1, src_len, src_len).to(dtype)
    inverted = 1.0 - expanded
    return inverted.masked_fill(inverted.to(torch.bool), torch.finfo(dtype).min)


def pixellm_vision_forward(model, pixel_values, attention_mask):
    """custom_clip.py `_CLIPVisionTransformer.forward` with output_hidden_states=True."""
    vm = model.vision_model
    hidden = vm.embeddings(pixel_values)
    hidden = vm.pre_layrnorm(hidden)
    mask = expand_mask(attention_mask, hidden.dtype) if attention_mask is not None else None
    enc = vm.encoder(inputs_embeds=hidden, attention_mask=mask, output_hidden_states=True)
    last = enc.last_hidden_state
    pooled = vm.post_layernorm(last[:, 0, :])
    return enc.hidden_states, last, pooled


def get_preprocess_shape(oldh, oldw, long_side_length):
    """segment_anything/utils/transforms.py `ResizeLongestSide.get_preprocess_shape`."""
    scale = long_side_length * 1.0 / max(oldh, oldw)
    newh, neww = oldh * scale, oldw * scale
    neww = int(neww + 0.5)
    newh = int(newh + 0.5)
    return (newh, neww)


def resize_longest_side(image, target_length):
    """`ResizeLongestSide.apply_image`: torchvision's `resize(to_pil_image(image), [h, w])` is
    `PIL.Image.resize((w, h), Image.BILINEAR)` for PIL input (torchvision
    transforms/_functional_pil.py `resize`)."""
    h, w = get_preprocess_shape(image.shape[0], image.shape[1], target_length)
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def pixellm_preprocess(x, img_size):
    """`preprocess` of chat.py / MultiReasonSegValDataset: normalize, pad bottom/right."""
    x = (x - PIXEL_MEAN) / PIXEL_STD
    h, w = x.shape[-2:]
    return F.pad(x, (0, img_size - w, 0, img_size - h))


# ---------------------------------------------------------------- fixture


def synthetic_image(h, w, rng):
    """Photo-like content: smooth colour gradients, a soft-edged disc, a hard-edged bar and
    sensor-like noise, so that resampling is exercised on both smooth and sharp signal."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 40 + 180 * x / (w - 1)
    g = 30 + 150 * y / (h - 1)
    b = 120 + 60 * np.sin(x / 3.0) * np.cos(y / 4.0)
    d = np.sqrt((x - 0.6 * w) ** 2 + (y - 0.45 * h) ** 2)
    disc = 1.0 / (1.0 + np.exp((d - 6.0) * 1.5))
    r = r * (1 - disc) + 250 * disc
    g = g * (1 - disc) + 210 * disc
    b = b * (1 - disc) + 40 * disc
    bar = (x >= 5) & (x < 9)
    r[bar], g[bar], b[bar] = 15, 20, 25
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 6, size=(h, w, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    tensors = {}

    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_channels=3,
        image_size=16,
        patch_size=4,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attn_implementation="eager",
    )
    model = CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(os.path.join(OUT, "model"), safe_serialization=True)
    keys = sorted(model.state_dict().keys())

    cases = {}
    with torch.no_grad():
        # base: HF forward at the native size.
        px = torch.randn(2, 3, 16, 16)
        out = model(pixel_values=px, output_hidden_states=True)
        idx = [0, 1, -3, -2, -1]
        tensors["base.pixel_values"] = px
        for i in idx:
            tensors[f"base.hidden_states.{i}"] = out.hidden_states[i]
        tensors["base.last_hidden_state"] = out.last_hidden_state
        tensors["base.pooler_output"] = out.pooler_output
        cases["base"] = {"hidden_state_indices": idx, "image_size": 16}

        # gelu: same weights, exact-erf GELU.
        cfg_g = CLIPVisionConfig(**{**cfg.to_dict(), "hidden_act": "gelu"})
        cfg_g._attn_implementation = "eager"
        model_g = CLIPVisionModel(cfg_g).eval()
        model_g.load_state_dict(model.state_dict())
        out_g = model_g(pixel_values=px, output_hidden_states=True)
        tensors["gelu.last_hidden_state"] = out_g.last_hidden_state
        tensors["gelu.pooler_output"] = out_g.pooler_output
        cases["gelu"] = {"hidden_act": "gelu"}

        # resized: PixelLM's resize 16 -> 24, unmasked and with PixelLM's ViT mask.
        model_r = CLIPVisionModel(cfg).eval()
        model_r.load_state_dict(model.state_dict())
        pixellm_resize_vision_tower(model_r, 24)
        tensors["resized.position_embedding"] = model_r.vision_model.embeddings.position_embedding.weight
        pxr = torch.randn(2, 3, 24, 24)
        tensors["resized.pixel_values"] = pxr
        hs, last, pooled = pixellm_vision_forward(model_r, pxr, None)
        ridx = [0, -2]
        for i in ridx:
            tensors[f"resized.hidden_states.{i}"] = hs[i]
        tensors["resized.last_hidden_state"] = last
        tensors["resized.pooler_output"] = pooled
        # Sanity: the plain HF forward of the resized model agrees with the transcription.
        hf = model_r(pixel_values=pxr, output_hidden_states=True)
        assert torch.equal(hf.last_hidden_state, last)
        resized_hw = [[24, 13], [9, 24]]
        mask = pixellm_vit_attention_mask(pxr, resized_hw, cfg.patch_size)
        tensors["resized.key_mask"] = mask
        hs_m, last_m, pooled_m = pixellm_vision_forward(model_r, pxr, mask)
        midx = [-3, -2]
        for i in midx:
            tensors[f"resized_masked.hidden_states.{i}"] = hs_m[i]
        tensors["resized_masked.last_hidden_state"] = last_m
        tensors["resized_masked.pooler_output"] = pooled_m
        cases["resized"] = {
            "image_size": 24,
            "hidden_state_indices": ridx,
            "masked_hidden_state_indices": midx,
            "resized_hw": resized_hw,
        }

    # preprocessing
    rng = np.random.default_rng(7)
    img = synthetic_image(23, 37, rng)
    Image.fromarray(img).save(os.path.join(OUT, "image.png"))
    assert np.array_equal(np.array(Image.open(os.path.join(OUT, "image.png")).convert("RGB")), img)
    pre = {}
    for size in (32, 48):
        resized = resize_longest_side(img, size)
        clip_resize = list(resized.shape[:2])
        x = pixellm_preprocess(torch.from_numpy(resized).permute(2, 0, 1).contiguous(), size)
        tensors[f"preprocess.{size}.resized_u8"] = torch.from_numpy(resized.astype(np.float32))
        if size == 32:  # the normalized, padded tensor once (fixture size)
            tensors[f"preprocess.{size}.pixels"] = x
        pre[str(size)] = {"resized_hw": clip_resize, "original_hw": [23, 37]}
    for (w, h) in ((20, 13), (50, 31)):
        bic = np.array(Image.fromarray(img).resize((w, h), Image.BICUBIC))
        tensors[f"bicubic.{w}x{h}"] = torch.from_numpy(bic.astype(np.float32))
    pre["bicubic_sizes_wh"] = [[20, 13], [50, 31]]

    save_file({k: v.detach().clone().contiguous().float() for k, v in tensors.items()},
              os.path.join(OUT, "expected.safetensors"))
    meta = {
        "generator": "tools/reference/clip_fixture.py",
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers", "safetensors", "Pillow", "numpy")},
        "pixellm_commit": "c43c0aff64e0bf4ab65023667e58eb2329b54f7b",
        "model_keys": keys,
    }
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"meta": meta, "model": cases, "preprocess": pre}, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(OUT) for fn in fns)
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
