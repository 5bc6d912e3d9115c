#!/usr/bin/env python3
"""PixelLM's gIoU / cIoU evaluation, transcribed to numpy + SciPy, and the fixtures that
crates/popen-eval/tests/eval.rs checks our Rust evaluator against.

Source (MaverickRen/PixelLM): `train_ds.py::ar_validate` (pairing, per-pair IoU, the gIoU
and cIoU meters), `utils/matcher.py` (`match_pred`, `batch_dice_loss`,
`batch_sigmoid_ce_loss`), `utils/utils.py::intersectionAndUnionGPU`. Transcribed below with
torch replaced by numpy and these changes, the same as the Rust side documents
(crates/popen-eval/src/matching.rs):

- predictions are binary masks, read as logits +L / -L (L = 10 unless --logit);
- the matching cost is taken over every pixel, not 12,544 random points (`point_sample`):
  deterministic, and the expectation of the sampled cost;
- one record is one question, so PixelLM's per-image divisor `max_num` is the pair count;
- float64 throughout (PixelLM sums float32 on the GPU).

The literal per-pixel cost (the two PixelLM functions on flattened masks) is computed and
checked against the closed form from integer counts; the assignment uses the closed form,
whose exact ties (equal areas and intersections) stay exact ties.

Usage, from the repository root (pinned versions: tools/reference/requirements-eval.txt):

    python3 tools/reference/pixellm_eval.py cases --samples data/synth/val.parquet \
        --out crates/popen-eval/tests/fixtures/pixellm_eval_cases.json
    python3 tools/reference/pixellm_eval.py run --cases crates/popen-eval/tests/fixtures/pixellm_eval_cases.json \
        --out crates/popen-eval/tests/fixtures/pixellm_eval_expected.json
    python3 tools/reference/pixellm_eval.py lsap --out crates/popen-eval/tests/fixtures/lsap_scipy.json
    # a whole split: predictions shard (popen predict) against its samples shard
    python3 tools/reference/pixellm_eval.py run --samples data/synth/val.parquet \
        --predictions out/pred.parquet --out /tmp/pixellm_eval.json

`cases` is deterministic (fixed seed); the samples shard is `popen synth`'s default
benchmark (`make data`).
"""

import argparse
import json
import sys

import numpy as np
import scipy
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

DEFAULT_LOGIT = 10.0
SEED = 20241126


# --- PixelLM utils/matcher.py, numpy ---------------------------------------------------

def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def bce_with_logits(x, target):
    """torch.nn.functional.binary_cross_entropy_with_logits(x, target, reduction='none')."""
    return np.maximum(x, 0) - x * target + np.log1p(np.exp(-np.abs(x)))


def batch_dice_loss(inputs, targets):
    inputs = sigmoid(inputs)
    numerator = 2 * np.einsum("nc,mc->nm", inputs, targets)
    denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss


def batch_sigmoid_ce_loss(inputs, targets):
    hw = inputs.shape[1]
    pos = bce_with_logits(inputs, np.ones_like(inputs))
    neg = bce_with_logits(inputs, np.zeros_like(inputs))
    loss = np.einsum("nc,mc->nm", pos, targets) + np.einsum("nc,mc->nm", neg, (1 - targets))
    return loss / hw


def softplus(x):
    return max(x, 0.0) + np.log1p(np.exp(-abs(x)))


def closed_form_cost(p, g, i, n, logit):
    """The two costs from areas P, G, intersection I and pixel count N (see matching.rs)."""
    sp_hit, sp_miss = softplus(-logit), softplus(logit)
    s_on, s_off = 1.0 / (1.0 + np.exp(-logit)), 1.0 / (1.0 + np.exp(logit))
    ce = (i * sp_hit + (g - i) * sp_miss + (p - i) * sp_miss + (n - p - g + i) * sp_hit) / n
    dice = 1.0 - (2.0 * (i * s_on + (g - i) * s_off) + 1.0) / (p * s_on + (n - p) * s_off + g + 1.0)
    return ce + dice


def match_pred(out_mask, tgt_mask, logit):
    """PixelLM's match_pred on binary masks (P, H, W) and (G, H, W): every pixel a point."""
    num_pred, num_tgt = out_mask.shape[0], tgt_mask.shape[0]
    if num_pred == 0 or num_tgt == 0:
        return linear_sum_assignment(np.zeros((num_pred, num_tgt)))
    logits = np.where(out_mask.reshape(num_pred, -1) > 0, logit, -logit).astype(np.float64)
    targets = tgt_mask.reshape(num_tgt, -1).astype(np.float64)
    literal = batch_sigmoid_ce_loss(logits, targets) + batch_dice_loss(logits, targets)
    n = targets.shape[1]
    pa = out_mask.reshape(num_pred, -1).astype(np.int64).sum(-1)
    ga = tgt_mask.reshape(num_tgt, -1).astype(np.int64).sum(-1)
    inter = out_mask.reshape(num_pred, -1).astype(np.int64) @ tgt_mask.reshape(num_tgt, -1).astype(np.int64).T
    c = np.array([[closed_form_cost(float(pa[a]), float(ga[b]), float(inter[a, b]), float(n), logit)
                   for b in range(num_tgt)] for a in range(num_pred)])
    assert np.allclose(literal, c, rtol=1e-9, atol=1e-12), (literal, c)
    return linear_sum_assignment(c)


