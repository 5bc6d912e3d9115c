#!/usr/bin/env python3
"""`make bench-cpu`: the CPU-speed comparison of issue 21, popen against the PyTorch /
transformers references, side by side in rounds on this machine, as one ratio table.

    tools/bench_cpu.py --python target/refenv/bin/python --popen target/release/popen \
        [--rounds 3] [--tiny-bench CMD] [--sft-step] [--no-decode] [--out target/bench-cpu]

Each round runs the reference, then popen, for every workload, back to back:
  - decode / prefill (SmolLM2-135M-Instruct f32, 2 threads): tools/reference/bench_decode.py
    (transformers generate with the KV cache) and `popen bench-decode` (same prompt ids);
  - the `tiny` PixelLM step, forward and forward+backward (docs/bench-model.md):
    tools/reference/bench_tiny_model.py and the Rust bench given by --tiny-bench (a command
    that writes target/bench-tiny-model.json; `make bench-cpu` passes the cargo bench with
    Flex); skipped when --tiny-bench is empty;
  - with --sft-step, the `tiny-sam` SFT step as `make demo` runs it (pipelines/sft-tiny.toml:
    batch 4, frozen SAM encoder with its embeddings cached, decoder frozen, `devices = 2`):
    tools/reference/bench_sft_step.py (PyTorch, --sft-iters timed steps after 3 warm-up
    steps) and one `popen sft --set max_steps=--sft-steps --set log_every=1` run, whose
    `seconds` per step (metrics.jsonl, the same values as metrics.csv at full precision) give
    the median over the steps from --sft-skip on (the first ones warm up allocators and
    caches). Its inputs are made once under --sft-work (default out/bench-sft, kept between
    runs; delete it after changing the popen binary's formats): `popen synth` (seed 0, as
    `make data`), `popen tokenizer-tiny`, `popen model-init` of pipelines/model-tiny-sam.toml
    with MobileSAM's weights (`make assets`), and a 1-step `popen sft` that fills the SAM
    embedding cache (--sft-work/sam-cache), so no round pays the SAM encoder. The parameter
    counts of both sides ("N / M parameters train" of popen's log, the reference's own
    count) are checked to be equal. popen's `sft` runs with RAYON_NUM_THREADS=--threads.
--no-decode leaves out the decode/prefill rows.
A ratio is popen's median over the reference's median of the SAME round (> 1: popen slower);
the table gives the median ratio over rounds and its range, each side's median ms, and the
load average before and after each round. Raw JSON goes to --out/round-N-*.json and the
table to --out/table.md (copy it into docs/bench-cpu.md with the machine's description).
"""
import argparse
import json
import os
import re
import shlex
import shutil
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


def run_checked(cmd, env=None):
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"bench-cpu: `{' '.join(map(shlex.quote, cmd))}` failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def sft_params(log):
    """(trainable, total) from popen sft's "N / M parameters train" log line."""
    m = re.search(r"(\d+) / (\d+) parameters train", log)
    if not m:
        sys.exit("bench-cpu: no 'N / M parameters train' line in popen sft's log")
    return int(m.group(1)), int(m.group(2))


def sft_cmd(a, out, steps):
    w = a.sft_work
    return [a.popen, "sft", "--config", a.sft_config, "--model", os.path.join(w, "init"),
            "--samples", os.path.join(w, "synth", "train.parquet"), "--out", out, "--seed", "0",
            "--sam-cache", os.path.join(w, "sam-cache"), "--set", f"max_steps={steps}", "--set", "log_every=1"]


def sft_prepare(a, env):
    """The demo's inputs of the SFT step under --sft-work (what `make tiny-init` makes), once;
    returns popen's (trainable, total) parameter counts."""
    w = a.sft_work
    synth, tok, init = (os.path.join(w, x) for x in ("synth", "tokenizer/tokenizer.json", "init"))
    if not os.path.exists(os.path.join(synth, "train.parquet")):
        run_checked([a.popen, "synth", "--config", "pipelines/synth.toml", "--seed", "0", "--out", synth])
    if not os.path.exists(tok):
        run_checked([a.popen, "tokenizer-tiny", "--data", synth, "--out", tok, "--seg-tokens", "3"])
    if not os.path.exists(os.path.join(init, "model.safetensors")):
        run_checked([a.popen, "model-init", "--config", a.sft_model_config, "--tokenizer", tok, "--out", init,
                   "--seed", "0", "--sam-checkpoint", a.sam_checkpoint])
    # One step, which also computes the SAM embeddings into the cache (minutes, once).
    warm = os.path.join(w, "warm")
    shutil.rmtree(warm, ignore_errors=True)
    print("bench-cpu: preparing the SFT step's inputs (the first time: SAM embeddings of the train images, "
          "a few minutes)", file=sys.stderr)
    p = run_checked(sft_cmd(a, warm, 1), env)
    shutil.rmtree(warm, ignore_errors=True)
    return sft_params(p.stderr)


