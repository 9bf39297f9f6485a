"""Loaders on the shapes data arrives in: BOMs, CRLF, blank lines, trailing commas, NUL bytes, invalid
UTF-8, 10 MB lines, non-string values, bad messages, CSV quoting. Each is read or rejected with a
reason and a location; random bytes and random JSON never raise anything but DataError."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.data.formats import Reject, Row, read_rows, write_rejects
from tunelab.data.schema import detect_schema, to_record
from tunelab.errors import DataError


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _lines(result) -> list[int]:
    return [r.line for r in result.rows]


# ---------------------------------------------------------------- JSONL


def test_jsonl_bom_crlf_blank_lines(tmp_path):
    data = b'\xef\xbb\xbf{"q": "a"}\r\n\r\n{"q": "b"}\r\n   \n{"q": "c"}'
    result = read_rows(_write(tmp_path / "d.jsonl", data))
    assert [r.data for r in result.rows] == [{"q": "a"}, {"q": "b"}, {"q": "c"}]
    assert _lines(result) == [1, 3, 5]
    assert result.rejects == []


def test_jsonl_invalid_utf8_rejects_only_that_line(tmp_path):
    path = _write(tmp_path / "d.jsonl", b'{"q": "a"}\n{"q": "b\xff\xfe"}\n{"q": "c"}\n')
    result = read_rows(path, on_bad_row="skip")
    assert [r.data["q"] for r in result.rows] == ["a", "c"]
    assert [(r.line, r.reason) for r in result.rejects] == [(2, "invalid UTF-8 (byte 9 of the row)")]
    with pytest.raises(DataError) as e:
        read_rows(path)
    assert (e.value.source, e.value.line) == (str(path), 2)
    assert "invalid UTF-8" in e.value.reason


def test_a_utf16_file_is_named_as_such_and_latin1_rows_get_a_re_encode_hint(tmp_path):
    """A UTF-16 file under skip was 'no usable rows ... name the columns with data.fields'; a
    Windows-1252 row said only 'invalid UTF-8'."""
    rows = "\n".join(json.dumps({"question": "Où?", "answer": "Ici"}) for _ in range(3))
    for encoding in ("utf-16", "utf-32"):
        path = _write(tmp_path / f"{encoding}.jsonl", rows.encode(encoding))
        for mode in ("error", "skip"):
            with pytest.raises(DataError, match=f"is {encoding.upper()} text, not UTF-8") as e:
                read_rows(path, on_bad_row=mode)
            assert "iconv" in e.value.hint
    latin = _write(tmp_path / "latin.csv", "question,answer\nCafé?,Oui\n".encode("cp1252"))
    with pytest.raises(DataError, match="invalid UTF-8") as e:
        read_rows(latin)
    assert "iconv -f cp1252" in e.value.hint


def test_jsonl_nul_and_non_objects_and_broken_json(tmp_path):
    data = b'{"q": "a\x00"}\n[1, 2]\n7\n{"q": \n{"q": "ok"}\n'
    result = read_rows(_write(tmp_path / "d.jsonl", data), on_bad_row="skip")
    assert [r.data for r in result.rows] == [{"q": "ok"}]
    assert [(r.line, r.reason) for r in result.rejects] == [
        (1, "contains a NUL byte"),
        (2, "expected an object with named fields, got list"),
        (3, "expected an object with named fields, got int"),
        (4, "not valid JSON (Expecting value: column 7)"),
    ]
    assert result.rejects[1].raw == "[1, 2]"


def test_jsonl_python_limits_are_data_errors(tmp_path):
    """An integer over 4300 digits and 100k nested lists raise ValueError / RecursionError in json."""
    data = b'{"q": ' + b"9" * 5000 + b"}\n" + b"[" * 100_000 + b"\n"
    result = read_rows(_write(tmp_path / "d.jsonl", data), on_bad_row="skip")
    assert result.rows == []
    assert [r.line for r in result.rejects] == [1, 2]
    assert all(r.reason.startswith("not valid JSON") for r in result.rejects)


def test_jsonl_ten_megabyte_line(tmp_path):
    big = "x" * 10_000_000
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"question": "q", "answer": big}) + "\n" + '{"question": "r", "answer": "s"}\n'
    )
    result = read_rows(path)
    assert [len(r.data["answer"]) for r in result.rows] == [10_000_000, 1]
    assert _lines(result) == [1, 2]


# ---------------------------------------------------------------- JSON


def test_json_array_trailing_commas_crlf_bom(tmp_path):
    data = b'\xef\xbb\xbf[\r\n  {"q": "a"},\r\n  {"q": "b"},\r\n\r\n  {"q": "c"},\r\n]\r\n'
    result = read_rows(_write(tmp_path / "d.json", data))
    assert [r.data["q"] for r in result.rows] == ["a", "b", "c"]
    assert _lines(result) == [2, 3, 5]


def test_json_object_with_rows_keeps_file_lines(tmp_path):
    text = '{\n  "version": {"x": [1]},\n  "data": [\n    {"q": "a"},\n\n    {"q": "b"}\n  ]\n}\n'
    result = read_rows(_write(tmp_path / "d.json", text.encode()))
    assert [(r.line, r.data["q"]) for r in result.rows] == [(4, "a"), (6, "b")]


def test_json_object_with_rows_rejects_bad_bytes_per_element(tmp_path):
    data = b'{"data": [\n{"q": "a"},\n{"q": "\xff"}\n]}'
    result = read_rows(_write(tmp_path / "d.json", data), on_bad_row="skip")
    assert [(r.line, r.data) for r in result.rows] == [(2, {"q": "a"})]
    assert [(r.line, r.reason) for r in result.rejects] == [(3, "invalid UTF-8 (byte 8 of the row)")]


def test_json_element_level_rejects_under_skip(tmp_path):
    data = b'[{"q": "a"}, 3, {"q": "\xff"}, {"q": "b"}]'
    result = read_rows(_write(tmp_path / "d.json", data), on_bad_row="skip")
    assert [r.data["q"] for r in result.rows] == ["a", "b"]
    assert [r.reason for r in result.rejects] == [
        "expected an object with named fields, got int",
        "invalid UTF-8 (byte 8 of the row)",
    ]


@pytest.mark.parametrize(
    "data, line, reason",
    [
        (b'[\n{"q": "a"},\n{"q": }\n]', 3, "not valid JSON (Expecting value: column 7)"),
        (b'[{"q": "a"}]\n[{"q": "b"}]', 2, "text after the closing ']' of the JSON array"),
        (b'[{"q": "a"},\n', 2, "the JSON array is not closed with ']'"),
        (b'"just a string"', 1, "expected a JSON array of objects"),
        (
            b'{"meta": 1}',
            1,
            'a JSON object without a list of rows inside (expected [...] or {"data": [...]})',
        ),
        (b'[{"q": "\x00"}]', 1, "contains a NUL byte (binary data?)"),
    ],
)
def test_json_file_level_problems_raise_under_skip_too(tmp_path, data, line, reason):
    """Past a broken array nothing can be counted, so it is refused whatever the policy."""
    path = _write(tmp_path / "d.json", data)
    with pytest.raises(DataError) as e:
        read_rows(path, on_bad_row="skip")
    assert (e.value.source, e.value.line, e.value.reason) == (str(path), line, reason)


# ---------------------------------------------------------------- CSV


def test_csv_embedded_newlines_quotes_and_lines(tmp_path):
    text = (
        'question,answer\r\n'
        '"Say ""hi""","Line one\r\nline two"\r\n'
        '\r\n'
        'plain,"a, b"\r\n'
    )  # fmt: skip
    result = read_rows(_write(tmp_path / "d.csv", b"\xef\xbb\xbf" + text.encode()))
    assert [r.data for r in result.rows] == [
        {"question": 'Say "hi"', "answer": "Line one\r\nline two"},
        {"question": "plain", "answer": "a, b"},
    ]
    assert _lines(result) == [2, 5]