# --- PixelLM utils/utils.py intersectionAndUnionGPU (K = 2, foreground class) ---------

def intersection_and_union(output, target):
    output = output.reshape(-1).astype(np.int64)
    target = target.reshape(-1).astype(np.int64)
    intersection = int(((output == 1) & (target == 1)).sum())
    area_output = int((output == 1).sum())
    area_target = int((target == 1).sum())
    return intersection, area_output + area_target - intersection


# --- PixelLM train_ds.py ar_validate, one question per record -------------------------

def evaluate_question(pred_mask, gt_mask, logit):
    """Pairs (pred index or None, gt index or None, intersection, union, iou) in PixelLM's
    order: matched by prediction, unmatched ground truth, unmatched predictions."""
    indice = match_pred(pred_mask, gt_mask, logit)
    unassigned_gt = [i for i in range(len(gt_mask)) if i not in indice[1]]
    unassigned_pred = [i for i in range(len(pred_mask)) if i not in indice[0]]
    h, w = gt_mask.shape[1:] if len(gt_mask) else pred_mask.shape[1:]
    empty = np.zeros((h, w), dtype=np.uint8)
    listed = [(int(p), int(g), (pred_mask[p] > 0).astype(np.uint8), gt_mask[g]) for p, g in zip(*indice)]
    listed += [(None, g, empty, gt_mask[g]) for g in unassigned_gt]
    listed += [(p, None, pred_mask[p], empty) for p in unassigned_pred]
    pairs = []
    for p, g, out_i, mask_i in listed:
        inter, union = intersection_and_union(out_i, mask_i)
        acc_iou = inter / (union + 1e-5)
        if union == 0:
            acc_iou += 1.0  # no-object target
        pairs.append({"pred": p, "gt": g, "intersection": inter, "union": union, "iou": acc_iou})
    max_num = max(len(pred_mask), len(gt_mask))
    assert max_num == len(pairs)
    return pairs


def evaluate_records(records, logit):
    out = []
    iou_sum, pairs_total, inter_total, union_total = 0.0, 0, 0, 0
    for r in records:
        pairs = evaluate_question(r["preds"], r["gts"], logit)
        s = sum(p["iou"] for p in pairs)
        out.append({"id": r["id"], "pairs": pairs, "iou_sum": s, "max_num": len(pairs)})
        iou_sum += s
        pairs_total += len(pairs)
        inter_total += sum(p["intersection"] for p in pairs)
        union_total += sum(p["union"] for p in pairs)
    return {
        "records": out,
        "giou": iou_sum / pairs_total if pairs_total else None,
        "ciou": inter_total / (union_total + 1e-10),
        "pairs": pairs_total,
        "intersection": inter_total,
        "union": union_total,
    }


# --- inputs ------------------------------------------------------------------------------

def decode(h, w, counts):
    return mask_utils.decode({"size": [h, w], "counts": counts.encode()}).astype(np.uint8)


def encode(m):
    return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()


def stack(h, w, masks):
    return np.stack(masks) if masks else np.zeros((0, h, w), dtype=np.uint8)


def records_from_cases(path):
    cases = json.load(open(path))
    recs = []
    for c in cases["cases"]:
        h, w = c["height"], c["width"]
        recs.append({
            "id": c["id"],
            "preds": stack(h, w, [decode(h, w, s) for s in c["preds"]]),
            "gts": stack(h, w, [decode(h, w, s) for s in c["gts"]]),
        })
    return recs


def records_from_shards(samples_path, predictions_path):
    import pyarrow.parquet as pq
    samples = pq.read_table(samples_path, columns=["id", "height", "width", "target_masks"]).to_pylist()
    preds = {r["id"]: r for r in pq.read_table(predictions_path, columns=["id", "masks"]).to_pylist()}
    recs = []
    for s in samples:
        h, w = s["height"], s["width"]
        p = preds[s["id"]]
        recs.append({
            "id": s["id"],
            "preds": stack(h, w, [decode(m["height"], m["width"], m["counts"]) for m in p["masks"]]),
            "gts": stack(h, w, [decode(m["height"], m["width"], m["counts"]) for m in s["target_masks"]]),
        })
    return recs


def rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def shift(m, dy, dx):
    out = np.zeros_like(m)
    h, w = m.shape
    ys, xs = np.nonzero(m)
    ys, xs = ys + dy, xs + dx
    keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    out[ys[keep], xs[keep]] = 1
    return out


