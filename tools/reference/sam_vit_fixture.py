#!/usr/bin/env python3
"""Write the fixtures that crates/popen-sam/tests/sam/vit.rs checks SAM's ViT image encoder
(crates/popen-sam/src/vit.rs) against: crates/popen-sam/tests/fixtures/sam_vit_*.

Reference code: the official `ImageEncoderViT` of facebookresearch/segment-anything, as
vendored unchanged in the isat-sam 1.1.0 sdist
(ISAT/segment_any/segment_anything/modeling/{image_encoder,common}.py).
The package's `__init__` files import the whole SAM stack (predictor, build_sam, mask
decoder...), which we do not need; so empty stand-in packages `segment_anything` and
`segment_anything.modeling` are registered in `sys.modules` with their real `__path__`, and
only `segment_anything.modeling.image_encoder` (and through its relative import, `common`) is
executed. No code of ours replaces any of the official module's code.

Files:

* `sam_vit_small.pt`: `torch.save` of a state dict in the official full-SAM layout (keys
  `image_encoder.*`, plus one `prompt_encoder.*` tensor that `Checkpoint::sub` must leave
  out) of model "small": img_size 40, patch 8 (5x5 grid), embed 32, depth 3, 2 heads,
  mlp_ratio 4, out_chans 16, qkv_bias, abs pos, rel pos, window 2 (the 5x5 grid is padded
  to 6x6 in windowed blocks), global_attn_indexes [1].
* `sam_vit_noabs.pt`: model "noabs": img_size 40, patch 8, embed 16, depth 2, 2 heads,
  mlp_ratio 2.3 (int(16 * 2.3) = 36 hidden units), out_chans 8, NO qkv bias, NO abs pos,
  rel pos, window 2, global_attn_indexes [1]. Without an absolute position embedding the
  official encoder runs on other input sizes, and then its global block's rel_pos tables
  (length 2 * 5 - 1 = 9) go through `get_rel_pos`'s `F.interpolate(mode="linear")`: input
  26x60 (grid 3x7, the 2 remainder rows dropped by the conv: h 9 -> 5 down, w 9 -> 13 up,
  windows padded 3x7 -> 4x8) and 64x16 (grid 8x2: h 9 -> 15 up, w 9 -> 3 down).
* `sam_vit_expected.pt`: inputs and expected outputs as f32 tensors (binary keeps the
  fixture small; read through the same `Checkpoint` as the weights). Outputs are computed in
  float64 from the f32 weights and inputs, then rounded to f32: `small.input`,
  `small.output`, `small.embed` (patch embedding + pos), `small.block{i}` (after block i);
  `noabs.{j}.input`, `noabs.{j}.output`.
* `sam_vit.json`: the configs, input shapes, direct `get_rel_pos(q, k, rel_pos)` cases (q != k
  exercises the coordinate scaling that the encoder itself never reaches; values rounded to 9
  significant digits), and the parameter counts of the official vit_b / vit_l / vit_h image
  encoders (built on the meta device, so nothing is allocated).

Every parameter is drawn at random (seed 0): rel_pos tables are NOT zero (the official
`rel_pos_zero_init` would make any rel-pos bug invisible), LayerNorm weights around 1.

Rerun (CPU only; torch 2.9.1):

    /tmp/refenv/bin/python tools/reference/sam_vit_fixture.py
"""
import importlib
import json
import math
import pathlib
import sys
import types
from functools import partial

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/popen-sam/tests/fixtures"
SAM_PKG = pathlib.Path("/tmp/samsdist/isat-sam-1.1.0/ISAT/segment_any/segment_anything")


def import_image_encoder():
    for name, path in [("segment_anything", SAM_PKG), ("segment_anything.modeling", SAM_PKG / "modeling")]:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)]
        sys.modules[name] = pkg
    return importlib.import_module("segment_anything.modeling.image_encoder")


ie = import_image_encoder()


def build(cfg, device=None):
    kw = dict(
        img_size=cfg["img_size"],
        patch_size=cfg["patch_size"],
        in_chans=cfg["in_chans"],
        embed_dim=cfg["embed_dim"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        mlp_ratio=cfg["mlp_ratio"],
        out_chans=cfg["out_chans"],
        qkv_bias=cfg["qkv_bias"],
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_abs_pos=cfg["use_abs_pos"],
        use_rel_pos=cfg["use_rel_pos"],
        window_size=cfg["window_size"],
        global_attn_indexes=tuple(cfg["global_attn_indexes"]),
    )
    if device is None:
        return ie.ImageEncoderViT(**kw)
    with torch.device(device):
        return ie.ImageEncoderViT(**kw)


def randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("pos_embed") or ".rel_pos_" in name:
                p.copy_(torch.randn_like(p) * 0.5)
            elif p.dim() == 1 and ("norm" in name or name.startswith("neck.1") or name.startswith("neck.3")):
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                else:
                    p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / math.sqrt(fan_in))


