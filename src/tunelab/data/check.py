"""The pre-flight report: what training would see, measured on the records before any weights load.

`analyse` takes the records `dataset.load_records` built (train/eval split included, so leakage is
measured on the split training will use) and returns a `Report`: lengths, truncation, masking,
empty fields, duplicates, leakage, the tokenizer's EOS/pad, and the size of an epoch. Each problem is
a `Finding`; blocking ones stop `train` (data.check=block) and make `tunelab data check` exit 1.
"""

from __future__ import annotations

import itertools
import math
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tunelab import progress
from tunelab.data import templates
from tunelab.data.check_report import (
    DEFAULT_MAX_LEAKAGE,
    EpochEstimate,
    Example,
    Finding,
    Quantiles,
    Report,
    SplitStats,
    TokenizerInfo,
)
from tunelab.data.dataset import LoadedRecords, chunk_documents
from tunelab.data.encodings import Encodings, Recipe
from tunelab.data.packing import plan_epoch
from tunelab.data.schema import COMPLETION_ROLE, SCHEMAS, Record
from tunelab.data.templates import Segment, Template
from tunelab.data.tokenize import IGNORE, Encoded, assemble, n_trainable, special_prefix, tokenize_segments
from tunelab.errors import DataError

if TYPE_CHECKING:
    from tunelab.config import RunConfig

N_EXAMPLES = 3
N_LOCATIONS = 5  # locations listed per finding; the counts are always complete
SHOW_CHARS = 2000  # longest segment text shown in rendered examples
_PUNCT = re.compile(r"[^\w\s]")


@dataclass
class Settings:
    """The training settings the report depends on (plain values; `settings_from_config` fills them)."""

    max_length: int
    truncation_side: Literal["right", "left"] = "right"
    train_on_prompt: bool = False
    batch_size: int = 16
    micro_batch_tokens: int = 8192
    seed: int = 0
    fields: dict[str, str] = field(default_factory=dict)
    max_leakage: float = DEFAULT_MAX_LEAKAGE
    tokens_per_s: float | None = None  # measured training speed; None = time per epoch unknown
    # Pretraining: documents are joined and cut into chunks of this many tokens, never truncated.
    chunk_length: int | None = None


def settings_from_config(cfg: RunConfig, tokens_per_s: float | None = None) -> Settings:
    d, t = cfg.data, cfg.train
    pretrain = cfg.task == "pretrain"
    if pretrain:
        max_length = 2**62  # documents are cut into chunks, never truncated: no length limit
    elif d.max_length is None:
        raise ValueError("data.max_length must be resolved first (runner.resolve_max_length)")
    else:
        max_length = d.max_length
    return Settings(
        max_length,
        d.truncation_side,
        d.train_on_prompt,
        t.batch_size,
        t.micro_batch_tokens,
        t.seed,
        dict(d.fields),
        max_leakage=d.max_leakage,
        tokens_per_s=tokens_per_s,
        chunk_length=d.chunk_length if pretrain else None,
    )


def recipe(template: Template, tokenizer: Any, s: Settings) -> Recipe:
    """What decides the ids of the examples the check encodes under these settings."""
    return Recipe(template, tokenizer, s.max_length, s.truncation_side, s.train_on_prompt, s.chunk_length)


def quantiles(values: list[int]) -> Quantiles | None:
    if not values:
        return None
    v = sorted(values)

    def rank(p: float) -> int:
        return v[max(0, math.ceil(p * len(v)) - 1)]

    return Quantiles(rank(0.5), rank(0.9), rank(0.99), v[-1])


def normalise(text: str) -> str:
    """Lowercase, strip punctuation, collapse whitespace: 'Paris. ' and 'paris' are near duplicates."""
    return " ".join(_PUNCT.sub("", text.lower()).split())


def _where(r: Record) -> str:
    return f"{r.source}:{r.line}"


def _key(values: dict[str, Any], norm: Callable[[str], str]) -> tuple[Any, ...]:
    """A hashable form of a record's values, each text passed through `norm`. An empty field counts
    as an absent one (Alpaca's `"input": ""` and no input render the same prompt)."""
    out: list[Any] = []
    for role in sorted(values):
        v = values[role]
        if isinstance(v, str) and not v.strip():
            continue
        if isinstance(v, list):
            out.append((role, tuple((m["role"], norm(m["content"])) for m in v)))
        else:
            out.append((role, norm(v)))
    return tuple(out)


def prompt_key(values: dict[str, Any], schema: str) -> tuple[str, ...] | None:
    """What the model is asked: leakage is an eval prompt that training already answered."""
    if schema == "messages":
        parts = [normalise(m["content"]) for m in values["messages"] if m["role"] != "assistant"]
    elif schema == "text":  # raw text (pretraining): the same document on both sides
        parts = [normalise(values["text"])]
    else:
        target = COMPLETION_ROLE.get(schema)
        parts = [normalise(values[r]) for r in sorted(values) if r != target and values[r].strip()]
    return tuple(parts) if any(parts) else None


