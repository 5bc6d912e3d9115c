#!/usr/bin/env python3
"""Fixture for crates/popen-data/tests/muse.rs: pycocotools' area and RLE string of every
labelme example annotation (frPyObjects + merge, as PixelLM's MUSE loader rasterizes).

labelme's own `area` field comes from its PIL rasterization, not pycocotools, so it is not
a reference for us. Run after `make assets`:

    python3 tools/reference/labelme_areas.py > crates/popen-data/tests/fixtures/labelme_pycocotools.json
"""
import json
from pathlib import Path

from importlib.metadata import version
from pycocotools import mask as mask_utils

root = Path(__file__).resolve().parents[2]
coco = json.loads((root / "data/assets/labelme/annotations.json").read_text())
images = {i["id"]: i for i in coco["images"]}
out = {"meta": {"pycocotools": version("pycocotools"), "source": "labelme==6.3.1 annotations.json"}, "annotations": {}}
for a in coco["annotations"]:
    im = images[a["image_id"]]
    rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], im["height"], im["width"]))
    out["annotations"][str(a["id"])] = {"area": int(mask_utils.area(rle)), "counts": rle["counts"].decode()}
print(json.dumps(out, indent=1, sort_keys=True))
