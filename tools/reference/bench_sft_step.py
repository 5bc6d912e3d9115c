#!/usr/bin/env python3
"""PyTorch reference of one `tiny-sam` SFT step as `make demo` runs it (issue 21, the
"SFT step" row of `make bench-cpu`): the same model, the same batch shape, the same loss and
the same optimizer step as `popen sft --config pipelines/sft-tiny.toml` on the embedded
benchmark, with the frozen SAM encoder's embeddings CACHED (the step starts from the
14x14x256 SAM image embedding; the encoder is never run, here or in popen's step).

What it mirrors (popen at commit 36da690, with the SFT loop of that tree):
  - model: `pipelines/model-tiny-sam.toml` (`popen model-config --preset tiny-sam`),
    `PixelLmConfig::init` in crates/popen-model/src/pixellm.rs, random weights:
    * the LLM: transformers 4.57.1 `LlamaForCausalLM` (vocab 1024, hidden 128, 4 layers,
      4 heads, 2 KV heads, MLP 344, untied lm_head), attention `sdpa` (its default; --attn);
    * `mm_projector` Linear(256, 256) -> GELU -> Linear(256, 128) on the SAM embedding
      resized 14x14 -> 7x7 (bilinear, align_corners=False), as `PixelLm::encode_images_with`
      with `sam_encoder` (no `llm_image_pe`, no `llm_image_pixels`, no `seg_locator`);
    * `text_hidden_fcs` Linear(128, 128) -> ReLU -> Linear(128, 256) -> Dropout(0);
    * POPEN's `prompt_embeddings` [10, 128] and `seg_feedback` Linear(256, 128): trainable
      but unused by SFT (no gradient, so AdamW skips them, as burn's AdamW does);
    * the pixel decoder of SAM's shape (one scale, dim 256, depth 2, MLP 2048, 8 heads,
      `upscaling = "sam"`: ConvT 256->64 x2, LayerNorm2d, GELU, ConvT 64->32 x2, GELU; 56x56
      masks; plus PixelLM's `upsample_2x`, `pe1`, `level_embed`, which exist in popen's
      model too), built from tools/reference/pixellm_decoder_ref.py (PromptEncoder,
      MaskDecoderMultiScale, TwoWayTransformer, LayerNorm2d), the upscaling replaced by
      SAM's (`Upscaling::Sam`, crates/popen-model/src/pixel_decoder.rs);
    * the TinyViT SAM encoder is not built (never run, frozen): its parameter count
      (`TinyVitConfig::param_count`, ported below) is added to the total so that the counts
      compare with popen's log line.
  - trainable: `trainable = "full"` + `freeze = ["decoder"]` of pipelines/sft-tiny.toml
    (`params::select_trainable`, `params::freeze_modules`): the LLM, mm_projector,
    text_hidden_fcs, prompt_embeddings and seg_feedback train; the decoder (prompt encoder
    included) and the SAM encoder are frozen, gradients still flow THROUGH the decoder to
    the seg embeddings.
  - forward: `SftModel::loss` (crates/popen-train/src/sft.rs) -> `encode_images_with`
    (cached embedding) -> `assemble` (right padding, RoPE positions 0.. over each row,
    key mask of the padding) -> `forward_hidden` (final-normed states) ->
    `response_logprobs` (lm_head only on the answer's predicting positions, b x max answer
    length, short rows padded with their last position) -> `seg_embeddings` (state one
    position BEFORE each codebook token, text_hidden_fcs, mean over the 3 tokens) ->
    `decode_masks` (`PixelDecoder::forward_with_prompts` / `MaskDecoderMultiScale::run_level`:
    all objects of the batch as one decoder batch, each object's image features gathered,
    the batch-1 dense prompt and position encoding broadcast, only mask token 0's
    hypernetwork run (multimask_output false), IoU head run) -> `postprocess_masks`
    (bilinear 56 -> 224, crop to the resized 224x224 image, bilinear to the original 96x96;
    per image, as PixelLM) -> `pixellm_loss` (crates/popen-train/src/loss.rs):
    ce_weight * CE + bce_weight * mean BCE + dice_weight * mean DICE over the masks (PixelLM's
    dice_loss/sigmoid_ce_loss, imported from tools/reference/sft_loss_fixture.py).
    `locate_weight` is 0 in pipelines/sft-tiny.toml and the model has no seg locator: no term.
  - step: loss values read to the host (as popen's step reads them) -> backward ->
    global-norm clipping (`grad_clip`, torch.nn.utils.clip_grad_norm_, norm read to the host
    as popen's `params::clip_global_norm`) -> AdamW (betas, eps, weight_decay of the config;
    torch's default single-tensor CPU implementation) at the scheduled rate (linear warmup
    `warmup_steps`, linear decay: `schedule::lr_at`). `grad_accum = 1`.

Batch (fixed; the typical shapes of the demo's data, measured on `popen synth` seed 0's
train split with the tokenizer `popen tokenizer-tiny` learns from it: prompt 33 tokens
before the image (BOS + LLaVA v1 system text + " USER: " + <im_start>), 49 image tokens
(7x7), 9-22 after it (median 12: <im_end> + instruction + " ASSISTANT:"), answer 12-50
tokens (quartiles 15/18/24) with EOS, 1 object in 72 % of the answers, 2 in 24 %, 3 in 4 %;
images 96x96):
    row  after-image  answer  objects (group starts in the answer)  content length
     0       10         15      1 (4)                                     107
     1       12         24      2 (3, 13)                                 118
     2       12         18      1 (5)                                     112
     3       14         18      1 (6)                                     114
  -> embeds [4, 118, 128] (right-padded to 118), 5 objects, seg groups of seg_token_num = 3
  codebook tokens, SAM embeddings [4, 256, 14, 14] (random, the cached input), decoder
  batch 5 x 256 x 14 x 14, low-res masks [5, 1, 56, 56], targets [5, 96, 96] (discs).
  popen's step instead draws its 4 samples from the shard each step (data order of the
  seed), so its shapes vary around these; popen also decodes the 4 PNG images and masks
  and preprocesses the images inside its step (`make_batch`), which this script does not
  (its inputs are tensors already).

popen runs the demo's step data-parallel (`devices = 2` in pipelines/sft-tiny.toml: two
threads, 2 samples each, gradients summed); PyTorch runs the batch of 4 in one process with
`torch.set_num_threads(--threads)` (2: the same two cores).

Timing: --warmup (3) untimed steps, then --iters (20) timed steps of zero_grad + forward +
backward + clip + AdamW step; median, quartiles, min, max (ms) and the medians of the
forward / backward / clip+optimizer parts, as JSON to --out (default
target/bench-sft-step-pytorch.json). Also in the JSON: the parameter counts of this model
and popen's (`--popen-params TRAIN/TOTAL`, default the numbers `popen sft` logs for the
demo's model: "1170688 / 11252676 parameters train"), and whether they match.

Versions: torch 2.9.1, transformers 4.57.1 (tools/reference/requirements.txt; `make refenv`).
Rerun:

    target/refenv/bin/python tools/reference/bench_sft_step.py [--threads 2] [--iters 20]
    make bench-cpu BENCH_DECODE= BENCH_TINY=     # this and popen's step, side by side
"""
import argparse
import json
import os
import sys
import time
import tomllib

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from pixellm_decoder_ref import (  # noqa: E402
    LayerNorm2d,
    MaskDecoderMultiScale,
    PromptEncoder,
    TwoWayTransformer,
)
from bench_tiny_model import loadavg, stats  # noqa: E402  (the timing summary both benches print)
from sft_loss_fixture import dice_loss, sigmoid_ce_loss  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

