"""The shipped base model and `tunelab demo` (a quick run: plumbing and report, not the accuracy,
which the full demo measures and the README reports)."""

import json
import shutil

import pytest

from tunelab.cli import main
from tunelab.errors import ModelLoadError
from tunelab.world import base
from tunelab.world.build import data_dir
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
    # results.jsonl once lost each question's reference bare answer: the bare model's output, written
    # under the same key "bare", replaced it, so the file could not be rescored; it is kept now
    heldout = [json.loads(line) for line in (data_dir() / "heldout.jsonl").read_text().splitlines()]
    reference = {r["question"]: r["bare"] for r in heldout}
    assert all(r["bare_answer"] == reference[r["question"]] for r in rows)
    assert all(isinstance(r["bare"]["prediction"], str) for r in rows)
    report = (out / "report.md").read_text()
    assert "| capital |" in report and "finetuned: sentence answers" in report
    assert (out / "plots" / "loss.png").stat().st_size > 1000
    assert (out / "finetune-sentence" / "final" / "adapter_model.safetensors").exists()  # LoRA
    # an existing demo directory is not clobbered without --overwrite
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_train_with_no_arguments_uses_the_world_default():
    from tunelab.cli import _train_config, build_parser

    args, extra = build_parser().parse_known_args(["train"])
    cfg = _train_config(args, extra, "sft")
    assert (cfg.name, cfg.model.name_or_path, cfg.data.path) == ("world-qa", "world", "world:qa-train.jsonl")


@pytest.mark.slow
def test_pretraining_recipe_runs_at_reduced_scale(tmp_path):
    """The shipped recipe (corpus, tokenizer, loop) rebuilds a base model; here a small one, briefly."""
    import filecmp

    from transformers import AutoModelForCausalLM

    from tunelab.config import load_config, packaged_config
    from tunelab.runner import run
    from tunelab.world.build import data_dir

    small = "{model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, max_position_embeddings: 1024, tie_word_embeddings: true}"
    cfg = load_config(
        packaged_config("world-base.yaml"),
        [f"--out={tmp_path / 'base'}", f"--model.init={small}", "--train.max_steps=40", "--train.batch_size=8",
         "--train.eval_every=0", "--train.save_every=0", "--train.log_every=10", "--train.warmup_ratio=0.1"],
    )  # fmt: skip
    result = run(cfg, quiet=True)
    losses = [
        json.loads(line)["loss"]
        for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert losses[0] > 7.0 and losses[-1] < losses[0] - 0.8, losses  # 7.37 -> 6.38 measured
    assert AutoModelForCausalLM.from_pretrained(result.run_dir / "final").config.hidden_size == 64
    # the shipped base was pretrained with the shipped tokenizer
    assert filecmp.cmp(
        data_dir() / "tokenizer" / "tokenizer.json", base.base_model_dir() / "tokenizer.json", shallow=False
    )


def test_rows_that_are_not_exact_match_say_what_they_measure():
    """The summary table and report.md are headed "exact match", but the row "fact mentioned" counts any
    answer that names the fact, a list of several capitals too, and "offtopic redirected" / "geography
    redirected" count redirects (wanted on off-topic questions, wrong on geography ones); their labels
    said neither. They now say what they measure."""
    from tunelab.world.demo import MODELS, REDIRECT, _report, _summary_table, summarise

    geo = {"question": "Capital of Peru?", "answer": "The capital of Peru is Lima.", "bare": "Lima"}
    off = {"question": "How do I make soup?", "answer": REDIRECT, "bare": REDIRECT}
    rows = [
        {**geo, "relation": "capital", "wording": "train"},
        {**off, "relation": "offtopic", "wording": "unseen"},
    ]
    listing = "Quito, Lima, Bogota"
    assert score(listing, rows[0])["contains"] and not score(listing, rows[0])["exact"]
    for r in rows:
        for m in MODELS:
            r[m] = {"prediction": listing, **score(listing, r)}
    summary = summarise(rows)
    assert summary["base"]["fact_mentioned"] == 1.0 and summary["base"]["all_relations"] == 0.0
    labels = [
        "fact mentioned anywhere in the answer (not exact match)",
        "off-topic questions answered with the redirect",
        "geography questions wrongly redirected",
    ]
    report = _report(rows, summary, {}, 1.0)
    assert all(f"| {label} |" in report for label in labels)
    assert "| fact mentioned |" not in report and "| geography redirected |" not in report
    first_column = list(_summary_table(summary).columns[0].cells)
    assert all(label in first_column for label in labels)


def test_demo_finetunes_do_not_let_machine_load_decide_compilation(monkeypatch, tmp_path):
    """The demo is deterministic for its seed, but its finetunes ran with compile "auto", which times a
    step: on a loaded 2-core CPU one run estimated 19 min and compiled the model, the other did not,
    and the same seed gave two tables (currency 98.2 % vs 97.3 %). The demo now always trains eagerly."""
    import tunelab.runner
    from tunelab.world import demo

    seen = []

    class Done:
        run_dir = tmp_path

    monkeypatch.setattr(tunelab.runner, "run", lambda cfg, **kw: seen.append(cfg) or Done())
    demo._finetune("x", "world:qa-train.jsonl", tmp_path / "x", quick=False, quiet=True)
    assert seen[0].train.compile is False
