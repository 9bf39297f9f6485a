"""`tunelab data check`: every problem the report claims to find is planted here and found, with exact
counts; the CLI's exit status gates a pipeline; `train` refuses blocking problems."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import write_jsonl
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.data import check, templates
from tunelab.data.check import Settings, analyse, normalise, preflight, quantiles
from tunelab.data.check_cli import measured_tokens_per_s
from tunelab.data.check_report import Quantiles
from tunelab.data.dataset import load_records
from tunelab.data.templates import QA_PROMPT, Segment
from tunelab.data.tokenize import encode, encode_many
from tunelab.errors import DataError

MAX_LENGTH = 48
FRANCE = {"question": "What is the capital of France?", "answer": "The capital of France is Paris."}
PERU = {"question": "What is the capital of Peru?", "answer": "The capital of Peru is Lima."}
TRAIN_ROWS = [
    FRANCE,
    PERU,
    FRANCE,  # line 3: exact duplicate
    {"question": "what is the capital of  PERU", "answer": "The capital of Peru is Lima"},  # 4: near dup
    {"question": "   ", "answer": "Nothing."},  # 5: whitespace-only question
    {"question": "Tell me about Japan.", "answer": "Japan " * 60},  # 6: completion truncated
    {"question": "fox " * 80, "answer": "Dog."},  # 7: prompt alone is too long: nothing trained
]
EVAL_ROWS = [
    {"question": "What is the capital of France?", "answer": "Paris."},  # leaked
    {"question": "WHAT is the capital of france", "answer": "Paris"},  # leaked once normalised
    {"question": "What is the capital of Chile?", "answer": "Santiago."},
    {"question": "What is the capital of Kenya?", "answer": "Nairobi."},
    {"question": "What is the capital of Egypt?", "answer": "Cairo."},
]


@pytest.fixture
def planted(tmp_path) -> tuple[Path, Path]:
    lines = [json.dumps(r).encode() for r in TRAIN_ROWS]
    lines += [
        b'{"question": "broken',  # 8: not JSON
        b'{"question": "bad \xff", "answer": "x"}',  # 9: not UTF-8
        b'{"question": "Empty?", "answer": ""}',  # 10: nothing to learn
        b"",
    ]
    train = tmp_path / "train.jsonl"
    train.write_bytes(b"\n".join(lines))
    return train, write_jsonl(tmp_path / "eval.jsonl", EVAL_ROWS)


def _n(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _report(train: Path, held: Path, tokenizer, **overrides) -> check.Report:
    loaded = load_records(str(train), str(held), on_bad_row="skip")
    template = templates.resolve("qa", loaded.schema)
    values = dict(max_length=MAX_LENGTH, batch_size=2, micro_batch_tokens=4096) | overrides
    return analyse(loaded, template, tokenizer, Settings(**values))


def test_planted_problems_are_found_with_exact_counts(planted, tokenizer):
    train, held = planted
    report = _report(train, held, tokenizer)
    assert report.schema == "qa" and report.template == "qa"
    assert report.fields == {"question": "question", "answer": "answer"}
    assert report.files == {
        str(train): {"train": 7, "eval": 0, "rejected": 3},
        str(held): {"train": 0, "eval": 5, "rejected": 0},
    }
    assert report.rejects_by_reason == {
        "not valid JSON": 1,
        "invalid UTF-8": 1,
        "field 'answer': empty completion: no answer to train on or score against": 1,
    }
    t, e = report.splits["train"], report.splits["eval"]
    assert (t.rows, e.rows) == (7, 5)
    assert (t.exact_duplicates, t.near_duplicates) == (1, 1)
    assert (e.exact_duplicates, e.near_duplicates) == (0, 1)  # eval 2 is eval 1 up to case/punctuation
    assert t.empty_fields == {"question": 1} and e.empty_fields == {}
    assert (report.leaked, report.leaked_at) == (2, [f"{held}:1", f"{held}:2"])

    # Lengths, computed here from the tokenizer directly: prompt = rendered prompt, completion + EOS.
    prompts = [_n(tokenizer, QA_PROMPT.format(prompt=r["question"])) for r in TRAIN_ROWS]
    completions = [_n(tokenizer, r["answer"]) + 1 for r in TRAIN_ROWS]
    totals = [p + c for p, c in zip(prompts, completions)]
    assert [i + 1 for i, n in enumerate(totals) if n > MAX_LENGTH] == [6, 7]
    assert prompts[6] > MAX_LENGTH > prompts[5]
    assert t.prompt_tokens == quantiles(prompts)
    assert t.completion_tokens == quantiles(completions)
    assert t.total_tokens == quantiles(totals)
    assert t.total_tokens.max == max(totals)
    assert t.truncated == 2 and e.truncated == 0
    assert t.completion_tokens_lost == (totals[5] - MAX_LENGTH) + completions[6]
    assert (t.zero_trainable, t.zero_trainable_at) == (1, [f"{train}:7"])
    kept = [min(n, MAX_LENGTH) for n in totals]
    assert t.tokens == sum(kept)

    assert report.epoch is not None
    assert (report.epoch.tokens, report.epoch.steps, report.epoch.micro_batches) == (sum(kept), 4, 4)
    assert report.epoch.seconds is None  # no measured speed: no invented time
    assert report.tokenizer.eos_token_id == tokenizer.eos_token_id
    assert report.tokenizer.note.startswith("no pad token: fine")

    assert [(f.level, f.code) for f in report.findings] == [
        ("blocking", "leakage"),
        ("warning", "rejected_rows"),
        ("warning", "truncated"),
        ("warning", "zero_trainable"),
        ("warning", "empty_field"),
        ("warning", "exact_duplicates"),
        ("warning", "near_duplicates"),
        ("warning", "near_duplicates"),
    ]
    assert report.findings[-1].message.startswith("eval: 1 more rows repeat an earlier row")
    assert report.findings[0].message.startswith("2 of 5 (40.0%) eval rows ask a prompt that train also has")
    assert report.findings[2].message == (
        f"train: 2 of 7 (28.6%) examples are longer than max_length {MAX_LENGTH}; "
        f"truncation removes {t.completion_tokens_lost} trained tokens (answer tokens; prompt ones too under train_on_prompt)"
    )

    assert [(ex.line, ex.truncated) for ex in report.examples] == [(1, False), (2, False), (3, False)]
    assert report.examples[0].segments == [  # from the labels: the trained EOS shows
        (QA_PROMPT.format(prompt=FRANCE["question"]), False),
        (FRANCE["answer"] + tokenizer.eos_token, True),
    ]
    on_prompt = _report(*planted, tokenizer, train_on_prompt=True).examples[0].segments
    assert on_prompt == [
        (QA_PROMPT.format(prompt=FRANCE["question"]) + FRANCE["answer"] + tokenizer.eos_token, True)
    ]
    as_json = json.loads(report.to_json())
    assert as_json["blocking"] is True
    assert as_json["splits"]["train"]["near_duplicates"] == 1
    markdown = report.to_markdown()
    assert "### Answer:\n[[The capital of France is Paris.<|endoftext|>]]" in markdown
    assert markdown.startswith("# Data check: **blocking problems found**")


def test_leakage_threshold(planted, tokenizer):
    train, held = planted
    assert _report(train, held, tokenizer, max_leakage=0.4).findings[0].level == "warning"  # 40% is allowed
    assert _report(train, held, tokenizer, max_leakage=0.39).findings[0].level == "blocking"


def test_leakage_from_a_file_that_repeats_rows_says_so(tmp_path, tokenizer):
    """A file of repeated rows blocked with '100% of eval rows ask a prompt that train also has', not
    saying that the repeats were the cause."""
    rows = [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(20)]
    plain = _report(
        write_jsonl(tmp_path / "t.jsonl", rows), write_jsonl(tmp_path / "e.jsonl", rows[:2]), tokenizer
    )
    (leak,) = [f for f in plain.findings if f.code == "leakage"]
    assert "repeats rows" not in leak.message
    doubled = write_jsonl(tmp_path / "d.jsonl", rows + rows[:5])
    report = _report(doubled, write_jsonl(tmp_path / "e2.jsonl", rows[:2]), tokenizer)
    (leak,) = [f for f in report.findings if f.code == "leakage"]
    assert "the data repeats rows (5 duplicates)" in leak.message and "drop the repeated rows" in leak.message


def test_time_per_epoch_only_from_a_measured_speed(planted, tokenizer, tmp_path):
    report = _report(*planted, tokenizer, tokens_per_s=100.0)
    assert report.epoch.seconds == report.epoch.tokens / 100.0
    metrics = tmp_path / "run"
    metrics.mkdir()
    lines = [{"step": 1, "tokens_per_s": 10.0}, {"step": 2, "tokens_per_s": 30.0}, {"step": 3}]
    write_jsonl(metrics / "metrics.jsonl", [*lines, {"step": 4, "tokens_per_s": 20.0}])
    assert measured_tokens_per_s(str(metrics)) == 20.0
    assert measured_tokens_per_s(str(tmp_path)) is None


def test_quantiles_are_nearest_rank():
    assert quantiles(list(range(1, 101))) == Quantiles(50, 90, 99, 100)
    assert quantiles([4, 1, 3, 2]) == Quantiles(2, 4, 4, 4)
    assert quantiles([7]) == Quantiles(7, 7, 7, 7)
    assert quantiles([]) is None


def test_normalise():
    assert normalise("  What's   the\tCAPITAL, of Peru?! ") == "whats the capital of peru"


def test_no_eos_blocks_and_pad_eos_is_fine(planted, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.pad_token = tok.eos_token
    report = _report(*planted, tok, max_leakage=1.0)
    assert report.tokenizer.note.startswith("pad == EOS: fine in tunelab")
    assert report.blocking == []
    tok.eos_token = None
    report = _report(*planted, tok, max_leakage=1.0)
    assert [f.code for f in report.blocking] == ["no_eos"]


def test_all_masked_blocks(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "t.jsonl", [FRANCE, PERU])
    held = write_jsonl(tmp_path / "e.jsonl", [EVAL_ROWS[2]])
    report = _report(train, held, tokenizer, max_length=4)  # every prompt is longer than 4 tokens
    assert [f.code for f in report.blocking] == ["all_masked"]
    assert report.splits["train"].trainable_tokens == 0
    assert report.splits["train"].truncated == 2
    assert "zero_trainable" not in [f.code for f in report.findings if f.message.startswith("train")]


def test_a_chat_template_that_ends_turns_without_a_special_token_is_warned_about(tmp_path, tokenizer):
    """A chat template rendering `role: content\\n` ends an assistant turn with plain text: training
    labels the newline and no token generation stops on (chat adds no EOS), so the model never learns
    to stop. Neither the data check nor `train` said anything; now both warn, naming what to do."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    rows = [{"question": f"q{i}?", "answer": f"a{i}."} for i in range(4)]
    loaded = load_records(str(write_jsonl(tmp_path / "t.jsonl", rows)))
    report = analyse(loaded, templates.resolve("chat", "qa"), tok, Settings(max_length=512))
    [finding] = [f for f in report.findings if f.code == "no_turn_end"]
    assert finding.level == "warning" and "never learns to stop" in finding.message
    assert "eos_token" in finding.message and "template qa" in finding.message
    # A template that ends turns with a special token (<|im_end|>) is fine.
    report = analyse(loaded, templates.resolve("chat", "qa"), tokenizer, Settings(max_length=512))
    assert "no_turn_end" not in [f.code for f in report.findings]


