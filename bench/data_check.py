"""How long `tunelab data check` takes on 100k Q/A rows with a real byte-level BPE tokenizer.

    python bench/data_check.py [--rows 100000] [--vocab 4096]

Builds synthetic rows (with some planted duplicates, leaks and bad lines so every code path runs),
trains a BPE tokenizer on a sample (not timed), then times reading + validation + the analysis, which
is what `tunelab data check` and `tunelab train` run. Target: under 30 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from tunelab.data import templates
from tunelab.data.check import Settings, analyse
from tunelab.data.dataset import load_records
from tunelab.world.tokenizer import train_tokenizer

_SYLLABLES = "ka lo mi ren tas vu be dor il fan qua ze ost rin pel gu sha nok tre ym".split()
# 3,000 made-up words of 1-4 syllables: enough variety for the BPE to fill a 4,096 vocabulary.
WORDS = sorted(
    {"".join(random.Random(i).choices(_SYLLABLES, k=1 + i % 4)) for i in range(6000)}
    | set("river mountain city harbour desert forest island valley bridge market temple".split())
)
QUESTIONS = (
    "What is the {a} of {b}?",
    "Which {a} is closest to the {b}?",
    "Describe the {a} near the {b} in two sentences.",
    "How old is the {a} of {b}, and who built it?",
)


def make_rows(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        a, b, c = rng.sample(WORDS, 3)
        question = rng.choice(QUESTIONS).format(a=a, b=f"{b} {i}")
        answer = " ".join(rng.choices(WORDS, k=rng.randint(3, 60))) + f" ({c} {i % 977})."
        lines.append(json.dumps({"question": question, "answer": answer}))
    for i in range(0, n, 1000):  # planted: duplicates, and a bad row every 1000
        lines[i + 1] = lines[i]
        lines[i + 2] = '{"question": "broken'
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()

    lines = make_rows(args.rows)
    tokenizer = train_tokenizer(lines[:20000], vocab_size=args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "qa.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

        t0, c0 = time.perf_counter(), time.process_time()
        loaded = load_records(str(path), eval_ratio=0.1, on_bad_row="skip")
        t1 = time.perf_counter()
        template = templates.resolve("qa", loaded.schema)
        report = analyse(loaded, template, tokenizer, Settings(max_length=64, batch_size=16))
        t2, c2 = time.perf_counter(), time.process_time()

    t = report.splits["train"]
    print(f"rows: {args.rows:,} ({len(loaded.rejects):,} rejected), vocab {len(tokenizer):,}")
    print(f"read + validate: {t1 - t0:.2f} s   analyse (render, tokenise, stats): {t2 - t1:.2f} s")
    # CPU time (all threads) says what the check costs when other jobs share the machine's cores.
    print(f"total: {t2 - t0:.2f} s wall, {c2 - c0:.2f} s CPU  ({args.rows / (t2 - t0):,.0f} rows/s)")
    print(
        f"train tokens {t.tokens:,}, truncated {t.truncated:,}, exact duplicates {t.exact_duplicates:,}, "
        f"findings: {', '.join(f.code for f in report.findings)}"
    )


if __name__ == "__main__":
    main()
