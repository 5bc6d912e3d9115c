"""Fixture for popen_model::weights reading PyTorch pickles (tests/weights.rs).

Writes crates/popen-model/tests/fixtures/weights/: the same small state dict as
`toy.bin` (torch.save, zip format, as transformers' save_pretrained(safe_serialization=False)
writes pytorch_model.bin) in f32 and bf16 variants, a legacy (non-zip) pickle, a sharded
pair with pytorch_model.bin.index.json, and expected.json with the values.

Rerun: /tmp/refenv/bin/python tools/reference/torch_pickle_fixture.py  (torch 2.9.1)
"""
import json
import pathlib

import torch

OUT = pathlib.Path(__file__).resolve().parents[2] / "crates/popen-model/tests/fixtures/weights"
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(3)
sd = {
    "model.layers.0.w": torch.randn(3, 4),
    "model.layers.0.b": torch.randn(3),
    "lm_head.weight": torch.randn(2, 3),
}
torch.save(sd, OUT / "toy.bin")
torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, OUT / "toy_bf16.bin")
torch.save(sd, OUT / "toy_legacy.pt", _use_new_zipfile_serialization=False)
shard = OUT / "sharded"
shard.mkdir(exist_ok=True)
torch.save({"model.layers.0.w": sd["model.layers.0.w"], "model.layers.0.b": sd["model.layers.0.b"]},
           shard / "pytorch_model-00001-of-00002.bin")
torch.save({"lm_head.weight": sd["lm_head.weight"]}, shard / "pytorch_model-00002-of-00002.bin")
json.dump({"metadata": {"total_size": 0}, "weight_map": {
    "model.layers.0.w": "pytorch_model-00001-of-00002.bin",
    "model.layers.0.b": "pytorch_model-00001-of-00002.bin",
    "lm_head.weight": "pytorch_model-00002-of-00002.bin"}}, open(shard / "pytorch_model.bin.index.json", "w"))
json.dump({k: {"shape": list(v.shape), "values": v.flatten().tolist(),
               "bf16": v.to(torch.bfloat16).float().flatten().tolist()} for k, v in sd.items()},
          open(OUT / "expected.json", "w"))
print(sorted(p.name for p in OUT.rglob("*")))
