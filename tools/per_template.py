#!/usr/bin/env python3
"""gIoU per instruction template of the embedded benchmark, for one or more popen eval reports.

    tools/per_template.py data/synth/val.parquet out/demo/eval/model/report.json out/demo/eval/baseline-largest/report.json

Reads each sample's `template` from the samples shard's `meta` (JSON) and averages the
report's per-sample gIoU (`samples[].giou`) by template: which kinds of question a model
gets wrong (e.g. colour references against the largest-instance baseline). Needs pyarrow
(tools/requirements-ci.txt).
"""
import collections
import json
import sys

import pyarrow.parquet as pq


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    rows = pq.read_table(argv[0], columns=["id", "meta"]).to_pylist()
    template = {r["id"]: json.loads(r["meta"]).get("template", "?") for r in rows}
    reports = []
    for path in argv[1:]:
        with open(path) as f:
            samples = json.load(f)["samples"]
        by = collections.defaultdict(list)
        for s in samples:
            if s["id"] not in template:
                sys.exit(f"{path}: sample {s['id']} is not in {argv[0]}")
            by[template[s["id"]]].append(s["giou"])
        reports.append(by)
    kinds = sorted(set().union(*reports))
    print("| template | n | " + " | ".join(argv[1:]) + " |")
    print("|---|---:|" + "---:|" * len(reports))
    for k in kinds:
        n = max(len(r.get(k, [])) for r in reports)
        cells = [f"{100 * sum(r[k]) / len(r[k]):.2f}" if r.get(k) else "-" for r in reports]
        print(f"| {k} | {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