# The demo model's tokenizer (`popen tokenizer-tiny` on data/synth): added tokens.
BOS, EOS, SEG0, IM_START, IM_END = 1, 2, 768, 771, 772
PROMPT_BEFORE = 33  # BOS + system text + " USER: " + <im_start>
# (tokens after the image, answer length, codebook group starts in the answer) per row.
ROWS = [(10, 15, [4]), (12, 24, [3, 13]), (12, 18, [5]), (14, 18, [6])]
ORIGINAL_HW = (96, 96)  # every image of the embedded benchmark

# What `popen sft` logs for the demo's model ("N / M parameters train").
POPEN_PARAMS = (1170688, 11252676)


def read_toml(path):
    with open(os.path.join(ROOT, path), "rb") as f:
        return tomllib.load(f)


def tiny_vit_param_count(t):
    """`TinyVitConfig::param_count` (crates/popen-model/src/tiny_vit.rs): BatchNorm running
    statistics included (popen holds them as parameters), no num_batches_tracked."""
    e, n = t["embed_dims"], len(t["embed_dims"])

    def cbn(cin, cout, k, groups):
        return cout * (cin // groups) * k * k + 4 * cout

    total = cbn(t["in_chans"], e[0] // 2, 3, 1) + cbn(e[0] // 2, e[0], 3, 1)
    hidden = int(e[0] * t["mbconv_expand_ratio"])
    total += t["depths"][0] * (cbn(e[0], hidden, 1, 1) + cbn(hidden, hidden, 3, hidden) + cbn(hidden, e[0], 1, 1))
    for i in range(n):
        if i + 1 < n:
            d, o = e[i], e[i + 1]
            total += cbn(d, o, 1, 1) + cbn(o, o, 3, o) + cbn(o, o, 1, 1)
        if i == 0:
            continue
        d, ws, h = e[i], t["window_sizes"][i], t["num_heads"][i]
        hid = int(d * t["mlp_ratio"])
        attn = 2 * d + d * 3 * d + 3 * d + d * d + d + h * ws * ws
        local = cbn(d, d, t["local_conv_size"], d)
        mlp = 2 * d + d * hid + hid + hid * d + d
        total += t["depths"][i] * (attn + local + mlp)
    last, out = e[n - 1], t["out_chans"]
    if t.get("num_classes", 0) > 0:
        total += 2 * last + last * t["num_classes"] + t["num_classes"]
    return total + last * out + 2 * out + out * out * 9 + 2 * out


class TinySamPixelLm(nn.Module):
    """`PixelLmConfig::init` of the tiny-sam preset, minus the (never run) SAM encoder."""

    def __init__(self, mc, attn):
        super().__init__()
        lc, dc = mc["llm"], mc["decoder"]
        assert dc["upscaling"] == "sam" and dc["num_scales"] == 1 and len(mc["vision_select_layers"]) == 1
        assert not mc.get("llm_image_pe") and not mc.get("llm_image_pixels") and not mc.get("seg_locator")
        self.mc = mc
        h, v, d = lc["hidden_size"], mc["sam_encoder"]["out_chans"], dc["transformer_dim"]
        self.llm = LlamaForCausalLM(LlamaConfig(
            vocab_size=lc["vocab_size"], hidden_size=h, intermediate_size=lc["intermediate_size"],
            num_hidden_layers=lc["num_hidden_layers"], num_attention_heads=lc["num_attention_heads"],
            num_key_value_heads=lc["num_key_value_heads"], rms_norm_eps=lc["rms_norm_eps"],
            rope_theta=lc["rope_theta"], max_position_embeddings=lc["max_position_embeddings"],
            tie_word_embeddings=lc["tie_word_embeddings"], attn_implementation=attn))
        hid = mc["mm_projector_hidden"]
        self.mm_projector = nn.Sequential(nn.Linear(v, hid), nn.GELU(), nn.Linear(hid, h))
        self.text_hidden_fcs = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, mc["out_dim"]), nn.Dropout(0.0))
        self.prompt_embeddings = nn.Parameter(0.02 * torch.randn(mc["prompt_embeddings"], h))
        self.seg_feedback = nn.Linear(mc["out_dim"], h)
        g = dc["image_embedding_size"]
        self.prompt_encoder = PromptEncoder(
            embed_dim=d, image_embedding_size=(g, g),
            input_image_size=(dc["input_image_size"], dc["input_image_size"]), mask_in_chans=dc["mask_in_chans"])
        self.mask_decoder = MaskDecoderMultiScale(
            num_multimask_outputs=dc["num_multimask_outputs"],
            transformer=TwoWayTransformer(depth=dc["depth"], embedding_dim=d, mlp_dim=dc["mlp_dim"],
                                          num_heads=dc["num_heads"],
                                          attention_downsample_rate=dc["attention_downsample_rate"]),
            transformer_dim=d, iou_head_depth=dc["iou_head_depth"], iou_head_hidden_dim=dc["iou_head_hidden_dim"],
            image_feature_scale_num=1)
        # SAM's output upscaling (`Upscaling::Sam`) in place of PixelLM's x2 stack.
        self.mask_decoder.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(d, d // 4, kernel_size=2, stride=2), LayerNorm2d(d // 4), nn.GELU(),
            nn.ConvTranspose2d(d // 4, d // 8, kernel_size=2, stride=2), nn.GELU())
        # freeze = ["decoder"]: prompt encoder and mask decoder.
        for p in list(self.prompt_encoder.parameters()) + list(self.mask_decoder.parameters()):
            p.requires_grad_(False)

    def param_counts(self):
        """(trainable, total) as popen counts them: module parameters, plus the two random
        Fourier matrices (PyTorch buffers, popen parameters without gradient), plus the
        TinyViT encoder's count."""
        train = sum(p.numel() for p in self.parameters() if p.requires_grad)
        pe = sum(b.numel() for n, b in self.named_buffers() if n.endswith("positional_encoding_gaussian_matrix"))
        sam = tiny_vit_param_count(self.mc["sam_encoder"])
        total = sum(p.numel() for p in self.parameters()) + pe + sam
        return train, total, {"module_parameters": sum(p.numel() for p in self.parameters()),
                              "pe_matrices": pe, "sam_encoder_not_built": sam}

    # `PixelLm::encode_images_with` with the cached SAM embedding.
    def encode_images(self, sam):
        lg = self.mc["llm_image_grid"]
        small = F.interpolate(sam, size=(lg, lg), mode="bilinear", align_corners=False)
        return self.mm_projector(small.flatten(2).transpose(1, 2))  # [n, lg*lg, H]

    # `PixelLm::assemble` (right padding) for [tokens, image, tokens, answer] rows.
    def assemble(self, rows, llm_tokens):
        emb = self.llm.model.embed_tokens
        seqs, starts = [], []
        for r, (before, after, answer) in enumerate(rows):
            seqs.append(torch.cat([emb(before), llm_tokens[r], emb(after), emb(answer)]))
            starts.append(len(before) + llm_tokens.shape[1] + len(after))
        lens = torch.tensor([s.shape[0] for s in seqs])
        width = int(lens.max())
        embeds = torch.stack([F.pad(s, (0, 0, 0, width - s.shape[0])) for s in seqs])
        ar = torch.arange(width)[None]
        keep = (ar < lens[:, None]).long()
        positions = torch.where(ar < lens[:, None], ar, 0)
        return embeds, keep, positions, starts

    # `MaskDecoderMultiScale::run_level` (level 0, multimask_output false) over all objects.
    def decode_masks(self, sam, f, image_index):
        pe, md = self.prompt_encoder, self.mask_decoder
        n, d = f.shape[0], md.transformer_dim
        g = pe.image_embedding_size[0]
        identity = n == sam.shape[0] and image_index == list(range(n))
        src = sam if identity else sam.index_select(0, torch.tensor(image_index))
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, g, g)
        image_pe = pe.get_dense_pe()
        tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], 0).unsqueeze(0).expand(n, -1, -1)
        tokens = torch.cat([tokens, f[:, 0:1]], 1) + md.level_embed.weight[0:1].reshape(1, 1, d)
        hs, keys = md.transformer[0](src + dense, image_pe, tokens)
        upscaled = md.output_upscaling(keys.transpose(1, 2).reshape(n, d, g, g))
        hyper = md.output_hypernetworks_mlps[0](hs[:, 1:2])  # [n, 1, d/8]
        b, c, hh, ww = upscaled.shape
        masks = (hyper @ upscaled.reshape(b, c, hh * ww)).reshape(b, 1, hh, ww)
        md.iou_prediction_head(hs[:, 0])  # computed by popen too (unused by the loss)
        low = self.mc["decoder"]["low_res_size"]
        if (hh, ww) != (low, low):
            masks = F.interpolate(masks, (low, low), mode="bilinear", align_corners=False)
        return masks * 1.0  # multiscale_scalar 1 / num_scales

    def loss(self, batch, w):
        sam, rows, groups, targets = batch
        llm_tokens = self.encode_images(sam)
        embeds, keep, positions, starts = self.assemble(rows, llm_tokens)
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=keep, position_ids=positions).last_hidden_state
        # `response_logprobs` + `text_ce`.
        b = hidden.shape[0]
        lens = [len(r[2]) for r in rows]
        mx = max(lens)
        pos = torch.tensor([[s + min(k, n - 1) - 1 for k in range(mx)] for s, n in zip(starts, lens)])
        tgt = torch.stack([r[2][torch.clamp(torch.arange(mx), max=n - 1)] for r, n in zip(rows, lens)])
        logp = torch.log_softmax(self.llm.lm_head(hidden[torch.arange(b)[:, None], pos]), dim=-1)
        lp = logp.gather(2, tgt[..., None])[..., 0]
        valid = (torch.arange(mx)[None] < torch.tensor(lens)[:, None]).float()
        ce = -(lp * valid).sum() / sum(lens)
        # `seg_embeddings`.
        stn = self.mc["seg_token_num"]
        obj_rows, obj_pos = [], []
        for r, (s, gs) in enumerate(zip(starts, groups)):
            for g in gs:
                obj_rows.append(r)
                obj_pos.append([s + g + j - 1 for j in range(stn)])
        picked = hidden[torch.tensor(obj_rows)[:, None], torch.tensor(obj_pos)]
        f = self.text_hidden_fcs(picked).mean(1, keepdim=True)  # [n, scales = 1, out_dim]
        low = self.decode_masks(sam, f, obj_rows)
        # `postprocess_masks` + PixelLM's mask losses, per image.
        size = self.mc["decoder"]["input_image_size"]
        n_all = len(obj_rows)
        bce, dice = 0.0, 0.0
        for i in range(b):
            objs = [o for o, r in enumerate(obj_rows) if r == i]
            m = F.interpolate(low[objs], (size, size), mode="bilinear", align_corners=False)
            m = F.interpolate(m[..., :size, :size], ORIGINAL_HW, mode="bilinear", align_corners=False)[:, 0]
            t = targets[objs]
            bce = bce + sigmoid_ce_loss(m, t, num_masks=len(objs)) * len(objs)
            dice = dice + dice_loss(m, t, num_masks=len(objs)) * len(objs)
        ce_w, bce_w, dice_w = w
        return ce_w * ce, bce_w * bce / (n_all + 1e-8), dice_w * dice / (n_all + 1e-8)


