#!/usr/bin/env python3
"""PyTorch side of the PixelLM `tiny` step benchmark (docs/bench-model.md); the Rust side is
crates/popen-model/benches/tiny_model.rs, which reads what this writes and prints both.

What it times: the same model and step as the Rust bench, on CPU with
`torch.set_num_threads(2)` (`--threads`), random weights (timing does not depend on them):
  - model = popen's `PixelLmConfig::tiny(1000)` built from
    * transformers 4.57.1 `CLIPVisionModel` (hidden 96, 4 layers, 4 heads, MLP 256, patch 8,
      image 128, quick_gelu), run as PixelLM's `_CLIPVisionTransformer` does with a key mask
      over padding patches (`pixellm_vit_attention_mask` / `expand_mask` imported from
      tools/reference/clip_fixture.py, transcribed from MaverickRen/PixelLM
      model/llava/llava_arch.py and custom_clip.py at c43c0aff); like popen it stops after the
      deepest layer it reads (hidden_states[-2], [-4] -> 3 of 4 layers);
    * transformers 4.57.1 `LlamaForCausalLM` (hidden 128, 4 layers, 4 heads, 2 KV heads, MLP
      344, vocab 1000, untied lm_head), called with `inputs_embeds`, a 2D attention mask
      (padding and masked image tokens) and positions = arange over each row, as popen and
      PixelLM;
    * PixelLM's `mm_projector` / `out_mm_projector` (Linear 96->256, GELU, Linear 256->128),
      `image_feature_neck` (Conv1x1 128->64, LayerNorm2d, Conv3x3 64->64, LayerNorm2d),
      `text_hidden_fcs` (Linear 128->128, ReLU, Linear 128->64, Dropout 0) and POPEN's
      unused-here `prompt_embeddings` [10, 128] and `seg_feedback` Linear(128, 128), so the
      parameter count equals popen's;
    * the pixel decoder (PromptEncoder + MaskDecoderMultiScale, dim 64, depth 2, MLP 256,
      4 heads, 2 scales) and its call sequence `pixellm_decode` (once per image, as PixelLM's
      `model_forward` does), imported from tools/reference/pixellm_decoder_ref.py;
  - step = encode images (4 non-square originals padded into 128x128) -> assemble 4 rows
    (12-15 prompt tokens, <im_start>, 64 image tokens, <im_end>, 8 tokens, 24-token answer
    with 2 groups of 6 codebook tokens; right-padded to 113) -> LLaMA -> lm_head on the
    answer positions -> CE -> seg embeddings (state before each codebook token, averaged per
    scale) -> decoder low-res masks 64x64 -> BCE with logits against a fixed target;
    loss = CE + 2 BCE. Modes: forward under `torch.inference_mode()`, and forward+backward
    (`loss.backward()`, grads set to None before each step, outside the timing).
  - timing: --warmup (3) untimed steps, then --iters (20) timed; median, quartiles, min, max;
    per-stage medians of the forward.

Writes target/bench-tiny-model-pytorch.json (`--out`). Versions: torch 2.9.1,
transformers 4.57.1 (tools/reference/requirements.txt). Rerun:

    /tmp/refenv/bin/python tools/reference/bench_tiny_model.py
    cargo bench -p popen-model --bench tiny_model
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from clip_fixture import expand_mask, pixellm_vit_attention_mask  # noqa: E402
from pixellm_decoder_ref import (  # noqa: E402
    LayerNorm2d,
    MaskDecoderMultiScale,
    PromptEncoder,
    TwoWayTransformer,
    pixellm_decode,
)
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

# The workload (same constants as benches/tiny_model.rs).
VOCAB = 1000
IM_START, IM_END, SEG0, EOS = 997, 998, 990, 2
ORIGINALS = [(480, 640), (640, 427), (300, 500), (512, 384)]
ANSWER_LEN = 24
GROUP_STARTS = [3, 12]
STAGES = ["encode_images", "assemble", "llm", "lm_head+ce", "seg+decoder+bce"]

# PixelLmConfig::tiny(1000)
IMAGE_SIZE, PATCH, SELECT, LLM_GRID = 128, 8, [-2, -4], 8
H, V, MM_HIDDEN, OUT_DIM, SEG_TOKEN_NUM, P_HAT = 128, 96, 256, 64, 3, 10
LOW_RES = 64


def tok(row, i):
    return 10 + (row * 131 + i * 37) % 900


def resized_hw(h, w, size=IMAGE_SIZE):
    """SAM's ResizeLongestSide.get_preprocess_shape."""
    s = size / max(h, w)
    return int(h * s + 0.5), int(w * s + 0.5)


