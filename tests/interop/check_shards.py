#!/usr/bin/env python3
"""Interop check: popen's shards are plain Parquet and its RLE is pycocotools' RLE.

Drives the popen binary end to end and checks its output with independent tools:
1. builds a MUSE-shaped JSON from the labelme COCO example (real photos, 12 polygons;
   `make assets` fetches it), runs `popen import-muse`, reads the shard with pyarrow and
   duckdb, and checks that pycocotools decodes every stored RLE string to exactly the mask
   pycocotools itself rasterizes from the original polygons (frPyObjects + merge);
2. runs `popen synth` and reads every shard with pyarrow and duckdb, decoding every mask
   with pycocotools and checking sizes and areas against the image;
3. runs `popen collect-pt` and `popen collect-ps` with a random tiny model and reads their
   shards the same way.

    python3 tests/interop/check_shards.py --popen target/debug/popen --work target/interop
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

ROOT = Path(__file__).resolve().parents[2]
LABELME = ROOT / "data" / "assets" / "labelme"


def fail(msg):
    sys.exit(f"interop: FAIL: {msg}")


def run(cmd):
    r = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        fail(f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout}")
    return r.stdout


def muse_from_labelme(coco):
    """One MUSE record per image: a question per category plus one for every object."""
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    records = []
    for img in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        ann_list = [
            {"id": a["id"], "category_id": a["category_id"], "category_name": cats[a["category_id"]],
             "bbox": a["bbox"], "segmentation": a["segmentation"]}
            for a in anns
        ]
        questions, answers, text_answers = [], [], []
        for cid in sorted({a["category_id"] for a in anns}):
            group = [a for a in ann_list if a["category_id"] == cid]
            questions.append(f"Where is every {cats[cid]} in this picture?")
            answers.append(group)
            text_answers.append(" and ".join(f"the {a['category_name']} {{seg}}" for a in group).capitalize() + ".")
        questions.append("Segment everything that is annotated.")
        answers.append(ann_list)
        text_answers.append(", ".join(f"a {a['category_name']} {{seg}}" for a in ann_list) + ".")
        records.append({"file_name": img["file_name"], "height": img["height"], "width": img["width"],
                        "ann_list": ann_list, "questions": questions, "answers": answers,
                        "text_answers": text_answers})
    return records


def coco_mask(segmentation, h, w):
    rles = mask_utils.frPyObjects(segmentation, h, w)
    return mask_utils.decode(mask_utils.merge(rles))


def check_readers(path, expect_rows=None, want_kind=b"sample/1"):
    table = pq.read_table(path)
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{path}')").fetchall()[0][0]
    if table.num_rows != n:
        fail(f"{path}: pyarrow reads {table.num_rows} rows, duckdb {n}")
    if expect_rows is not None and n != expect_rows:
        fail(f"{path}: {n} rows, expected {expect_rows}")
    kind = (pq.read_metadata(path).metadata or {}).get(b"popen.kind")
    if kind != want_kind:
        fail(f"{path}: popen.kind metadata is {kind!r}, expected {want_kind!r}")
    if "target_masks" in table.column_names:
        # duckdb sees the nested RLE structs as structs, with their field names.
        duckdb.sql(f"SELECT id, len(target_masks), target_masks[1].counts FROM read_parquet('{path}')").fetchall()
    return table.to_pylist()


def check_masks(row, path):
    h, w = row["height"], row["width"]
    for col in ("target_masks", "instance_masks"):
        for k, m in enumerate(row[col]):
            if (m["height"], m["width"]) != (h, w):
                fail(f"{path}: {row['id']} {col}[{k}] is {m['height']}x{m['width']}, image {h}x{w}")
            dec = mask_utils.decode({"size": [h, w], "counts": m["counts"].encode()})
            if dec.shape != (h, w):
                fail(f"{path}: {row['id']} {col}[{k}] decodes to {dec.shape}")
            if int(mask_utils.area({"size": [h, w], "counts": m["counts"].encode()})) != int(dec.sum()):
                fail(f"{path}: {row['id']} {col}[{k}] area differs from the decoded mask")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--popen", required=True)
    ap.add_argument("--work", required=True)
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    # 1. MUSE import of the labelme photos vs pycocotools rasterization.
    ann_path = LABELME / "annotations.json"
    if not ann_path.is_file():
        fail(f"{ann_path} is missing: run `make assets`")
    coco = json.loads(ann_path.read_text())
    records = muse_from_labelme(coco)
    muse_json = work / "muse_val.json"
    muse_json.write_text(json.dumps(records))
    run([a.popen, "import-muse", "--json", muse_json, "--images", LABELME, "--out", work / "muse"])
    n_questions = sum(len(r["questions"]) for r in records)
    rows = check_readers(work / "muse" / "val.parquet", expect_rows=n_questions)
    by_id = {a["id"]: a for a in coco["annotations"]}
    checked = 0
    for row, rec_q in zip(rows, [(r, q) for r in records for q in range(len(r["questions"]))]):
        rec, q = rec_q
        h, w = rec["height"], rec["width"]
        check_masks(row, "muse")
        for k, ann in enumerate(rec["answers"][q]):
            want = coco_mask(by_id[ann["id"]]["segmentation"], h, w)
            got = mask_utils.decode({"size": [h, w], "counts": row["target_masks"][k]["counts"].encode()})
            if not np.array_equal(want, got):
                fail(f"muse: {row['id']} target {k}: pycocotools decodes our RLE to a different mask "
                     f"({int(got.sum())} vs {int(want.sum())} px)")
            want_rle = mask_utils.encode(np.asfortranarray(want))["counts"].decode()
            if want_rle != row["target_masks"][k]["counts"]:
                fail(f"muse: {row['id']} target {k}: RLE string differs from pycocotools'")
            checked += 1
        if row["answer"].count("<seg>") != len(rec["answers"][q]):
            fail(f"muse: {row['id']} answer has the wrong number of <seg>")
    print(f"interop: MUSE import: {len(rows)} samples, {checked} masks identical to pycocotools")

    # 2. synth shards through pyarrow / duckdb / pycocotools.
    run([a.popen, "synth", "--out", work / "synth", "--seed", "3", "--train-samples", "40", "--val-samples", "10", "--test-samples", "10"])
    total = 0
    for split, n in (("train", 40), ("val", 10), ("test", 10)):
        path = work / "synth" / f"{split}.parquet"
        for row in check_readers(path, expect_rows=n):
            check_masks(row, path)
            if row["split"] != split:
                fail(f"{path}: {row['id']} has split {row['split']}")
            total += 1
    manifest = json.loads((work / "synth" / "manifest.json").read_text())
    if manifest["stage"] != "synth":
        fail("synth manifest has the wrong stage")
    print(f"interop: synth: {total} samples read by pyarrow and duckdb, every mask decoded by pycocotools")
    # 3. preference shards (collect-pt, collect-ps) of a random tiny model through pyarrow / duckdb.
    syn = work / "synth"
    run([a.popen, "tokenizer-tiny", "--data", syn, "--out", work / "tok" / "tokenizer.json", "--vocab-size", "400"])
    run([a.popen, "model-init", "--config", ROOT / "pipelines" / "model-tiny.toml", "--tokenizer",
         work / "tok" / "tokenizer.json", "--out", work / "model"])
    run([a.popen, "collect-pt", "--model", work / "model", "--samples", syn / "train.parquet", "--lexicon",
         syn / "lexicon.json", "--out", work / "prefs" / "pt.parquet", "--shard", "0/10", "--force"])
    cfg = work / "ps.toml"
    cfg.write_text((ROOT / "pipelines" / "collect-ps-tiny.toml").read_text()
                   .replace("perturbations = 12", "perturbations = 5").replace("batch_size = 12", "batch_size = 5"))
    run([a.popen, "collect-ps", "--config", cfg, "--phase", "2", "--model", work / "model", "--samples",
         syn / "train.parquet", "--out", work / "prefs" / "ps.parquet", "--shard", "0/10", "--force"])
    pt = check_readers(work / "prefs" / "pt-00000-of-00010.parquet", expect_rows=4, want_kind=b"text-pref/1")
    for row in pt:
        if len(row["y_ids"]) != len(row["ref_logp_y"]) or any(p >= len(row["y_ids"]) for p in row["l_y"]):
            fail(f"text-pref {row['id']}: ids, log-probs and positions disagree")
    ps = check_readers(work / "prefs" / "ps-00000-of-00010.parquet", expect_rows=4, want_kind=b"seg-pref/1")
    for row in ps:
        n = len(row["target_masks"])
        if len(row["ref_f"]) != 3 * n * row["f_dim"] or len(row["ref_masks"]) != 3 * n:
            fail(f"seg-pref {row['id']}: flattened lengths disagree with {n} targets")
        for m in row["ref_masks"] + row["target_masks"]:
            dec = mask_utils.decode({"size": [m["height"], m["width"]], "counts": m["counts"].encode()})
            if dec.shape != (row["height"], row["width"]):
                fail(f"seg-pref {row['id']}: a mask is {dec.shape}")
    print(f"interop: preference shards: {len(pt)} text-pref and {len(ps)} seg-pref rows read by pyarrow and duckdb")
    print("interop: OK")


if __name__ == "__main__":
    main()
