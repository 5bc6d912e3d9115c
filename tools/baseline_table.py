#!/usr/bin/env python3
"""Print the baseline table of `make demo` (Markdown) from popen eval reports.

    tools/baseline_table.py MODEL/report.json LARGEST/report.json NOTHING/report.json
    tools/baseline_table.py [--rows NAME=SUB ...] --seeds out/seed-0/eval out/seed-1/eval ...

The second form reads `SUB/report.json` under each eval folder for each row (default rows:
"SFT tiny model=model", "largest instance=baseline-largest", "nothing=baseline-nothing";
the POPEN demo adds its stages) and prints mean +- standard deviation (sample std, n-1)
over the seeds; a row missing from some seed folders is averaged over the others.
"""
import json
import statistics
import sys
from pathlib import Path

COLS = [
    ("giou", "gIoU", 100),
    ("ciou", "cIoU", 100),
    ("chair_s", "C_S", 100),
    ("chair_i", "C_I", 100),
    ("boundary_iou", "Boundary IoU", 100),
    ("localization_error_rate", "loc. error p", 100),
]


def metrics(path):
    with open(path) as f:
        return json.load(f)["metrics"]


def fmt(v, scale):
    return "-" if v is None else f"{v * scale:.2f}"


def header():
    print("| model | " + " | ".join(c[1] for c in COLS) + " |")
    print("|---|" + "---|" * len(COLS))


def single(paths):
    header()
    for name, p in zip(["SFT tiny model", "largest instance", "nothing"], paths):
        m = metrics(p)
        print(f"| {name} | " + " | ".join(fmt(m.get(k), s) for k, _, s in COLS) + " |")


DEFAULT_ROWS = [("SFT tiny model", "model"), ("largest instance", "baseline-largest"), ("nothing", "baseline-nothing")]


def seeds(dirs, rows=DEFAULT_ROWS):
    header()
    for name, sub in rows:
        ms = [metrics(Path(d) / sub / "report.json") for d in dirs if (Path(d) / sub / "report.json").exists()]
        if not ms:
            print(f"| {name} | " + " | ".join("-" for _ in COLS) + " |")
            continue
        cells = []
        for k, _, s in COLS:
            vals = [m.get(k) for m in ms]
            if any(v is None for v in vals):
                cells.append("-")
                continue
            vals = [v * s for v in vals]
            if len(vals) == 1:
                cells.append(f"{vals[0]:.2f}")
                continue
            cells.append(f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n{len(dirs)} seed(s): " + ", ".join(str(d) for d in dirs) + ("" if len(dirs) < 2 else " (mean ± sample std)"))


if __name__ == "__main__":
    a = sys.argv[1:]
    rows = DEFAULT_ROWS
    if a and a[0] == "--rows" and "--seeds" in a:
        k = a.index("--seeds")
        rows = [tuple(r.rsplit("=", 1)) for r in a[1:k]]
        if any(len(r) != 2 for r in rows):
            sys.exit("--rows takes NAME=SUBDIR entries")
        a = a[k:]
    if a and a[0] == "--seeds":
        seeds(a[1:], rows)
    elif len(a) == 3:
        single(a)
    else:
        sys.exit(__doc__)
