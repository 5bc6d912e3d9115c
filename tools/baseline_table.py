#!/usr/bin/env python3
"""Print the baseline table of `make demo` (Markdown) from popen eval reports.

    tools/baseline_table.py MODEL/report.json LARGEST/report.json NOTHING/report.json
    tools/baseline_table.py [--rows NAME=SUB ...] [--paired A:B ...] --seeds out/seed-0/eval out/seed-1/eval ...

The second form reads `SUB/report.json` under each eval folder for each row (default rows:
"SFT tiny model=model", "largest instance=baseline-largest", "nothing=baseline-nothing";
the POPEN demo adds its stages) and prints mean +- standard deviation (sample std, n-1)
over the seeds; a row missing from some seed folders is averaged over the others.
`--paired A:B` adds, per pair of rows (SUB names), B - A per seed for gIoU, cIoU and C_S
(paired by seed folder) and whether B >= A in gIoU and cIoU and B <= A in C_S on every
seed (issue 22's goal 1), against the seed-to-seed spread (sample std) of A's gIoU.

Localization error: "loc. error p" is the paper's rate (share of all ground-truth objects,
SPEC 10.20, report key `localization_error_rate`); "loc. error (matched)" is the share of
matched pairs (`localization_error_rate_matched`), the only rate of reports written before
issue 24, which stored it under `localization_error_rate`; for those, p is recomputed from
the report's counts (localization_errors / target_objects).
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
    ("localization_error_rate_matched", "loc. error (matched)", 100),
]


def metrics(path):
    """The report's metrics; a report from before issue 24 (no
    `localization_error_rate_matched`) gets both localization rates under their new names."""
    with open(path) as f:
        r = json.load(f)
    m = dict(r["metrics"])
    if "localization_error_rate_matched" not in m:
        c = r.get("counts", {})
        m["localization_error_rate_matched"] = m.get("localization_error_rate")
        t = c.get("target_objects", 0)
        m["localization_error_rate"] = c["localization_errors"] / t if t and "localization_errors" in c else None
    return m


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


PAIRED = [("giou", "gIoU", 1), ("ciou", "cIoU", 1), ("chair_s", "C_S", -1)]


def paired(dirs, pairs, rows):
    names = {sub: name for name, sub in rows}
    print("\nPaired by seed (B - A per seed folder, in order; mean):\n")
    print("| A -> B | " + " | ".join(c[1] for c in PAIRED) + " | B >= A on every seed | spread of A's gIoU |")
    print("|---|" + "---|" * (len(PAIRED) + 2))
    for a, b in pairs:
        per = []
        for d in dirs:
            pa, pb = Path(d) / a / "report.json", Path(d) / b / "report.json"
            if pa.exists() and pb.exists():
                per.append((metrics(pa), metrics(pb)))
        if not per:
            print(f"| {names.get(a, a)} -> {names.get(b, b)} | " + " | ".join("-" for _ in PAIRED) + " | - | - |")
            continue
        cells, ok = [], True
        for k, _, sign in PAIRED:
            ds = [(mb[k] - ma[k]) * 100 for ma, mb in per]
            ok = ok and all(sign * x >= 0 for x in ds)
            cells.append(" / ".join(f"{x:+.2f}" for x in ds) + f" ({statistics.mean(ds):+.2f})")
        ga = [ma["giou"] * 100 for ma, _ in per]
        spread = f"{statistics.stdev(ga):.2f}" if len(ga) > 1 else "-"
        print(f"| {names.get(a, a)} -> {names.get(b, b)} | " + " | ".join(cells) + f" | {'yes' if ok else 'no'} | {spread} |")


if __name__ == "__main__":
    a = sys.argv[1:]
    rows = DEFAULT_ROWS
    pairs = []
    if a and a[0] == "--rows" and "--seeds" in a:
        k = a.index("--seeds")
        spec = a[1:k]
        if "--paired" in spec:
            j = spec.index("--paired")
            pairs = [tuple(p.split(":", 1)) for p in spec[j + 1:]]
            spec = spec[:j]
            if any(len(p) != 2 for p in pairs):
                sys.exit("--paired takes A:B entries (SUB names of two rows)")
        rows = [tuple(r.rsplit("=", 1)) for r in spec]
        if any(len(r) != 2 for r in rows):
            sys.exit("--rows takes NAME=SUBDIR entries")
        a = a[k:]
    if a and a[0] == "--seeds":
        seeds(a[1:], rows)
        if pairs:
            paired(a[1:], pairs, rows)
    elif len(a) == 3:
        single(a)
    else:
        sys.exit(__doc__)
