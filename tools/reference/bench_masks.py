#!/usr/bin/env python3
"""pycocotools / OpenCV+numpy side of the mask kernel benchmark.

Generates the same inputs as crates/popen-core/benches/mask_kernels.rs (splitmix64 and a
table of 64 unit directions as decimal literals, only IEEE + - * /, so the polygons are
bit-identical) and prints the same input checksum. Times each kernel the way a Python
user calls it, over the batch, median of repeats (at least 5, about a second), and writes
microseconds per item to target/bench-masks-pycocotools.json (or argv[1]), which
`cargo bench -p popen-core --bench mask_kernels` reads to print the combined table.

    python3 tools/reference/bench_masks.py && cargo bench -p popen-core --bench mask_kernels
"""

import json
import os
import platform
import sys
import time

import cv2
import numpy as np
from pycocotools import mask as mask_utils

H, W, N = 480, 640, 100
SEED = 0x5EED0FB0BA
M64 = (1 << 64) - 1

# cos/sin of 2*pi*k/64 (identical literals in mask_kernels.rs).
DIRS = [
(1.0, 0.0),
    (0.9951847266721969, 0.0980171403295606),
    (0.9807852804032304, 0.19509032201612825),
    (0.9569403357322088, 0.29028467725446233),
    (0.9238795325112867, 0.3826834323650898),
    (0.881921264348355, 0.47139673682599764),
    (0.8314696123025452, 0.5555702330196022),
    (0.773010453362737, 0.6343932841636455),
    (0.7071067811865476, 0.7071067811865475),
    (0.6343932841636455, 0.773010453362737),
    (0.5555702330196023, 0.8314696123025452),
    (0.4713967368259978, 0.8819212643483549),
    (0.38268343236508984, 0.9238795325112867),
    (0.29028467725446233, 0.9569403357322089),
    (0.19509032201612833, 0.9807852804032304),
    (0.09801714032956077, 0.9951847266721968),
    (6.123233995736766e-17, 1.0),
    (-0.09801714032956065, 0.9951847266721969),
    (-0.1950903220161282, 0.9807852804032304),
    (-0.29028467725446216, 0.9569403357322089),
    (-0.3826834323650897, 0.9238795325112867),
    (-0.4713967368259977, 0.881921264348355),
    (-0.555570233019602, 0.8314696123025455),
    (-0.6343932841636454, 0.7730104533627371),
    (-0.7071067811865475, 0.7071067811865476),
    (-0.773010453362737, 0.6343932841636455),
    (-0.8314696123025453, 0.5555702330196022),
    (-0.8819212643483549, 0.47139673682599786),
    (-0.9238795325112867, 0.3826834323650899),
    (-0.9569403357322088, 0.2902846772544624),
    (-0.9807852804032304, 0.1950903220161286),
    (-0.9951847266721968, 0.09801714032956083),
    (-1.0, 1.2246467991473532e-16),
    (-0.9951847266721969, -0.09801714032956059),
    (-0.9807852804032304, -0.19509032201612836),
    (-0.9569403357322089, -0.2902846772544621),
    (-0.9238795325112868, -0.38268343236508967),
    (-0.881921264348355, -0.47139673682599764),
    (-0.8314696123025455, -0.555570233019602),
    (-0.7730104533627371, -0.6343932841636453),
    (-0.7071067811865477, -0.7071067811865475),
    (-0.6343932841636459, -0.7730104533627367),
    (-0.5555702330196022, -0.8314696123025452),
    (-0.47139673682599786, -0.8819212643483549),
    (-0.38268343236509034, -0.9238795325112865),
    (-0.29028467725446244, -0.9569403357322088),
    (-0.19509032201612866, -0.9807852804032303),
    (-0.09801714032956045, -0.9951847266721969),
    (-1.8369701987210297e-16, -1.0),
    (0.09801714032956009, -0.9951847266721969),
    (0.1950903220161283, -0.9807852804032304),
    (0.29028467725446205, -0.9569403357322089),
    (0.38268343236509, -0.9238795325112866),
    (0.4713967368259976, -0.881921264348355),
    (0.5555702330196018, -0.8314696123025455),
    (0.6343932841636456, -0.7730104533627369),
    (0.7071067811865474, -0.7071067811865477),
    (0.7730104533627367, -0.6343932841636459),
    (0.8314696123025452, -0.5555702330196022),
    (0.8819212643483548, -0.4713967368259979),
    (0.9238795325112865, -0.3826834323650904),
    (0.9569403357322088, -0.2902846772544625),
    (0.9807852804032303, -0.19509032201612872),
    (0.9951847266721969, -0.0980171403295605),
]