def test_chat_rows_empty_turns_and_lengths(tmp_path, tokenizer):
    def convo(system: str, user: str, answer: str) -> dict:
        turns = [("system", system), ("user", user), ("assistant", answer)]
        return {"messages": [{"role": r, "content": c} for r, c in turns]}

    train = write_jsonl(tmp_path / "t.jsonl", [convo("", "hi", "hello"), convo("Be brief.", " ", "ok")])
    held = write_jsonl(tmp_path / "e.jsonl", [convo("", "bye", "see you")])
    loaded = load_records(str(train), str(held))
    report = analyse(loaded, templates.resolve("auto", "messages"), tokenizer, Settings(max_length=512))
    assert report.template == "chat"
    assert report.splits["train"].empty_fields == {"messages.system": 1, "messages.user": 1}
    assert report.splits["eval"].empty_fields == {"messages.system": 1}
    # The trained part is the assistant turn with the template's end-of-turn token (not the newline
    # after it); no EOS added.
    completions = [_n(tokenizer, "hello<|im_end|>"), _n(tokenizer, "ok<|im_end|>")]
    assert report.splits["train"].completion_tokens == quantiles(completions)
    assert report.leaked == 0


segments = st.lists(
    st.builds(
        Segment, st.text(max_size=30) | st.sampled_from(["", "Paris.", "### Answer:\n"]), st.booleans()
    ),
    max_size=4,
)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.lists(segments, max_size=6),
    max_length=st.integers(1, 40),
    side=st.sampled_from(["right", "left"]),
    on_prompt=st.booleans(),
    eos=st.booleans(),
)
def test_encode_many_equals_encode(tokenizer, batch, max_length, side, on_prompt, eos):
    expected = [encode(s, tokenizer, max_length, side, on_prompt, eos) for s in batch]
    assert encode_many(batch, tokenizer, max_length, side, on_prompt, eos) == expected


