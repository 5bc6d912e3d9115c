#!/usr/bin/env python3
"""Write crates/popen-model/tests/fixtures/smollm2_gguf.json, the independent reference that
crates/popen-model/tests/gguf.rs checks the Rust GGUF reader (crates/popen-model/src/gguf.rs)
against.

The reference is the PyPI `gguf` package (llama.cpp's own gguf-py: `gguf.GGUFReader`, a numpy
memmap reader, and `gguf.quants.dequantize`), run on the SmolLM2-135M-Instruct Q4_1 GGUF that
`make assets` fetches. Versions are pinned in tools/reference/requirements.txt and recorded in
the fixture's "meta".

    pip install -r tools/reference/requirements.txt
    python tools/reference/gguf_fixture.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
import importlib.metadata
import json
import os
import sys

import gguf
import numpy as np
from gguf.quants import dequantize

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT = os.path.join(ROOT, "data/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
OUT = os.path.join(ROOT, "crates/popen-model/tests/fixtures/smollm2_gguf.json")

# Tensors checked value by value: one per ggml type present and per shape family.
CHECK = [
    "token_embd.weight",        # Q8_0, [576, 49152]
    "blk.0.attn_q.weight",      # Q4_1, [576, 576] (permuted rows)
    "blk.0.attn_k.weight",      # Q4_1, [576, 192] (permuted rows, kv heads)
    "blk.3.ffn_down.weight",    # Q4_1, [1536, 576]
    "blk.29.ffn_gate.weight",   # Q4_1, [576, 1536]
    "blk.0.attn_norm.weight",   # F32, [576]
    "output_norm.weight",       # F32, [576]
]


def field_value(reader, key):
    f = reader.fields[key]
    t = f.types[0]
    if t == gguf.GGUFValueType.ARRAY:
        if f.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if t == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT
    r = gguf.GGUFReader(path)
    tokens = field_value(r, "tokenizer.ggml.tokens")
    meta = {
        "general.architecture": field_value(r, "general.architecture"),
        "llama.block_count": field_value(r, "llama.block_count"),
        "llama.embedding_length": field_value(r, "llama.embedding_length"),
        "llama.feed_forward_length": field_value(r, "llama.feed_forward_length"),
        "llama.attention.head_count": field_value(r, "llama.attention.head_count"),
        "llama.attention.head_count_kv": field_value(r, "llama.attention.head_count_kv"),
        "llama.rope.freq_base": field_value(r, "llama.rope.freq_base"),
        "llama.attention.layer_norm_rms_epsilon": field_value(r, "llama.attention.layer_norm_rms_epsilon"),
        "llama.context_length": field_value(r, "llama.context_length"),
        "tokenizer.ggml.model": field_value(r, "tokenizer.ggml.model"),
        "tokenizer.ggml.bos_token_id": field_value(r, "tokenizer.ggml.bos_token_id"),
        "tokenizer.ggml.eos_token_id": field_value(r, "tokenizer.ggml.eos_token_id"),
        "tokenizer.ggml.add_bos_token": bool(field_value(r, "tokenizer.ggml.add_bos_token")),
    }
    token_types = field_value(r, "tokenizer.ggml.token_type")
    merges = field_value(r, "tokenizer.ggml.merges")

    all_tensors = [
        {
            "name": t.name,
            "type": t.tensor_type.name,
            "dims": [int(d) for d in t.shape],  # GGUF order, ne0 first
            "offset": int(t.data_offset),        # absolute file offset
            "n_bytes": int(t.n_bytes),
        }
        for t in r.tensors
    ]

    by_name = {t.name: t for t in r.tensors}
    checked = []
    for name in CHECK:
        t = by_name[name]
        v = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(d) for d in reversed([int(x) for x in t.shape])]  # row-major
        v = v.reshape(shape)
        flat = v.reshape(-1)
        v64 = flat.astype(np.float64)
        mid = flat.size // 2
        checked.append({
            "name": name,
            "type": t.tensor_type.name,
            "shape": shape,
            "sum": float(v64.sum()),
            "sum_sq": float((v64 * v64).sum()),
            "first16": [float(x) for x in flat[:16]],
            "mid_index": int(mid),
            "mid16": [float(x) for x in flat[mid:mid + 16]],
        })

    fixture = {
        "meta": {
            "generator": "tools/reference/gguf_fixture.py",
            "gguf": importlib.metadata.version("gguf"),
            "numpy": np.__version__,
            "file": os.path.basename(path),
            "file_size": os.path.getsize(path),
        },
        "tensor_count": len(r.tensors),
        "metadata_count": len(r.fields) - 3,  # minus GGUF.version/tensor_count/kv_count pseudo-fields
        "metadata": meta,
        "vocab_size": len(tokens),
        "first_tokens": tokens[:5],
        "last_token": tokens[-1],
        "token_type_sum": int(sum(token_types)),
        "merges_count": len(merges),
        "first_merges": merges[:3],
        "chat_template_len": len(field_value(r, "tokenizer.chat_template")),
        "tensors": all_tensors,
        "checked": checked,
    }
    with open(OUT, "w") as f:
        json.dump(fixture, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
