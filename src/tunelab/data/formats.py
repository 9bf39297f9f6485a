"""Files -> rows, each row keeping the file and line it came from.

Readers never drop a row silently: a row that cannot be read raises `DataError` with its location
(policy "error") or is kept, untouched, as a `Reject` with the reason (policy "skip").
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunelab.errors import DataError

FORMATS = ("jsonl", "json", "csv", "parquet", "text", "datasets")
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
}


@dataclass
class Row:
    source: str
    line: int  # 1-based line in the file (row number for parquet / datasets)
    data: dict[str, Any]


@dataclass
class Reject:
    source: str
    line: int
    reason: str
    raw: str  # the row as it was in the file, so nothing is lost


@dataclass
class ReadResult:
    rows: list[Row] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "datasets"
        raise DataError(
            "is a folder but not one saved with `datasets.save_to_disk`",
            source=str(path),
            hint="point data.path at a .jsonl/.json/.csv/.parquet/.txt file or a `datasets` folder",
        )
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"unknown file type '{path.suffix}'",
            source=str(path),
            hint=f"use one of {', '.join(sorted(_SUFFIXES))} or set data.format explicitly",
        )
    return fmt


class _Collector:
    """Applies the bad-row policy in one place for every reader."""

    def __init__(self, source: str, policy: Literal["error", "skip"]) -> None:
        self.source = source
        self.policy = policy
        self.result = ReadResult()

    def add(self, line: int, data: Any, raw: str) -> None:
        if not isinstance(data, dict):
            self.bad(line, f"expected an object with named fields, got {type(data).__name__}", raw)
            return
        self.result.rows.append(Row(self.source, line, data))

    def bad(self, line: int, reason: str, raw: str, hint: str | None = None) -> None:
        if self.policy == "error":
            raise DataError(
                reason,
                source=self.source,
                line=line,
                hint=hint
                or "fix the row, or pass --data.on_bad_row=skip to set bad rows aside in a rejects file",
            )
        self.result.rejects.append(Reject(self.source, line, reason, raw))


def _decode(raw: bytes, source: str) -> str:
    try:
        text = raw.decode("utf-8-sig")  # -sig: a UTF-8 BOM at the start is not part of the data
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"invalid UTF-8 at byte {e.start}", source=source, line=line, hint="re-save the file as UTF-8"
        ) from None
    return text


def _read_jsonl(text: str, col: _Collector) -> None:
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other "line breaks" that are data.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue  # blank lines separate nothing and hold nothing
        if "\x00" in line:
            col.bad(number, "contains a NUL byte", line.replace("\x00", "\\u0000"))
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            col.bad(number, f"not valid JSON ({e.msg} at column {e.colno})", line)
            continue
        col.add(number, data, line)


def _read_json(text: str, col: _Collector) -> None:
    """A JSON array of objects (or {"data": [...]}) read element by element to keep line numbers."""
    decoder = json.JSONDecoder()
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            col.bad(e.lineno, f"not valid JSON ({e.msg})", text[:200])
            return
        items = (
            next((v for v in whole.values() if isinstance(v, list)), None)
            if isinstance(whole, dict)
            else None
        )
        if items is None:
            col.bad(
                1,
                'a JSON object without a list of rows inside (expected [...] or {"data": [...]})',
                text[:200],
            )
            return
        for i, item in enumerate(items, start=1):
            col.add(i, item, json.dumps(item, ensure_ascii=False))
        return
    if not stripped.startswith("["):
        col.bad(1, "expected a JSON array of objects", text[:200])
        return
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1  # tolerates trailing commas, which hand-edited files often have
        if pos >= len(text):
            col.bad(text.count("\n") + 1, "the JSON array is not closed with ']'", "")
            return
        if text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            # A broken element makes the rest of the array unreadable: report it and stop.
            col.bad(e.lineno, f"not valid JSON ({e.msg} at column {e.colno})", text[pos : pos + 200])
            return
        col.add(line, item, text[pos:end])
        pos = end


def _read_csv(text: str, col: _Collector) -> None:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        col.bad(1, f"CSV header unreadable: {e}", "")
        return
    header = [h.strip() for h in header]
    start = reader.line_num + 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            col.bad(start, f"CSV row unreadable: {e}", "")
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1  # a quoted field may span several lines
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            col.bad(line, f"has {len(values)} columns, the header has {len(header)}", ",".join(values))
            continue
        col.add(line, dict(zip(header, values)), ",".join(values))


def _read_text(text: str, col: _Collector) -> None:
    """Plain text: documents are separated by blank lines."""
    buf: list[str] = []
    first = 1
    for number, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            if not buf:
                first = number
            buf.append(raw)
        elif buf:
            col.add(first, {"text": "\n".join(buf)}, "\n".join(buf))
            buf = []
    if buf:
        col.add(first, {"text": "\n".join(buf)}, "\n".join(buf))


def _read_table(records: Iterator[dict[str, Any]], col: _Collector) -> None:
    for i, rec in enumerate(records, start=1):
        col.add(i, rec, json.dumps(rec, ensure_ascii=False, default=str))


def read_rows(
    path: str | Path,
    fmt: str = "auto",
    on_bad_row: Literal["error", "skip"] = "error",
) -> ReadResult:
    """Read every row of a data file. Raises `DataError` (with file and line) on the first bad row
    when `on_bad_row="error"`; with "skip" the bad rows come back in `rejects`, untouched."""
    p = Path(path)
    source = str(path)
    if not p.exists():
        raise DataError(
            "file not found", source=source, hint="check data.path (relative paths start from here)"
        )
    fmt = detect_format(p) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise DataError(f"unknown format '{fmt}'", source=source, hint=f"use one of {', '.join(FORMATS)}")
    col = _Collector(source, on_bad_row)
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(
                "reading parquet needs pyarrow", source=source, hint="pip install pyarrow"
            ) from None
        try:
            table = pq.read_table(p)
        except Exception as e:  # pyarrow raises many types for a bad file
            raise DataError(f"not a readable parquet file ({e})", source=source) from None
        _read_table(iter(table.to_pylist()), col)
        return col.result
    if fmt == "datasets":
        try:
            import datasets
        except ImportError:
            raise DataError(
                "reading a datasets folder needs `datasets`", source=source, hint="pip install datasets"
            ) from None
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else next(iter(ds))
            ds = ds[split]
        _read_table(iter(ds), col)
        return col.result
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the file ({e.strerror})", source=source) from None
    text = _decode(raw, source)
    if "\x00" in text and fmt != "jsonl":  # JSONL rejects such lines one by one
        line = text[: text.index("\x00")].count("\n") + 1
        raise DataError(
            "contains a NUL byte (binary data?)", source=source, line=line, hint="remove NUL bytes"
        )
    {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "text": _read_text}[fmt](text, col)
    return col.result


def write_rejects(rejects: list[Reject], path: Path) -> None:
    """Bad rows go to a JSONL file next to the run: where they were, why, and the row itself."""
    with path.open("w", encoding="utf-8") as f:
        for r in rejects:
            f.write(
                json.dumps(
                    {"source": r.source, "line": r.line, "reason": r.reason, "raw": r.raw}, ensure_ascii=False
                )
            )
            f.write("\n")
