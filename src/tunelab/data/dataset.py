"""The data path end to end: file -> rows -> records -> segments -> encoded examples, split.

Nothing here reaches a model: the tokenizer is the only thing it needs.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from tunelab import progress
from tunelab.data import formats, schema, templates
from tunelab.data.formats import Reject
from tunelab.data.schema import Record
from tunelab.data.templates import Template
from tunelab.data.tokenize import IGNORE, Encoded, encode_many, special_prefix
from tunelab.errors import DataError


@dataclass
class LoadedRecords:
    schema: str
    train: list[Record]
    eval: list[Record]
    rejects: list[Reject] = field(default_factory=list)


@dataclass
class SFTData:
    template: Template
    schema: str
    train: list[Encoded]
    eval: list[Encoded]
    train_records: list[Record]
    eval_records: list[Record]
    rejects: list[Reject] = field(default_factory=list)


def _records(
    path: str,
    fmt: str,
    schema_name: str,
    fields: dict[str, str],
    on_bad_row: Literal["error", "skip"],
) -> tuple[str, list[Record], list[Reject]]:
    from tunelab.world.build import resolve_world_path

    with progress.timed(f"data: reading {path}") as say:
        name, records, rejects = _read_records(
            resolve_world_path(path), path, fmt, schema_name, fields, on_bad_row
        )
        say(f"{len(records):,} rows" + (f" ({len(rejects):,} set aside)" if rejects else ""))
    return name, records, rejects


def _read_records(
    file: Any,
    path: str,
    fmt: str,
    schema_name: str,
    fields: dict[str, str],
    on_bad_row: Literal["error", "skip"],
) -> tuple[str, list[Record], list[Reject]]:
    # Read leniently, then validate: under "error" the first bad row in the file stops it, whether it
    # cannot be read or is not a usable example (reading first found a later unreadable row first).
    read = formats.read_rows(file, fmt, "skip")
    if on_bad_row == "error":  # an unreadable row before any readable one: before the schema is guessed
        formats.raise_first_bad_row(
            file, fmt, read.rejects, [], read.rows[0].line if read.rows else float("inf")
        )
    if not read.rows and read.rejects:
        raise _none_usable(path, read.rejects)
    schema.check_fields(read.rows, fields, None, path)  # a role no schema has: before detection
    name = schema.detect_schema(read.rows, fields, source=path) if schema_name == "auto" else schema_name
    schema.check_fields(read.rows, fields, name, path)
    records, rejects, unusable = [], list(read.rejects), []
    for row in read.rows:
        try:
            records.append(schema.to_record(row, name, fields))
        except DataError as e:
            unusable.append(e)
            reason = f"field '{e.field}': {e.reason}"
            rejects.append(Reject(row.source, row.line, reason, row.raw or str(row.data)))
    if on_bad_row == "error":
        formats.raise_first_bad_row(file, fmt, read.rejects, unusable)
    if not records:
        raise _none_usable(path, rejects)
    return name, records, rejects


def _none_usable(path: str, rejects: list[Reject]) -> DataError:
    """Every row was set aside: say why here, since no run (and no rejects file) will follow."""
    shown = "; ".join(f"line {r.line}: {r.reason}" for r in rejects[:3])
    more = f" (and {len(rejects) - 3} more)" if len(rejects) > 3 else ""
    return DataError(
        f"no usable rows: all {len(rejects)} were set aside: {shown}{more}" if rejects else "no usable rows",
        source=path,
        hint="fix those rows, or name the columns with data.fields",
    )


def load_records(
    path: str,
    eval_path: str | None = None,
    eval_ratio: float = 0.1,
    split_seed: int = 42,
    fmt: str = "auto",
    schema_name: str = "auto",
    fields: dict[str, str] | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
) -> LoadedRecords:
    """Read and validate; split off `eval_ratio` with a seeded shuffle unless an eval file is given."""
    fields = fields or {}
    if not path:
        raise DataError("no training data given", hint="set data.path (or --data FILE)")
    name, records, rejects = _records(path, fmt, schema_name, fields, on_bad_row)
    if eval_path:
        eval_name, eval_records, eval_rejects = _records(eval_path, fmt, name, fields, on_bad_row)
        rejects += eval_rejects
        return LoadedRecords(name, records, eval_records, rejects)
    order = list(range(len(records)))
    random.Random(split_seed).shuffle(order)
    n_eval = round(len(records) * eval_ratio)
    if eval_ratio > 0 and len(records) >= 2:
        n_eval = max(1, min(n_eval, len(records) - 1))
    eval_idx = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in eval_idx]
    held = [r for i, r in enumerate(records) if i in eval_idx]
    return LoadedRecords(name, train, held, rejects)


def encode_records(
    records: list[Record],
    template: Template,
    tokenizer: Any,
    max_length: int,
    truncation_side: Literal["right", "left"] = "right",
    train_on_prompt: bool = False,
    label: str = "examples",
) -> list[Encoded]:
    # Chat templates write their own end-of-turn markup (and BOS) into the text; others get EOS here.
    chat = template.name == "chat"

    def encode(part: list[Record]) -> list[Encoded]:
        return encode_many(
            [templates.render(r, template, tokenizer) for r in part],
            tokenizer,
            max_length,
            truncation_side,
            train_on_prompt,
            add_eos=not chat,
            add_prefix=not chat,
        )

    # A part at a time, for the progress (each example's ids depend on it alone).
    return progress.chunked(f"data: tokenising {label}", records, encode)


def pack_documents(
    texts: list[str], tokenizer: Any, chunk_length: int, label: str = "data: tokenising documents"
) -> list[Encoded]:
    """Pretraining: documents joined into one stream, cut into chunks; every token is trained. Each
    document is framed as the model will meet text later: the tokenizer's own prefix (a Llama
    tokenizer's BOS, which generation and finetuning put before every prompt), the text, EOS."""
    eos = tokenizer.eos_token_id
    prefix = special_prefix(tokenizer)

    def documents(advance: Any) -> Iterator[list[int]]:
        for text in texts:
            # verbose=False: no "longer than the model's maximum ... indexing errors" warning for a long
            # document; it is cut into chunks here, never fed whole.
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            yield prefix + ids + ([eos] if eos is not None else [])
            advance(1)

    with progress.track(label, len(texts), "documents") as advance:
        return chunk_documents(documents(advance), chunk_length)


def chunk_documents(documents: Iterable[list[int]], chunk_length: int) -> list[Encoded]:
    """Framed documents' ids (prefix, text, EOS: as `pack_documents` frames them, and as
    `encode_records` with template none encodes a text) joined into one stream and cut into chunks.
    A chunk's first token is never a target (nothing precedes it in its chunk), so each chunk starts
    on the last token of the one before: every token but the stream's first is a target exactly once.
    The last chunk may be shorter; chunks never cross into padding (training is padding-free)."""
    stream: list[int] = []
    for ids in documents:
        stream.extend(ids)
    step = chunk_length - 1
    chunks = [stream[i : i + chunk_length] for i in range(0, len(stream) - 1, step)]
    return [Encoded(c, list(c)) for c in chunks]


def count_trainable(examples: list[Encoded]) -> int:
    return sum(sum(lab != IGNORE for lab in ex.labels[1:]) for ex in examples)
