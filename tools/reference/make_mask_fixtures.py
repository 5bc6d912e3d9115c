#!/usr/bin/env python3
"""Writes the mask fixtures that crates/popen-core/tests/mask_fixtures.rs checks.

Every expected value comes from the reference implementations, never from our Rust code:

- pycocotools (the PyPI package, github.com/ppwwyyxx/cocoapi; version recorded in the
  output): `encode`, `decode`, `area`, `toBbox`, `iou`, `merge`, `frPyObjects`;
- boundary-iou-api (github.com/bowenc0221/boundary-iou-api): `mask_to_boundary` from
  `boundary_iou/utils/boundary_utils.py` and `boundary_iou` from the helper published
  with it (gist bowenc0221/71f7a02afee92646ca05efeeb14d687d), transcribed below unchanged
  apart from the names; they need OpenCV (`cv2.copyMakeBorder`, `cv2.erode`);
- numpy, for what pycocotools does not expose: run counts (from the Fortran-ordered
  pixels) and raw intersection/union pixel counts.

Raw masks are stored independently of RLE, as base64 of `np.packbits` of the row-major
0/1 array (most significant bit first), so the Rust test never checks RLE with RLE.
Polygon coordinates are stored as `repr` strings: serde_json's default float parsing is
not guaranteed to be correctly rounded, and one ulp can move a pycocotools rounding.

Deterministic: fixed seeds, no time or randomness from the environment. Run from the
repository root:

    python3 tools/reference/make_mask_fixtures.py

and commit crates/popen-core/tests/fixtures/masks/*.json (kept well under 1 MB).
"""

import base64
import json
import math
import os
import sys

import cv2
import numpy as np
import pycocotools
from pycocotools import mask as mask_utils

OUT_DIR = os.path.join("crates", "popen-core", "tests", "fixtures", "masks")
SEED = 20240611


# --- boundary-iou-api, transcribed -------------------------------------------------------
# Source: boundary_iou/utils/boundary_utils.py (mask_to_boundary) and the boundary_iou
# helper of github.com/bowenc0221/boundary-iou-api, unchanged.

def mask_to_boundary(mask, dilation_ratio=0.02):
    """
    Convert binary mask to boundary mask.
    :param mask (numpy array, uint8): binary mask
    :param dilation_ratio (float): ratio to calculate dilation = dilation_ratio * image_diagonal
    :return: boundary mask (numpy array)
    """
    h, w = mask.shape
    img_diag = np.sqrt(h ** 2 + w ** 2)
    dilation = int(round(dilation_ratio * img_diag))
    if dilation < 1:
        dilation = 1
    # Pad image so mask truncated by the image border is also considered as boundary.
    new_mask = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    kernel = np.ones((3, 3), dtype=np.uint8)
    new_mask_erode = cv2.erode(new_mask, kernel, iterations=dilation)
    mask_erode = new_mask_erode[1 : h + 1, 1 : w + 1]
    # G_d intersects G in the paper.
    return mask - mask_erode


def boundary_iou(gt, dt, dilation_ratio=0.02):
    """
    Compute boundary iou between two binary masks.
    :param gt (numpy array, uint8): binary mask
    :param dt (numpy array, uint8): binary mask
    :param dilation_ratio (float): ratio to calculate dilation = dilation_ratio * image_diagonal
    :return: boundary iou (float)
    """
    gt_boundary = mask_to_boundary(gt, dilation_ratio)
    dt_boundary = mask_to_boundary(dt, dilation_ratio)
    intersection = ((gt_boundary * dt_boundary) > 0).sum()
    union = ((gt_boundary + dt_boundary) > 0).sum()
    boundary_iou = intersection / union
    return boundary_iou


# --- helpers -----------------------------------------------------------------------------

def bits_b64(m):
    """Row-major 0/1 array -> base64 of packbits (big-endian bit order)."""
    m = np.ascontiguousarray(m, dtype=np.uint8).reshape(-1)
    return base64.b64encode(np.packbits(m).tobytes()).decode("ascii")


def run_counts(m):
    """COCO run lengths computed with numpy from the column-major pixels (not pycocotools)."""
    flat = np.asfortranarray(m).reshape(-1, order="F").astype(np.int8)
    if flat.size == 0:
        return [0]
    change = np.flatnonzero(np.diff(np.concatenate(([0], flat))) != 0)
    bounds = np.concatenate(([0], change, [flat.size]))
    return [int(v) for v in np.diff(bounds)]


