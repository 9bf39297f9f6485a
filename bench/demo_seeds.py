"""The demo's sentence-answer finetune over several training seeds, scored like `tunelab demo`.

    python bench/demo_seeds.py 0 1 2        # about 45 s per seed on the 2-core CPU machine

For each seed: `configs/world-qa.yaml` with `--train.seed=N`, then greedy answers to the held-out
questions and exact match per relation, on wordings seen in finetuning and on unseen ones.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tunelab.config import load_config, packaged_config
from tunelab.generate import Generator
from tunelab.runner import run
from tunelab.world.build import resolve_world_path
from tunelab.world.demo import MAX_NEW_TOKENS, score


def seed_accuracy(seed: int, out: Path) -> dict[str, float]:
    cfg = load_config(packaged_config("world-qa.yaml"), [f"--out={out}", f"--train.seed={seed}"])
    run(cfg, quiet=True, overwrite=True)
    heldout = Path(resolve_world_path("world:heldout.jsonl")).read_text().splitlines()
    rows = [json.loads(line) for line in heldout if line.strip()]
    rows = [r for r in rows if r["relation"] != "offtopic"]
    answers = Generator.load(str(out), device="cpu").generate(
        [r["question"] for r in rows], max_new_tokens=MAX_NEW_TOKENS, batch_size=64
    )
    hits: dict[str, list[bool]] = {}
    for r, answer in zip(rows, answers):
        for key in (r["relation"], f"{r['relation']} {r['wording']}"):
            hits.setdefault(key, []).append(score(answer, r)["exact"])
    return {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(hits.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("seeds", type=int, nargs="+")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            print(json.dumps({"seed": seed, **seed_accuracy(seed, Path(tmp) / f"seed{seed}")}), flush=True)


if __name__ == "__main__":
    main()