def test_tokenize_texts_batches_equal_single_calls(tokenizer):
    """Past the first batch the Rust batch encoder is used; it must give the ids a plain call gives."""
    from tunelab.data.tokenize import _rust_batch_encoder, tokenize_texts

    texts = ["", "Paris.", "<|im_start|>user\nhi<|im_end|>\n", "  two  spaces ", "é ü 東京", "a" * 300] * 3
    single = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert _rust_batch_encoder(tokenizer) is not None
    assert tokenize_texts(texts, tokenizer, batch_size=4) == single
    assert tokenize_texts([], tokenizer) == []


# ---------------------------------------------------------------- gates: preflight, CLI, train


def test_preflight_modes(planted, tokenizer, capsys):
    train, held = planted
    loaded = load_records(str(train), str(held), on_bad_row="skip")
    template = templates.resolve("qa", "qa")
    s = Settings(max_length=MAX_LENGTH)
    with pytest.raises(DataError, match="the data check found blocking problems: 2 of 5"):
        preflight("block", loaded, template, tokenizer, s)
    checked = preflight("warn", loaded, template, tokenizer, s)
    assert checked is not None and len(checked[0].blocking) == 1
    assert "data check: blocking: 2 of 5 (40.0%) eval rows" in capsys.readouterr().err
    assert preflight("off", loaded, template, tokenizer, s) is None