def s(rle):
    c = rle["counts"]
    return c.decode("ascii") if isinstance(c, bytes) else c


def frepr(v):
    return repr(float(v))


def pycoco_error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - we record whatever pycocotools raises
        return f"{type(e).__name__}: {e}"
    return None


# --- masks -------------------------------------------------------------------------------

def make_masks(rng):
    masks = []

    def add(name, m):
        masks.append((name, np.ascontiguousarray(m, dtype=np.uint8)))

    def blob(h, w, k=3):
        m = np.zeros((h, w), np.uint8)
        for _ in range(k):
            c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            axes = (int(rng.integers(1, max(2, w // 2))), int(rng.integers(1, max(2, h // 2))))
            cv2.ellipse(m, c, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        return m

    def noise(h, w, p):
        return (rng.random((h, w)) < p).astype(np.uint8)

    def lines(h, w):
        m = np.zeros((h, w), np.uint8)
        for _ in range(3):
            p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(m, p0, p1, 1, 1)
        return m

    add("1x1_empty", np.zeros((1, 1)))
    add("1x1_full", np.ones((1, 1)))
    add("2x2_diag", np.eye(2))
    add("1x17_noise", noise(1, 17, 0.5))
    add("1x17_full", np.ones((1, 17)))
    add("17x1_noise", noise(17, 1, 0.5))
    add("17x1_end", np.r_[np.zeros(16), np.ones(1)].reshape(17, 1))
    add("9x7_noise", noise(9, 7, 0.4))
    for name, m in [
        ("empty", np.zeros((37, 53))),
        ("full", np.ones((37, 53))),
        ("blob_a", blob(37, 53)),
        ("blob_b", blob(37, 53)),
        ("blob_c", blob(37, 53, 1)),
        ("noise_sparse", noise(37, 53, 0.05)),
        ("noise_dense", noise(37, 53, 0.7)),
        ("lines", lines(37, 53)),
        ("border_frame", np.pad(np.zeros((35, 51)), 1, constant_values=1)),
        ("last_pixel", np.pad(np.zeros((36, 52)), ((0, 1), (0, 1)), constant_values=1)[:37, :53]),
    ]:
        add(f"37x53_{name}", m)
    add("53x37_blob", blob(53, 37))
    add("53x37_lines", lines(53, 37))
    add("64x64_blob", blob(64, 64, 4))
    add("64x64_checker", (np.indices((64, 64)).sum(axis=0) % 2))
    add("64x64_rows", (np.arange(64)[:, None] % 3 == 0) * np.ones((1, 64)))
    add("64x64_cols", (np.arange(64)[None, :] % 5 < 2) * np.ones((64, 1)))
    # Sizes where 0.02 * diagonal is a tie: 75x100 -> 2.5 -> 2, 45x60 -> 1.5 -> 2,
    # 135x180 -> 4.5 -> 4 (round half to even).
    add("75x100_blob", blob(75, 100))
    add("75x100_blob2", blob(75, 100))
    add("45x60_blob", blob(45, 60))
    add("135x180_blob", blob(135, 180, 4))
    add("135x180_blob2", blob(135, 180, 4))
    add("120x160_noise_blob", np.clip(blob(120, 160, 5) + noise(120, 160, 0.01), 0, 1))
    add("3x100_noise", noise(3, 100, 0.5))
    return masks


def mask_fixtures(rng):
    masks = make_masks(rng)
    out = []
    for name, m in masks:
        h, w = m.shape
        rle = mask_utils.encode(np.asfortranarray(m))
        decoded = mask_utils.decode(rle)
        assert (decoded == m).all()
        out.append({
            "name": name,
            "h": h,
            "w": w,
            "bits": bits_b64(m),
            "counts": run_counts(m),
            "rle": s(rle),
            "area": int(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        })
    # pycocotools encodes zero-sized masks as "0"; boundaries are not defined there
    # (cv2 refuses empty images), so these have no boundary fixtures.
    for h, w in [(0, 5), (5, 0), (0, 0)]:
        m = np.zeros((h, w), np.uint8)
        rle = mask_utils.encode(np.asfortranarray(m))
        out.append({"name": f"{h}x{w}_zero_size", "h": h, "w": w, "bits": bits_b64(m),
                    "counts": run_counts(m), "rle": s(rle),
                    "area": int(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
    return masks, out


def group_fixtures(masks):
    """Pairwise IoU (pycocotools `iou`, iscrowd 0), numpy raw counts, and merges."""
    by_size = {}
    for i, (_, m) in enumerate(masks):
        by_size.setdefault(m.shape, []).append(i)
    groups = []
    for shape, idx in sorted(by_size.items()):
        if len(idx) < 2:
            continue
        rles = [mask_utils.encode(np.asfortranarray(masks[i][1])) for i in idx]
        iou = mask_utils.iou(rles, rles, [0] * len(rles))
        inter, union = [], []
        for a in idx:
            ia, ua = [], []
            for b in idx:
                ma, mb = masks[a][1].astype(bool), masks[b][1].astype(bool)
                ia.append(int((ma & mb).sum()))
                ua.append(int((ma | mb).sum()))
            inter.append(ia)
            union.append(ua)
        merges = []
        subsets = [idx[:2], idx[:3], idx, idx[::-1], [idx[0]], idx[1::2] or idx[:1]]
        for sub in subsets:
            pos = [idx.index(i) for i in sub]
            rs = [rles[p] for p in pos]
            merges.append({
                "members": sub,
                "union": s(mask_utils.merge(rs, intersect=False)),
                "intersection": s(mask_utils.merge(rs, intersect=True)),
            })
        groups.append({
            "h": shape[0], "w": shape[1], "members": idx,
            "iou": [[float(v) for v in row] for row in iou],
            "inter": inter, "union": union, "merges": merges,
        })
    return groups


def odd_rle_fixtures():
    """Hand-made, non-canonical RLEs (zero-length runs) through pycocotools' C code."""
    cases = [
        (3, 3, [2, 0, 1, 3, 3]),
        (3, 3, [0, 0, 9]),
        (3, 3, [9, 0]),
        (3, 3, [0, 9]),
        (3, 3, [1, 1, 0, 1, 6]),
        (3, 3, [3, 0, 0, 3, 3]),
        (4, 2, [1, 2, 0, 0, 3, 2]),
        (4, 2, [0, 3, 2, 3]),
    ]
    out = []
    for h, w, counts in cases:
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        full = mask_utils.encode(np.asfortranarray(np.ones((h, w), np.uint8)))
        half = np.zeros((h, w), np.uint8)
        half[: h // 2 + 1, :] = 1
        half_rle = mask_utils.encode(np.asfortranarray(half))
        out.append({
            "h": h, "w": w, "counts": counts, "rle": s(rle),
            "decoded_bits": bits_b64(mask_utils.decode(rle)),
            "area": int(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "half_bits": bits_b64(half),
            "merge_with_half": s(mask_utils.merge([rle, half_rle])),
            "intersect_with_half": s(mask_utils.merge([rle, half_rle], intersect=True)),
            "merge_with_full": s(mask_utils.merge([rle, full])),
            "iou_with_half": float(mask_utils.iou([rle], [half_rle], [0])[0][0]),
        })
    return out


# --- polygons ----------------------------------------------------------------------------

def star(rng, cx, cy, r, n, jitter=0.4, decimals=None):
    ang = np.sort(rng.uniform(0, 2 * math.pi, n))
    rad = r * (1 - jitter + jitter * rng.random(n))
    pts = []
    for a, rr in zip(ang, rad):
        x, y = cx + rr * math.cos(a), cy + rr * math.sin(a)
        if decimals is not None:
            x, y = round(x, decimals), round(y, decimals)
        pts += [float(x), float(y)]
    return pts


def polygon_cases(rng):
    cases = []

    def add(name, h, w, polys):
        cases.append((name, h, w, [[float(v) for v in p] for p in polys]))

    add("square", 10, 10, [[1, 1, 5, 1, 5, 5, 1, 5]])
    add("triangle", 10, 10, [[1, 1, 5, 1, 5, 5]])
    add("pixel_centres", 12, 12, [[2.5, 2.5, 8.5, 2.5, 8.5, 9.5, 2.5, 9.5]])
    add("tenths", 12, 14, [[0.1, 0.3, 11.7, 0.5, 12.9, 10.1, 2.3, 11.9, 0.7, 6.5]])
    add("negative_small", 8, 8, [[-0.1, -0.2, 5.3, -0.3, 6.0, 5.0, -0.5, 6.5]])
    add("outside_all_sides", 20, 30, [[-5.5, -3.2, 35.1, -1.0, 40.0, 25.5, -2.0, 30.25]])
    add("fully_outside", 20, 30, [[-10, -10, -2, -10, -2, -3]])
    add("fully_right", 20, 30, [[31, 2, 40, 2, 40, 10]])
    add("huge", 16, 24, [[-1000, -1000, 1000, -1000, 1000, 1000, -1000, 1000]])
    add("bowtie", 30, 30, [[2, 2, 27, 27, 27, 2, 2, 27]])
    add("star_self_intersect", 40, 40, [[20, 1, 25, 38, 2, 12, 38, 12, 15, 38]])
    add("repeated_vertices", 20, 20, [[2, 2, 2, 2, 15, 3, 15, 3, 14, 16, 3, 15, 2, 2]])
    add("closed_explicitly", 20, 20, [[3.3, 2.7, 16.2, 4.1, 12.8, 17.9, 3.3, 2.7]])
    add("collinear", 20, 20, [[1, 1, 10, 10, 18, 18]])
    add("sub_pixel", 10, 10, [[4.1, 4.1, 4.4, 4.2, 4.2, 4.45]])
    add("thin_vertical", 30, 30, [[10, 1, 10.4, 1, 10.4, 28, 10, 28]])
    add("thin_horizontal", 30, 30, [[1, 10, 28, 10, 28, 10.3, 1, 10.3]])
    add("one_row_image", 1, 40, [[-1, -1, 20.5, -0.5, 35, 2, 3, 1.7]])
    add("one_col_image", 40, 1, [[-1, -1, 0.6, 20.5, 2, 35, 0.3, 3]])
    add("odd_first_7_values", 10, 10, [[1, 1, 8, 1, 8, 8, 1]])
    add("five_values", 10, 10, [[1, 1, 8, 1, 8]])
    add("multi_disjoint", 30, 40, [[2, 2, 12, 2, 12, 12], [20, 15, 35, 16, 30, 28, 21, 27]])
    add("multi_overlap", 30, 40, [[2, 2, 25, 3, 24, 25, 3, 24], [10, 10, 35, 12, 33, 28, 12, 27]])
    add("multi_with_two_point", 30, 40, [[2, 2, 25, 3, 24, 25], [5, 5, 20, 20]])
    add("multi_with_one_point", 30, 40, [[2, 2, 25, 3, 24, 25], [5, 5]])
    add("multi_with_empty", 30, 40, [[2, 2, 25, 3, 24, 25], []])
    add("multi_with_odd", 30, 40, [[2, 2, 25, 3, 24, 25], [30, 2, 38, 2, 38, 10, 30]])
    add("multi_three", 50, 60, [star(rng, 15, 15, 10, 9), star(rng, 40, 30, 15, 12),
                                star(rng, 25, 25, 12, 7)])
    add("canvas_h0", 0, 10, [[1, 1, 5, 1, 5, 5]])
    add("canvas_00", 0, 0, [[1, 1, 5, 1, 5, 5]])
    for i in range(24):
        h = int(rng.integers(5, 120))
        w = int(rng.integers(5, 160))
        n = int(rng.integers(3, 40))
        cx, cy = rng.uniform(-0.2 * w, 1.2 * w), rng.uniform(-0.2 * h, 1.2 * h)
        r = rng.uniform(1, 0.7 * max(h, w))
        dec = [None, 1, 2][i % 3]
        add(f"random_star_{i}", h, w, [star(rng, cx, cy, r, n, decimals=dec)])
    for i in range(8):
        h, w = int(rng.integers(10, 60)), int(rng.integers(10, 60))
        pts = list(rng.uniform(-3, max(h, w) + 3, 2 * int(rng.integers(3, 12))))
        add(f"random_cloud_{i}", h, w, [pts])
    for i in range(6):
        h, w = 480, 640
        k = int(rng.integers(1, 4))
        polys = [star(rng, rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 200),
                      int(rng.integers(8, 60)), decimals=2) for _ in range(k)]
        add(f"coco_like_{i}", h, w, polys)
    return cases


def polygon_fixtures(rng):
    out = []
    for name, h, w, polys in polygon_cases(rng):
        case = {"name": name, "h": h, "w": w,
                "polygons": [[frepr(v) for v in p] for p in polys]}
        rles = mask_utils.frPyObjects(polys, h, w)
        case["per_polygon"] = [s(r) for r in rles]
        merged = mask_utils.merge(rles)
        case["merged"] = s(merged)
        case["area"] = int(mask_utils.area(merged))
        out.append(case)
    return out


def polygon_error_fixtures():
    """Lists pycocotools refuses; the Rust API must return an error for each."""
    cases = [
        ("first_has_4_values", [[1, 1, 5, 5], [1, 1, 5, 1, 5, 5]]),
        ("only_4_values", [[1, 1, 5, 5]]),
        ("first_has_2_values", [[1, 1], [1, 1, 5, 1, 5, 5]]),
        ("first_has_3_values", [[1, 1, 2]]),
        ("first_empty", [[]]),
        ("no_polygons", []),
    ]
    out = []
    for name, polys in cases:
        err = pycoco_error(lambda: mask_utils.frPyObjects(polys, 10, 10))
        assert err is not None, name
        out.append({"name": name, "h": 10, "w": 10,
                    "polygons": [[frepr(v) for v in p] for p in polys],
                    "pycocotools_error": err})
    return out


def bbox_fixtures(rng):
    boxes = [
        (10, 10, [1, 1, 4, 4]),
        (10, 10, [0, 0, 10, 10]),
        (10, 10, [2.5, 3.5, 4.2, 1.1]),
        (10, 10, [-3, -2, 6, 7]),
        (10, 10, [8, 8, 10, 10]),
        (10, 10, [3, 3, 0, 0]),
        (10, 10, [3, 3, 0.3, 5]),
        (20, 30, [25.25, -1.75, 10, 30]),
    ]
    for _ in range(8):
        h, w = int(rng.integers(5, 80)), int(rng.integers(5, 80))
        x, y = rng.uniform(-5, w), rng.uniform(-5, h)
        boxes.append((h, w, [x, y, rng.uniform(0, w), rng.uniform(0, h)]))
    out = []
    for h, w, b in boxes:
        b = [float(v) for v in b]
        rle = mask_utils.frPyObjects(np.array([b], dtype=np.double), h, w)[0]
        out.append({"h": h, "w": w, "bbox": [frepr(v) for v in b], "rle": s(rle)})
    return out


# --- boundaries --------------------------------------------------------------------------

RATIOS = [0.02, 0.005, 0.05, 0.1, 0.3]


def boundary_fixtures(masks):
    out = []
    for i, (name, m) in enumerate(masks):
        for ratio in RATIOS:
            b = mask_to_boundary(m, ratio)
            h, w = m.shape
            d = max(1, int(round(ratio * np.sqrt(h ** 2 + w ** 2))))
            out.append({"mask": i, "name": name, "ratio": ratio, "dilation": d,
                        "bits": bits_b64(b), "area": int(b.sum())})
    return out


def boundary_iou_fixtures(masks):
    by_size = {}
    for i, (_, m) in enumerate(masks):
        by_size.setdefault(m.shape, []).append(i)
    out = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for shape, idx in sorted(by_size.items()):
            for a in idx:
                for b in idx:
                    for ratio in (0.02, 0.05):
                        v = float(boundary_iou(masks[a][1], masks[b][1], ratio))
                        out.append({"a": a, "b": b, "ratio": ratio,
                                    "value": None if math.isnan(v) else v})
    return out


def main():
    rng = np.random.default_rng(SEED)
    masks, mask_fx = mask_fixtures(rng)
    meta = {
        "generator": "tools/reference/make_mask_fixtures.py",
        "seed": SEED,
        "pycocotools": getattr(pycocotools, "__version__", None) or _dist_version("pycocotools"),
        "opencv": cv2.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
    files = {
        "rle.json": {
            "meta": meta,
            "masks": mask_fx,
            "groups": group_fixtures(masks),
            "odd_rles": odd_rle_fixtures(),
        },
        "polygons.json": {
            "meta": meta,
            "polygons": polygon_fixtures(rng),
            "errors": polygon_error_fixtures(),
            "bboxes": bbox_fixtures(rng),
        },
        "boundary.json": {
            "meta": meta,
            "boundaries": boundary_fixtures(masks),
            "boundary_iou": boundary_iou_fixtures(masks),
        },
    }
    os.makedirs(OUT_DIR, exist_ok=True)
    total = 0
    for fname, content in files.items():
        path = os.path.join(OUT_DIR, fname)
        text = json.dumps(content, separators=(",", ":"), allow_nan=False)
        with open(path, "w") as f:
            f.write(text + "\n")
        total += len(text) + 1
        print(f"wrote {path} ({len(text) + 1} bytes)")
    print(f"total {total} bytes")
    assert total < 1_000_000, "fixtures must stay well under 1 MB"


def _dist_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
