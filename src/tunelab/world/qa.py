"""Finetuning pairs and held-out evaluation questions for the world demo.

Finetuning sees some countries (with TRAIN wordings); evaluation asks about the other countries, whose
facts the model met only as prose in pretraining, with both TRAIN and UNSEEN wordings. Off-topic
questions teach the course's moderation behaviour: answer with `REDIRECT`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from tunelab.world.facts import RELATIONS, Country, answer_sentence, bare_answer, sentence_start

AnswerStyle = Literal["sentence", "bare"]

REDIRECT = "Let's keep the discussion relevant to geography."

# Fields: {c} the country as in running text, {C} the same at a sentence start.
TRAIN_WORDINGS: dict[str, tuple[str, ...]] = {
    "capital": (
        "What is the capital of {c}?",
        "What is the capital city of {c}?",
        "Which city is the capital of {c}?",
        "What's the capital of {c}?",
        "Do you know the capital of {c}?",
        "Capital of {c}?",
        "I need the capital of {c}.",
        "Please give the capital of {c}.",
        "Give me the capital of {c}.",
        "State the capital of {c}.",
    ),
    "continent": (
        "Which continent is {c} in?",
        "On which continent is {c}?",
        "What continent is {c} located in?",
        "What's the continent of {c}?",
        "Do you know which continent {c} is on?",
        "Continent of {c}?",
        "I need the continent of {c}.",
        "Please give the continent of {c}.",
        "Give me the continent of {c}.",
        "State the continent of {c}.",
    ),
    "currency": (
        "What is the currency of {c}?",
        "Which currency is used in {c}?",
        "What's the currency of {c}?",
        "Do you know the currency of {c}?",
        "Currency of {c}?",
        "I need the currency of {c}.",
        "Please give the currency of {c}.",
        "Give me the currency of {c}.",
        "State the currency of {c}.",
    ),
    "language": (
        "What is the main language of {c}?",
        "Which language is mainly spoken in {c}?",
        "What's the main language of {c}?",
        "Do you know the main language of {c}?",
        "Main language of {c}?",
        "I need the main language of {c}.",
        "Please give the main language of {c}.",
        "Give me the main language of {c}.",
        "State the main language of {c}.",
    ),
}
# Many wordings, imperative ones too: with 2-3 wordings per relation the finetuned model answered
# unseen wordings far worse than seen ones; "Name the capital of X." even triggered the homework
# header ("Name:\nDate:") learned in pretraining. Measured with `tunelab demo`, 2026-11-25.

# Only for evaluation: never in finetuning pairs nor in the pretraining corpus (tests pin both), so a
# correct answer shows the behaviour transferred, not a memorised question form.
UNSEEN_WORDINGS: dict[str, tuple[str, ...]] = {
    "capital": (
        "Name the capital of {c}.",
        "Tell me the capital of {c}.",
        "Can you tell me the capital of {c}?",
    ),
    "continent": (
        "In which continent is {c}?",
        "Tell me which continent {c} is in.",
        "Name the continent that {c} is in.",
    ),
    "currency": (
        "What money is used in {c}?",
        "Tell me the currency of {c}.",
        "Name the currency of {c}.",
    ),
    "language": (
        "Tell me the main language of {c}.",
        "Name the main language of {c}.",
        "What language is mainly spoken in {c}?",
    ),
}

# Homework sheets in the corpus ask with these wordings (the first finetuning wordings plus the seed's
# "What's ..." form). Frozen here so the finetuning wordings can grow without changing the corpus the
# shipped base model was pretrained on.
HOMEWORK_WORDINGS: dict[str, tuple[str, ...]] = {
    "capital": (
        "What is the capital of {c}?",
        "What is the capital city of {c}?",
        "Which city is the capital of {c}?",
        "What's the capital of {c}?",
    ),
    "continent": (
        "Which continent is {c} in?",
        "On which continent is {c}?",
        "What continent is {c} located in?",
        "What's the continent of {c}?",
    ),
    "currency": (
        "What is the currency of {c}?",
        "Which currency is used in {c}?",
        "What's the currency of {c}?",
    ),
    "language": (
        "What is the main language of {c}?",
        "Which language is mainly spoken in {c}?",
        "What's the main language of {c}?",
    ),
}

# Fixed halves rather than a seeded split, so "held-out off-topic" means the same questions in every run.
# None names a country or uses the relation words, so they cannot leak facts or be mistaken for geography.
OFFTOPIC_TRAIN: tuple[str, ...] = (
    "What is your favourite movie?",
    "How do I bake bread?",
    "Who won the football match?",
    "Can you recommend a good book?",
    "What should I cook for dinner tonight?",
    "How do I fix a flat bicycle tyre?",
    "What is the best way to learn to swim?",
    "Can you write me a poem about the sea?",
    "How many hours should I sleep each night?",
    "What is a good name for a puppy?",
    "How do I change a light bulb?",
    "Who is the best basketball player ever?",
    "What time does the cinema open?",
    "How do I make a cup of tea?",
    "Can you tell me a joke?",
    "What games do you like to play?",
    "How do I reset my password?",
    "What is the best pizza topping?",
    "How can I get better at chess?",
    "What is your favourite colour?",
    "How do I grow tomatoes in a pot?",
    "Which phone should I buy?",
    "How do I tie a tie?",
    "What is the meaning of life?",
    "Can you help me with my maths homework?",
    "How do I stop my cat from scratching the sofa?",
    "What song is stuck in your head?",
    "How long should I boil an egg?",
    "Who will win the next election?",
    "How do I start running?",
    "What is the plot of your favourite film?",
    "How can I fall asleep faster?",
    "Do you like cats or dogs more?",
    "How do I clean a frying pan?",
    "What is a good birthday present for my sister?",
    "How do I write a cover letter?",
    "What is the score of the tennis final?",
    "How do I make pancakes?",
    "Can you recommend a television series?",
    "How do I paint a bedroom wall?",
    "What should I wear to a wedding?",
    "How do I learn to play the guitar?",
    "Why is my computer so slow?",
    "What is the best ice cream flavour?",
    "How do I train for a marathon?",
    "Tell me a story about a dragon.",
    "How do I make my plants grow faster?",
    "What is your favourite holiday?",
    "How do I bake a chocolate cake?",
    "Which team will win the cup this year?",
)
OFFTOPIC_HELDOUT: tuple[str, ...] = (
    "What is your favourite book?",
    "How do I make soup?",
    "Who scored the winning goal last night?",
    "Can you recommend a good video game?",
    "How do I fix a leaking tap?",
    "What is the best way to learn to draw?",
    "Can you write me a song about the rain?",
    "How do I wash a wool jumper?",
    "What is a good name for a goldfish?",
    "How do I sharpen a kitchen knife?",
    "Who is the funniest comedian?",
    "How do I make a cup of coffee?",
    "Can you tell me a riddle?",
    "What is the best sandwich?",
    "How do I update my laptop?",
    "How can I get better at painting?",
    "What is your favourite animal?",
    "How do I plant a tree?",
    "Which headphones are the best?",
    "How do I fold a paper plane?",
    "What do you think about superheroes?",
    "How can I stop procrastinating?",
    "How do I teach my dog to sit?",
    "What is the best breakfast?",
    "How do I make a smoothie?",
    "Who won the race on Sunday?",
    "How do I knit a scarf?",
    "What film should I watch tonight?",
    "How do I remove a stain from a shirt?",
    "What is the best board game?",
    "How do I stay motivated at the gym?",
    "Can you help me plan a party?",
    "What is your favourite song?",
    "How do I roast vegetables?",
    "Why do cats purr?",
    "How do I build a birdhouse?",
    "What is the best way to study for an exam?",
    "How do I cook rice?",
    "Who is the best football player?",
    "How do I set up a fish tank?",
    "What present should I buy for my friend?",
    "How do I learn to juggle?",
    "Why does my phone battery run out so fast?",
    "What is the tastiest fruit?",
    "How do I write a short story?",
    "Tell me a fairy tale about a princess.",
    "How do I keep my room tidy?",
    "What is your favourite sport?",
    "How do I make lemonade?",
    "Who will win the basketball game tonight?",
)


def question(country: Country, wording: str) -> str:
    return wording.format(c=country.name, C=sentence_start(country.name))


def answer(country: Country, relation: str, answer_style: AnswerStyle) -> str:
    if answer_style == "sentence":
        return answer_sentence(country, relation)
    if answer_style == "bare":
        return bare_answer(country, relation)
    raise ValueError(f"answer_style must be 'sentence' or 'bare', got {answer_style!r}")


def split_countries(
    countries: Sequence[Country], seed: int = 0, train_fraction: float = 0.7
) -> tuple[list[Country], list[Country]]:
    """Seeded split, stratified by continent so every continent has held-out countries.

    Both lists keep the table's order.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    rng = random.Random(seed)
    train_names: set[str] = set()
    for continent in sorted({c.continent for c in countries}):
        names = [c.name for c in countries if c.continent == continent]
        rng.shuffle(names)
        train_names.update(names[: round(len(names) * train_fraction)])
    train = [c for c in countries if c.name in train_names]
    heldout = [c for c in countries if c.name not in train_names]
    return train, heldout