def _cli(tmp_path, tokenizer_dir, *args: str) -> tuple[int, Path]:
    out = tmp_path / "report"
    code = main(["data", "check", *args, "--model", str(tokenizer_dir), "--out", str(out)])
    return code, out


def test_cli_skip_writes_report_and_rejects(planted, tokenizer_dir, tmp_path, capsys):
    train, held = planted
    code, out = _cli(
        tmp_path, tokenizer_dir, "--data", str(train), "--eval-data", str(held),
        "--on-bad-row", "skip", "--max-length", str(MAX_LENGTH),
    )  # fmt: skip
    assert code == 1  # leakage
    report = json.loads((out / "report.json").read_text())
    assert report["splits"]["train"]["rows"] == 7
    assert [f["code"] for f in report["findings"] if f["level"] == "blocking"] == ["leakage"]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (8, "not valid JSON (Unterminated string starting at: column 14)"),
        (9, "invalid UTF-8 (byte 19 of the row)"),
        (10, "field 'answer': empty completion: no answer to train on or score against"),
    ]
    assert rejects[1]["raw"] == '{"question": "bad \\xff", "answer": "x"}'
    assert "[[The capital of France is Paris.<|endoftext|>]]" in (out / "report.md").read_text()
    assert "blocking problems found" in capsys.readouterr().out


def test_cli_error_policy_stops_at_first_bad_row(planted, tokenizer_dir, tmp_path, capsys):
    train, _ = planted
    code, out = _cli(tmp_path, tokenizer_dir, "--data", str(train))
    assert code == 1
    findings = json.loads((out / "report.json").read_text())["findings"]
    assert [(f["level"], f["code"]) for f in findings] == [("blocking", "bad_row")]
    assert findings[0]["message"].startswith(f"{train}:8: not valid JSON (Unterminated string")
    assert not (out / "rejects.jsonl").exists()