def workload():
    s = IMAGE_SIZE
    pixels = torch.zeros(len(ORIGINALS), 3, s, s)
    sizes = []
    for i, (h, w) in enumerate(ORIGINALS):
        rh, rw = resized_hw(h, w)
        sizes.append((rh, rw))
        c = torch.arange(3).view(3, 1, 1)
        y = torch.arange(rh).view(1, rh, 1)
        x = torch.arange(rw).view(1, 1, rw)
        pixels[i, :, :rh, :rw] = ((x * 7 + y * 13 + c * 29 + i * 5) % 255).float() / 64.0 - 2.0
    rows = []
    for r in range(len(ORIGINALS)):
        before = [tok(r, i) for i in range(12 + r)] + [IM_START]
        after = [IM_END] + [tok(r, 100 + i) for i in range(8)]
        answer = [tok(r, 200 + i) for i in range(ANSWER_LEN)]
        for g in GROUP_STARTS:
            for j in range(SEG_TOKEN_NUM * len(SELECT)):
                answer[g + j] = SEG0 + j
        answer[-1] = EOS
        rows.append((before, after, answer))
    n_obj = len(ORIGINALS) * len(GROUP_STARTS)
    target = torch.zeros(n_obj, LOW_RES, LOW_RES)
    yy, xx = torch.meshgrid(torch.arange(LOW_RES).float(), torch.arange(LOW_RES).float(), indexing="ij")
    for o in range(n_obj):
        cy, cx, rad = 16.0 + 4.0 * o, 32.0, 12.0 + o
        target[o] = (((yy - cy) ** 2 + (xx - cx) ** 2) <= rad * rad).float()
    return pixels, sizes, rows, target