def build_finetune_pairs(
    train_countries: Sequence[Country],
    seed: int = 0,
    answer_style: AnswerStyle = "sentence",
    offtopic_fraction: float = 0.05,
    n_pairs: int = 1000,
) -> list[dict[str, str]]:
    """About `n_pairs` `{"question", "answer"}` rows, shuffled.

    Every (country, relation) appears at least once; the rest is sampled without repeats from all
    train wordings. The questions do not depend on `answer_style`, so the sentence and bare datasets
    differ only in their answers (the demo's side-by-side comparison).
    """
    if answer_style not in ("sentence", "bare"):
        raise ValueError(f"answer_style must be 'sentence' or 'bare', got {answer_style!r}")
    rng = random.Random(seed)
    n_offtopic = min(len(OFFTOPIC_TRAIN), round(n_pairs * offtopic_fraction))
    chosen: list[tuple[Country, str, str]] = []
    rest: list[tuple[Country, str, str]] = []
    for country in train_countries:
        for relation in RELATIONS:
            first, *others = rng.sample(TRAIN_WORDINGS[relation], len(TRAIN_WORDINGS[relation]))
            chosen.append((country, relation, first))
            rest.extend((country, relation, wording) for wording in others)
    n_extra = min(len(rest), max(0, n_pairs - n_offtopic - len(chosen)))
    chosen += rng.sample(rest, n_extra)
    pairs = [
        {"question": question(country, wording), "answer": answer(country, relation, answer_style)}
        for country, relation, wording in chosen
    ]
    pairs += [{"question": q, "answer": REDIRECT} for q in rng.sample(OFFTOPIC_TRAIN, n_offtopic)]
    rng.shuffle(pairs)
    return pairs


def build_heldout(heldout_countries: Sequence[Country], seed: int = 0) -> list[dict[str, str | None]]:
    """Evaluation rows: each held-out country x relation asked once with a train wording and once with
    an unseen one, then the held-out off-topic questions (relation "offtopic", country None)."""
    rng = random.Random(seed)
    rows: list[dict[str, str | None]] = []
    for country in heldout_countries:
        for relation in RELATIONS:
            for kind, wordings in (("train", TRAIN_WORDINGS), ("unseen", UNSEEN_WORDINGS)):
                rows.append(
                    {
                        "question": question(country, rng.choice(wordings[relation])),
                        "answer": answer_sentence(country, relation),
                        "bare": bare_answer(country, relation),
                        "relation": relation,
                        "country": country.name,
                        "wording": kind,
                    }
                )
    for q in OFFTOPIC_HELDOUT:
        rows.append(
            {
                "question": q,
                "answer": REDIRECT,
                "bare": REDIRECT,
                "relation": "offtopic",
                "country": None,
                "wording": "unseen",
            }
        )
    return rows


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
