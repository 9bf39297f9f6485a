"""Benchmarks through lm-evaluation-harness: a local YAML task over JSONL runs end to end, offline, on
tiny models; a missing lm-eval or an unknown task says what to do."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest

from tunelab.errors import TunelabError
from tunelab.evaluate import harness

# The correct choice is the one-word answer in two docs and the long one in the third. A random tiny
# model spreads probability almost evenly over its 400 tokens (about -6 nats a token), so a one-word
# choice always outscores a 20-token one: accuracy is 2/3 for any such model.
LONG = "Paris and Lima and Tokyo and Cairo and Rome and Accra and Madrid and Ottawa"
DOCS = [
    {"question": "What is the capital of France?", "choices": ["Paris", LONG], "label": 0},
    {"question": "What is the capital of Peru?", "choices": [LONG, "Lima"], "label": 1},
    {"question": "What is the capital of Japan?", "choices": ["Tokyo", LONG], "label": 1},
]
TASK = """task: capitals_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TunelabError) as err:
        harness.require_lm_eval()
    assert err.value.hint == "pip install 'tunelab[eval]'"


def test_unknown_task_names_the_close_ones():
    manager = SimpleNamespace(all_tasks=["arc_easy", "arc_challenge", "capitals_local"])
    harness.check_tasks(["arc_easy"], manager)
    with pytest.raises(TunelabError, match=r"unknown lm-eval task\(s\): arc_esay \(did you mean arc_easy"):
        harness.check_tasks(["arc_esay"], manager)


def test_lm_eval_numbers_lose_their_filter_suffix():
    raw = {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict": 1.0, "sample_len": 3}
    assert harness._numbers(raw) == {"acc": 0.5, "acc_stderr": 0.1, "exact_match (strict)": 1.0}


@pytest.mark.slow
def test_local_task_end_to_end_offline(tmp_path, tiny_models):
    pytest.importorskip("lm_eval")
    from tunelab.evaluate.cli import register

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "capitals.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "capitals.yaml").write_text(TASK.format(data=data))

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(
        ["bench", str(tiny_models["llama"]), str(tiny_models["qwen2"]), "--tasks", "capitals_local",
         "--include-path", str(tasks), "--device", "cpu", "--out", str(out)]
    )  # fmt: skip
    assert args.func(args) == 0
    results = json.loads((out / "eval" / "bench.json").read_text())
    assert list(results) == ["llama", "qwen2"]
    for label in results:
        assert results[label]["capitals_local"]["acc"] == pytest.approx(2 / 3)