class TinyPixelLm(nn.Module):
    def __init__(self, attn):
        super().__init__()
        vcfg = CLIPVisionConfig(
            hidden_size=V, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_channels=3, image_size=IMAGE_SIZE, patch_size=PATCH, layer_norm_eps=1e-5,
            hidden_act="quick_gelu", attn_implementation=attn)
        self.vision_tower = CLIPVisionModel(vcfg)
        lcfg = LlamaConfig(
            vocab_size=VOCAB, hidden_size=H, intermediate_size=344, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=512, tie_word_embeddings=False, attn_implementation=attn)
        self.llm = LlamaForCausalLM(lcfg)
        self.mm_projector = nn.Sequential(nn.Linear(V, MM_HIDDEN), nn.GELU(), nn.Linear(MM_HIDDEN, H))
        self.out_mm_projector = nn.Sequential(nn.Linear(V, MM_HIDDEN), nn.GELU(), nn.Linear(MM_HIDDEN, H))
        self.image_feature_neck = nn.Sequential(
            nn.Conv2d(H, OUT_DIM, 1, bias=False), LayerNorm2d(OUT_DIM),
            nn.Conv2d(OUT_DIM, OUT_DIM, 3, padding=1, bias=False), LayerNorm2d(OUT_DIM))
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(H, H), nn.ReLU(), nn.Linear(H, OUT_DIM), nn.Dropout(0.0))
        self.prompt_embeddings = nn.Parameter(0.02 * torch.randn(P_HAT, H))
        self.seg_feedback = nn.Linear(len(SELECT) * OUT_DIM, H)
        grid = IMAGE_SIZE // PATCH
        self.prompt_encoder = PromptEncoder(
            embed_dim=OUT_DIM, image_embedding_size=(grid, grid),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE), mask_in_chans=16)
        self.mask_decoder = MaskDecoderMultiScale(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=OUT_DIM, mlp_dim=256, num_heads=4),
            transformer_dim=OUT_DIM, iou_head_depth=3, iou_head_hidden_dim=64,
            image_feature_scale_num=len(SELECT))

    def encode_images(self, pixels, sizes):
        n = pixels.shape[0]
        g = IMAGE_SIZE // PATCH
        vit_keep = pixellm_vit_attention_mask(pixels, sizes, PATCH)  # [n, 1 + g*g]
        llm_keep = F.interpolate(vit_keep[:, 1:].view(n, 1, g, g), size=(LLM_GRID, LLM_GRID),
                                 mode="nearest").flatten(1)
        vm = self.vision_tower.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixels))
        mask = expand_mask(vit_keep, x.dtype)
        n_states = len(vm.encoder.layers) + 1
        want = [i % n_states for i in SELECT]
        states = {0: x}
        for i, layer in enumerate(vm.encoder.layers[: max(want)]):
            x = layer(x, mask, None)[0]
            states[i + 1] = x
        patches = [states[i][:, 1:] for i in want]
        grid = patches[0].transpose(1, 2).reshape(n, V, g, g)
        small = F.interpolate(grid, size=(LLM_GRID, LLM_GRID), mode="bilinear", align_corners=False)
        llm_tokens = self.mm_projector(small.flatten(2).transpose(1, 2))
        scales = [self.image_feature_neck(self.out_mm_projector(p).transpose(1, 2).reshape(n, H, g, g))
                  for p in patches]
        return llm_tokens, llm_keep, scales

    def assemble(self, rows, llm_tokens, llm_keep):
        emb = self.llm.model.embed_tokens
        seqs, keeps, starts = [], [], []
        for r, (before, after, answer) in enumerate(rows):
            ids_b, ids_a, ids_ans = (torch.tensor(t) for t in (before, after, answer))
            seqs.append(torch.cat([emb(ids_b), llm_tokens[r], emb(ids_a), emb(ids_ans)]))
            keeps.append(torch.cat([torch.ones(len(before)), llm_keep[r], torch.ones(len(after) + len(answer))]))
            starts.append(len(before) + llm_tokens.shape[1] + len(after))
        width = max(s.shape[0] for s in seqs)
        embeds = torch.stack([F.pad(s, (0, 0, 0, width - s.shape[0])) for s in seqs])
        keep = torch.stack([F.pad(k, (0, width - k.shape[0])) for k in keeps])
        # PixelLM passes no position_ids: arange over the expanded row, masked image padding
        # counted (popen's `assemble` since 74fc574); edge padding gets 0.
        lens = torch.tensor([s.shape[0] for s in seqs])[:, None]
        ar = torch.arange(width)[None]
        positions = torch.where(ar < lens, ar, 0)
        return embeds, keep.long(), positions, starts

    def step(self, pixels, sizes, rows, target, lap):
        llm_tokens, llm_keep, scales = self.encode_images(pixels, sizes)
        lap(0)
        embeds, keep, positions, starts = self.assemble(rows, llm_tokens, llm_keep)
        lap(1)
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=keep,
                                position_ids=positions).last_hidden_state
        lap(2)
        b = hidden.shape[0]
        pred_pos = torch.tensor([[s - 1 + k for k in range(ANSWER_LEN)] for s in starts])
        answers = torch.tensor([row[2] for row in rows])
        sel = hidden[torch.arange(b)[:, None], pred_pos]
        logp = torch.log_softmax(self.llm.lm_head(sel), dim=-1)
        ce = -logp.gather(2, answers[..., None]).mean()
        lap(3)
        group = SEG_TOKEN_NUM * len(SELECT)
        obj_rows, obj_pos = [], []
        for r, s in enumerate(starts):
            for g in GROUP_STARTS:
                obj_rows.append(r)
                obj_pos.append([s + g + j - 1 for j in range(group)])
        picked = hidden[torch.tensor(obj_rows)[:, None], torch.tensor(obj_pos)]
        f = self.text_hidden_fcs(picked).view(len(obj_rows), len(SELECT), SEG_TOKEN_NUM, OUT_DIM).mean(2)
        lows = []
        for i in range(b):
            objs = [o for o, r in enumerate(obj_rows) if r == i]
            single = torch.stack([sc[i] for sc in scales])
            low, _ = pixellm_decode(self.prompt_encoder, self.mask_decoder, single, f[objs],
                                    len(SELECT), LOW_RES)
            lows.append(low)
        low = torch.cat(lows)[:, 0]  # objects are grouped by image already, in object order
        bce = F.binary_cross_entropy_with_logits(low, target)
        lap(4)
        return ce + 2.0 * bce