def _empty_fields(records: list[Record], schema: str, fields: dict[str, str]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for r in records:
        for role, v in r.values.items():
            if isinstance(v, list):
                counts.update(f"{fields.get(role, role)}.{m['role']}" for m in v if not m["content"].strip())
            elif not v.strip() and not (schema == "alpaca" and role == "input"):
                counts[fields.get(role, role)] += 1  # alpaca's empty input means "no input": normal
    return dict(sorted(counts.items()))


def _duplicates(records: list[Record]) -> tuple[int, int]:
    exact = {_key(r.values, str) for r in records}
    near = {_key(r.values, normalise) for r in records}
    return len(records) - len(exact), len(exact) - len(near)


def _encode_split(
    records: list[Record], template: Template, tokenizer: Any, s: Settings, split: str = "train"
) -> tuple[SplitStats, list[Encoded]]:
    # As dataset.encode_records: chat templates write their own BOS and end-of-turn markup.
    chat = template.name == "chat"
    prefix = 0 if chat else len(special_prefix(tokenizer))
    has_eos = not chat and tokenizer.eos_token_id is not None
    stats, encoded = SplitStats(rows=len(records)), []
    prompts, completions = [], []

    def tokenise(part: list[Record]) -> list[tuple[Record, list[Segment], list[list[int]]]]:
        segment_lists = [templates.render(r, template, tokenizer) for r in part]
        ids = tokenize_segments([[seg.text for seg in segs] for segs in segment_lists], tokenizer)
        return list(zip(part, segment_lists, ids))

    # A part at a time, for the progress (each example's ids depend on it alone).
    for r, segs, pieces in progress.chunked(f"data check: tokenising {split}", records, tokenise):
        enc = assemble(
            pieces, segs, tokenizer, s.max_length, s.truncation_side, s.train_on_prompt, not chat, not chat
        )
        encoded.append(enc)
        eos = int(has_eos and bool(segs) and segs[-1].train)
        prompts.append(prefix + sum(len(p) for p, g in zip(pieces, segs) if not g.train))
        completions.append(sum(len(p) for p, g in zip(pieces, segs) if g.train) + eos)
        stats.truncated += enc.truncated
        stats.completion_tokens_lost += enc.completion_tokens_lost
        trainable = n_trainable(enc)
        stats.trainable_tokens += trainable
        stats.tokens += len(enc.input_ids)
        if trainable == 0:
            stats.zero_trainable += 1
            if len(stats.zero_trainable_at) < N_LOCATIONS:
                stats.zero_trainable_at.append(_where(r))
    stats.prompt_tokens = quantiles(prompts)
    stats.completion_tokens = quantiles(completions)
    stats.total_tokens = quantiles([p + c for p, c in zip(prompts, completions)])
    return stats, encoded


def tokenizer_info(tokenizer: Any) -> TokenizerInfo:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None:
        note = "no EOS token: the model cannot learn to stop, and generation would never end"
    elif pad is None:
        note = "no pad token: fine, training is padding-free; generation pads with EOS"
    elif pad == eos:
        note = (
            "pad == EOS: fine in tunelab, which builds labels by structure and never by comparing "
            "ids with the pad token, so the EOS the model must learn is never masked"
        )
    else:
        note = "pad and EOS are different tokens"
    return TokenizerInfo(tokenizer.eos_token, eos, tokenizer.pad_token, pad, note)


def _epoch(train: list[Encoded], s: Settings) -> EpochEstimate:
    lengths = [len(e.input_ids) for e in train]
    plan = plan_epoch(lengths, s.batch_size, s.micro_batch_tokens, s.seed, 0)
    tokens = sum(lengths)
    seconds = tokens / s.tokens_per_s if s.tokens_per_s else None
    return EpochEstimate(
        tokens,
        len(plan),
        sum(len(step) for step in plan),
        s.batch_size,
        s.micro_batch_tokens,
        s.tokens_per_s,
        seconds,
    )


def _leakage(train: list[Record], held: list[Record], schema: str) -> tuple[int, list[str]]:
    seen = {prompt_key(r.values, schema) for r in train} - {None}
    leaked = [_where(r) for r in held if prompt_key(r.values, schema) in seen]
    return len(leaked), leaked[:N_LOCATIONS]


def _repeated_across(train: list[Record], held: list[Record]) -> int:
    """Eval rows split off a training file (same source) that equal a train row once normalised."""
    sources = {r.source for r in train}
    seen = {_key(r.values, normalise) for r in train}
    return sum(r.source in sources and _key(r.values, normalise) in seen for r in held)


def _file_counts(loaded: LoadedRecords) -> dict[str, dict[str, int]]:
    files: dict[str, dict[str, int]] = {}
    for split, items in (("train", loaded.train), ("eval", loaded.eval), ("rejected", loaded.rejects)):
        for item in items:
            files.setdefault(item.source, {"train": 0, "eval": 0, "rejected": 0})[split] += 1
    return files


def reason_kind(reason: str) -> str:
    """Rejects are counted by kind: 'not valid JSON (Expecting value: column 3)' -> 'not valid JSON'."""
    return reason.split(" (")[0]


def _run_texts(tokenizer: Any, runs: list[list[int]]) -> list[str]:
    """Each run of ids as its text shows in the whole sequence decoded: a run decoded on its own would
    lose a leading space, which a SentencePiece-style decoder strips as the dummy prefix at the start
    of text (a chat's " Hello" after "[/INST]", a raw completion's " Lima"). A run is decoded on its
    own only where the decoded prefix does not extend the one before (e.g. a character cut in two)."""
    texts, done, ids = [], "", []
    for run in runs:
        ids += run
        text = tokenizer.decode(ids)
        texts.append(text[len(done) :] if text.startswith(done) else tokenizer.decode(run))
        done = text
    return texts


def _example(r: Record, enc: Encoded, tokenizer: Any) -> Example:
    """The example as training sees it: its tokens (after any cut at max_length), decoded in runs
    trained or not, from the labels themselves: the EOS the model learns to stop with shows, and
    under train_on_prompt so does the trained prompt."""
    pairs = zip(enc.input_ids, enc.labels)
    runs = [
        (trained, [token for token, _ in run])
        for trained, run in itertools.groupby(pairs, key=lambda pair: pair[1] != IGNORE)
    ]
    texts = _run_texts(tokenizer, [ids for _, ids in runs])
    segs = [Segment(text, trained) for (trained, _), text in zip(runs, texts)]
    shown = [(g.text if len(g.text) <= SHOW_CHARS else g.text[:SHOW_CHARS] + "…", g.train) for g in segs]
    return Example(r.source, r.line, shown, enc.truncated)


def analyse(loaded: LoadedRecords, template: Template, tokenizer: Any, settings: Settings) -> Report:
    """Every measurement of the report, then the findings drawn from them."""
    return analyse_encoded(loaded, template, tokenizer, settings)[0]


def analyse_encoded(
    loaded: LoadedRecords, template: Template, tokenizer: Any, settings: Settings
) -> tuple[Report, Encodings]:
    """`analyse`, and the examples it encoded on the way, as training receives them."""
    required, optional = SCHEMAS[loaded.schema]
    report = Report(
        schema=loaded.schema,
        fields={role: settings.fields.get(role, role) for role in required + optional},
        template=template.name,
        max_length=settings.max_length,
        files=_file_counts(loaded),
        rejects_by_reason=dict(Counter(reason_kind(r.reason) for r in loaded.rejects).most_common()),
        max_leakage=settings.max_leakage,
        tokenizer=tokenizer_info(tokenizer),
    )
    encoded: dict[str, list[Encoded]] = {}
    for split, records in (("train", loaded.train), ("eval", loaded.eval)):
        stats, encoded[split] = _encode_split(records, template, tokenizer, settings, split)
        with progress.timed(f"data check: duplicates in {split}"):
            stats.empty_fields = _empty_fields(records, loaded.schema, settings.fields)
            stats.exact_duplicates, stats.near_duplicates = _duplicates(records)
        report.splits[split] = stats
        if split == "train":
            for r, enc in zip(records[:N_EXAMPLES], encoded[split]):
                report.examples.append(_example(r, enc, tokenizer))
    with progress.timed("data check: leakage from train into eval"):
        report.leaked, report.leaked_at = _leakage(loaded.train, loaded.eval, loaded.schema)
        report.repeated_across = _repeated_across(loaded.train, loaded.eval)
    if settings.chunk_length is not None:  # pretraining trains on chunks of the joined documents
        # Each text encoded above (template none: one trained segment, never truncated) is framed as
        # pack_documents frames a document (prefix, text, EOS): chunked, not tokenised again.
        with progress.timed("data check: chunking"):
            encoded = {
                split: chunk_documents((e.input_ids for e in docs), settings.chunk_length)
                for split, docs in encoded.items()
            }
        report.chunk_length = settings.chunk_length
    report.epoch = _epoch(encoded["train"], settings)
    report.findings = findings(report)
    if template.name == "chat" and templates.turn_end(tokenizer) is None:
        report.findings.append(
            Finding(
                "warning",
                "no_turn_end",
                "the tokenizer's chat template ends an assistant turn with no special token (plain text "
                "such as a newline), and chat training adds no EOS: the model never learns to stop, and "
                "generation runs on to max_new_tokens. Use a chat template that writes an end-of-turn "
                "token after each assistant message (e.g. {{ eos_token }}), or data.template qa / custom, "
                "which train EOS after the answer",
            )
        )
    return report, Encodings(recipe(template, tokenizer, settings), encoded["train"], encoded["eval"])


def _pct(n: int, of: int) -> str:
    return f"{n} of {of} ({100 * n / of:.1f}%)" if of else str(n)


def _at(locations: list[str], total: int) -> str:
    more = f" and {total - len(locations)} more" if total > len(locations) else ""
    return f" at {', '.join(locations)}{more}" if locations else ""


def _split_findings(split: str, s: SplitStats, max_length: int) -> list[Finding]:
    out: list[Finding] = []

    def warn(code: str, message: str) -> None:
        out.append(Finding("warning", code, f"{split}: {message}"))

    if s.truncated:
        warn(
            "truncated",
            f"{_pct(s.truncated, s.rows)} examples are longer than max_length {max_length}; "
            f"truncation removes {s.completion_tokens_lost} trained tokens (answer tokens; prompt ones too under train_on_prompt)",
        )
    if s.zero_trainable and not (split == "train" and s.trainable_tokens == 0):
        warn(
            "zero_trainable",
            f"{_pct(s.zero_trainable, s.rows)} examples have no trained token"
            + _at(s.zero_trainable_at, s.zero_trainable),
        )
    for column, n in s.empty_fields.items():
        warn("empty_field", f"{n} rows have an empty or whitespace-only '{column}'")
    if s.exact_duplicates:
        warn("exact_duplicates", f"{s.exact_duplicates} rows repeat an earlier row exactly")
    if s.near_duplicates:
        warn(
            "near_duplicates",
            f"{s.near_duplicates} more rows repeat an earlier row up to case, punctuation and spacing",
        )
    return out


def findings(report: Report) -> list[Finding]:
    """Blocking: training would be wrong or useless. Warning: worth a look, training still makes sense."""
    out: list[Finding] = []
    tok, train, held = report.tokenizer, report.splits["train"], report.splits["eval"]
    if tok is not None and tok.eos_token_id is None:
        out.append(Finding("blocking", "no_eos", f"the tokenizer has no EOS token: {tok.note}"))
    if train.rows and train.trainable_tokens == 0:
        out.append(
            Finding(
                "blocking",
                "all_masked",
                "no training example has a trained token (check the template and max_length: "
                "truncation may cut every completion)",
            )
        )
    if report.leaked:
        share = report.leaked / held.rows
        level = "blocking" if share > report.max_leakage else "warning"
        repeats = report.repeated_across + sum(
            s.exact_duplicates + s.near_duplicates for s in report.splits.values()
        )
        why = (
            f"; the data repeats rows ({repeats} duplicates), and a repeated row can land on both sides "
            "of the split: drop the repeated rows (those named above are on the eval side) and check again"
            if repeats
            else ""
        )
        out.append(
            Finding(
                level,
                "leakage",
                f"{_pct(report.leaked, held.rows)} eval rows "
                + ("are documents" if report.schema == "text" else "ask a prompt")
                + " that train also has "
                f"(limit {100 * report.max_leakage:g}%)" + _at(report.leaked_at, report.leaked) + why,
            )
        )
    if report.rejects_by_reason:
        reasons = ", ".join(f"{k}: {n}" for k, n in report.rejects_by_reason.items())
        total = sum(report.rejects_by_reason.values())
        out.append(Finding("warning", "rejected_rows", f"{total} bad rows set aside ({reasons})"))
    if not held.rows:
        out.append(Finding("warning", "no_eval", "no eval rows: overfitting would go unmeasured"))
    for split, stats in report.splits.items():
        out.extend(_split_findings(split, stats, report.max_length))
    return out


def preflight(
    mode: Literal["block", "warn", "off"],
    loaded: LoadedRecords,
    template: Template,
    tokenizer: Any,
    settings: Settings,
) -> tuple[Report, Encodings] | None:
    """What `train` runs before loading weights: "block" raises DataError on blocking findings,
    "warn" only prints them, "off" skips the check. Returns the report and the examples it encoded,
    which the run reuses (`encodings.reuse`) rather than tokenising every text again."""
    if mode == "off":
        return None
    report, encoded = analyse_encoded(loaded, template, tokenizer, settings)
    for f in report.findings:
        print(f"data check: {f.level}: {f.message}", file=sys.stderr)
    if mode == "block" and report.blocking:
        raise DataError(
            "the data check found blocking problems: " + "; ".join(f.message for f in report.blocking),
            hint="fix the data (`tunelab data check` gives the full report); data.check=warn trains anyway, "
            "with these problems in the run",
        )
    return report, encoded
