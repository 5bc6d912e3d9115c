#!/usr/bin/env python3
"""Write crates/popen-model/tests/fixtures/smollm2_tokens.json, the independent reference that
crates/popen-model/tests/tokenizer.rs checks the Rust tokenizer (crates/popen-model/src/tokenizer.rs)
against.

The reference tokenizer is built from the GGUF's tokenizer metadata read with llama.cpp's own
gguf-py (`gguf.GGUFReader`), the way transformers' GGUF loader does for a "gpt2"-type vocabulary
(`GGUFGPTConverter` -> `GPT2Converter`): a byte-level BPE over `tokenizer.ggml.tokens` (token ->
index) and `tokenizer.ggml.merges` (split on the first space), a ByteLevel pre-tokenizer
(add_prefix_space=False, GPT-2 regex) and a ByteLevel decoder, with every token whose
`tokenizer.ggml.token_type` is 3 (CONTROL) added as a special token. For `tokenizer.ggml.pre ==
"smollm"` the pre-tokenizer is preceded by Digits(individual_digits=True), as in llama.cpp
(LLAMA_VOCAB_PRE_TYPE_SMOLLM: "\\p{N}" then the GPT-2 regex) and SmolLM2's own tokenizer.json.
(SmolLM2's vocabulary has no multi-digit tokens, so this split does not change any ids.)

The chat prompt is `tokenizer.chat_template` rendered with jinja2 for one user message and
add_generation_prompt=True; SmolLM2's template inserts a default system message when the first
message is not a system message.

Versions are pinned in tools/reference/requirements.txt and recorded in the fixture's "meta".

    pip install -r tools/reference/requirements.txt
    python tools/reference/tokenizer_fixture.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
import importlib.metadata
import json
import os
import sys

import gguf
import jinja2
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT = os.path.join(ROOT, "data/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
OUT = os.path.join(ROOT, "crates/popen-model/tests/fixtures/smollm2_tokens.json")

USER = "What is the capital of France?"

STRINGS = [
    "Hello, world! This is a test of the tokenizer.",
    " leading spaces,  double  spaces and trailing ",
    "12345 and 3.14159 or 1,000,000",
    "Punctuation: (a) [b] {c} <d> \"quoted\" 'single' it's don't -- ... ?!;:@#$%^&*",
    "café — naïve 😀 日本語 Ünïcödé",
    "line one\nline two\n\n\tindented\r\nend\n",
    "def f(x):\n    return x * 2  # code\n",
]


from gguf_fixture import field_value  # same folder: one reading of gguf-py's fields


def build(reader):
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field_value(reader, "tokenizer.ggml.merges")]
    types = field_value(reader, "tokenizer.ggml.token_type")
    pre = field_value(reader, "tokenizer.ggml.pre") if "tokenizer.ggml.pre" in reader.fields else None
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [t for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok, special, pre


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT
    r = gguf.GGUFReader(path)
    tok, special, pre = build(r)
    template = field_value(r, "tokenizer.chat_template")
    chat = jinja2.Environment().from_string(template).render(
        messages=[{"role": "user", "content": USER}], add_generation_prompt=True)
    cases = []
    for s in STRINGS + [chat]:
        ids = tok.encode(s, add_special_tokens=False).ids
        back = tok.decode(ids, skip_special_tokens=False)
        assert back == s, (s, back)
        cases.append({"text": s, "ids": ids})
    out = {
        "meta": {
            "source": os.path.basename(path),
            "tool": "tools/reference/tokenizer_fixture.py",
            "versions": {p: importlib.metadata.version(p) for p in ("gguf", "tokenizers", "Jinja2")},
            "tokenizer.ggml.pre": pre,
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "bos_token_id": field_value(r, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": field_value(r, "tokenizer.ggml.eos_token_id"),
        },
        "special_tokens": {t: tok.token_to_id(t) for t in special},
        "chat": {"user": USER, "prompt": chat},
        "cases": cases,
    }
    with open(OUT, "w", encoding="utf-8") as fh:
        json.dump(out, fh, ensure_ascii=False, indent=1)
        fh.write("\n")
    print(f"wrote {OUT}: {len(cases)} cases")


if __name__ == "__main__":
    main()