def test_csv_bad_rows_are_kept_untouched(tmp_path):
    rows = b'q,a\n"x","y",z\n"bad \xff",ok\n"nul \x00",ok\n"fine","row"\n'
    result = read_rows(_write(tmp_path / "d.csv", rows), on_bad_row="skip")
    assert [r.data for r in result.rows] == [{"q": "fine", "a": "row"}]
    assert [(r.line, r.reason) for r in result.rejects] == [
        (2, "has 3 columns, the header has 2"),
        (3, "invalid UTF-8 (byte 6 of the row)"),
        (4, "contains a NUL byte"),
    ]
    assert result.rejects[0].raw == '"x","y",z\n'  # quotes as in the file


def test_csv_ten_megabyte_field(tmp_path):
    big = "y" * 10_000_000
    result = read_rows(_write(tmp_path / "d.csv", f'q,a\nshort,"{big}"\n'.encode()))
    assert len(result.rows[0].data["a"]) == 10_000_000


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"q,q\n1,2\n", "the CSV header names a column twice: 'q'"),
        (b"\nq,a\n1,2\n", "the first line must name the columns, and it is empty"),
        (b"q\xff,a\n1,2\n", "the CSV header holds bytes that are not UTF-8 text"),
    ],
)
def test_csv_header_problems_raise(tmp_path, data, reason):
    with pytest.raises(DataError) as e:
        read_rows(_write(tmp_path / "d.csv", data), on_bad_row="skip")
    assert (e.value.line, e.value.reason) == (1, reason)


