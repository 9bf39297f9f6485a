"""The world data package: facts table, pretraining corpus, finetuning/eval sets, tokenizer."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tunelab.world.corpus import PARAPHRASES, build_corpus, write_corpus
from tunelab.world.facts import (
    CONTINENTS,
    RELATIONS,
    Country,
    answer_sentence,
    bare_answer,
    load_facts,
    parse_facts,
    sentence_start,
)
from tunelab.world.qa import (
    OFFTOPIC_HELDOUT,
    OFFTOPIC_TRAIN,
    REDIRECT,
    TRAIN_WORDINGS,
    UNSEEN_WORDINGS,
    build_finetune_pairs,
    build_heldout,
    question,
    split_countries,
    write_jsonl,
)
from tunelab.world.tokenizer import train_tokenizer

HEADER = "country,capital,continent,currency,language\n"


@pytest.fixture(scope="module")
def countries() -> list[Country]:
    return load_facts()


@pytest.fixture(scope="module")
def corpus(countries: list[Country]) -> list[str]:
    return build_corpus(countries, seed=0)


@pytest.fixture(scope="module")
def split(countries: list[Country]) -> tuple[list[Country], list[Country]]:
    return split_countries(countries, seed=0)


@pytest.fixture(scope="module")
def pairs(split: tuple[list[Country], list[Country]]) -> list[dict[str, str]]:
    return build_finetune_pairs(split[0], seed=0)


def _bare_name(country: Country) -> str:
    return country.name.removeprefix("the ")


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", text) is not None


def _sentences(doc: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.?!])\s+|\n", doc) if s]


def _render(template: str, country: Country, relation: str) -> str:
    return template.format(c=country.name, C=sentence_start(country.name), v=bare_answer(country, relation))


# --- facts ---------------------------------------------------------------------------------------


def test_table_shape(countries: list[Country]) -> None:
    assert len(countries) >= 160
    assert len({c.name for c in countries}) == len(countries)
    assert len({c.capital for c in countries}) == len(countries)
    for c in countries:
        assert c.continent in CONTINENTS
        assert all(getattr(c, field).strip() for field in ("name", "capital", "currency", "language"))
    assert {c.continent for c in countries} == CONTINENTS


@pytest.mark.parametrize(
    ("name", "capital", "continent", "currency", "language"),
    [
        ("France", "Paris", "Europe", "euro", "French"),
        ("Japan", "Tokyo", "Asia", "Japanese yen", "Japanese"),
        ("Brazil", "Brasilia", "South America", "Brazilian real", "Portuguese"),
        ("Kenya", "Nairobi", "Africa", "Kenyan shilling", "Swahili"),
        ("Australia", "Canberra", "Oceania", "Australian dollar", "English"),
        ("Mexico", "Mexico City", "North America", "Mexican peso", "Spanish"),
        ("Russia", "Moscow", "Europe", "Russian ruble", "Russian"),
        ("Turkey", "Ankara", "Asia", "Turkish lira", "Turkish"),
        ("Egypt", "Cairo", "Africa", "Egyptian pound", "Arabic"),
        ("Bolivia", "Sucre", "South America", "Bolivian boliviano", "Spanish"),
        ("Cote d'Ivoire", "Yamoussoukro", "Africa", "West African CFA franc", "French"),
    ],
)
def test_spot_checked_facts(
    countries: list[Country], name: str, capital: str, continent: str, currency: str, language: str
) -> None:
    assert Country(name, capital, continent, currency, language) in countries


def test_no_country_name_inside_another(countries: list[Country]) -> None:
    # "Sudan" inside "South Sudan" would make held-out leakage checks and exact match ambiguous.
    names = [_bare_name(c) for c in countries]
    clashes = [(a, b) for a in names for b in names if a != b and _mentions(b, a)]
    assert clashes == []


def test_bad_rows_are_named() -> None:
    with pytest.raises(ValueError, match="line 3"):
        parse_facts(HEADER + "France,Paris,Europe,euro,French\nSpain,Madrid,Europa,euro,Spanish\n")
    with pytest.raises(ValueError, match="line 2.*empty"):
        parse_facts(HEADER + "France,,Europe,euro,French\n")
    with pytest.raises(ValueError, match="line 2.*expected 5"):
        parse_facts(HEADER + "France,Paris,Europe,euro\n")
    with pytest.raises(ValueError, match="line 3.*duplicate capital"):
        parse_facts(HEADER + "France,Paris,Europe,euro,French\nGaul,Paris,Europe,euro,French\n")
    with pytest.raises(ValueError, match="header"):
        parse_facts("name,capital\nFrance,Paris\n")


def test_answer_forms(countries: list[Country]) -> None:
    by_name = {c.name: c for c in countries}
    mexico, netherlands = by_name["Mexico"], by_name["the Netherlands"]
    assert [answer_sentence(mexico, r) for r in RELATIONS] == [
        "The capital of Mexico is Mexico City.",
        "The continent of Mexico is North America.",
        "The currency of Mexico is the Mexican peso.",
        "The main language of Mexico is Spanish.",
    ]
    assert [bare_answer(mexico, r) for r in RELATIONS] == [
        "Mexico City",
        "North America",
        "Mexican peso",
        "Spanish",
    ]
    # Names carry their article so sentences stay grammatical.
    assert answer_sentence(netherlands, "capital") == "The capital of the Netherlands is Amsterdam."
    assert answer_sentence(netherlands, "continent") == "The continent of the Netherlands is Europe."
    with pytest.raises(ValueError):
        bare_answer(mexico, "population")


# --- corpus ----------------------------------------------------------------------------------------


def test_answer_sentence_is_a_paraphrase(countries: list[Country]) -> None:
    assert len(PARAPHRASES["capital"]) >= 8
    assert all(len(PARAPHRASES[r]) >= 6 for r in RELATIONS)
    for c in countries:
        for r in RELATIONS:
            assert answer_sentence(c, r) in {_render(p, c, r) for p in PARAPHRASES[r]}
            if r != "continent":  # continent answers use another paraphrase (see facts.py)
                assert _render(PARAPHRASES[r][0], c, r) == answer_sentence(c, r)


def test_shipped_files_are_what_the_builders_write(countries: list[Country], corpus: list[str]) -> None:
    """The shipped corpus is the one the base model was pretrained on, and the Q/A files are current."""
    import json

    from tunelab.world.build import data_dir

    def read(name: str) -> list[dict]:
        return [json.loads(line) for line in (data_dir() / name).read_text().splitlines()]

    assert [d["text"] for d in read("corpus.jsonl")] == corpus
    train, heldout = split_countries(countries, seed=0)
    assert read("qa-train.jsonl") == build_finetune_pairs(train, seed=0)
    assert read("qa-train-bare.jsonl") == build_finetune_pairs(train, seed=0, answer_style="bare")
    assert read("heldout.jsonl") == build_heldout(heldout, seed=0)


def test_corpus_is_seeded(countries: list[Country], corpus: list[str]) -> None:
    assert build_corpus(countries, seed=0) == corpus
    assert build_corpus(countries, seed=1) != corpus


def test_corpus_size(countries: list[Country], corpus: list[str]) -> None:
    homework = [d for d in corpus if d.startswith("Geography Homework")]
    assert len(homework) == 3 * len(countries)
    assert len(corpus) == 24 * len(countries) + len(homework)
    # ~830 kB is ~170k tokens at vocab 4096; WORLD-NOTES pretrained on ~115k.
    assert 500_000 < sum(len(d) for d in corpus) < 1_000_000


def test_every_fact_is_stated_often_and_canonically(countries: list[Country], corpus: list[str]) -> None:
    doc_sentences = [set(_sentences(d)) for d in corpus]
    for c in countries:
        for r in RELATIONS:
            forms = {_render(p, c, r) for p in PARAPHRASES[r]}
            n_docs = sum(bool(forms & sentences) for sentences in doc_sentences)
            assert n_docs >= 8, (c.name, r, n_docs)
            assert any(answer_sentence(c, r) in sentences for sentences in doc_sentences), (c.name, r)


def test_homework_sheets_hold_only_unanswered_questions(corpus: list[str]) -> None:
    sheets = [d for d in corpus if d.startswith("Geography Homework")]
    for sheet in sheets:
        lines = sheet.splitlines()
        assert 3 <= sum(line.endswith("?") for line in lines) <= 6
        assert all(line.endswith(("?", ":", "Homework")) for line in lines)


def test_write_corpus(tmp_path: Path) -> None:
    docs = ["one\ntwo", 'with "quotes"']
    path = write_corpus(tmp_path / "sub" / "corpus.jsonl", docs)
    assert [json.loads(line)["text"] for line in path.read_text().splitlines()] == docs


# --- finetuning and held-out sets --------------------------------------------------------------------


def test_split(countries: list[Country], split: tuple[list[Country], list[Country]]) -> None:
    train, heldout = split
    assert {c.name for c in train}.isdisjoint(c.name for c in heldout)
    assert len(train) + len(heldout) == len(countries)
    assert 0.65 < len(train) / len(countries) < 0.75
    assert {c.continent for c in heldout} == CONTINENTS
    assert split_countries(countries, seed=0) == split
    assert split_countries(countries, seed=1) != split


def test_finetune_pairs(split: tuple[list[Country], list[Country]], pairs: list[dict[str, str]]) -> None:
    train, _ = split
    assert 900 <= len(pairs) <= 1200
    assert all(set(p) == {"question", "answer"} for p in pairs)
    assert len({p["question"] for p in pairs}) == len(pairs)
    assert build_finetune_pairs(train, seed=0) == pairs
    assert build_finetune_pairs(train, seed=1) != pairs
    answers = {p["answer"] for p in pairs}
    assert all(answer_sentence(c, r) in answers for c in train for r in RELATIONS)
    offtopic = [p for p in pairs if p["answer"] == REDIRECT]
    assert 30 <= len(offtopic) <= 70
    assert {p["question"] for p in offtopic} <= set(OFFTOPIC_TRAIN)


def test_bare_pairs_differ_only_in_answers(
    split: tuple[list[Country], list[Country]], pairs: list[dict[str, str]]
) -> None:
    bare = build_finetune_pairs(split[0], seed=0, answer_style="bare")
    assert [p["question"] for p in bare] == [p["question"] for p in pairs]
    expected = {bare_answer(c, r) for c in split[0] for r in RELATIONS} | {REDIRECT}
    assert {p["answer"] for p in bare} == expected
    with pytest.raises(ValueError):
        build_finetune_pairs(split[0], answer_style="short")  # type: ignore[arg-type]


def test_no_heldout_country_in_finetune_pairs(
    split: tuple[list[Country], list[Country]], pairs: list[dict[str, str]]
) -> None:
    train, heldout = split
    # Fact values of train countries may legitimately contain a held-out name
    # ("Ecuador ... the United States dollar"); strip them before looking.
    values = sorted({bare_answer(c, r) for c in train for r in RELATIONS}, key=len, reverse=True)
    for p in pairs:
        answer = p["answer"]
        for value in values:
            answer = answer.replace(value, "")
        for c in heldout:
            assert not _mentions(p["question"], _bare_name(c)), (c.name, p)
            assert not _mentions(answer, _bare_name(c)), (c.name, p)


def test_unseen_wordings_are_unseen(
    countries: list[Country], corpus: list[str], pairs: list[dict[str, str]]
) -> None:
    for r in RELATIONS:
        assert set(TRAIN_WORDINGS[r]).isdisjoint(UNSEEN_WORDINGS[r])
        assert len(UNSEEN_WORDINGS[r]) >= 2
    unseen = {question(c, w) for c in countries for ws in UNSEEN_WORDINGS.values() for w in ws}
    assert unseen.isdisjoint(p["question"] for p in pairs)
    # Not in pretraining either: not even the wording's stem ("Tell me the capital of").
    text = "\n".join(corpus)
    stems = {w.split("{")[0] for ws in UNSEEN_WORDINGS.values() for w in ws}
    assert [s for s in stems if s in text] == []


def test_offtopic_questions(countries: list[Country]) -> None:
    assert len(OFFTOPIC_TRAIN) + len(OFFTOPIC_HELDOUT) >= 30
    assert set(OFFTOPIC_TRAIN).isdisjoint(OFFTOPIC_HELDOUT)
    assert len(set(OFFTOPIC_TRAIN)) == len(OFFTOPIC_TRAIN)
    assert len(set(OFFTOPIC_HELDOUT)) == len(OFFTOPIC_HELDOUT)
    names = [_bare_name(c) for c in countries]
    for q in OFFTOPIC_TRAIN + OFFTOPIC_HELDOUT:
        assert not any(_mentions(q, n) for n in names), q
        assert not any(word in q.lower() for word in RELATIONS), q


def test_heldout_rows(split: tuple[list[Country], list[Country]]) -> None:
    _, heldout = split
    rows = build_heldout(heldout, seed=0)
    assert rows == build_heldout(heldout, seed=0)
    assert rows != build_heldout(heldout, seed=1)
    geo = [r for r in rows if r["relation"] != "offtopic"]
    assert Counter((r["country"], r["relation"], r["wording"]) for r in geo) == Counter(
        {(c.name, rel, w): 1 for c in heldout for rel in RELATIONS for w in ("train", "unseen")}
    )
    by_name = {c.name: c for c in heldout}
    for r in geo:
        c = by_name[r["country"]]
        assert r["answer"] == answer_sentence(c, r["relation"])
        assert r["bare"] == bare_answer(c, r["relation"])
        wordings = TRAIN_WORDINGS if r["wording"] == "train" else UNSEEN_WORDINGS
        assert r["question"] in {question(c, w) for w in wordings[r["relation"]]}
    offtopic = [r for r in rows if r["relation"] == "offtopic"]
    assert [r["question"] for r in offtopic] == list(OFFTOPIC_HELDOUT)
    assert all(r["answer"] == REDIRECT and r["country"] is None for r in offtopic)


def test_write_jsonl(tmp_path: Path) -> None:
    rows = [{"question": "Q?", "answer": "A.", "country": None}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows


# --- tokenizer -------------------------------------------------------------------------------------


def test_tokenizer_round_trips_and_loads(
    corpus: list[str], pairs: list[dict[str, str]], tmp_path: Path
) -> None:
    extra = [f"### Question:\n{p['question']}\n\n### Answer:\n{p['answer']}" for p in pairs]
    tok = train_tokenizer(corpus, vocab_size=4096, extra_texts=extra)
    assert 1000 < len(tok) <= 4096
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.model_max_length == 1024
    # The template's markers should be a handful of tokens, not spelt out byte by byte.
    assert len(tok("### Question:\n")["input_ids"]) <= 5
    samples = [
        corpus[0],
        "The capital of Mexico is Mexico City.",
        "  leading spaces, tabs\tand\nnew lines;  odd #$%^&* symbols ~`|",
        "Words the corpus never saw: xylophone quizzically zephyr.",
    ]
    for text in samples:
        assert tok.decode(tok(text)["input_ids"]) == text
    tok.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for text in samples:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"]) == text
    assert (loaded.eos_token, loaded.pad_token, loaded.model_max_length) == ("<|endoftext|>", "<|pad|>", 1024)