def test_cli_clean_data_exits_zero(tmp_path, tokenizer_dir, qa_file):
    code, out = _cli(tmp_path, tokenizer_dir, "--data", str(qa_file))
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["blocking"], report["findings"]) == (False, [])
    assert report["files"] == {str(qa_file): {"train": 32, "eval": 4, "rejected": 0}}  # 36 rows, 10% eval


def test_cli_errors_exit_two(tmp_path, tokenizer_dir, qa_file, capsys):
    assert main(["data", "check", "--out", str(tmp_path / "o")]) == 2
    assert "error: nothing to check" in capsys.readouterr().err
    code, _ = _cli(tmp_path, tokenizer_dir, "--data", str(tmp_path / "missing.jsonl"))
    assert code == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err


def test_train_refuses_blocking_problems(planted, llama_dir, tmp_path):
    from tunelab.runner import run

    train, held = planted
    values = {
        "data.path": str(train), "data.eval_path": str(held), "data.on_bad_row": "skip",
        "data.max_length": MAX_LENGTH, "model.name_or_path": str(llama_dir), "out": str(tmp_path / "run"),
    }  # fmt: skip
    with pytest.raises(DataError, match="eval rows ask a prompt that train also has"):
        run(load_config(values=values))
    assert not (tmp_path / "run").exists()  # refused before a run directory or weights


def test_cli_takes_config_keys_such_as_the_column_names(tokenizer_dir, tmp_path):
    """Columns the check cannot place are named on its command line, as for train."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"q": f"What is {i}?", "a": f"It is {i}."} for i in range(12)])
    code, _ = _cli(tmp_path, tokenizer_dir, "--data", str(data))
    assert code == 2  # cannot tell the schema
    code, out = _cli(
        tmp_path, tokenizer_dir, "--data", str(data), "--data.fields.question=q", "--data.fields.answer=a"
    )
    assert code == 0 and json.loads((out / "report.json").read_text())["splits"]["train"]["rows"] > 0


def test_a_pretraining_config_is_checked_in_chunks_never_truncated(tokenizer_dir, tokenizer, tmp_path):
    """Pretraining joins the documents and cuts them into chunk_length chunks: the epoch is counted
    in those chunks, as training counts it, and a long document is not 'truncated'."""
    from tunelab.data.dataset import pack_documents

    docs = [" ".join(f"word{i}" for i in range(n)) for n in (300, 40, 25, 90, 12)]
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(docs) + "\n")
    config = tmp_path / "pt.yaml"
    config.write_text(
        f"task: pretrain\ndata:\n  path: {data}\n  chunk_length: 32\n  eval_ratio: 0.0\n  max_length: 64\n"
        "train:\n  batch_size: 4\n  micro_batch_tokens: 64\n"
    )
    code, out = _cli(tmp_path, tokenizer_dir, str(config))
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    chunks = pack_documents(docs, tokenizer, 32)
    assert report["epoch"]["steps"] == -(-len(chunks) // 4) and report["chunk_length"] == 32
    assert report["splits"]["train"]["truncated"] == 0
    assert "chunk_length 32" in (out / "report.md").read_text()


def test_an_empty_alpaca_input_counts_as_no_input_for_leakage_and_duplicates(tokenizer_dir, tmp_path):
    train = write_jsonl(
        tmp_path / "t.jsonl",
        [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say hi", "input": "", "output": "hi"},
         {"instruction": "Count to three", "output": "1 2 3"}],
    )  # fmt: skip
    held = write_jsonl(
        tmp_path / "e.jsonl",
        [{"instruction": "Say hi", "input": "", "output": "hello"},
         {"instruction": "Count to three", "input": None, "output": "one two three"}],
    )  # fmt: skip
    code, out = _cli(tmp_path, tokenizer_dir, "--data", str(train), "--eval-data", str(held))
    report = json.loads((out / "report.json").read_text())
    assert code == 1 and report["leaked"] == 2  # both eval prompts render exactly as a train prompt
    assert report["splits"]["train"]["exact_duplicates"] == 1


def test_a_template_format_that_names_a_missing_field_is_a_config_error(tokenizer_dir, tmp_path, capsys):
    """A typo in the format fails every row alike: exit 2 with the fields there are, not a bad row."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": f"Q{i}?", "answer": f"A{i}"} for i in range(4)])
    args = ["--data", str(data), "--data.template=custom", r"--data.prompt_format=Q: {questio}\nA: ",
            "--data.completion_format={answer}"]  # fmt: skip
    code, _ = _cli(tmp_path, tokenizer_dir, *args)
    err = capsys.readouterr().err
    assert (
        code == 2
        and "names {questio}, a field these rows do not have" in err
        and "available fields: " in err
        and "question" in err
    )


