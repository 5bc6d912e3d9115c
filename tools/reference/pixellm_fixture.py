#!/usr/bin/env python3
"""Write crates/popen-model/tests/fixtures/pixellm/, the end-to-end reference that
crates/popen-model/tests/pixellm_reference.rs checks popen_model::pixellm's PixelLM glue against.

What it computes: PixelLM's teacher-forced forward (`PixelLMForCausalLM.model_forward` with
`inference=True`-style masks, i.e. no labels/loss) on a random tiny model, two rows of a batch,
each row its own NON-square image (so the ViT key mask, the LLM image-token mask and the mask
crop/resize all matter) and a prompt + an answer with two objects' seg groups:

  1. CLIP tower (transformers 4.57.1 `CLIPVisionModel`, eager attention) saved at 24 px, its
     position table resized 24 -> 32 px the way PixelLM's `CLIPVisionTower.load_model` does,
     run with PixelLM's padded-patch key mask (`_CLIPVisionTransformer.forward` /
     `_expand_mask` of custom_clip.py; mask built as `LlavaMetaForCausalLM.encode_images`,
     with PixelLM's hard-coded patch_size 14 -> the tiny model's 4 and 16x16 -> `LLM_GRID`);
     `feature_select`: hidden_states[-2][:, 1:] and, for PixelLM's hard-coded [-11], [-3][:, 1:].
  2. `prepare_inputs_labels_for_multimodal` (llava_arch.py): out_mm_projector on both scales
     (before any resize), the -2 features bilinearly resized (align_corners=False) to
     LLM_GRID x LLM_GRID -> mm_projector -> spliced where IMAGE_TOKEN_INDEX (-200) stands
     between `<im_start>` and `<im_end>`; the LLM attention mask gets the nearest-resized patch
     mask over the image tokens.
  3. LLaMA (transformers 4.57.1 `LlamaForCausalLM`, eager) on inputs_embeds + that attention
     mask. POSITIONS: PixelLM passes no position_ids, so transformers uses arange(L) (also in
     its `generate`, because `LlavaLlamaForCausalLM.prepare_inputs_for_generation` drops
     position_ids); popen does the same (PixelLm::assemble, PixelLm::generate), and the main
     expectations use arange. A second set (`*_cumsum`) uses HF LLaMA generate's
     cumsum(mask) - 1, so the difference between the two conventions is measured.
  4. model_forward's seg path: `seg_token_mask = input_ids[:, 1:] == any SEG id`, one False
     column appended, LLM_GRID^2 - 1 False columns prepended (PixelLM: 255); text_hidden_fcs[0]
     on the final (normed) hidden states; view (objects, scales, seg_token_num, out_dim);
     multiseg_scalar = 1/seg_token_num weights summed.
  5. The mask path: per image `image_feature_neck` over the two out_mm_projector scales,
     prompt encoder + MaskDecoderMultiScale per scale + multiscale_scalar fusion at
     out_size = 4 * grid (PixelLM: 128), `postprocess_masks` (resize to max(input_size), crop
     to the resized region, resize to the original size) and the mask score.

Sources (MaverickRen/PixelLM at c43c0aff64e0bf4ab65023667e58eb2329b54f7b):
  model/PixelLM.py (model_forward, evaluate, postprocess_masks, initialize_pixellm_modules),
  model/llava/model/llava_arch.py (encode_images, prepare_inputs_labels_for_multimodal),
  model/llava/model/language_model/llava_llama.py (forward),
  model/llava/model/multimodal_encoder/clip_encoder.py (load_model, feature_select),
  model/llava/model/multimodal_encoder/custom_clip.py;
  transcriptions reused from tools/reference/clip_fixture.py (tower resize, ViT mask, masked
  CLIP forward, preprocessing: ResizeLongestSide with Pillow BILINEAR, ImageNet mean/std,
  zero padding) and tools/reference/pixellm_decoder_ref.py (SAM/PixelLM decoder modules,
  `pixellm_decode`, `postprocess_masks`). Versions: torch 2.9.1, transformers 4.57.1,
  safetensors 0.8.0, Pillow 12.0.0, numpy 2.4.6 (tools/reference/requirements.txt).
All maths in float64 (HF's softmax upcasts are float32); weights are rounded to bfloat16
(PixelLM checkpoint; PixelLM trains in bf16) and float16 (CLIP tower) and stored in that
dtype, so the files hold exactly the values the reference computes with; outputs as f32.

Files:
  pixellm.safetensors  PixelLM checkpoint key layout (docs/checkpoint-keys.md), no vision
                       tower, bfloat16
  clip/                HF CLIPVisionModel (save_pretrained, float16) at its own 24 px
  io.safetensors       inputs (pixels, raw images) and expected outputs
  case.json            configs, token ids, sizes, seg positions

Rerun (CPU, a few seconds):
    /tmp/refenv/bin/python tools/reference/pixellm_fixture.py
"""
import importlib.metadata
import json
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clip_fixture as cf  # noqa: E402
import pixellm_decoder_ref as dr  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.environ.get("PIXELLM_FIXTURE_OUT", os.path.join(ROOT, "crates/popen-model/tests/fixtures/pixellm"))