def sft_popen(a, out, env, skip, keep_metrics):
    """One `popen sft` run into `out` (removed after: model and checkpoints are ~0.1 GB; its
    metrics.jsonl is kept as `keep_metrics`); the per-step seconds of the steps from `skip` on."""
    shutil.rmtree(out, ignore_errors=True)
    p = run_checked(sft_cmd(a, out, a.sft_steps), env)
    shutil.copyfile(os.path.join(out, "metrics.jsonl"), keep_metrics)
    shutil.rmtree(out, ignore_errors=True)
    with open(keep_metrics) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    ms = [r["seconds"] * 1e3 for r in rows if r["step"] >= skip]
    if not ms:
        sys.exit(f"bench-cpu: popen sft wrote no step >= {skip} ({keep_metrics})")
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "p25_ms": q[0], "p75_ms": q[2], "min_ms": min(ms),
            "max_ms": max(ms), "n": len(ms), "steps": [skip, a.sft_steps - 1], "params": sft_params(p.stderr),
            "final_loss": rows[-1]["loss"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", default=os.path.join(ROOT, "target/refenv/bin/python"))
    ap.add_argument("--popen", default=os.path.join(ROOT, "target/release/popen"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny-bench", default="")
    ap.add_argument("--no-decode", action="store_true", help="leave out the decode/prefill rows")
    ap.add_argument("--sft-step", action="store_true", help="the tiny-sam SFT step row (see the docstring)")
    ap.add_argument("--sft-work", default=os.path.join(ROOT, "out/bench-sft"))
    ap.add_argument("--sft-config", default="pipelines/sft-tiny.toml")
    ap.add_argument("--sft-model-config", default="pipelines/model-tiny-sam.toml")
    ap.add_argument("--sam-checkpoint", default="data/assets/mobile_sam/mobile_sam.pt")
    ap.add_argument("--sft-steps", type=int, default=30, help="steps of each popen sft run")
    ap.add_argument("--sft-skip", type=int, default=5, help="popen's first steps left out of the median")
    ap.add_argument("--sft-iters", type=int, default=20, help="timed steps of the PyTorch reference")
    ap.add_argument("--out", default=os.path.join(ROOT, "target/bench-cpu"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    sft_env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    sft_note = ""
    if a.sft_step:
        if a.sft_skip >= a.sft_steps:
            sys.exit("bench-cpu: --sft-skip must be below --sft-steps")
        popen_params = sft_prepare(a, sft_env)
    rounds = []
    for r in range(a.rounds):
        load0 = os.getloadavg()[0]
        rows = {}
        if not a.no_decode:
            ref = run_json([a.python, "tools/reference/bench_decode.py", "--iters", str(a.iters), "--threads", str(a.threads)],
                           os.path.join(a.out, f"round-{r}-decode-transformers.json"))
            ours = run_json([a.popen, "bench-decode", "--iters", str(a.iters)], os.path.join(a.out, f"round-{r}-decode-popen.json"))
            rows.update(decode_rows(ref, ours))
        if a.tiny_bench:
            tref = os.path.join(a.out, f"round-{r}-tiny-pytorch.json")
            subprocess.run([a.python, "tools/reference/bench_tiny_model.py", "--out", tref, "--threads", str(a.threads)],
                           cwd=ROOT, check=True, capture_output=True)
            tours = os.path.join(a.out, f"round-{r}-tiny-popen.json")
            env = dict(os.environ, TINY_BENCH_OUT=tours, TINY_BENCH_REFERENCE=tref, TINY_BENCH_BACKENDS="flex")
            subprocess.run(a.tiny_bench, shell=True, cwd=ROOT, check=True, env=env, capture_output=True)
            rows.update(tiny_rows(tref, tours))
        if a.sft_step:
            sref = os.path.join(a.out, f"round-{r}-sft-pytorch.json")
            run_checked([a.python, "tools/reference/bench_sft_step.py", "--out", sref, "--threads", str(a.threads),
                         "--iters", str(a.sft_iters), "--model-config", a.sft_model_config,
                         "--sft-config", a.sft_config, "--popen-params", "%d/%d" % popen_params])
            with open(sref) as f:
                ref = json.load(f)
            ours = sft_popen(a, os.path.join(a.sft_work, f"round-{r}"), sft_env, a.sft_skip,
                             os.path.join(a.out, f"round-{r}-sft-popen-metrics.jsonl"))
            with open(os.path.join(a.out, f"round-{r}-sft-popen.json"), "w") as f:
                json.dump(ours, f, indent=2)
            if not ref["params_match"] or tuple(ours["params"]) != popen_params:
                print(f"bench-cpu: WARNING: parameter counts differ: popen {ours['params']}, PyTorch "
                      f"{ref['params_trainable']} / {ref['params_total']}", file=sys.stderr)
            rows["tiny-sam SFT step b4 (ms)"] = (ref["step"]["median_ms"], ours["median_ms"])
            sft_note = (f" SFT step: popen = median of steps {a.sft_skip}..{a.sft_steps - 1} of one `popen sft` run "
                        f"per round (metrics.jsonl `seconds`, devices = 2), PyTorch = median of {a.sft_iters} steps "
                        f"after 3 warm-up; parameters popen {ours['params'][0]} / {ours['params'][1]}, PyTorch "
                        f"{ref['params_trainable']} / {ref['params_total']} trainable / total.")
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
    lines.append(f"{a.rounds} round(s), {a.iters} timed iterations per decode/tiny workload and side, {a.threads} threads; load average (1 min) per round: {loads}; {os.cpu_count()} CPUs.{sft_note}")
    table = "\n".join(lines)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
