"""Files -> rows, each row keeping the file and line it came from.

Readers never drop a row silently: a row that cannot be read raises `DataError` with its location
(policy "error") or is kept, untouched, as a `Reject` with the reason (policy "skip"). A problem with
the file as a whole (a missing file, a CSV header that cannot be read, a JSON array broken mid-way)
raises under either policy: no row of it could be trusted, so none is kept or counted as read.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

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
# Bytes that are not UTF-8 are decoded with "surrogateescape": each becomes one of these code points,
# so a bad byte rejects only the row it sits in and the rejects file can still show it.
_BAD_BYTE = re.compile("[\udc80-\udcff]")
_CSV_FIELD_LIMIT = 1 << 30  # the csv module's default (128 KiB) would reject a long but valid field


@dataclass
class Row:
    source: str
    line: int  # 1-based line in the file (row number for parquet / datasets)
    data: dict[str, Any]
    raw: str = ""  # the row as in the file, for the rejects file when a later step refuses it


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
        self.result.rows.append(Row(self.source, line, data, raw))

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

    def fail(self, line: int | None, reason: str, hint: str | None = None) -> NoReturn:
        """The file as a whole is unreadable: raise under either policy."""
        raise DataError(reason, source=self.source, line=line, hint=hint)

    def bad_bytes(self, line: int, raw: str) -> bool:
        """Reject `raw` if it holds bytes that are not UTF-8; True when it did."""
        m = _BAD_BYTE.search(raw)
        if m is None:
            return False
        byte = len(raw[: m.start()].encode("utf-8", "surrogateescape")) + 1
        self.bad(
            line,
            f"invalid UTF-8 (byte {byte} of the row)",
            raw,
            hint="re-save the file as UTF-8 (from Windows-1252/Latin-1, e.g. "
            "`iconv -f cp1252 -t utf-8 FILE > FILE.utf8`); --data.on_bad_row=skip would drop those rows",
        )
        return True


def _json_loads(text: str) -> tuple[Any, str | None]:
    """(value, None) or (None, reason). Catches more than JSONDecodeError: Python's own limits too."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg}: column {e.colno})"
    except ValueError as e:  # e.g. an integer over 4300 digits (sys.set_int_max_str_digits)
        return None, f"not valid JSON ({e})"
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"


def _read_jsonl(text: str, col: _Collector) -> None:
    check_bytes = _BAD_BYTE.search(text) is not None
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other "line breaks" that are data.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue  # blank lines separate nothing and hold nothing
        if check_bytes and col.bad_bytes(number, line):
            continue
        if "\x00" in line:
            col.bad(number, "contains a NUL byte", line)
            continue
        data, error = _json_loads(line)
        if error is not None:
            col.bad(number, error, line)
            continue
        col.add(number, data, line)


def _skip_blank(text: str, pos: int, chars: str = " \t\r\n") -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _list_start(text: str) -> int | None:
    """Where the first list value of a top-level JSON object starts ({"data": [...]}); None if none.
    The text is known to be valid JSON, so the object is walked key by key with the same decoder."""
    decoder = json.JSONDecoder()
    pos = _skip_blank(text, text.index("{") + 1)
    while pos < len(text) and text[pos] == '"':
        _, pos = decoder.raw_decode(text, pos)  # the key
        pos = _skip_blank(text, _skip_blank(text, pos) + 1)  # past ':'
        if text[pos] == "[":
            return pos
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip_blank(text, pos, " \t\r\n,")
    return None


def _read_json(text: str, col: _Collector) -> None:
    """A JSON array of objects (or {"data": [...]}) read element by element to keep line numbers."""
    stripped = text.lstrip()
    if stripped.startswith("{"):
        whole, error = _json_loads(text)
        if error is not None:
            try:
                json.loads(text)
                where = None
            except json.JSONDecodeError as e:
                where = e.lineno
            except (ValueError, RecursionError):
                where = None
            col.fail(
                where,
                error,
                hint="a .json file holds one JSON value (a trailing comma is forgiven only in a top-level "
                "[...] array); for one row per line use .jsonl",
            )
        start = _list_start(text)
        if start is None:
            col.fail(1, 'a JSON object without a list of rows inside (expected [...] or {"data": [...]})')
        _read_array(text, start, col, whole=True)
        return
    if not stripped.startswith("["):
        col.fail(1, "expected a JSON array of objects", hint="for one JSON object per line use .jsonl")
    _read_array(text, text.index("["), col, whole=False)


def _read_array(text: str, start: int, col: _Collector, whole: bool) -> None:
    decoder = json.JSONDecoder()
    pos, line, counted = start + 1, 1 + text.count("\n", 0, start), start
    while True:
        pos = _skip_blank(text, pos, " \t\r\n,")  # tolerates trailing commas, which hand-edited files have
        if pos >= len(text):
            col.fail(text.count("\n") + 1, "the JSON array is not closed with ']'")
        if text[pos] == "]":
            break
        line += text.count("\n", counted, pos)  # counted incrementally: a big file stays linear
        counted = pos
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            # Past a syntax error the array cannot be split into rows reliably, so nothing after it
            # could be kept or counted: the file is refused as a whole.
            col.fail(e.lineno, f"not valid JSON ({e.msg}: column {e.colno})", "fix it, or convert to JSONL")
        except (ValueError, RecursionError) as e:  # int over 4300 digits; nesting too deep
            col.fail(line, f"not valid JSON ({e})")
        raw = text[pos:end]
        if not col.bad_bytes(line, raw):
            col.add(line, item, raw)
        pos = end
    after = _skip_blank(text, pos + 1)
    if not whole and after < len(text):
        col.fail(text.count("\n", 0, after) + 1, "text after the closing ']' of the JSON array")


