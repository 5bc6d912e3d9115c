"""Fixture for popen's LLaVA glue (crates/popen-model/tests/pixellm.rs::llava_hf_fixture).

Writes crates/popen-model/tests/fixtures/llava/: a random tiny Hugging Face
`LlavaForConditionalGeneration` (transformers 4.57.1: CLIP vision tower, 2-layer GELU
projector, LLaMA with GQA) saved with `save_pretrained` (safetensors, HF >= 4.52 key layout
`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`,
`lm_head.*`), one square image's pixel values (no padding, so PixelLM's padding masks are
all-true and the LLM image grid equals the patch grid: popen's path then computes exactly
HF LLaVA's), the token ids around the image, and the logits of the whole sequence.

Rerun: /tmp/refenv/bin/python tools/reference/llava_fixture.py   (pins: requirements.txt)
"""
import json
import pathlib

import numpy as np
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

OUT = pathlib.Path(__file__).resolve().parents[2] / "crates/popen-model/tests/fixtures/llava"
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(7)

vision = CLIPVisionConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                          num_attention_heads=4, image_size=16, patch_size=4,
                          hidden_act="quick_gelu", layer_norm_eps=1e-5)
text = LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                   rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=128)
IMAGE_TOKEN = 99
cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                  projector_hidden_act="gelu", vision_feature_layer=-2,
                  vision_feature_select_strategy="default", image_seq_length=16)
model = LlavaForConditionalGeneration(cfg).eval()
# Spread the weights a little so the comparison is not dominated by tiny values.
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
model.save_pretrained(OUT, safe_serialization=True)

pixels = torch.randn(1, 3, 16, 16)
before = [1, 5, 17, 23]
after = [42, 7, 64, 3, 88]
n_img = (16 // 4) ** 2
ids = torch.tensor([before + [IMAGE_TOKEN] * n_img + after])
with torch.no_grad():
    out = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
json.dump({
    "source": "transformers 4.57.1 LlavaForConditionalGeneration, random init (seed 7)",
    "vision_config": vision.to_dict(),
    "text_config": text.to_dict(),
    "before": before, "after": after, "image_tokens": n_img,
    "pixels": pixels.flatten().tolist(),
    "logits_shape": list(out.logits.shape),
    "logits": out.logits.flatten().tolist(),
    "last_hidden": out.hidden_states[-1].flatten().tolist(),
}, open(OUT / "expected.json", "w"))
from safetensors import safe_open
with safe_open(OUT / "model.safetensors", "pt") as f:
    keys = sorted(f.keys())
print(len(keys), keys[:3], [k for k in keys if "projector" in k])
