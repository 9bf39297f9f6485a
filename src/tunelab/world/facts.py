"""The world's facts table: real countries with capital, continent, currency and main language.

Country names are stored the way they read in running text, with the article where English needs one
("the Netherlands"), so every sentence built from them is grammatical; `sentence_start` capitalises
that article at the start of a sentence.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources

RELATIONS: tuple[str, ...] = ("capital", "continent", "currency", "language")
CONTINENTS: frozenset[str] = frozenset(
    {"Africa", "Asia", "Europe", "North America", "South America", "Oceania"}
)
COLUMNS: tuple[str, ...] = ("country", "capital", "continent", "currency", "language")


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    continent: str
    currency: str
    language: str


def sentence_start(text: str) -> str:
    """Capitalise the first letter only ("the Netherlands ..." -> "The Netherlands ...")."""
    return text[:1].upper() + text[1:]


def _parse_row(row: list[str], line: int) -> Country:
    if len(row) != len(COLUMNS):
        raise ValueError(f"facts.csv line {line}: expected {len(COLUMNS)} fields, got {len(row)}: {row!r}")
    fields = [field.strip() for field in row]
    if any(not field for field in fields):
        raise ValueError(f"facts.csv line {line}: empty field in {row!r}")
    if not all(field.isascii() for field in fields):
        raise ValueError(f"facts.csv line {line}: non-ASCII text in {row!r}")
    country = Country(*fields)
    if country.continent not in CONTINENTS:
        raise ValueError(f"facts.csv line {line}: unknown continent {country.continent!r} in {row!r}")
    return country


def parse_facts(text: str) -> list[Country]:
    """Parse and validate the CSV text; raises ValueError naming the offending line."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header) != COLUMNS:
        raise ValueError(f"facts.csv: header must be {','.join(COLUMNS)}, got {header!r}")
    countries: list[Country] = []
    seen: dict[str, set[str]] = {"name": set(), "capital": set()}
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        country = _parse_row(row, line)
        # Duplicates would make a question ambiguous and leak held-out facts into training.
        for key in ("name", "capital"):
            value = getattr(country, key)
            if value in seen[key]:
                raise ValueError(f"facts.csv line {line}: duplicate {key} {value!r}")
            seen[key].add(value)
        countries.append(country)
    return countries


def load_facts() -> list[Country]:
    """The shipped table, in file order (grouped by continent)."""
    text = resources.files("tunelab.world").joinpath("facts.csv").read_text(encoding="utf-8")
    return parse_facts(text)


def bare_answer(country: Country, relation: str) -> str:
    """The fact alone: "Mexico City", "North America", "Mexican peso", "Spanish"."""
    if relation == "capital":
        return country.capital
    if relation == "continent":
        return country.continent
    if relation == "currency":
        return country.currency
    if relation == "language":
        return country.language
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def answer_sentence(country: Country, relation: str) -> str:
    """The answer sentence; the corpus states every fact in this form too (among its paraphrases), because
    WORLD-NOTES measured that answers phrased like the pretraining text generalise to held-out
    countries (100 %) while bare answers do not (10 %)."""
    value = bare_answer(country, relation)
    if relation == "capital":
        return f"The capital of {country.name} is {value}."
    if relation == "continent":
        # Not "Mexico is in North America.": an answer that opens with the country name makes the model
        # copy the name at the very first answer token with no cue, and it wrote a finetuning country's
        # name instead (held-out continent 6 % exact vs 93 % with this form; `tunelab demo`, 2026-11-25).
        return f"The continent of {country.name} is {value}."
    if relation == "currency":
        return f"The currency of {country.name} is the {value}."
    return f"The main language of {country.name} is {value}."
