"""Progress of the long steps outside the loop: on stderr, off for library calls, and the results the same."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from tunelab import progress
from tunelab.cli import main
from tunelab.data import templates
from tunelab.data.dataset import encode_records, load_records, pack_documents


@pytest.fixture
def chatty(monkeypatch):
    """Every step says what it does: a line per part, whatever the time."""
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    monkeypatch.setattr(progress, "SAY_S", 0.0)
    monkeypatch.setattr(progress, "CHUNK", 8)


def _rows(n: int) -> list[dict]:
    return [{"question": f"What is {i} plus one?", "answer": str(i + 1)} for i in range(n)]


def test_library_calls_are_silent_and_progress_changes_no_result(tmp_path, tokenizer, chatty, capsys):
    f = write_jsonl(tmp_path / "d.jsonl", _rows(50))
    loaded = load_records(str(f), eval_ratio=0)
    t = templates.resolve("qa", "qa")
    quiet = encode_records(loaded.train, t, tokenizer, 64)
    docs = [f"document {i} " * 3 for i in range(20)]
    quiet_chunks = pack_documents(docs, tokenizer, 16)
    assert capsys.readouterr().err == ""  # nothing unless a command turned progress on
    with progress.shown():
        shown = encode_records(loaded.train, t, tokenizer, 64, label="train")
        shown_chunks = pack_documents(docs, tokenizer, 16)
    assert [(e.input_ids, e.labels) for e in shown] == [(e.input_ids, e.labels) for e in quiet]
    assert [(c.input_ids, c.labels) for c in shown_chunks] == [(c.input_ids, c.labels) for c in quiet_chunks]
    err = capsys.readouterr().err.splitlines()
    # a line per part of 8 with the count and an ETA, then one with the total and the time
    assert err[0].startswith("data: tokenising train: 8/50 examples (16%), ") and ", eta " in err[0]
    assert sum(line.startswith("data: tokenising train: ") and "eta" in line for line in err) == 6
    assert any(line.startswith("data: tokenising train: 50 examples in ") for line in err)
    assert any(line.startswith("data: tokenising documents: 20 documents in ") for line in err)


def test_short_steps_say_nothing_and_a_terminal_gets_a_bar(tmp_path, tokenizer, monkeypatch, capsys):
    monkeypatch.setattr(progress, "CHUNK", 8)
    f = write_jsonl(tmp_path / "d.jsonl", _rows(50))
    t = templates.resolve("qa", "qa")
    with progress.shown():
        loaded = load_records(str(f), eval_ratio=0)
        encode_records(loaded.train, t, tokenizer, 64)
    assert capsys.readouterr().err == ""  # under SAY_S: no line
    monkeypatch.setattr(progress, "_is_terminal", lambda: True)
    monkeypatch.setattr(progress, "SAY_S", 0.0)
    with progress.shown():
        with progress.track("work", 3, "items") as advance:
            for _ in range(3):
                advance(1)
    assert capsys.readouterr().err.splitlines()[-1].startswith("work: 3 items in ")


def test_data_check_shows_progress_on_stderr_and_keeps_stdout(tmp_path, tokenizer_dir, chatty, capsys):
    f = write_jsonl(tmp_path / "d.jsonl", _rows(40))
    out = tmp_path / "report"
    code = main(["data", "check", "--data", str(f), "--model", str(tokenizer_dir), "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert err[0].startswith(f"data: reading {f}: 40 rows in ")
    assert any(line.startswith("data check: tokenising train: 8/36 examples") for line in err)
    assert any(line.startswith("data check: tokenising train: 36 examples in ") for line in err)
    assert any(line.startswith("data check: leakage from train into eval in ") for line in err)
    assert "tokenising" not in captured.out and "reading" not in captured.out
    assert json.loads((out / "report.json").read_text())["splits"]["train"]["rows"] == 36


def test_generate_file_shows_progress_per_batch_and_answers_as_one_call(tmp_path, llama_dir, chatty, capsys):
    from tunelab.generate import Generator, read_prompts

    f = write_jsonl(tmp_path / "p.jsonl", [{"question": f"What is {i}?"} for i in range(40)])
    out = tmp_path / "out.jsonl"
    args = ["generate", str(llama_dir), "--file", str(f), "--output", str(out), "--max-new-tokens", "3"]
    assert main([*args, "--temperature", "1.0", "--seed", "7"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"wrote 40 completions to {out}\n"  # stdout as before
    err = captured.err.splitlines()
    assert err[0].startswith("generate: 32/40 prompts (80%), 0:0") and " elapsed, eta 0:" in err[0]
    assert err[1].startswith("generate: 40 prompts in ")
    gen = Generator.load(str(llama_dir))
    whole = gen.generate(read_prompts(f), 3, 1.0, 1.0, 7)  # the same stream as one call
    assert [json.loads(line)["completion"] for line in out.read_text().splitlines()] == whole


def test_compare_shows_each_contenders_generation_on_stderr(tmp_path, tiny_models, qa_file, chatty, capsys):
    llama, qwen = str(tiny_models["llama"]), str(tiny_models["qwen2"])
    common = ["--data", str(qa_file), "--limit", "5", "--max-new-tokens", "2", "--batch-size", "2"]
    assert main(["compare", llama, qwen, *common, "--out", str(tmp_path / "c"), "--bootstrap", "200"]) == 0
    err = capsys.readouterr().err.splitlines()
    for name in ("llama", "qwen2"):  # per contender: a line per batch with an ETA, then the count and time
        assert any(
            line.startswith(f"generate {name}: 2/5 examples (40%), ") and "eta" in line for line in err
        )
        assert any(line.startswith(f"generate {name}: 5 examples in ") for line in err)
    assert main(["compare", llama, *common, "--out", str(tmp_path / "q"), "--no-loss", "--quiet"]) == 0
    assert "generate " not in capsys.readouterr().err  # --quiet: none


def test_an_evaluation_in_training_says_how_many_examples_and_how_long(tmp_path, llama_dir, qa_file, capsys):
    import tunelab

    run = tunelab.train(
        model=str(llama_dir),
        data=str(qa_file),
        out=str(tmp_path / "run"),
        epochs=1,
        batch_size=8,
        log_every=1,
    )
    evals = [
        r for r in map(json.loads, (run.path / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r
    ]
    assert [r["eval_examples"] for r in evals] == [4] * len(evals) and len(evals) >= 2  # step 0 and the end
    assert all(r["eval_s"] >= 0 for r in evals)
    lines = [line for line in capsys.readouterr().err.splitlines() if "eval_loss" in line]
    assert len(lines) == len(evals) and all(
        " (4 examples in " in line and line.endswith(" s)") for line in lines
    )
