"""The shipped base model and `tunelab demo` (a quick run: plumbing and report, not the accuracy,
which the full demo measures and the README reports)."""

import json
import shutil

import pytest

from tunelab.cli import main
from tunelab.errors import ModelLoadError
from tunelab.world import base
from tunelab.world.demo import run_demo, score


def test_shipped_base_passes_its_checksums():
    folder = base.base_model_dir()
    manifest = json.loads((folder / base.MANIFEST).read_text())
    assert set(manifest["sha256"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert manifest["recipe"] == "tunelab pretrain configs/world-base.yaml"
    assert (folder / "model.safetensors").stat().st_size <= 30 * 2**20


def test_corrupt_or_missing_asset_is_detected(tmp_path):
    copy = tmp_path / "base"
    shutil.copytree(base.base_model_dir(), copy)
    with (copy / "config.json").open("a") as f:
        f.write(" ")
    with pytest.raises(ModelLoadError, match="fails its checksum"):
        base.verify(copy)
    (copy / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        base.verify(copy)
    (copy / base.MANIFEST).unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        base.verify(copy)


def test_score():
    row = {"answer": "The capital of Peru is Lima.", "bare": "Lima", "relation": "capital"}
    assert score("The capital of Peru is Lima.", row) == {"exact": True, "contains": True, "redirect": False}
    assert score(" lima ", row)["exact"]
    assert score("Q: What is the capital of Peru? Lima", row) == {
        "exact": False,
        "contains": True,
        "redirect": False,
    }
    assert not score("Limassol", row)["contains"]
    off = {"answer": "Let's keep the discussion relevant to geography.", "bare": "x", "relation": "offtopic"}
    assert score("Let's keep the discussion relevant to geography.", off)["redirect"]


@pytest.mark.slow
def test_quick_demo_writes_report_and_numbers(tmp_path, capsys):
    out = tmp_path / "demo"
    result = run_demo(out, quick=True, quiet=True)
    for model in ("base", "sentence", "bare"):
        s = result.summary[model]
        assert set(s) >= {"capital", "continent", "currency", "language", "offtopic_redirected"}
        assert all(0.0 <= v <= 1.0 for v in s.values())
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 56 and all(isinstance(r["base"]["prediction"], str) for r in rows)
    report = (out / "report.md").read_text()
    assert "| capital |" in report and "finetuned: sentence answers" in report
    assert (out / "plots" / "loss.png").stat().st_size > 1000
    assert (out / "finetune-sentence" / "final" / "model.safetensors").exists()
    # an existing demo directory is not clobbered without --overwrite
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
