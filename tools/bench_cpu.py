#!/usr/bin/env python3
"""`make bench-cpu`: the CPU-speed comparison of issue 21, popen against the PyTorch /
transformers references, side by side in rounds on this machine, as one ratio table.

    tools/bench_cpu.py --python target/refenv/bin/python --popen target/release/popen \
        [--rounds 3] [--tiny-bench CMD] [--out target/bench-cpu]

Each round runs the reference, then popen, for every workload, back to back:
  - decode / prefill (SmolLM2-135M-Instruct f32, 2 threads): tools/reference/bench_decode.py
    (transformers generate with the KV cache) and `popen bench-decode` (same prompt ids);
  - the `tiny` PixelLM step, forward and forward+backward (docs/bench-model.md):
    tools/reference/bench_tiny_model.py and the Rust bench given by --tiny-bench (a command
    that writes target/bench-tiny-model.json; `make bench-cpu` passes the cargo bench with
    Flex); skipped when --tiny-bench is empty.
A ratio is popen's median over the reference's median of the SAME round (> 1: popen slower);
the table gives the median ratio over rounds and its range, each side's median ms, and the
load average before and after each round. Raw JSON goes to --out/round-N-*.json and the
table to --out/table.md (copy it into docs/bench-cpu.md with the machine's description).
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def run_json(cmd, out_path):
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"bench-cpu: `{' '.join(map(shlex.quote, cmd))}` failed ({p.returncode}):\n{p.stderr[-3000:]}")
    with open(out_path, "w") as f:
        f.write(p.stdout)
    return json.loads(p.stdout)


def decode_rows(ref, ours):
    by = {r["workload"]: r["median_ms"] for r in ref["results"]}
    return {r["workload"] + " (ms/token)" if r["workload"].startswith("decode") else r["workload"] + " (ms)": (by.get(r["workload"]), r["median_ms"])
            for r in ours["results"]}


def tiny_rows(ref_path, ours_path):
    with open(ref_path) as f:
        ref = json.load(f)
    with open(ours_path) as f:
        ours = json.load(f)
    runs = ours.get("runs", {})
    flex = next((v for k, v in runs.items() if "flex" in k.lower()), None)
    if flex is None:
        sys.exit(f"bench-cpu: no flex entry in {ours_path}")
    return {
        "tiny step forward (ms)": (ref["forward"]["median_ms"], flex["forward"]["median_ms"]),
        "tiny step fwd+bwd (ms)": (ref["forward_backward"]["median_ms"], flex["forward_backward"]["median_ms"]),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", default=os.path.join(ROOT, "target/refenv/bin/python"))
    ap.add_argument("--popen", default=os.path.join(ROOT, "target/release/popen"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny-bench", default="")
    ap.add_argument("--out", default=os.path.join(ROOT, "target/bench-cpu"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rounds = []
    for r in range(a.rounds):
        load0 = os.getloadavg()[0]
        ref = run_json([a.python, "tools/reference/bench_decode.py", "--iters", str(a.iters), "--threads", str(a.threads)],
                       os.path.join(a.out, f"round-{r}-decode-transformers.json"))
        ours = run_json([a.popen, "bench-decode", "--iters", str(a.iters)], os.path.join(a.out, f"round-{r}-decode-popen.json"))
        rows = decode_rows(ref, ours)
        if a.tiny_bench:
            tref = os.path.join(a.out, f"round-{r}-tiny-pytorch.json")
            subprocess.run([a.python, "tools/reference/bench_tiny_model.py", "--out", tref, "--threads", str(a.threads)],
                           cwd=ROOT, check=True, capture_output=True)
            tours = os.path.join(a.out, f"round-{r}-tiny-popen.json")
            env = dict(os.environ, TINY_BENCH_OUT=tours, TINY_BENCH_REFERENCE=tref, TINY_BENCH_BACKENDS="flex")
            subprocess.run(a.tiny_bench, shell=True, cwd=ROOT, check=True, env=env, capture_output=True)
            rows.update(tiny_rows(tref, tours))
        load1 = os.getloadavg()[0]
        rounds.append({"rows": rows, "load": (load0, load1)})
        print(f"round {r}: load {load0:.2f} -> {load1:.2f}", file=sys.stderr)
    names = list(rounds[0]["rows"])
    lines = ["| workload | reference median | popen median | ratio popen/reference: median [min-max] over rounds |", "|---|---:|---:|---|"]
    for n in names:
        refs = [x["rows"][n][0] for x in rounds if x["rows"][n][0]]
        ours = [x["rows"][n][1] for x in rounds]
        ratios = [x["rows"][n][1] / x["rows"][n][0] for x in rounds if x["rows"][n][0]]
        rr = f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]" if ratios else "-"
        lines.append(f"| {n} | {statistics.median(refs):.1f} | {statistics.median(ours):.1f} | {rr} |" if refs else f"| {n} | - | {statistics.median(ours):.1f} | - |")
    loads = ", ".join(f"{x['load'][0]:.2f}->{x['load'][1]:.2f}" for x in rounds)
    lines.append("")
    lines.append(f"{a.rounds} round(s), {a.iters} timed iterations per workload and side, {a.threads} threads; load average (1 min) per round: {loads}; {os.cpu_count()} CPUs.")
    table = "\n".join(lines)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