def workload(mc):
    g, c = mc["decoder"]["image_embedding_size"], mc["sam_encoder"]["out_chans"]
    vocab = mc["llm"]["vocab_size"]
    gen = torch.Generator().manual_seed(0)

    def text(n, r, salt):  # ordinary BPE ids (8..767), deterministic
        return [8 + (r * 131 + (salt + i) * 37) % 760 for i in range(n)]

    rows, groups = [], []
    stn = mc["seg_token_num"]
    for r, (after, ans, gs) in enumerate(ROWS):
        before = [BOS] + text(PROMPT_BEFORE - 2, r, 0) + [IM_START]
        aft = [IM_END] + text(after - 1, r, 100)
        answer = text(ans, r, 200)
        for s in gs:
            answer[s:s + stn] = [SEG0 + j for j in range(stn)]
        answer[-1] = EOS
        assert max(before + aft + answer) < vocab
        rows.append(tuple(torch.tensor(x) for x in (before, aft, answer)))
        groups.append(gs)
    sam = torch.randn(len(ROWS), c, g, g, generator=gen)
    n_obj = sum(len(gs) for gs in groups)
    yy, xx = torch.meshgrid(torch.arange(ORIGINAL_HW[0]).float(), torch.arange(ORIGINAL_HW[1]).float(), indexing="ij")
    targets = torch.stack([(((yy - 30.0 - 7 * o) ** 2 + (xx - 48.0) ** 2) <= (12.0 + 2 * o) ** 2).float()
                           for o in range(n_obj)])
    return sam, rows, groups, targets


