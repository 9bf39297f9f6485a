"""`eval` / `compare` say which test rows a run trained on: counted from the run's own training rows
(its file, mapping and split), flagged per row, the means on the rest reported, never refused."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
from pathlib import Path

from conftest import write_jsonl
from tunelab.data import templates
from tunelab.evaluate.predict import examples_from_rows
from tunelab.evaluate.seen import check_run

QA = templates.resolve("qa", "qa")
TRAIN = [{"q": f"What is {a} plus {b}?", "a": f"{a + b}"} for a in range(1, 4) for b in range(1, 4)]  # 9 rows


def _run(tmp: Path, models: dict[str, Path], data: dict, out: str | None = None) -> Path:
    """A full finetune of the tiny llama (its final/ the tiny qwen2) trained on `data`."""
    from tunelab.config import DataConfig, ModelConfig, RunConfig, save_config

    run = tmp / (out or "run")
    shutil.copytree(models["qwen2"], run / "final")
    (run / "final" / "tunelab_template.json").write_text(json.dumps(dataclasses.asdict(QA)))
    cfg = RunConfig(
        model=ModelConfig(name_or_path=str(models["llama"])), data=DataConfig(**data), out=out or str(run)
    )
    save_config(cfg, run / "config.yaml")
    return run


def test_eval_counts_flags_and_reports_test_rows_the_run_trained_on(tmp_path, tiny_models, capsys):
    """A test file sharing rows with the run's training file: 2 of its 5 questions were trained on (1 with
    the same answer), said on stderr, in summary.json, per row in predictions.jsonl and in report.md,
    with the means on the 3 others; --drop-seen leaves the 2 out."""
    from tunelab.cli import main

    train = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    # Its own eval file (gone now: not needed, every row of train.jsonl was trained on).
    run = _run(tmp_path, tiny_models, {"path": str(train), "eval_path": str(tmp_path / "gone.jsonl"), "fields": {"question": "q", "answer": "a"}})  # fmt: skip
    test_rows = [
        {"q": "What is 1 plus 1?", "a": "2"},  # seen, with its answer
        {"q": "what is 2 plus 3", "a": "five"},  # seen up to case and punctuation, another answer
        {"q": "What is 7 plus 7?", "a": "14"},
        {"q": "What is 8 plus 1?", "a": "9"},
        {"q": "What is 9 plus 9?", "a": "18"},
    ]
    test = write_jsonl(tmp_path / "test.jsonl", test_rows)
    common = ["--data", str(test), "--max-new-tokens", "2", "--quiet", "--bootstrap", "200"]
    assert main(["eval", str(run), *common]) == 0
    err = capsys.readouterr().err
    assert (
        "run: 2 of 5 test rows (40.0 %) have a question the run trained on (1 with the same answer too)"
        in err
    )
    summary = json.loads((run / "eval" / "summary.json").read_text())
    seen = summary["models"]["run"]["seen_in_training"]
    assert {k: seen[k] for k in ("checked", "rows", "seen_prompt", "seen_prompt_and_reference", "trained_rows")} == {
        "checked": True, "rows": 5, "seen_prompt": 2, "seen_prompt_and_reference": 1, "trained_rows": 9,
    }  # fmt: skip
    assert summary["models"]["llama"]["seen_in_training"] is None  # a hub/HF base: no run to check
    preds = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").open()]
    mine = [p for p in preds if p["model"] == "run"]
    assert [p["seen_in_training"] for p in mine] == [True, True, False, False, False]
    assert [p["seen_with_reference"] for p in mine] == [True, False, False, False, False]
    assert all("seen_in_training" not in p for p in preds if p["model"] == "llama")
    for metric in summary["metrics"]:  # the honest figure: the mean over the unseen rows only
        unseen = [p[metric] for p in mine if not p["seen_in_training"]]
        assert math.isclose(seen["unseen_means"][metric], sum(unseen) / 3)
    assert {(d["model"], d["wins"] + d["ties"] + d["losses"]) for d in summary["unseen_deltas"]} == {
        ("run", 3)
    }
    report = (run / "report.md").read_text()
    assert "## Seen in training" in report and "run: 2 of 5 test rows (40.0 %)" in report
    assert "run (3 rows)" in report

    assert main(["eval", str(run), "--drop-seen", *common]) == 0
    err = capsys.readouterr().err
    assert "(1 with the same answer too); its scores on them measure recall, not generalisation: they are left out (--drop-seen)" in err  # fmt: skip
    assert "left out 2 test rows a run here trained on (--drop-seen)" in err
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["n_examples"] == 3 and summary["models"]["run"]["seen_in_training"]["seen_prompt"] == 0
    assert summary["settings"]["drop_seen"] is True and summary["unseen_deltas"] == []
    assert (
        "Seen in training: 2 test rows a run here trained on were left out (--drop-seen). None of the 3 "
        "test questions is among those run trained on." in (run / "report.md").read_text()
    )


def test_a_run_whose_training_file_is_gone_says_the_check_could_not_run(tmp_path, tiny_models, capsys):
    from tunelab.cli import main

    train = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    run = _run(tmp_path, tiny_models, {"path": str(train), "fields": {"question": "q", "answer": "a"}})
    train.unlink()
    test = write_jsonl(tmp_path / "test.jsonl", TRAIN[:2])
    assert main(["eval", str(run), "--no-base", "--data", str(test), "--max-new-tokens", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "run: could not check whether the test rows were in its training data (" in err
    assert "train.jsonl" in err and "its scores may include rows it trained on" in err
    summary = json.loads((run / "eval" / "summary.json").read_text())
    seen = summary["models"]["run"]["seen_in_training"]
    assert seen["checked"] is False and seen["seen_prompt"] is None and "train.jsonl" in seen["note"]
    assert "could not check" in (run / "report.md").read_text()
    preds = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").open()]
    assert all("seen_in_training" not in p for p in preds)


def test_rows_the_run_split_off_for_its_own_eval_were_not_trained_on(tmp_path, tiny_models, monkeypatch):
    """data.eval_ratio split the file: the rows its eval split took are not seen. The run's relative
    data path is read from where training ran (the run directory's `out` tells), not the current one."""
    project = tmp_path / "project"
    write_jsonl((project / "data").mkdir(parents=True) or project / "data" / "train.jsonl", TRAIN)
    monkeypatch.chdir(project)
    data = {
        "path": "data/train.jsonl",
        "eval_ratio": 0.3,
        "split_seed": 7,
        "fields": {"question": "q", "answer": "a"},
    }
    run = _run(project, tiny_models, data, out="runs/r")
    monkeypatch.chdir(tmp_path)  # evaluated from elsewhere, where another data/train.jsonl lies
    write_jsonl((tmp_path / "data").mkdir() or tmp_path / "data" / "train.jsonl", TRAIN[:1])
    order = list(range(len(TRAIN)))
    random.Random(7).shuffle(order)
    held = set(order[: round(len(TRAIN) * 0.3)])  # 3 rows, as load_records splits
    examples = examples_from_rows(TRAIN, fields={"question": "q", "answer": "a"})
    check = check_run(run, examples)
    assert check.note is None and check.trained_rows == 6
    assert check.prompt == [i not in held for i in range(len(TRAIN))]
    assert check.pair == check.prompt and check.n_prompt == 6