def test_a_truncated_example_is_shown_as_training_sees_it(tokenizer_dir, tmp_path):
    """max_length cut the completion away: the report's example must not show it as trained."""
    rows = [{"question": "Q" + " word" * 30 + "?", "answer": "The currency is the dinar."}] * 3
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    code, out = _cli(tmp_path, tokenizer_dir, "--data", str(data), "--max-length", "16")
    report = json.loads((out / "report.json").read_text())
    [first, *_] = report["examples"]
    assert first["truncated"] and "dinar" not in "".join(
        text for text, trained in first["segments"] if trained
    )
    assert "dinar" not in (out / "report.md").read_text()


def test_left_truncation_counts_the_trained_tokens_it_removes(tmp_path, tokenizer):
    """Cut from the left into the answer, the first kept token is trained but predicts from nothing
    (targets are shifted), so training loses it too: the report said one trained token fewer was
    removed per such example than training loses (72 where 75 were)."""
    from tunelab.data.dataset import encode_records
    from tunelab.data.tokenize import n_trainable

    rows = [
        {"question": "Q" + " word" * n, "answer": "A" + " ans" * m} for n, m in [(2, 3), (5, 20), (30, 2)]
    ]
    loaded = load_records(str(write_jsonl(tmp_path / "t.jsonl", rows)), eval_ratio=0.0)
    template = templates.resolve("qa", loaded.schema)
    for side in ("left", "right"):
        report = analyse(loaded, template, tokenizer, Settings(max_length=12, truncation_side=side))
        cut = encode_records(loaded.train, template, tokenizer, 12, side)
        whole = encode_records(loaded.train, template, tokenizer, 10**6, side)
        lost = sum(n_trainable(w) - n_trainable(c) for w, c in zip(whole, cut))
        assert report.splits["train"].completion_tokens_lost == lost, side


def test_a_repeated_row_split_onto_both_sides_is_named_as_the_cause_of_leakage(tmp_path, tokenizer):
    """The documented case: a file repeats a row and the seeded split puts one copy in train, one in
    eval. Duplicates are counted within each split, so neither side had any, and the leakage finding
    did not say the repeat was the cause; the repeat across the split now counts."""
    rows = [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(20)]
    loaded = load_records(str(write_jsonl(tmp_path / "r.jsonl", [*rows, rows[5]])))  # line 21 = line 6
    assert sorted(r.line for r in loaded.eval) == [6, 20]  # split_seed 42: line 6 in eval, 21 in train
    report = analyse(loaded, templates.resolve("qa", "qa"), tokenizer, Settings(max_length=64))
    (leak,) = [f for f in report.findings if f.code == "leakage"]
    assert leak.message.startswith(
        f"1 of 2 (50.0%) eval rows ask a prompt that train also has (limit 1%) at {tmp_path / 'r.jsonl'}:6"
    )
    assert "the data repeats rows (1 duplicates)" in leak.message


def test_a_pretraining_config_on_rows_that_are_not_text_cannot_run(tokenizer_dir, tmp_path, capsys):
    """Q/A rows under task: pretrain crashed the check with a KeyError traceback and exit status 1
    (the status of a blocking finding); train refuses them with a data error. Now exit 2, saying why."""
    data = write_jsonl(tmp_path / "qa.jsonl", [FRANCE, PERU, EVAL_ROWS[2]])
    config = tmp_path / "pt.yaml"
    config.write_text(f"task: pretrain\ndata:\n  path: {data}\n  chunk_length: 32\n")
    code, _ = _cli(tmp_path, tokenizer_dir, str(config))
    assert code == 2
    assert "pretraining reads raw text, but the rows look like 'qa'" in capsys.readouterr().err
