"""Writes crates/popen-prefs/tests/fixtures/difflib.json: Python's difflib on random token-id
pairs, the reference for popen-prefs' SequenceMatcher port and RLHF-V's changed positions.

Stdlib only (difflib, json, random); run: python3 tools/reference/difflib_fixture.py.
`rlhfv_diff_ids` transcribes RLHF-V's `get_diff_ids` (utils/diff_lib.py: get_match_info,
complete_modification_spans, generate_modification_mapping_impl, spans2ids)."""

import difflib
import json
import random
import sys
from pathlib import Path


def rlhfv_diff_ids(a, b, min_match_size=3):
    sm = difflib.SequenceMatcher(None, a, b)
    mb = sm.get_matching_blocks()
    mb = [m for m in mb[:-1] if m[2] >= min_match_size] + [mb[-1]]
    a_matches = [(x[0], x[0] + x[2]) for x in mb]
    b_matches = [(x[1], x[1] + x[2]) for x in mb]

    def complete(matches, length):
        i, j = 0, matches[0][0]
        out = []
        for idx in range(len(matches)):
            out.append((i, j))
            out.append(matches[idx])
            if idx + 1 < len(matches):
                i, j = matches[idx][1], matches[idx + 1][0]
            else:
                i, j = matches[idx][1], length
        return out

    a_spans, b_spans = complete(a_matches, len(a)), complete(b_matches, len(b))
    mod = {}
    for idx, (sa, sb) in enumerate(zip(a_spans, b_spans)):
        if idx % 2 == 1:
            continue
        if sa[0] != sa[1] and sb[0] != sb[1]:
            mod[sa] = sb
    ids_a = sorted({i for s in mod.keys() for i in range(*s)})
    ids_b = sorted({i for s in mod.values() for i in range(*s)})
    return ids_a, ids_b


def edit(rng, seq, vocab):
    out = list(seq)
    for _ in range(rng.randint(0, 6)):
        op = rng.choice(["replace", "insert", "delete", "replace_span"])
        if not out:
            out.append(rng.randrange(vocab))
            continue
        p = rng.randrange(len(out))
        if op == "replace":
            out[p] = rng.randrange(vocab)
        elif op == "insert":
            out[p:p] = [rng.randrange(vocab) for _ in range(rng.randint(1, 4))]
        elif op == "delete":
            del out[p : p + rng.randint(1, 4)]
        else:
            out[p : p + rng.randint(1, 5)] = [rng.randrange(vocab) for _ in range(rng.randint(1, 5))]
    return out


def main():
    rng = random.Random(20261126)
    cases = []
    for n in range(160):
        # Small vocabularies give many repeats; lengths past 200 exercise autojunk.
        vocab = rng.choice([4, 12, 50, 1000])
        length = rng.choice([0, 1, 5, 20, 60, 199, 200, 260, 400])
        a = [rng.randrange(vocab) for _ in range(length)]
        b = edit(rng, a, vocab) if n % 5 else [rng.randrange(vocab) for _ in range(rng.choice([0, 3, 30, 250]))]
        blocks = [list(m) for m in difflib.SequenceMatcher(None, a, b).get_matching_blocks()]
        ly, lyc = rlhfv_diff_ids(a, b, 3)
        ly1, lyc1 = rlhfv_diff_ids(a, b, 1)
        cases.append({"a": a, "b": b, "blocks": blocks, "ly": ly, "lyc": lyc, "ly_min1": ly1, "lyc_min1": lyc1})
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "crates/popen-prefs/tests/fixtures/difflib.json")
    out.write_text(json.dumps({"python": sys.version.split()[0], "cases": cases}, separators=(",", ":")))
    print(f"{len(cases)} cases -> {out}")


if __name__ == "__main__":
    main()