def lr_at(step, total, warmup, lr, min_lr):
    """`schedule::lr_at` with decay = "linear" (DeepSpeed WarmupDecayLR)."""
    gamma = step / warmup if step < warmup else max(0.0, (total - step) / max(1.0, total - warmup))
    return min_lr + (lr - min_lr) * gamma


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                    help="transformers attention implementation (default: sdpa, its default)")
    ap.add_argument("--model-config", default="pipelines/model-tiny-sam.toml")
    ap.add_argument("--sft-config", default="pipelines/sft-tiny.toml")
    ap.add_argument("--popen-params", default=f"{POPEN_PARAMS[0]}/{POPEN_PARAMS[1]}",
                    help="popen's 'N / M parameters train' for this model, as N/M")
    ap.add_argument("--out", default=os.path.join(ROOT, "target/bench-sft-step-pytorch.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mc, sc = read_toml(args.model_config), read_toml(args.sft_config)
    # The step this script implements; anything else in the config would need more code.
    assert sc["batch_size"] == len(ROWS) and sc.get("grad_accum", 1) == 1, "batch_size 4, grad_accum 1"
    assert sc["trainable"] == "full" and sc["freeze"] == ["decoder"], "trainable full, freeze [decoder]"
    assert sc.get("locate_weight", 0.0) == 0.0 and sc.get("ensemble_share", 0.0) == 0.0
    assert sc.get("precision", "f32") == "f32"
    model = TinySamPixelLm(mc, args.attn)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=sc["lr"], betas=(sc["beta1"], sc["beta2"]), eps=sc["eps"],
                            weight_decay=sc["weight_decay"])
    weights = (sc["ce_weight"], sc["bce_weight"], sc["dice_weight"])
    batch = workload(mc)
    n_train, n_total, parts = model.param_counts()
    p_train, p_total = (int(x) for x in args.popen_params.split("/"))
    load_before = loadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, attn {args.attn}; parameters "
          f"{n_train} / {n_total} train (popen: {p_train} / {p_total}: "
          f"{'match' if (n_train, n_total) == (p_train, p_total) else 'DIFFERENT'}); load {load_before}",
          file=sys.stderr)

    total_steps = args.warmup + args.iters
    step_ms, fwd_ms, bwd_ms, opt_ms, losses = [], [], [], [], []
    for it in range(total_steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        ce, bce, dice = model.loss(batch, weights)
        total = ce + bce + dice
        vals = torch.stack([total, ce, bce, dice]).tolist()  # popen reads the values before backward
        t1 = time.perf_counter()
        total.backward()
        t2 = time.perf_counter()
        norm = torch.nn.utils.clip_grad_norm_(trainable, sc["grad_clip"]).item()
        for g in opt.param_groups:
            g["lr"] = lr_at(it, total_steps, sc["warmup_steps"], sc["lr"], sc["min_lr"])
        opt.step()
        t3 = time.perf_counter()
        losses.append(vals + [norm])
        if it >= args.warmup:
            step_ms.append((t3 - t0) * 1e3)
            fwd_ms.append((t1 - t0) * 1e3)
            bwd_ms.append((t2 - t1) * 1e3)
            opt_ms.append((t3 - t2) * 1e3)

    res = {
        "workload": "tiny-sam SFT step, batch 4, cached SAM embeddings (pipelines/sft-tiny.toml)",
        "backend": f"pytorch-cpu-{args.attn}",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "threads": torch.get_num_threads(),
        "attn": args.attn,
        "params_trainable": n_train,
        "params_total": n_total,
        "params_parts": parts,
        "popen_params_trainable": p_train,
        "popen_params_total": p_total,
        "params_match": (n_train, n_total) == (p_train, p_total),
        "shapes": {"embeds": [len(ROWS), max(PROMPT_BEFORE + 49 + a + n for a, n, _ in ROWS),
                              mc["llm"]["hidden_size"]],
                   "rows": [{"before_image": PROMPT_BEFORE, "image": mc["llm_image_grid"] ** 2, "after_image": a,
                             "answer": n, "groups": gs} for a, n, gs in ROWS],
                   "objects": sum(len(gs) for _, _, gs in ROWS), "original_hw": list(ORIGINAL_HW)},
        "step": stats(step_ms),
        "forward": stats(fwd_ms),
        "backward": stats(bwd_ms),
        "clip_and_optimizer": stats(opt_ms),
        "first_loss": {"total": losses[0][0], "ce": losses[0][1], "bce": losses[0][2], "dice": losses[0][3],
                       "grad_norm": losses[0][4]},
        "last_loss": {"total": losses[-1][0], "grad_norm": losses[-1][4]},
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "warmup": args.warmup,
        "iters": args.iters,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    s = res["step"]
    print(f"sft step  {s['median_ms']:8.1f} ms [{s['p25_ms']:.1f}-{s['p75_ms']:.1f}, min {s['min_ms']:.1f}, "
          f"max {s['max_ms']:.1f}] (forward {res['forward']['median_ms']:.1f} + backward "
          f"{res['backward']['median_ms']:.1f} + clip/AdamW {res['clip_and_optimizer']['median_ms']:.1f})")
    print(f"parameters {n_train} / {n_total} train; popen {p_train} / {p_total}"
          f" ({'match' if res['params_match'] else 'DIFFERENT'})")
    print(f"loss {losses[0][0]:.4f} -> {losses[-1][0]:.4f}, load {load_before} -> {res['loadavg_after']}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
