"""The data check's report: plain dataclasses, written out as JSON or Markdown.

`tunelab.data.check` fills it; this module only holds and renders it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Literal

# Leakage above this fraction of eval rows blocks: one stray overlap in a few hundred hand-collected
# rows is common and worth a warning, a percent of the eval set visibly inflates eval scores.
DEFAULT_MAX_LEAKAGE = 0.01  # the default of data.max_leakage
# The per-split counts shown as table rows (terminal and Markdown).
STAT_ROWS = ("rows", "truncated", "completion_tokens_lost", "zero_trainable", "exact_duplicates",
             "near_duplicates", "tokens", "trainable_tokens")  # fmt: skip


@dataclass
class Quantiles:
    """Nearest-rank quantiles: p50 of [1, 2, 3, 4] is 2, an observed value, never an interpolation."""

    p50: int
    p90: int
    p99: int
    max: int


@dataclass
class SplitStats:
    rows: int = 0
    # Lengths before truncation, so they say what max_length would fit.
    prompt_tokens: Quantiles | None = None
    completion_tokens: Quantiles | None = None
    total_tokens: Quantiles | None = None
    truncated: int = 0
    completion_tokens_lost: int = 0
    zero_trainable: int = 0
    zero_trainable_at: list[str] = field(default_factory=list)
    empty_fields: dict[str, int] = field(default_factory=dict)
    exact_duplicates: int = 0  # rows equal to an earlier row of the split
    near_duplicates: int = 0  # further rows equal to an earlier one once normalised
    tokens: int = 0  # after truncation: what training reads
    trainable_tokens: int = 0


@dataclass
class TokenizerInfo:
    eos_token: str | None
    eos_token_id: int | None
    pad_token: str | None
    pad_token_id: int | None
    note: str


@dataclass
class EpochEstimate:
    tokens: int
    steps: int
    micro_batches: int
    batch_size: int
    micro_batch_tokens: int
    tokens_per_s: float | None
    seconds: float | None  # None: no measured speed, so no guess


@dataclass
class Example:
    source: str
    line: int
    segments: list[tuple[str, bool]]  # (text, trained)
    truncated: bool


@dataclass
class Finding:
    level: Literal["blocking", "warning"]
    code: str
    message: str


@dataclass
class Report:
    schema: str = ""
    fields: dict[str, str] = field(default_factory=dict)  # schema role -> column
    template: str = ""
    max_length: int = 0
    chunk_length: int | None = None  # pretraining: the chunk the documents are cut into (no max_length)
    files: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> train/eval/rejected
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    splits: dict[str, SplitStats] = field(default_factory=dict)
    leaked: int = 0  # eval rows whose prompt is also in train
    leaked_at: list[str] = field(default_factory=list)
    # Eval rows split off the training file equal (normalised) to a train row: a row the file repeats,
    # one copy on each side of the split (no split holds both, so neither counts it as a duplicate).
    repeated_across: int = 0
    max_leakage: float = DEFAULT_MAX_LEAKAGE
    tokenizer: TokenizerInfo | None = None
    epoch: EpochEstimate | None = None
    examples: list[Example] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "blocking"]

    def to_json(self) -> str:
        return json.dumps(
            {"blocking": bool(self.blocking), **dataclasses.asdict(self)}, indent=2, ensure_ascii=False
        )

    @property
    def length_setting(self) -> str:
        if self.chunk_length is not None:
            return (
                f"chunk_length {self.chunk_length} (pretraining: documents joined and cut, never truncated)"
            )
        return f"max_length {self.max_length}"

    def to_markdown(self) -> str:
        verdict = "**blocking problems found**" if self.blocking else "no blocking problems"
        lines = [f"# Data check: {verdict}", ""]
        lines += [f"- **{f.level}** `{f.code}`: {f.message}" for f in self.findings] or ["- no findings"]
        lines += ["", f"Schema `{self.schema}`, template `{self.template}`, {self.length_setting}."]
        lines += ["", "| role | column |", "|---|---|", *(f"| {k} | {v} |" for k, v in self.fields.items())]
        lines += ["", "| file | train | eval | rejected |", "|---|---|---|---|"]
        lines += [f"| {f} | {c['train']} | {c['eval']} | {c['rejected']} |" for f, c in self.files.items()]
        lines += ["", "| | " + " | ".join(self.splits) + " |", "|---|" + "---|" * len(self.splits)]
        for name in STAT_ROWS:
            lines.append(
                f"| {name} | " + " | ".join(str(getattr(s, name)) for s in self.splits.values()) + " |"
            )
        for part in ("prompt", "completion", "total"):
            cells = [quantile_cell(getattr(s, f"{part}_tokens")) for s in self.splits.values()]
            lines.append(f"| {part} tokens p50/p90/p99/max | " + " | ".join(cells) + " |")
        if self.tokenizer is not None:
            t = self.tokenizer
            lines += ["", f"Tokenizer: EOS {t.eos_token!r} ({t.eos_token_id}), pad {t.pad_token!r} "
                      f"({t.pad_token_id}). {t.note}."]  # fmt: skip
        if self.epoch is not None:
            lines += ["", epoch_line(self.epoch) + "."]
        lines += ["", "## Examples (trained text in [[ ]])"]
        for ex in self.examples:
            text = "".join(f"[[{t}]]" if trained else t for t, trained in ex.segments)
            fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
            lines += ["", f"{ex.source}:{ex.line}" + (" (truncated)" if ex.truncated else ""), "", fence]
            lines += [text, fence]
        return "\n".join(lines) + "\n"


def quantile_cell(q: Quantiles | None) -> str:
    return "-" if q is None else f"{q.p50}/{q.p90}/{q.p99}/{q.max}"


def epoch_line(e: EpochEstimate) -> str:
    time = (
        "unknown (no measured tokens/s)"
        if e.seconds is None
        else f"{e.seconds:,.0f} s at {e.tokens_per_s:,.0f} tokens/s"
    )
    return (
        f"One epoch: {e.tokens:,} tokens, {e.steps:,} optimizer steps of {e.batch_size} examples "
        f"({e.micro_batches:,} micro-batches of at most {e.micro_batch_tokens:,} tokens); time {time}"
    )
