"""Rows -> records: which columns mean what, checked row by row.

A record maps schema roles (question/answer, instruction/input/output, prompt/completion, input/output,
messages, text) to validated values. The schema is detected from the column names unless given.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from tunelab.data.formats import Row
from tunelab.errors import DataError

# role -> (required roles, optional roles). Order matters for detection: first full match wins.
SCHEMAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "qa": (("question", "answer"), ()),
    "prompt_completion": (("prompt", "completion"), ()),
    "input_output": (("input", "output"), ()),
    "text": (("text",), ()),
}
# The role whose value is the trained part of the example.
COMPLETION_ROLE = {
    "alpaca": "output",
    "qa": "answer",
    "prompt_completion": "completion",
    "input_output": "output",
}
# The role a user's free text fills at inference time (`tunelab generate RUN "..."`).
PROMPT_ROLE = {
    "alpaca": "instruction",
    "qa": "question",
    "prompt_completion": "prompt",
    "input_output": "input",
}
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Record:
    source: str
    line: int
    values: dict[str, Any]  # role -> str (or list of messages)


def detect_schema(rows: list[Row], fields: dict[str, str], source: str | None = None) -> str:
    """Pick the schema whose required columns the first rows have (after the explicit mapping).
    `source` names the file in the error when there are no rows to look at."""
    if not rows:
        raise DataError("no rows to read", source=source, hint="the file is empty or every row was rejected")
    mapped = set(fields)
    keys: set[str] = set()
    for row in rows[:20]:
        keys |= set(row.data)
    reverse = {v: k for k, v in fields.items()}
    roles = {reverse.get(k, k) for k in keys} | mapped
    for name, (required, _) in SCHEMAS.items():
        if all(r in roles for r in required):
            return name
    raise DataError(
        f"cannot tell the schema from the columns {sorted(keys)}",
        source=rows[0].source,
        hint="name the columns with data.fields (train, data check, eval, compare: --data.fields.question=q "
        "--data.fields.answer=a, or in the config), rename them, "
        f"or set data.schema to one of {', '.join(SCHEMAS)}",
    )


def check_fields(rows: list[Row], fields: dict[str, str], name: str | None, source: str | None) -> None:
    """`data.fields` maps only roles of the schema (`name`; None: of any schema, before it is
    detected) to columns some row has: otherwise the mapping would be dropped without a word (an
    optional role, such as Alpaca's input, is simply left out of every example)."""
    every = dict.fromkeys(r for required, optional in SCHEMAS.values() for r in required + optional)
    roles = list(SCHEMAS[name][0] + SCHEMAS[name][1]) if name else list(every)
    columns = sorted({k for row in rows for k in row.data})
    for role, column in fields.items():
        if role not in roles:
            close = difflib.get_close_matches(role, roles, n=1)
            whose = f"the {name} schema has no" if name else "no schema has a"
            raise DataError(
                f"data.fields maps '{role}', which {whose} role for (roles: {', '.join(roles)})",
                source=source,
                hint=(f"did you mean '{close[0]}'? " if close else "")
                + "data.fields maps a role to a column: --data.fields.question=q",
            )
        if rows and column not in columns:
            close = difflib.get_close_matches(column, columns, n=1)
            raise DataError(
                f"data.fields.{role} names column '{column}', which no row has",
                source=source,
                hint=(f"did you mean '{close[0]}'? " if close else "") + f"the columns: {', '.join(columns)}",
            )


# A lone surrogate (JSON can spell one as "\ud800") is not text any tokenizer can encode.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _as_text(value: Any, row: Row, column: str) -> str:
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise DataError(
                "holds a lone UTF-16 surrogate (e.g. \\ud800), which is not text",
                source=row.source,
                line=row.line,
                field=column,
            )
        return value
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        shown = "null" if value is None else type(value).__name__
        raise DataError(f"expected text, got {shown}", source=row.source, line=row.line, field=column)
    if isinstance(value, (int, float)):
        return str(value)  # numbers in a CSV/JSON answer column are text to the model
    raise DataError(
        f"expected text, got {type(value).__name__}", source=row.source, line=row.line, field=column
    )


def _check_messages(value: Any, row: Row, column: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(
            "expected a non-empty list of messages", source=row.source, line=row.line, field=column
        )
    out = []
    for i, m in enumerate(value):
        where = f"{column}[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(
                "a message needs 'role' and 'content'", source=row.source, line=row.line, field=where
            )
        if m["role"] not in ROLES:
            raise DataError(
                f"unknown role {m['role']!r} (expected one of {', '.join(ROLES)})",
                source=row.source,
                line=row.line,
                field=where,
            )
        content = _as_text(m["content"], row, f"{where}.content")
        if m["role"] == "assistant" and not content.strip():
            raise DataError("empty assistant turn", source=row.source, line=row.line, field=where)
        out.append({"role": m["role"], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(
            "no assistant message: no answer to train on or score against",
            source=row.source,
            line=row.line,
            field=column,
        )
    return out


def to_record(row: Row, schema: str, fields: dict[str, str]) -> Record:
    """Validate one row against the schema. Raises DataError naming file, line and field."""
    required, optional = SCHEMAS[schema]
    values: dict[str, Any] = {}
    for role in required + optional:
        column = fields.get(role, role)
        if column not in row.data or (role in optional and row.data[column] is None):
            if role in required:
                raise DataError("missing field", source=row.source, line=row.line, field=column)
            continue
        raw = row.data[column]
        values[role] = _check_messages(raw, row, column) if role == "messages" else _as_text(raw, row, column)
    target = COMPLETION_ROLE.get(schema, "text" if schema == "text" else None)
    if target and not values[target].strip():
        column = fields.get(target, target)
        raise DataError(
            # text rows are documents (pretraining, template none): no completion, no answer
            "empty text: no document to train on"
            if schema == "text"
            else "empty completion: no answer to train on or score against",
            source=row.source,
            line=row.line,
            field=column,
        )
    return Record(row.source, row.line, values)
