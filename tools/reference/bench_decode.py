#!/usr/bin/env python3
"""Reference for `popen bench-decode` (`make bench-cpu`): a LLaMA's prefill and greedy decoding
with the KV cache in transformers, f32 on the CPU, the same workloads and prompt ids.

    target/refenv/bin/python tools/reference/bench_decode.py [--gguf PATH] [--threads 2]

- The model: the GGUF file dequantized by transformers (gguf-py) to f32, LlamaForCausalLM.
- Prompt: `prompt_ids` below (the formula of popen_model::bench::prompt_ids), repeated over
  the batch, attention mask all ones.
- generate(n) = model.generate(max_new_tokens = min_new_tokens = n, greedy, use_cache);
  per decoded token (T(n) - T(1)) / (n - 1); prefill T(1). One warm-up, then `--iters`.
Prints JSON as popen bench-decode does.
"""
import argparse
import json
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM


def prompt_ids(n, vocab):
    offset, span = (100, vocab - 200) if vocab > 200 else (0, max(vocab, 1))
    return [(i * 7919 + 13) % span + offset for i in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default="data/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--batch", default="1,3")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=33)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d, f = os.path.split(os.path.abspath(a.gguf))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    vocab = model.config.vocab_size

    def gen(b, p, n):
        ids = torch.tensor([prompt_ids(p, vocab)] * b)
        mask = torch.ones_like(ids)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 num_beams=1, pad_token_id=0, use_cache=True)
        assert out.shape[1] == p + n, out.shape
        return (time.perf_counter() - t0) * 1e3

    results = []
    for b in [int(x) for x in a.batch.split(",") if x]:
        gen(b, a.prompt, a.new_tokens)
        ms = []
        for _ in range(a.iters):
            one = gen(b, a.prompt, 1)
            n = gen(b, a.prompt, a.new_tokens)
            ms.append(max((n - one) / (a.new_tokens - 1), 0.0))
        results.append({"workload": f"decode b{b} p{a.prompt}", "batch": b, "prompt": a.prompt, "new_tokens": a.new_tokens,
                        "ms": ms, "median_ms": statistics.median(ms)})
    if a.prefill > 0:
        gen(1, a.prefill, 1)
        ms = [gen(1, a.prefill, 1) for _ in range(a.iters)]
        results.append({"workload": f"prefill b1 p{a.prefill}", "batch": 1, "prompt": a.prefill, "new_tokens": 1,
                        "ms": ms, "median_ms": statistics.median(ms)})
    print(json.dumps({"side": "transformers", "torch": torch.__version__, "threads": a.threads, "model": a.gguf,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
