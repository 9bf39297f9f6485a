"""The world's data on disk: corpus, tokenizer, finetuning pairs (sentence and bare answers) and the
held-out questions. Deterministic for a seed; `tunelab world build` writes them, and the shipped copies
in `assets/data` are what it wrote with seed 0."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from tunelab.data.templates import QA_PROMPT
from tunelab.world.corpus import build_corpus, write_corpus
from tunelab.world.facts import load_facts
from tunelab.world.qa import build_finetune_pairs, build_heldout, split_countries, write_jsonl
from tunelab.world.tokenizer import train_tokenizer

DATA_FILES = ("corpus.jsonl", "qa-train.jsonl", "qa-train-bare.jsonl", "heldout.jsonl")


def assets_dir() -> Path:
    return Path(str(files("tunelab") / "world" / "assets"))


def data_dir() -> Path:
    return assets_dir() / "data"


def resolve_world_path(path: str) -> str:
    """`world:qa-train.jsonl` -> the shipped file; anything else is returned unchanged."""
    if path.startswith("world:"):
        return str(data_dir() / path.removeprefix("world:"))
    return path


def build(out: Path, seed: int = 0, tokenizer: bool = True) -> dict[str, int]:
    """Write the corpus, the Q/A files and (unless `tokenizer=False`) the tokenizer (out/tokenizer);
    returns their sizes.

    The shipped tokenizer was trained on the corpus plus the first version of the finetuning pairs
    (fewer question wordings); the pairs have grown since, so a rebuild trains a comparable tokenizer,
    not the identical one. The corpus is unchanged (tests pin it), and the shipped base model keeps the
    tokenizer it was pretrained with."""
    out.mkdir(parents=True, exist_ok=True)
    countries = load_facts()
    corpus = build_corpus(countries, seed=seed)
    train_countries, heldout_countries = split_countries(countries, seed=seed)
    pairs = build_finetune_pairs(train_countries, seed=seed, answer_style="sentence")
    bare = build_finetune_pairs(train_countries, seed=seed, answer_style="bare")
    heldout = build_heldout(heldout_countries, seed=seed)
    write_corpus(out / "corpus.jsonl", corpus)
    write_jsonl(out / "qa-train.jsonl", pairs)
    write_jsonl(out / "qa-train-bare.jsonl", bare)
    write_jsonl(out / "heldout.jsonl", heldout)
    sizes = {"documents": len(corpus), "pairs": len(pairs), "heldout": len(heldout)}
    if tokenizer:
        # The template's markup is in the tokenizer's training text so it tokenises compactly.
        rendered = [QA_PROMPT.format(prompt=p["question"]) + p["answer"] for p in pairs]
        tok = train_tokenizer(corpus, extra_texts=rendered)
        tok.save_pretrained(out / "tokenizer")
        sizes["vocab"] = len(tok)
    return sizes