def _read_csv(text: str, col: _Collector) -> None:
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    # The reader is fed a list of physical lines so a row's raw text (quotes, newlines) can be kept.
    lines = list(io.StringIO(text, newline=""))
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
    except csv.Error as e:
        col.fail(1, f"CSV header unreadable: {e}")
    if header is None:
        return
    header = [h.strip() for h in header]
    if not any(header):
        col.fail(1, "the first line must name the columns, and it is empty")
    if _BAD_BYTE.search("".join(header)) or "\x00" in "".join(header):
        col.fail(1, "the CSV header holds bytes that are not UTF-8 text", hint="re-save the file as UTF-8")
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        col.fail(1, f"the CSV header names a column twice: {', '.join(map(repr, duplicated))}")
    while True:
        start = reader.line_num + 1  # a quoted field may span several lines
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if reader.line_num < start:  # never seen; guards against looping on one line forever
                col.fail(start, f"CSV unreadable: {e}")
            col.bad(start, f"CSV row unreadable: {e}", "".join(lines[start - 1 : reader.line_num]))
            continue
        raw = "".join(lines[start - 1 : reader.line_num])
        if not values or (len(values) == 1 and not values[0].strip() and len(header) > 1):
            continue  # a blank line
        if col.bad_bytes(start, raw):
            continue
        if "\x00" in raw:
            col.bad(start, "contains a NUL byte", raw)
            continue
        if len(values) != len(header):
            col.bad(start, f"has {len(values)} columns, the header has {len(header)}", raw)
            continue
        col.add(start, dict(zip(header, values)), raw)


def _read_text(text: str, col: _Collector) -> None:
    """Plain text: documents are separated by blank lines."""
    if "\x00" in text:
        col.fail(text[: text.index("\x00")].count("\n") + 1, "contains a NUL byte (binary data?)")
    buf: list[str] = []
    first = 1
    for number, raw in enumerate([*text.splitlines(), ""], start=1):
        if raw.strip():
            if not buf:
                first = number
            buf.append(raw)
        elif buf:
            doc = "\n".join(buf)
            if not col.bad_bytes(first, doc):
                col.add(first, {"text": doc}, doc)
            buf = []


def _read_table(records: Iterator[dict[str, Any]], col: _Collector) -> None:
    for i, rec in enumerate(records, start=1):
        col.add(i, rec, json.dumps(rec, ensure_ascii=False, default=str))


def _read_parquet(p: Path, col: _Collector) -> None:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        col.fail(None, "reading parquet needs pyarrow", hint="pip install pyarrow")
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises many types for a bad file
        col.fail(None, f"not a readable parquet file ({e})")
    _read_table(iter(table.to_pylist()), col)


def _read_datasets(p: Path, col: _Collector) -> None:
    try:
        import datasets
    except ImportError:
        col.fail(None, "reading a datasets folder needs `datasets`", hint="pip install datasets")
    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    _read_table(iter(ds), col)


def raise_first_bad_row(
    path: str | Path,
    fmt: str,
    unreadable: list[Reject],
    unusable: list[DataError],
    upto: float = float("inf"),
) -> None:
    """For on_bad_row "error" after a lenient read: the first bad row in the file, at or before line
    `upto`, stops it. An unreadable row raises its reader's own error (the file read again strictly),
    a row that is no usable example its DataError (one without a line counts as first)."""
    lines = [(0 if e.line is None else e.line, e) for e in unusable]
    first = min((x for x in lines if x[0] <= upto), key=lambda x: x[0], default=None)
    if any(r.line <= (upto if first is None else min(upto, first[0])) for r in unreadable):
        read_rows(path, fmt)  # raises that row's own error
    if first is not None:
        raise first[1]


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
    if fmt in ("parquet", "datasets"):
        (_read_parquet if fmt == "parquet" else _read_datasets)(p, col)
        return col.result
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the file ({e.strerror})", source=source) from None
    # -sig: a UTF-8 BOM at the start is not part of the data.
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or raw[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        encoding = "UTF-32" if raw[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff") else "UTF-16"
        col.fail(
            None,
            f"the file is {encoding} text, not UTF-8 (its first bytes say so)",
            f"re-save it as UTF-8, e.g. `iconv -f {encoding} -t UTF-8 FILE > FILE.utf8`",
        )
    text = raw.decode("utf-8-sig", "surrogateescape")
    if fmt == "json":
        if "\x00" in text:  # never valid JSON; say what it is instead of a parser message
            col.fail(text[: text.index("\x00")].count("\n") + 1, "contains a NUL byte (binary data?)")
    {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "text": _read_text}[fmt](text, col)
    return col.result


def _printable(raw: str) -> str:
    """Bytes that were not UTF-8 are written as \\xNN, so the rejects file stays valid JSON lines."""
    try:
        return raw.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that did not come from a bad byte
        return raw.encode("utf-8", "backslashreplace").decode("utf-8")


def write_rejects(rejects: list[Reject], path: Path) -> None:
    """Bad rows go to a JSONL file next to the run: where they were, why, and the row itself."""
    with path.open("w", encoding="utf-8", errors="backslashreplace") as f:
        for r in rejects:
            row = {"source": r.source, "line": r.line, "reason": r.reason, "raw": _printable(r.raw)}
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")