PIXELLM_COMMIT = "c43c0aff64e0bf4ab65023667e58eb2329b54f7b"
IMAGE_TOKEN_INDEX = -200

# ---------------------------------------------------------------- tiny dims
CLIP_SIZE = 24  # the tower's own size (PixelLM: 336), resized to IMAGE_SIZE (448)
IMAGE_SIZE = 32
PATCH = 4
GRID = IMAGE_SIZE // PATCH  # 8 (PixelLM: 32)
LLM_GRID = 4  # (PixelLM: 16)
SELECT = [-2, -3]  # (PixelLM: -2, -11)
H = 32
OUT_DIM = 32
SEG_TOKEN_NUM = 3
SCALES = 2
OUT_SIZE = 4 * GRID  # PixelLM's out_size 128 for a 32x32 grid
VOCAB = 64
SEG_IDS = list(range(56, 62))  # [SEG0]..[SEG5], added before <im_start>/<im_end> as PixelLM
IM_START, IM_END = 62, 63
BOS, EOS, PAD = 1, 2, 0  # PixelLM: pad = unk = 0

ORIGINAL_HW = [(20, 30), (37, 22)]  # non-square: padding below, then to the right
PROMPTS = [
    ([BOS, 5, 9, 14, IM_START], [IM_END, 20, 11, 7]),
    ([BOS, 5, 9, IM_START], [IM_END, 21, 12, 7, 8, 25]),
]
ANSWERS = [
    [30, 31] + SEG_IDS + [33, 34] + SEG_IDS + [EOS],
    [40, 45] + SEG_IDS + [41, 42, 46] + SEG_IDS + [43, EOS],
]


def seeded_normal(p, gen, std, mean=0.0):
    with torch.no_grad():
        p.copy_(mean + std * torch.randn(p.shape, generator=gen, dtype=torch.float32))


def round_to(module, dtype):
    """Make every saved float tensor exactly representable in `dtype` (kept in f32), so that
    the half-precision files hold exactly the values the float64 reference computes with.
    Only the state dict: non-persistent buffers (LLaMA's rotary inv_freq) stay as they are."""
    with torch.no_grad():
        for t in module.state_dict().values():  # detached views of the module's storage
            if t.is_floating_point():
                t.copy_(t.to(dtype).to(t.dtype))


def randomize_plain(module, gen):
    """Every parameter redrawn: norm weights around 1, biases around 0, matrices with
    std 1/sqrt(fan_in) so that no layer is an identity or negligible."""
    for name, p in module.named_parameters():
        if p.dim() == 1:
            is_norm = any(k in name for k in ("norm", "layrnorm", "layer_norm"))
            if is_norm and name.endswith("weight"):
                seeded_normal(p, gen, 0.1, 1.0)
            else:
                seeded_normal(p, gen, 0.1)
        else:
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            seeded_normal(p, gen, 1.0 / np.sqrt(fan_in))