def values(t):
    return [float(f"{v:.9g}") for v in t.detach().double().flatten().tolist()]


def exact(t):
    # f32 -> python float is exact; JSON round-trips it.
    return t.detach().float().flatten().tolist()


def build_like(model):
    m = build(model._popen_cfg).double()
    m.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    m.eval()
    return m


SMALL = dict(img_size=40, patch_size=8, in_chans=3, embed_dim=32, depth=3, num_heads=2,
             mlp_ratio=4.0, out_chans=16, qkv_bias=True, use_abs_pos=True, use_rel_pos=True,
             window_size=2, global_attn_indexes=[1])
NOABS = dict(img_size=40, patch_size=8, in_chans=3, embed_dim=16, depth=2, num_heads=2,
             mlp_ratio=2.3, out_chans=8, qkv_bias=False, use_abs_pos=False, use_rel_pos=True,
             window_size=2, global_attn_indexes=[1])
PRESETS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=[5, 11, 17, 23]),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=[7, 15, 23, 31]),
}
PRESET_COMMON = dict(img_size=1024, patch_size=16, in_chans=3, mlp_ratio=4.0, out_chans=256,
                     qkv_bias=True, use_abs_pos=True, use_rel_pos=True, window_size=14)


def main():
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    doc = {"generator": "tools/reference/sam_vit_fixture.py", "torch": torch.__version__}

    # --- model "small" -------------------------------------------------------------------
    small = build(SMALL)
    small._popen_cfg = SMALL
    randomize(small)
    small.eval()
    sd = {f"image_encoder.{k}": v.clone() for k, v in small.state_dict().items()}
    sd["prompt_encoder.no_mask_embed.weight"] = torch.randn(1, SMALL["out_chans"])
    torch.save(sd, OUT / "sam_vit_small.pt")
    x = torch.randn(2, 3, 40, 40)
    m64 = build_like(small)
    acts = {}
    with torch.no_grad():
        h = m64.patch_embed(x.double()) + m64.pos_embed
        acts["embed"] = h
        for i, blk in enumerate(m64.blocks):
            h = blk(h)
            acts[f"block{i}"] = h
        y = m64(x.double())
    expected = {"small.input": x, "small.output": y.float()}
    expected.update({f"small.{k}": v.float() for k, v in acts.items()})
    doc["small"] = {
        "config": SMALL,
        "param_count": sum(p.numel() for p in small.parameters()),
        "input_shape": list(x.shape),
        "activations": list(acts),
    }

    # --- model "noabs" -------------------------------------------------------------------
    noabs = build(NOABS)
    noabs._popen_cfg = NOABS
    randomize(noabs)
    noabs.eval()
    torch.save({f"image_encoder.{k}": v.clone() for k, v in noabs.state_dict().items()},
               OUT / "sam_vit_noabs.pt")
    m64 = build_like(noabs)
    cases = []
    for j, shape in enumerate([(1, 3, 26, 60), (2, 3, 64, 16), (1, 3, 40, 40)]):
        x = torch.randn(*shape)
        with torch.no_grad():
            y = m64(x.double())
        expected[f"noabs.{j}.input"] = x
        expected[f"noabs.{j}.output"] = y.float()
        cases.append({"input_shape": list(x.shape), "output_shape": list(y.shape)})
    doc["noabs"] = {"config": NOABS,
                    "param_count": sum(p.numel() for p in noabs.parameters()),
                    "cases": cases}

    # --- get_rel_pos ---------------------------------------------------------------------
    rel = []
    for q, k, length in [(4, 4, 7), (3, 5, 9), (5, 3, 9), (3, 7, 13), (7, 3, 13), (6, 14, 27),
                         (4, 6, 7), (6, 4, 21), (5, 5, 3), (2, 9, 4), (3, 3, 5)]:
        table = torch.randn(length, 3)
        with torch.no_grad():
            r = ie.get_rel_pos(q, k, table.double())
        rel.append({"q": q, "k": k, "rel_pos": {"shape": list(table.shape), "values": exact(table)},
                    "output": {"shape": list(r.shape), "values": values(r)}})
    doc["get_rel_pos"] = rel

    # --- presets: exact parameter counts of the official encoders (meta device) --------------
    counts = {}
    for name, p in PRESETS.items():
        cfg = dict(PRESET_COMMON, **p)
        m = build(cfg, device="meta")
        counts[name] = {"config": cfg, "param_count": sum(t.numel() for t in m.parameters())}
    doc["presets"] = counts

    torch.save({k: v.contiguous() for k, v in expected.items()}, OUT / "sam_vit_expected.pt")
    with open(OUT / "sam_vit.json", "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    for p in sorted(OUT.glob("sam_vit*")):
        print(p.name, p.stat().st_size)
    print({k: v["param_count"] for k, v in counts.items()})


if __name__ == "__main__":
    main()