class SplitMix:
    def __init__(self, seed):
        self.s = seed & M64

    def next(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & M64
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def uniform(self):
        return float(self.next() >> 11) / 9007199254740992.0

    def below(self, n):
        return self.next() % n


def star(rng, cx, cy, r):
    n = 12 + rng.below(37)
    p = []
    for k in range(n):
        c, s = DIRS[k * 64 // n]
        rk = r * (0.7 + 0.3 * rng.uniform())
        p.append(cx + rk * c)
        p.append(cy + rk * s)
    return p


def obj(rng, cx, cy, r):
    extra = int(rng.below(4) == 0) + int(rng.below(8) == 0)
    polys = [star(rng, cx, cy, r)]
    for _ in range(extra):
        px = cx + (rng.uniform() - 0.5) * r
        py = cy + (rng.uniform() - 0.5) * r
        pr = r * (0.4 + 0.6 * rng.uniform())
        polys.append(star(rng, px, py, pr))
    return polys


def inputs():
    rng = SplitMix(SEED)
    gt, dt = [], []
    for _ in range(N):
        cx = 40.0 + rng.uniform() * (W - 80.0)
        cy = 40.0 + rng.uniform() * (H - 80.0)
        r = 20.0 + rng.uniform() * 130.0
        gt.append(obj(rng, cx, cy, r))
        dx = cx + (rng.uniform() - 0.5) * 0.3 * r
        dy = cy + (rng.uniform() - 0.5) * 0.3 * r
        dr = r * (0.85 + 0.3 * rng.uniform())
        dt.append(obj(rng, dx, dy, dr))
    return gt, dt


# boundary-iou-api, transcribed (see make_mask_fixtures.py for the source).
def mask_to_boundary(mask, dilation_ratio=0.02):
    h, w = mask.shape
    img_diag = np.sqrt(h ** 2 + w ** 2)
    dilation = int(round(dilation_ratio * img_diag))
    if dilation < 1:
        dilation = 1
    new_mask = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    kernel = np.ones((3, 3), dtype=np.uint8)
    new_mask_erode = cv2.erode(new_mask, kernel, iterations=dilation)
    mask_erode = new_mask_erode[1 : h + 1, 1 : w + 1]
    return mask - mask_erode


def boundary_iou(gt, dt, dilation_ratio=0.02):
    gt_boundary = mask_to_boundary(gt, dilation_ratio)
    dt_boundary = mask_to_boundary(dt, dilation_ratio)
    intersection = ((gt_boundary * dt_boundary) > 0).sum()
    union = ((gt_boundary + dt_boundary) > 0).sum()
    return intersection / union


def time_batch(f):
    f()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < 1.0 and len(times) < 200):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def fnv1a(h, data):
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join("target", "bench-masks-pycocotools.json")
    gt_polys, dt_polys = inputs()
    gt_rle = [mask_utils.merge(mask_utils.frPyObjects(p, H, W)) for p in gt_polys]
    dt_rle = [mask_utils.merge(mask_utils.frPyObjects(p, H, W)) for p in dt_polys]
    # Row-major (C-ordered) uint8 masks, as a model or an image library produces them.
    gt_mask = [np.ascontiguousarray(mask_utils.decode(r)) for r in gt_rle]
    dt_mask = [np.ascontiguousarray(mask_utils.decode(r)) for r in dt_rle]
    gt_fortran = [np.asfortranarray(m) for m in gt_mask]
    gt_counts = []  # uncompressed RLEs (counts lists), the input of "counts -> string"
    for m in gt_mask:
        flat = m.reshape(-1, order="F").astype(np.int8)
        change = np.flatnonzero(np.diff(np.concatenate(([0], flat))) != 0)
        bounds = np.concatenate(([0], change, [flat.size]))
        gt_counts.append({"size": [H, W], "counts": [int(v) for v in np.diff(bounds)]})

    area = int(sum(int(mask_utils.area(r)) for r in gt_rle + dt_rle))
    h = 0xCBF29CE484222325
    for r in gt_rle + dt_rle:
        h = fnv1a(h, r["counts"])
    print(f"inputs: {N} gt + {N} dt objects on {H}x{W}; total area {area}; strings fnv1a {h:016x}")

    k = {}
    k["encode"] = time_batch(lambda: [mask_utils.encode(np.asfortranarray(m)) for m in gt_mask]) / N
    k["encode_fortran"] = time_batch(lambda: [mask_utils.encode(m) for m in gt_fortran]) / N
    k["decode"] = time_batch(lambda: [mask_utils.decode(r) for r in gt_rle]) / N
    k["to_string"] = time_batch(lambda: [mask_utils.frPyObjects(c, H, W) for c in gt_counts]) / N
    k["from_string"] = time_batch(lambda: [mask_utils.area(r) for r in gt_rle]) / N
    iscrowd = [0] * N
    k["iou_matrix"] = time_batch(lambda: mask_utils.iou(dt_rle, gt_rle, iscrowd))
    k["iou_pairs"] = time_batch(lambda: [mask_utils.iou([d], [g], [0]) for d, g in zip(dt_rle, gt_rle)]) / N
    k["polygon"] = time_batch(lambda: [mask_utils.merge(mask_utils.frPyObjects(p, H, W)) for p in gt_polys]) / N
    k["boundary_iou"] = time_batch(lambda: [boundary_iou(g, d) for g, d in zip(gt_mask, dt_mask)]) / N
    k["mask_iou"] = time_batch(
        lambda: [(int(np.logical_and(g, d).sum()), int(np.logical_or(g, d).sum())) for g, d in zip(gt_mask, dt_mask)]
    ) / N

    how = {
        "encode": "encode(np.asfortranarray(m)) on a C-ordered uint8 mask",
        "encode_fortran": "encode(m) on a mask already Fortran-ordered",
        "decode": "decode(rle)",
        "to_string": "frPyObjects({'size', 'counts': list}) (frUncompressedRLE)",
        "from_string": "area(rle) (parses the string)",
        "iou_matrix": "iou(dts, gts, [0]*100), per matrix",
        "iou_pairs": "iou([dt], [gt], [0]) per pair",
        "polygon": "merge(frPyObjects(polygons, h, w))",
        "boundary_iou": "boundary-iou-api boundary_iou (cv2.erode + numpy)",
        "mask_iou": "numpy logical_and/or sums",
    }
    result = {
        "checksum": {"area": area, "fnv1a": f"{h:016x}"},
        "versions": {
            "python": platform.python_version(),
            "pycocotools": _version("pycocotools"),
            "opencv": cv2.__version__,
            "numpy": np.__version__,
        },
        "kernels": {name: {"us": secs * 1e6, "how": how[name]} for name, secs in k.items()},
    }
    for name, secs in k.items():
        print(f"{name:15s} {secs * 1e6:10.2f} us   {how[name]}")
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out_path}")


def _version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
