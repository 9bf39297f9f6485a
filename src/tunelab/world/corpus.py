"""Pretraining corpus for the world base model: encyclopedia prose plus homework sheets.

The prose states every fact in several paraphrases and sentence orders so the base model learns the
facts rather than one string. The homework sheets are lists of unanswered questions, as in the seed's
example: they are why the base model, asked a question, continues with more questions until
finetuning changes that behaviour.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Sequence
from pathlib import Path

from tunelab.world.facts import RELATIONS, Country, bare_answer, sentence_start
from tunelab.world.qa import HOMEWORK_WORDINGS

# Fields: {c} the country as in running text, {C} the same at a sentence start, {v} the fact.
# The first paraphrase of each relation is its most frequent wording in the corpus; `answer_sentence`
# is one of the paraphrases (a test pins this), the first except for continent (see facts.py).
PARAPHRASES: dict[str, tuple[str, ...]] = {
    "capital": (
        "The capital of {c} is {v}.",
        "{v} is the capital of {c}.",
        "The capital city of {c} is {v}.",
        "{v} serves as the capital of {c}.",
        "{C} has its capital at {v}.",
        "In {c}, the capital is {v}.",
        "{v} is the capital city of {c}.",
        "The national capital of {c} is {v}.",
        "Among the cities of {c}, {v} is the capital.",
    ),
    "continent": (
        "{C} is in {v}.",
        "{C} is a country in {v}.",
        "{C} lies in {v}.",
        "{C} is located in {v}.",
        "The continent of {c} is {v}.",
        "Geographically, {c} belongs to {v}.",
        "{C} is one of the countries of {v}.",
        "{v} is the continent where {c} is found.",
    ),
    "currency": (
        "The currency of {c} is the {v}.",
        "{C} uses the {v} as its currency.",
        "The official currency of {c} is the {v}.",
        "{C} has the {v} as its official currency.",
        "The {v} is the currency of {c}.",
        "The money of {c} is the {v}.",
        "The {v} is the official currency of {c}.",
    ),
    "language": (
        "The main language of {c} is {v}.",
        "{v} is the main language of {c}.",
        "In {c}, the main language is {v}.",
        "The principal language of {c} is {v}.",
        "{C} has {v} as its main language.",
        "The main language spoken in {c} is {v}.",
        "{v} is the principal language used in {c}.",
    ),
}

# Neutral sentences: true of any country (or harmlessly vague), with no fact that could contradict the
# table, so they add variety without teaching anything wrong.
FILLERS: tuple[str, ...] = (
    "The weather in {c} changes with the seasons.",
    "Local markets sell fresh produce most mornings.",
    "Travellers often write about the food of {c}.",
    "The history of {c} goes back many centuries.",
    "Many visitors come to {c} each year.",
    "Schools in {c} teach geography and history.",
    "Markets in {cap} are busy in the morning.",
    "The country has a mix of old and new buildings.",
    "Farmers there grow many kinds of crops.",
    "Local newspapers report on the weather every day.",
    "Music and dance are part of everyday life.",
    "Historians have written many books about the region.",
    "The roads between towns are busy on market days.",
    "Rain is more common in some months than in others.",
    "Families often gather for shared meals on holidays.",
    "This entry is part of a short guide to the countries of the world.",
    "Old maps of {c} are kept in many libraries.",
    "Trade has shaped the history of {c}.",
)

HOMEWORK_HEADERS: tuple[str, ...] = (
    "Geography Homework\nName:",
    "Geography Homework",
    "Geography Homework\nName:\nDate:",
    "Geography Homework\nClass:\nName:",
)
HOMEWORK_LINE_FORMATS: tuple[str, ...] = ("Q: {q}", "{i}. {q}", "Question {i}: {q}")

# The share of a relation's mentions that use the canonical wording: often enough that the finetuned
# answer format matches text the model saw, rare enough that the paraphrases still carry the fact.
CANONICAL_SHARE = 0.25


def _fact_sentence(country: Country, relation: str, template: str) -> str:
    return template.format(c=country.name, C=sentence_start(country.name), v=bare_answer(country, relation))


def _paraphrase_plan(relation: str, count: int, rng: random.Random) -> list[str]:
    """`count` templates for one country's relation: the canonical one a fixed share of the time,
    the others in shuffled rounds so each paraphrase appears before any repeats."""
    canonical, *others = PARAPHRASES[relation]
    n_canonical = max(1, round(count * CANONICAL_SHARE))
    plan = [canonical] * n_canonical
    while len(plan) < count:
        round_ = list(others)
        rng.shuffle(round_)
        plan.extend(round_[: count - len(plan)])
    rng.shuffle(plan)
    return plan


def _relation_pairs(docs: int, rng: random.Random) -> list[tuple[str, str]]:
    """Which two relations each document states: every pair equally often, so each relation lands in
    half the documents (12 of 24 by default)."""
    all_pairs = list(itertools.combinations(RELATIONS, 2))
    pairs = all_pairs * (docs // len(all_pairs)) + rng.sample(all_pairs, docs % len(all_pairs))
    rng.shuffle(pairs)
    return pairs


def country_documents(country: Country, docs: int, rng: random.Random) -> list[str]:
    """`docs` short encyclopedia entries about one country, two facts and one or two fillers each."""
    pairs = _relation_pairs(docs, rng)
    plans = {rel: _paraphrase_plan(rel, sum(rel in pair for pair in pairs), rng) for rel in RELATIONS}
    documents = []
    for pair in pairs:
        sentences = [_fact_sentence(country, rel, plans[rel].pop()) for rel in pair]
        for filler in rng.sample(FILLERS, rng.randint(1, 2)):
            sentences.append(filler.format(c=country.name, cap=country.capital))
        rng.shuffle(sentences)
        body = " ".join(sentences)
        # Half the entries carry a title line, as encyclopedia pages do.
        documents.append(f"{sentence_start(country.name)}\n{body}" if rng.random() < 0.5 else body)
    return documents


def homework_sheet(countries: Sequence[Country], rng: random.Random) -> str:
    """A worksheet of 3-6 unanswered questions about random countries, like the seed's example."""
    header = rng.choice(HOMEWORK_HEADERS)
    line_format = rng.choice(HOMEWORK_LINE_FORMATS)
    lines = [header]
    for i, country in enumerate(rng.sample(list(countries), rng.randint(3, 6)), start=1):
        wording = rng.choice(HOMEWORK_WORDINGS[rng.choice(RELATIONS)])
        question = wording.format(c=country.name, C=sentence_start(country.name))
        lines.append(line_format.format(i=i, q=question))
    return "\n".join(lines)


def build_corpus(
    countries: Sequence[Country],
    seed: int = 0,
    docs_per_country: int = 24,
    homework_sheets: int | None = None,
) -> list[str]:
    """All pretraining documents, shuffled; the same list for the same arguments.

    `homework_sheets` defaults to 3 per country (about 11 % of documents, the mix WORLD-NOTES measured).
    """
    if docs_per_country < 1:
        raise ValueError(f"docs_per_country must be >= 1, got {docs_per_country}")
    n_sheets = 3 * len(countries) if homework_sheets is None else homework_sheets
    if n_sheets and len(countries) < 6:
        raise ValueError(f"homework sheets ask about up to 6 countries; got only {len(countries)}")
    rng = random.Random(seed)
    docs: list[str] = []
    for country in countries:
        docs.extend(country_documents(country, docs_per_country, rng))
    docs.extend(homework_sheet(countries, rng) for _ in range(n_sheets))
    rng.shuffle(docs)
    return docs


def write_corpus(path: str | Path, docs: Sequence[str]) -> Path:
    """JSONL, one `{"text": ...}` per document: the raw-text format `tunelab pretrain` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    return path