class Glue(nn.Module):
    """PixelLM's own modules under their `model.` attribute names (llava_arch.py
    LlavaMetaModel.__init__ with separate_mm_projector, mm_projector_hidden_dim = 2,
    mm_projector_out_dim = 1; PixelLM.py initialize_pixellm_modules)."""

    def __init__(self, c, h, out_dim, gen):
        super().__init__()
        self.mm_projector = nn.Sequential(nn.Linear(c, 2 * h), nn.GELU(), nn.Linear(2 * h, h))
        self.out_mm_projector = nn.Sequential(nn.Linear(c, 2 * h), nn.GELU(), nn.Linear(2 * h, h))
        self.text_hidden_fcs = nn.ModuleList([nn.Sequential(
            nn.Linear(h, h), nn.ReLU(inplace=True), nn.Linear(h, out_dim), nn.Dropout(0.0))])
        self.image_feature_neck = nn.Sequential(
            nn.Conv2d(h, out_dim, kernel_size=1, bias=False),
            dr.LayerNorm2d(out_dim),
            nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1, bias=False),
            dr.LayerNorm2d(out_dim),
        )
        randomize_plain(self, gen)
        for norm in (self.image_feature_neck[1], self.image_feature_neck[3]):
            seeded_normal(norm.weight, gen, 0.1, 1.0)
        self.prompt_encoder = dr.PromptEncoder(
            embed_dim=out_dim, image_embedding_size=(GRID, GRID),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE), mask_in_chans=16)
        self.mask_decoder = dr.MaskDecoderMultiScale(
            num_multimask_outputs=3,
            transformer=dr.TwoWayTransformer(depth=2, embedding_dim=out_dim, mlp_dim=32,
                                             num_heads=2),
            transformer_dim=out_dim, iou_head_depth=3, iou_head_hidden_dim=16,
            image_feature_scale_num=SCALES)
        dr.randomize(self.prompt_encoder, gen)
        dr.randomize(self.mask_decoder, gen)
        # Default-init hypernetworks give logits within +-0.2, where the mask score's
        # `logit > 0` test is fragile: spread them (any weights are valid for a fixture).
        with torch.no_grad():
            for mlp in self.mask_decoder.output_hypernetworks_mlps:
                mlp.layers[-1].weight.mul_(10.0)
                mlp.layers[-1].bias.mul_(10.0)


def encode_images(tower, images, clip_resize_list):
    """llava_arch.py LlavaMetaForCausalLM.encode_images (+ clip_encoder.py feature_select)."""
    vit_mask = torch.zeros_like(images[:, 0, :, :])
    for i, size in enumerate(clip_resize_list):
        vit_mask[i, :size[0], :size[1]] = 1
    patch_num = vit_mask.shape[-1] // PATCH
    vit_mask = F.interpolate(vit_mask[:, None], size=(patch_num, patch_num), mode="nearest")[:, 0]
    mask_for_llm = F.interpolate(vit_mask[:, None], size=(LLM_GRID, LLM_GRID), mode="nearest")[:, 0]
    mask_for_llm = mask_for_llm.flatten(1)
    flat = vit_mask.flatten(1)
    flat = torch.cat((torch.ones(flat.shape[0], 1).to(flat), flat), dim=-1)
    # The same mask through clip_fixture's transcription (a cross-check of the two copies).
    assert torch.equal(flat, cf.pixellm_vit_attention_mask(images, clip_resize_list, PATCH))
    hs, _, _ = cf.pixellm_vision_forward(tower, images, flat)
    image_features = hs[SELECT[0]][:, 1:]
    pre_image_features = [hs[SELECT[1]][:, 1:]]
    return image_features, mask_for_llm, pre_image_features, flat


def prepare_inputs(glue, llm, tower, input_ids, attention_mask, images, clip_resize_list):
    """llava_arch.py prepare_inputs_labels_for_multimodal, mm_use_im_start_end branch (no
    tune_mm_mlp_adapter), one image per row, no labels."""
    image_features, vit_mask, pre_image_features, vit_key = encode_images(
        tower, images, clip_resize_list)
    pre = [glue.out_mm_projector(f) for f in pre_image_features]
    output_image_features = [glue.out_mm_projector(image_features)] + pre
    n, l, c = image_features.shape
    p_num = int(l ** 0.5)
    small = F.interpolate(image_features.permute(0, 2, 1).reshape(n, c, p_num, p_num),
                          size=(LLM_GRID, LLM_GRID), mode="bilinear", align_corners=False)
    small = small.flatten(-2).permute(0, 2, 1)
    llm_tokens = glue.mm_projector(small)
    embed = llm.model.embed_tokens
    new_embeds, new_masks = [], []
    for b, cur_ids in enumerate(input_ids):
        s = int(torch.where(cur_ids == IMAGE_TOKEN_INDEX)[0][0])
        am = attention_mask[b]
        emb = [embed(cur_ids[:s]), llm_tokens[b], embed(cur_ids[s + 1:s + 2])]
        msk = [am[:s], vit_mask[b], am[s + 1:s + 2]]
        rest_ids, rest_mask = cur_ids[s + 2:], am[s + 2:]
        assert not (rest_ids == IMAGE_TOKEN_INDEX).any()
        emb.append(embed(rest_ids))
        msk.append(rest_mask)
        new_embeds.append(torch.cat(emb))
        new_masks.append(torch.cat(msk).bool())
    return (output_image_features, torch.stack(new_embeds), torch.stack(new_masks), llm_tokens,
            vit_mask, vit_key)


