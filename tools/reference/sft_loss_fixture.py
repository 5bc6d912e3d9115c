"""Reference values for popen-train's losses and schedule (crates/popen-train/tests/fixtures/sft_loss.json).

The mask losses are PixelLM's own functions (MaverickRen/PixelLM, model/PixelLM.py:
dice_loss, sigmoid_ce_loss), transcribed verbatim; CE is torch's cross_entropy over the
answer tokens (Hugging Face's causal-LM loss with ignore_index -100); the schedule is
DeepSpeed's WarmupDecayLR formula (warmup_type linear). Run with torch 2.9.1:

    target/refenv/bin/python tools/reference/sft_loss_fixture.py
"""
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parents[2] / "crates/popen-train/tests/fixtures/sft_loss.json"


def dice_loss(inputs, targets, num_masks: float, scale=1000, eps=1e-6):
    inputs = inputs.sigmoid()
    inputs = inputs.flatten(1, 2)
    targets = targets.flatten(1, 2)
    numerator = 2 * (inputs / scale * targets).sum(-1)
    denominator = (inputs / scale).sum(-1) + (targets / scale).sum(-1)
    loss = 1 - (numerator + eps) / (denominator + eps)
    loss = loss.sum() / (num_masks + 1e-8)
    return loss


def sigmoid_ce_loss(inputs, targets, num_masks: float):
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    loss = loss.flatten(1, 2).mean(1).sum() / (num_masks + 1e-8)
    return loss


def main():
    g = torch.Generator().manual_seed(7)
    # Two images with 2 and 1 masks of 5x7 (logits in a wide range, targets 0/1).
    pred = [torch.randn(2, 5, 7, generator=g) * 4, torch.randn(1, 5, 7, generator=g) * 4]
    gt = [(torch.rand(2, 5, 7, generator=g) > 0.5).float(), (torch.rand(1, 5, 7, generator=g) > 0.6).float()]
    bce, dice, num = 0.0, 0.0, 0
    for p, t in zip(pred, gt):
        bce = bce + sigmoid_ce_loss(p, t, num_masks=t.shape[0]) * t.shape[0]
        dice = dice + dice_loss(p, t, num_masks=t.shape[0]) * t.shape[0]
        num += t.shape[0]
    bce = 2.0 * bce / (num + 1e-8)
    dice = 0.5 * dice / (num + 1e-8)
    # Text: batch of 2 answers (lengths 4 and 2) over a vocabulary of 6.
    logits = torch.randn(2, 4, 6, generator=g) * 3
    labels = torch.tensor([[1, 4, 2, 5], [3, 0, -100, -100]])
    ce = F.cross_entropy(logits.reshape(-1, 6), labels.reshape(-1), ignore_index=-100)
    logprobs = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # DeepSpeed WarmupDecayLR (linear warmup), total 20 steps, warmup 5, max 3e-4, min 1e-5.
    total, warm, mx, mn = 20, 5, 3e-4, 1e-5
    lrs = []
    for i in range(total):
        if i < warm:
            gamma = i / warm
        else:
            gamma = max(0.0, (total - i) / max(1.0, total - warm))
        lrs.append(mn + (mx - mn) * gamma)
    out = {
        "masks": [
            {"logits": p[k].tolist(), "target": t[k].tolist()} for p, t in zip(pred, gt) for k in range(t.shape[0])
        ],
        "bce": bce.item(),
        "dice": dice.item(),
        "logprobs": logprobs.tolist(),
        "lens": [4, 2],
        "ce": ce.item(),
        "total": (1.0 * ce + bce + dice).item(),
        "schedule": {"total": total, "warmup": warm, "lr": mx, "min_lr": mn, "lrs": lrs},
        "cosine_mid": mn + (mx - mn) * 0.5 * (1 + math.cos(math.pi * 0.5)),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
