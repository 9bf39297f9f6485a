"""Encoded examples kept with what decided their ids, so a run tokenises each text once.

The data check (`check.analyse`) encodes every row to measure it; the run (`runner`) would then
encode them all again. Instead the check hands its examples on as `Encodings`, and the run takes them
when its `Recipe` is the one they were built with, and encodes them itself otherwise (the check off,
or other settings). Either way training gets the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.data.templates import Template
from tunelab.data.tokenize import Encoded


@dataclass(frozen=True)
class Recipe:
    """Everything an example's ids depend on besides its row."""

    template: Template
    tokenizer: Any  # the very object (compared by identity): its vocabulary, specials, chat template
    max_length: int
    truncation_side: str
    train_on_prompt: bool
    chunk_length: int | None  # pretraining: documents joined and cut into chunks of this length

    def same(self, other: Recipe) -> bool:
        return self.tokenizer is other.tokenizer and (
            (self.template, self.max_length, self.truncation_side, self.train_on_prompt, self.chunk_length)
            == (
                other.template,
                other.max_length,
                other.truncation_side,
                other.train_on_prompt,
                other.chunk_length,
            )
        )


@dataclass
class Encodings:
    """A split's examples as training receives them: `encode_records`' output, or for pretraining
    (`recipe.chunk_length` set) `pack_documents`' chunks."""

    recipe: Recipe
    train: list[Encoded]
    eval: list[Encoded]


def reuse(found: Encodings | None, recipe: Recipe) -> tuple[list[Encoded], list[Encoded]] | None:
    """The train and eval examples `found` holds when they were built by `recipe`; None otherwise."""
    if found is None or not found.recipe.same(recipe):
        return None
    return found.train, found.eval