def make_cases(samples_path):
    cases = []

    def add(cid, h, w, preds, gts, note):
        cases.append({"id": cid, "height": h, "width": w, "note": note,
                      "preds": [encode(m) for m in preds], "gts": [encode(m) for m in gts]})

    h, w = 12, 17  # not square: catches row/column-major mix-ups
    a, b, c = rect(h, w, 0, 5, 0, 6), rect(h, w, 6, 12, 10, 17), rect(h, w, 3, 9, 5, 12)
    z = np.zeros((h, w), dtype=np.uint8)
    add("more-predictions", h, w, [c, shift(a, 1, 1), b], [a], "3 predictions, 1 target")
    add("fewer-predictions", h, w, [shift(b, 0, -1)], [a, b, c], "1 prediction, 3 targets")
    add("no-predictions", h, w, [], [a, c], "targets pair with empty predictions")
    add("no-targets", h, w, [a, b], [], "predictions pair with empty targets")
    add("nothing", h, w, [], [], "no pairs at all")
    add("empty-target-empty-prediction", h, w, [z], [z], "union 0: IoU 1")
    add("empty-target-with-prediction", h, w, [a], [z], "IoU 0")
    add("empty-prediction-with-target", h, w, [z, b], [a, b], "empty mask predicted")
    add("tie-identical-predictions", h, w, [c, c], [a, b], "equal costs across the assignment")
    add("tie-identical-targets", h, w, [a, b, c], [c, c], "two equal targets")
    add("tie-constant-costs", h, w, [z, z, z], [a, rect(h, w, 6, 11, 0, 6)], "every cost equal (equal areas)")
    add("swap", h, w, [b, a], [a, b], "the matching must cross")

    # realistic: synth val samples, predictions made from the sample's masks
    import pyarrow.parquet as pq
    rng = np.random.default_rng(SEED)
    rows = pq.read_table(samples_path, columns=["id", "height", "width", "target_masks", "instance_masks"]).to_pylist()
    for r in rows[:16]:
        h, w = r["height"], r["width"]
        gts = [decode(m["height"], m["width"], m["counts"]) for m in r["target_masks"]]
        inst = [decode(m["height"], m["width"], m["counts"]) for m in r["instance_masks"]]
        k = int(rng.integers(0, len(inst) + 2))
        preds = []
        for _ in range(k):
            src = inst[int(rng.integers(0, len(inst)))] if inst else np.zeros((h, w), np.uint8)
            preds.append(shift(src, int(rng.integers(-4, 5)), int(rng.integers(-4, 5))))
        add(r["id"], h, w, preds, gts, f"{k} shifted instance masks")
    return {"meta": {"seed": SEED, "samples": samples_path}, "cases": cases}


def lsap_matrices():
    rng = np.random.default_rng(SEED)
    out = []
    for rows in range(1, 7):
        for cols in range(1, 7):
            for kind in ("int3", "int10", "float"):
                for _ in range(2):
                    if kind == "float":
                        c = rng.random((rows, cols))
                    else:
                        c = rng.integers(0, 3 if kind == "int3" else 10, (rows, cols)).astype(np.float64)
                    out.append(c)
    for shape in [(10, 7), (7, 10), (12, 12)]:
        out.append(rng.integers(0, 4, shape).astype(np.float64))
        out.append(rng.random(shape))
    out.append(np.ones((4, 4)))
    out.append(np.ones((3, 5)))
    out.append(np.ones((5, 3)))
    res = []
    for c in out:
        r, k = linear_sum_assignment(c)
        res.append({"rows": c.shape[0], "cols": c.shape[1], "cost": [repr(float(v)) for v in c.ravel()],
                    "row_ind": r.tolist(), "col_ind": k.tolist()})
    return res


def versions():
    from importlib.metadata import version
    return {"numpy": np.__version__, "scipy": scipy.__version__, "pycocotools": version("pycocotools"),
            "python": sys.version.split()[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cases")
    c.add_argument("--samples", required=True)
    c.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--cases")
    r.add_argument("--samples")
    r.add_argument("--predictions")
    r.add_argument("--logit", type=float, default=DEFAULT_LOGIT)
    r.add_argument("--out", required=True)
    s = sub.add_parser("lsap")
    s.add_argument("--out", required=True)
    a = ap.parse_args()

    if a.cmd == "cases":
        out = make_cases(a.samples)
    elif a.cmd == "run":
        if a.cases:
            recs = records_from_cases(a.cases)
        elif a.samples and a.predictions:
            recs = records_from_shards(a.samples, a.predictions)
        else:
            ap.error("run needs --cases, or --samples and --predictions")
        out = evaluate_records(recs, a.logit)
        out["logit"] = a.logit
    else:
        out = {"matrices": lsap_matrices()}
    out["versions"] = versions()
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