def run_llm(llm, embeds, mask, positions):
    out = llm(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=positions,
              output_hidden_states=True, use_cache=False)
    # hidden_states[-1] is the final-normed state PixelLM reads (its lm_head input).
    assert torch.allclose(llm.lm_head(out.hidden_states[-1]), out.logits)
    return out.hidden_states[-1], out.logits


def seg_embeddings(glue, input_ids, hidden):
    """model_forward's seg-token mask and per-scale averaging (one image per row)."""
    seg_mask = torch.zeros_like(input_ids[:, 1:]).bool()
    for t in SEG_IDS:
        seg_mask = seg_mask | (input_ids[:, 1:] == t)
    seg_mask = torch.cat([seg_mask, torch.zeros(seg_mask.shape[0], 1).bool()], dim=1)
    seg_mask = torch.cat([torch.zeros(seg_mask.shape[0], LLM_GRID * LLM_GRID - 1).bool(),
                          seg_mask], dim=1)
    assert seg_mask.shape == hidden.shape[:2]
    last = glue.text_hidden_fcs[0](hidden)
    pred = last[seg_mask]
    counts = seg_mask.int().sum(-1)
    offs = torch.cat([torch.zeros(1).long(), counts.cumsum(-1)])
    multiseg_scalar = [1.0 / SEG_TOKEN_NUM] * SEG_TOKEN_NUM
    per_row = []
    for i in range(len(offs) - 1):
        e = pred[offs[i]:offs[i + 1]]
        e = e.view(len(e) // (SEG_TOKEN_NUM * SCALES), SCALES, SEG_TOKEN_NUM, e.shape[-1])
        fused = e[:, :, 0] * 0
        for k in range(SEG_TOKEN_NUM):
            fused = fused + multiseg_scalar[k] * e[:, :, k]
        per_row.append(fused)
    read_at = [torch.where(seg_mask[r])[0].tolist() for r in range(seg_mask.shape[0])]
    return per_row, read_at


def build_inputs():
    """The fixture's two images (raw and preprocessed as PixelLM's dataset does) and rows."""
    torch.set_default_dtype(torch.float64)
    rng = np.random.default_rng(11)
    raw, pixels, resized_hw = [], [], []
    for (h, w) in ORIGINAL_HW:
        img = cf.synthetic_image(h, w, rng)
        raw.append(img)
        r = cf.resize_longest_side(img, IMAGE_SIZE)
        resized_hw.append(list(r.shape[:2]))
        x = cf.pixellm_preprocess(torch.from_numpy(r).permute(2, 0, 1).contiguous().float(),
                                  IMAGE_SIZE)
        pixels.append(x)
    images = torch.stack(pixels).double()

    rows = [p + [IMAGE_TOKEN_INDEX] + s + a for (p, s), a in zip(PROMPTS, ANSWERS)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r)
        attention_mask[i, :len(r)] = 1
    return raw, images, resized_hw, input_ids, attention_mask, rows


def forward(tower, llm, glue, inputs):
    """PixelLM's teacher-forced forward of the fixture rows, in float64 (the modules are
    converted here; PixelLM's tower resize must already be applied)."""
    tower = tower.double()
    llm = llm.double()
    glue = glue.double()
    torch.set_default_dtype(torch.float64)  # decoder-ref modules create tensors by default dtype
    raw, images, resized_hw, input_ids, attention_mask, rows = inputs
    with torch.no_grad():
        feats, embeds, mask, llm_tokens, llm_keep, vit_key = prepare_inputs(
            glue, llm, tower, input_ids, attention_mask, images, resized_hw)
        # Main expectations: PixelLM's own positions (arange over the expanded row); the
        # `*_cumsum` set: HF-generate-style cumsum(mask) - 1, to measure the difference.
        arange = torch.arange(mask.shape[1]).expand(mask.shape[0], -1)
        hidden, logits = run_llm(llm, embeds, mask, arange)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden_ar, logits_ar = run_llm(llm, embeds, mask, positions)

        # Answer log-probs: the answer of row r starts at expanded position `start`.
        expand = LLM_GRID * LLM_GRID - 1
        starts = [len(p) + 1 + len(s) + expand for (p, s) in PROMPTS]
        max_ans = max(len(a) for a in ANSWERS)

        def answer_logprobs(lg):
            lp = torch.zeros(len(rows), max_ans)
            logp = torch.log_softmax(lg, dim=-1)
            for r, a in enumerate(ANSWERS):
                for k, t in enumerate(a):
                    lp[r, k] = logp[r, starts[r] + k - 1, t]
            return lp

        lp, lp_ar = answer_logprobs(logits), answer_logprobs(logits_ar)

        f_rows, read_at = seg_embeddings(glue, input_ids, hidden)
        f_rows_ar, _ = seg_embeddings(glue, input_ids, hidden_ar)
        f = torch.cat(f_rows)
        f_ar = torch.cat(f_rows_ar)

        # Mask path (model_forward: per image, image_feature_neck over [Lev, H, g, g]).
        stacked = torch.stack(feats, dim=0)  # [Lev, n, g*g, H]
        lev, n, pc, hd = stacked.shape
        ps = int(pc ** 0.5)
        scales_out = []
        low, post, scores, iou = [], [], [], []
        for i in range(n):
            single = stacked[:, i].permute(0, 2, 1).reshape(lev, hd, ps, ps)
            neck = glue.image_feature_neck(single)  # [Lev, out_dim, g, g]
            scales_out.append(neck)
            lr, ip = dr.pixellm_decode(glue.prompt_encoder, glue.mask_decoder, neck, f_rows[i],
                                       SCALES, OUT_SIZE)
            pm = dr.postprocess_masks(lr, resized_hw[i], ORIGINAL_HW[i])
            pm0 = pm[:, 0]
            score = (pm0.sigmoid().flatten(1) * (pm0 > 0).flatten(1)).sum(1) / (
                (pm0 > 0).flatten(1).sum(1) + 1e-6)
            for j in range(lr.shape[0]):
                low.append(lr[j, 0])
                post.append(pm0[j])
                scores.append(score[j])
                iou.append(ip[j, 0])
    return {"feats": feats, "mask": mask, "llm_tokens": llm_tokens, "llm_keep": llm_keep,
            "vit_key": vit_key, "hidden": hidden, "hidden_ar": hidden_ar, "lp": lp,
            "lp_ar": lp_ar, "f": f, "f_ar": f_ar, "read_at": read_at, "starts": starts,
            "scales_out": scales_out, "low": low, "post": post, "scores": scores, "iou": iou}


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(2024)
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)

    # ---------------- models (f32 draws, saved as f32)
    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                            num_attention_heads=4, num_channels=3, image_size=CLIP_SIZE,
                            patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                            attn_implementation="eager")
    tower = CLIPVisionModel(vcfg).eval()
    vision_config = vcfg.to_dict()  # before the resize below edits the shared config
    randomize_plain(tower, gen)
    round_to(tower, torch.float16)
    # As openai's CLIP releases: float16 (the loader converts to f32).
    tower.half().save_pretrained(os.path.join(OUT, "clip"), safe_serialization=True)
    tower.float()

    lcfg = LlamaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       max_position_embeddings=128, bos_token_id=BOS, eos_token_id=EOS,
                       pad_token_id=PAD, attn_implementation="eager")
    llm = LlamaForCausalLM(lcfg).eval()
    randomize_plain(llm, gen)
    glue = Glue(vcfg.hidden_size, H, OUT_DIM, gen).eval()
    round_to(llm, torch.bfloat16)
    round_to(glue, torch.bfloat16)

    # bfloat16 like PixelLM's (bf16-trained) checkpoints; also keeps the fixture small.
    weights = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in llm.state_dict().items()}
    weights.update({"model." + k: v.detach().to(torch.bfloat16).contiguous()
                    for k, v in glue.state_dict().items()})
    assert not any("vision_tower" in k for k in weights)
    save_file(weights, os.path.join(OUT, "pixellm.safetensors"), metadata={"format": "pt"})

    # PixelLM's load_model resize, then everything in float64.
    cf.pixellm_resize_vision_tower(tower, IMAGE_SIZE)
    inputs = build_inputs()
    raw, images, resized_hw, input_ids, attention_mask, rows = inputs
    r = forward(tower, llm, glue, inputs)
    (feats, mask, llm_tokens, llm_keep, vit_key, hidden, hidden_ar, lp, lp_ar, f, f_ar, read_at,
     starts, scales_out, low, post, scores, iou) = (
        r[k] for k in ("feats", "mask", "llm_tokens", "llm_keep", "vit_key", "hidden",
                       "hidden_ar", "lp", "lp_ar", "f", "f_ar", "read_at", "starts",
                       "scales_out", "low", "post", "scores", "iou"))

    # ---------------- checks that keep the fixture meaningful
    for o, m in enumerate(post):
        frac = (m > 0).double().mean().item()
        margin = m.abs().min().item()
        print(f"object {o}: mask {tuple(m.shape)} positive fraction {frac:.3f}, "
              f"min |logit| {margin:.2e}, max |logit| {m.abs().max().item():.2f}, score {scores[o].item():.4f}")
        assert margin > 1e-4, "a logit this close to 0 makes the mask score fragile"
    keep = mask
    diff = (hidden - hidden_ar).abs()[keep].max().item()
    print(f"max |hidden(arange positions) - hidden(cumsum positions)| at kept positions: {diff:.3e}")
    print("llm_keep", llm_keep.tolist())
    print("answer log-probs", lp.tolist())

    seg_positions = []  # per object: (row, expanded positions of its 6 codebook tokens)
    for r in range(len(rows)):
        at = [p + 1 for p in read_at[r]]  # read_at is the predicting position
        for k in range(0, len(at), SEG_TOKEN_NUM * SCALES):
            seg_positions.append([r, at[k:k + SEG_TOKEN_NUM * SCALES]])

    io = {
        "pixels": images,
        "raw.0": torch.from_numpy(raw[0].astype(np.float32)),
        "raw.1": torch.from_numpy(raw[1].astype(np.float32)),
        "vit_key_mask": vit_key,
        "llm_tokens": llm_tokens,
        "llm_keep": llm_keep,
        "scales.0": torch.stack([s[0] for s in scales_out]),
        "scales.1": torch.stack([s[1] for s in scales_out]),
        "keep": mask.double(),
        "hidden": hidden,
        "hidden_cumsum": hidden_ar,
        "answer_logprobs": lp,
        "answer_logprobs_cumsum": lp_ar,
        "f": f,
        "f_cumsum": f_ar,
        "low_res_masks": torch.stack(low),
        "iou_predictions": torch.stack(iou),
        "mask_scores": torch.stack(scores),
    }
    for o, m in enumerate(post):
        io[f"masks.{o}"] = m
    save_file({k: v.detach().float().contiguous() for k, v in io.items()},
              os.path.join(OUT, "io.safetensors"))

    case = {
        "generator": "tools/reference/pixellm_fixture.py",
        "pixellm_commit": PIXELLM_COMMIT,
        "versions": {p: importlib.metadata.version(p)
                     for p in ("torch", "transformers", "safetensors", "Pillow", "numpy")},
        "text_config": lcfg.to_dict(),
        "vision_config": vision_config,
        "image_size": IMAGE_SIZE,
        "vision_select_layers": SELECT,
        "llm_image_grid": LLM_GRID,
        "mm_projector_hidden": 2 * H,
        "seg_token_num": SEG_TOKEN_NUM,
        "out_dim": OUT_DIM,
        "decoder": {"transformer_dim": OUT_DIM, "num_scales": SCALES, "depth": 2, "mlp_dim": 32,
                    "num_heads": 2, "iou_head_hidden_dim": 16, "image_embedding_size": GRID,
                    "input_image_size": IMAGE_SIZE, "mask_in_chans": 16,
                    "low_res_size": OUT_SIZE},
        "seg_ids": SEG_IDS,
        "im_start": IM_START,
        "im_end": IM_END,
        "rows": [{"prefix": p, "suffix": s, "answer": a, "image": i}
                 for i, ((p, s), a) in enumerate(zip(PROMPTS, ANSWERS))],
        "answer_starts": starts,
        "expanded_width": int(mask.shape[1]),
        "resized_hw": resized_hw,
        "original_hw": [list(x) for x in ORIGINAL_HW],
        "objects": seg_positions,
        "object_images": [r for r, _ in seg_positions],
    }
    with open(os.path.join(OUT, "case.json"), "w") as fh:
        json.dump(case, fh, indent=1)
        fh.write("\n")
    total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(OUT) for fn in fns)
    print(f"wrote {OUT} ({total} bytes)")
    assert total < 600_000


if __name__ == "__main__":
    main()