def test_text_documents_and_bad_bytes(tmp_path):
    data = b"first doc\nstill first\n\n\nbad \xff doc\n\r\nlast"
    result = read_rows(_write(tmp_path / "d.txt", data), on_bad_row="skip")
    assert [(r.line, r.data["text"]) for r in result.rows] == [(1, "first doc\nstill first"), (7, "last")]
    assert [(r.line, r.reason) for r in result.rejects] == [(5, "invalid UTF-8 (byte 5 of the row)")]


def test_write_rejects_keeps_bad_bytes_readable(tmp_path):
    bad = b'{"q": "b\xff"}'.decode("utf-8", "surrogateescape")
    out = tmp_path / "rejects.jsonl"
    write_rejects([Reject("f.jsonl", 2, "invalid UTF-8 (byte 9 of the row)", bad)], out)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [
        {
            "source": "f.jsonl",
            "line": 2,
            "reason": "invalid UTF-8 (byte 9 of the row)",
            "raw": '{"q": "b\\xff"}',
        }
    ]


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError) as e:
        read_rows(tmp_path / "nope.jsonl")
    assert (e.value.source, e.value.reason) == (str(tmp_path / "nope.jsonl"), "file not found")
    with pytest.raises(DataError, match="unknown file type '.xml'"):
        read_rows(_write(tmp_path / "d.xml", b"<a/>"))


# ---------------------------------------------------------------- schema


def _row(data: dict) -> Row:
    return Row("f.jsonl", 7, data)


@pytest.mark.parametrize(
    "data, field, reason",
    [
        ({"question": "q", "answer": None}, "answer", "expected text, got null"),
        ({"question": True, "answer": "a"}, "question", "expected text, got bool"),
        ({"question": ["q"], "answer": "a"}, "question", "expected text, got list"),
        ({"question": "q", "answer": "  \n"}, "answer", "empty completion: no answer to train on or score against"),
        ({"question": "\ud800", "answer": "a"}, "question", "holds a lone UTF-16 surrogate (e.g. \\ud800), which is not text"),
        ({"answer": "a"}, "question", "missing field"),
    ],
)  # fmt: skip
def test_qa_bad_values(data, field, reason):
    with pytest.raises(DataError) as e:
        to_record(_row(data), "qa", {})
    assert (e.value.source, e.value.line, e.value.field, e.value.reason) == ("f.jsonl", 7, field, reason)


def test_numbers_are_text():
    assert to_record(_row({"question": 12, "answer": 3.5}), "qa", {}).values == {
        "question": "12",
        "answer": "3.5",
    }


@pytest.mark.parametrize(
    "messages, field, reason",
    [
        ([], "messages", "expected a non-empty list of messages"),
        ("hi", "messages", "expected a non-empty list of messages"),
        (["hi"], "messages[0]", "a message needs 'role' and 'content'"),
        ([{"role": "bot", "content": "x"}], "messages[0]", "unknown role 'bot' (expected one of system, user, assistant, tool)"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}], "messages[1]", "empty assistant turn"),
        ([{"role": "user", "content": "x"}], "messages", "no assistant message: no answer to train on or score against"),
        ([{"role": "user", "content": {"a": 1}}, {"role": "assistant", "content": "y"}], "messages[0].content", "expected text, got dict"),
    ],
)  # fmt: skip
def test_bad_messages(messages, field, reason):
    with pytest.raises(DataError) as e:
        to_record(_row({"messages": messages}), "messages", {})
    assert (e.value.line, e.value.field, e.value.reason) == (7, field, reason)