def stats(v):
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"median_ms": statistics.median(v), "p25_ms": q[0], "p75_ms": q[2],
            "min_ms": min(v), "max_ms": max(v), "n": len(v)}


def loadavg():
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                    help="transformers attention implementation (default: sdpa, its default)")
    ap.add_argument("--out", default=os.path.join(ROOT, "target/bench-tiny-model-pytorch.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pixels, sizes, rows, target = workload()
    model = TinyPixelLm(args.attn)
    params = sum(p.numel() for p in model.parameters())
    load_before = loadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, attn {args.attn}, "
          f"params {params}, load {load_before}", file=sys.stderr)

    fwd, stage_ms = [], [[] for _ in STAGES]
    model.eval()
    with torch.inference_mode():
        for it in range(args.warmup + args.iters):
            t0 = time.perf_counter()
            laps, last = [0.0] * len(STAGES), [0.0]

            def lap(k):
                now = (time.perf_counter() - t0) * 1e3
                laps[k] = now - last[0]
                last[0] = now
            loss = model.step(pixels, sizes, rows, target, lap)
            loss_value = loss.item()
            total = (time.perf_counter() - t0) * 1e3
            if it >= args.warmup:
                fwd.append(total)
                for k, v in enumerate(laps):
                    stage_ms[k].append(v)

    model.train()
    train, train_fwd, train_bwd = [], [], []
    for it in range(args.warmup + args.iters):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = model.step(pixels, sizes, rows, target, lambda k: None)
        loss.item()
        t_fwd = (time.perf_counter() - t0) * 1e3
        loss.backward()
        model.text_hidden_fcs[0].weight.grad.sum().item()
        total = (time.perf_counter() - t0) * 1e3
        if it >= args.warmup:
            train.append(total)
            train_fwd.append(t_fwd)
            train_bwd.append(total - t_fwd)

    res = {
        "backend": f"pytorch-cpu-{args.attn}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "attn": args.attn,
        "params": params,
        "loss": loss_value,
        "forward": stats(fwd),
        "forward_backward": stats(train),
        "train_forward_part": stats(train_fwd),
        "train_backward_part": stats(train_bwd),
        "forward_stages_median_ms": {s: statistics.median(v) for s, v in zip(STAGES, stage_ms)},
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "warmup": args.warmup,
        "iters": args.iters,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    r = lambda k: res[k]  # noqa: E731
    print(f"forward          {r('forward')['median_ms']:8.1f} ms [{r('forward')['p25_ms']:.1f}-{r('forward')['p75_ms']:.1f}]")
    print(f"forward+backward {r('forward_backward')['median_ms']:8.1f} ms "
          f"[{r('forward_backward')['p25_ms']:.1f}-{r('forward_backward')['p75_ms']:.1f}] "
          f"(forward {r('train_forward_part')['median_ms']:.1f} + backward {r('train_backward_part')['median_ms']:.1f})")
    for s in STAGES:
        print(f"  {s:<16} {res['forward_stages_median_ms'][s]:8.2f}")
    print(f"loss {loss_value:.4f}, load {load_before} -> {res['loadavg_after']}; wrote {args.out}")


if __name__ == "__main__":
    main()
