"""Error analysis: what is wrong with a generation, by category, as the course's labs read outputs.

Each check is a plain rule over the text, so a user can see why an example landed in a category.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from tunelab.evaluate.metrics import _CJK, normalize

CATEGORIES = ("empty", "did_not_stop", "repetitive", "too_long", "copies_prompt", "wrong_format")
DESCRIPTIONS = {
    "empty": "nothing but whitespace",
    "did_not_stop": "hit max_new_tokens before any stop token",
    "repetitive": "an n-gram loop (a word n-gram three times back to back, or a sentence said twice)",
    "too_long": "longer than twice the reference plus slack",
    "copies_prompt": "repeats the question",
    "wrong_format": "does not match the reference's shape (or --format-regex)",
}
_SENTENCE_END = (".", "!", "?", "。", "！", "？")


@dataclass(frozen=True)
class ErrorRules:
    too_long_factor: float = 2.0
    too_long_slack: int = 10  # words: short references would flag any slightly chatty answer otherwise
    repeat_times: int = 3
    max_ngram: int = 8
    format_regex: str | None = None  # when given, the stripped prediction must fully match it


def _words(text: str) -> list[str]:
    return text.split()


def is_repetitive(text: str, times: int = 3, max_ngram: int = 8) -> bool:
    """An n-gram (n <= max_ngram words, or characters for text without spaces) repeated back to back
    `times` times, or a sentence of 3+ words said twice."""
    words = _words(text)
    # Text without spaces (Chinese, or one long token) is read as characters; a run must then cover
    # 12+ characters, so "1000" or "Mississippi" are not loops.
    units, min_span = (words, 1) if len(words) > 1 else (list(text.strip()), 12)
    for n in range(1, max_ngram * (1 if min_span == 1 else 2) + 1):
        for start in range(0, len(units) - n * times + 1):
            gram = units[start : start + n]
            if n * times >= min_span and all(
                units[start + k * n : start + (k + 1) * n] == gram for k in range(1, times)
            ):
                return True
    sentences = [normalize(s) for s in re.split(r"(?<=[.!?。！？])\s+|\n+", text)]
    sentences = [s for s in sentences if len(s.split()) >= 3]
    return len(sentences) != len(set(sentences))


def _length(text: str) -> int:
    """Words between spaces; each Han or kana character is one (those scripts write no spaces, so a
    whole Chinese paragraph was one word), as ROUGE-L counts them."""
    return len(_CJK.sub(r" \g<0> ", text).split())


def is_too_long(prediction: str, reference: str, rules: ErrorRules) -> bool:
    return _length(prediction) > rules.too_long_factor * _length(reference) + rules.too_long_slack


def _word_split(text: str) -> str:
    """Normalised, each Han or kana character a word of its own (as `_length` counts them): Chinese
    and Japanese write no spaces, so a whole question was one word, under copies_prompt's 3."""
    return normalize(_CJK.sub(r" \g<0> ", text))


def copies_prompt(prediction: str, prompt: str, reference: str = "") -> bool:
    """The (normalised) question appears in the prediction, and not because the reference answer
    itself restates it ("Main language of Belgium?" / "The main language of Belgium is Dutch.");
    questions under 3 words are too short to tell."""
    q = _word_split(prompt)
    if len(q.split()) < 3 or f" {q} " in f" {_word_split(reference)} ":
        return False
    return f" {q} " in f" {_word_split(prediction)} "


def wrong_format(prediction: str, reference: str, regex: str | None = None) -> bool:
    pred, ref = prediction.strip(), reference.strip()
    if regex is not None:
        return re.fullmatch(regex, pred, flags=re.DOTALL) is None
    if ref[:1] in "{[":
        try:
            json.loads(ref)
        except ValueError:
            pass
        else:  # a JSON reference wants a JSON prediction
            try:
                json.loads(pred)
            except ValueError:
                return True
            return False
    if ref.endswith(_SENTENCE_END) and len(_words(ref)) >= 3:
        return not pred.endswith(_SENTENCE_END)
    return False


def analyse(
    prediction: str, reference: str, prompt: str, finish_reason: str, rules: ErrorRules | None = None
) -> list[str]:
    """The categories this generation falls in (none = no problem found)."""
    rules = rules or ErrorRules()
    if not prediction.strip():
        return ["empty"] + (["did_not_stop"] if finish_reason == "length" else [])
    found = []
    if finish_reason == "length":
        found.append("did_not_stop")
    if is_repetitive(prediction, rules.repeat_times, rules.max_ngram):
        found.append("repetitive")
    if is_too_long(prediction, reference, rules):
        found.append("too_long")
    if copies_prompt(prediction, prompt, reference):
        found.append("copies_prompt")
    if wrong_format(prediction, reference, rules.format_regex):
        found.append("wrong_format")
    return found


@dataclass
class ErrorExample:
    index: int
    question: str
    prediction: str
    reference: str


@dataclass
class ErrorSummary:
    total: int
    flagged: int = 0  # generations in at least one category
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[ErrorExample]] = field(default_factory=dict)

    @property
    def clean(self) -> int:
        return self.total - self.flagged

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "flagged": self.flagged,
            "counts": self.counts,
            "examples": {k: [vars(e) for e in v] for k, v in self.examples.items()},
        }


def summarise(
    errors: list[list[str]],
    prompts: list[str],
    predictions: list[str],
    references: list[str],
    max_examples: int = 3,
) -> ErrorSummary:
    """Counts per category, and the first `max_examples` of each to read."""
    summary = ErrorSummary(total=len(errors), counts={c: 0 for c in CATEGORIES})
    for i, cats in enumerate(errors):
        summary.flagged += bool(cats)
        for c in cats:
            summary.counts[c] += 1
            shown = summary.examples.setdefault(c, [])
            if len(shown) < max_examples:
                shown.append(ErrorExample(i, prompts[i], predictions[i], references[i]))
    return summary