def test_detect_schema_names_the_file_even_without_rows():
    with pytest.raises(DataError) as e:
        detect_schema([], {}, source="empty.jsonl")
    assert (e.value.source, e.value.reason) == ("empty.jsonl", "no rows to read")
    assert detect_schema([_row({"q": "x", "a": "y"})], {"question": "q", "answer": "a"}) == "qa"


# ---------------------------------------------------------------- properties

KEYS = ["question", "answer", "messages", "text", "instruction", "input", "output", "prompt", "completion"]
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["role", "content", *KEYS]) | st.text(max_size=4), inner, max_size=3
        )
    ),
    max_leaves=10,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "bot"]) | json_values, "content": json_values}
)  # fmt: skip
row_values = json_values | st.lists(message, max_size=3)
rows_strategy = st.lists(
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), row_values, max_size=4) | json_values,
    max_size=5,
)
PIECES = [b"{", b"}", b"[", b"]", b'"', b",", b":", b"\n", b"\r\n", b"\x00", b"\xff", b"\xef\xbb\xbf", b"a",
          b"1", b'"question"', b'"answer"', b'"messages"', b" ", b"\\", b"\\ud800", b"null", b"9" * 30]  # fmt: skip
raw_bytes = st.binary(max_size=200) | st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _load_all(path: Path, fmt: str, policy: str, fields: dict[str, str]) -> None:
    """The loading pipeline up to records: it may only ever raise DataError, and with a location."""
    try:
        result = read_rows(path, fmt, policy)
        assert all(isinstance(r.data, dict) for r in result.rows)
        assert all(r.source == str(path) and r.line >= 1 for r in result.rows + result.rejects)
        name = detect_schema(result.rows, fields, source=str(path))
        for row in result.rows:
            try:
                record = to_record(row, name, fields)
            except DataError as e:
                assert (e.source, e.line) == (str(path), row.line)
            else:
                assert (record.source, record.line) == (row.source, row.line)
    except DataError as e:
        assert e.source == str(path)


def _csv_text(rows: list) -> str:
    dicts = [r for r in rows if isinstance(r, dict)]
    header = sorted({k for r in dicts for k in r}) or ["question"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for r in dicts:
        writer.writerow([v if isinstance(v, str) else json.dumps(v) for v in (r.get(k, "") for k in header)])
    return buf.getvalue()


@FUZZ
@given(data=raw_bytes, fmt=st.sampled_from(["jsonl", "json", "csv", "text"]), policy=st.sampled_from(["error", "skip"]))  # fmt: skip
def test_random_bytes_load_or_raise_data_error(tmp_path, data, fmt, policy):
    _load_all(_write(tmp_path / f"fuzz.{fmt}", data), fmt, policy, {})


@FUZZ
@given(rows=rows_strategy, fmt=st.sampled_from(["jsonl", "json", "csv"]), policy=st.sampled_from(["error", "skip"]))  # fmt: skip
def test_random_json_shapes_load_or_raise_data_error(tmp_path, rows, fmt, policy):
    if fmt == "jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    elif fmt == "json":
        text = json.dumps(rows, indent=1)
    else:
        text = _csv_text(rows)
    path = tmp_path / f"shapes.{fmt}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _load_all(path, fmt, policy, {})
    _load_all(path, fmt, policy, {"question": "prompt", "answer": "text"})


def test_a_broken_json_object_file_names_the_line(tmp_path):
    from tunelab.data.formats import read_rows

    path = tmp_path / "obj.json"
    path.write_text('{"meta": {"v": 1}, "data": [\n {"question": "Q1?", "answer": "A1"},\n]}\n')
    with pytest.raises(DataError) as e:
        read_rows(str(path), on_bad_row="skip")
    assert e.value.line == 3 and "top-level [...] array" in e.value.hint
