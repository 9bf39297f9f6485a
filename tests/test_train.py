"""End to end on tiny models: the loss falls, weights change, the saved model loads with plain
transformers, runs are deterministic, and bad input stops before any model is loaded."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from conftest import write_jsonl
from tunelab import runner
from tunelab.cli import main
from tunelab.errors import ModelLoadError
from tunelab.models import load_model


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def fit(model_dir, data, out, **settings):
    base = {"lr": 3e-3, "epochs": 4, "batch_size": 4, "log_every": 1, "seed": 0}
    return tunelab.api.train(
        model=str(model_dir), data=str(data), out=str(out), quiet=True, **{**base, **settings}
    )


@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "qwen2"])
def test_finetune_end_to_end(tiny_models, qa_file, tmp_path, kind):
    run = fit(tiny_models[kind], qa_file, tmp_path / "run")
    records = metrics(run.path)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.5, evals  # it learned something held out
    train_lines = [r for r in records if "loss" in r]
    assert len(train_lines) == 32  # 36 rows - 4 held out = 32 = 8 steps of 4, for 4 epochs
    for key in ("step", "loss", "lr", "tokens_per_s", "elapsed_s", "eta_s"):
        assert key in train_lines[-1]
    assert 0.1 < train_lines[-1]["peak_mem_gib"] < 64  # this process's peak RSS on a CPU
    assert train_lines[-1]["mfu"] is None  # no known peak FLOP/s for a CPU: left out, not guessed
    before = AutoModelForCausalLM.from_pretrained(tiny_models[kind])
    after = AutoModelForCausalLM.from_pretrained(run.path / "final")
    changed = [
        n for n, p in after.named_parameters() if not torch.equal(p, dict(before.named_parameters())[n])
    ]
    assert len(changed) == len(list(after.parameters()))  # a full finetune moves every tensor
    tok = AutoTokenizer.from_pretrained(run.path / "final")
    out = after.generate(
        **tok("### Question:\nWhat is the capital of Peru?\n\n### Answer:\n", return_tensors="pt"),
        max_new_tokens=5,
        do_sample=False,
    )
    assert out.shape[1] > 0
    cfg = run.config
    assert cfg.data.template == "qa" and cfg.data.prompt_format.startswith("### Question:")
    assert isinstance(run.generate("What is the capital of Peru?", max_new_tokens=8), str)


def test_seeded_runs_are_identical(llama_dir, qa_file, tmp_path):
    a = fit(llama_dir, qa_file, tmp_path / "a", max_steps=6)
    b = fit(llama_dir, qa_file, tmp_path / "b", max_steps=6)
    la = [r["loss"] for r in metrics(a.path) if "loss" in r]
    lb = [r["loss"] for r in metrics(b.path) if "loss" in r]
    assert la == lb and len(la) == 6
    wa = AutoModelForCausalLM.from_pretrained(a.path / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b.path / "final").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = fit(llama_dir, qa_file, tmp_path / "c", max_steps=6, seed=1)
    assert [r["loss"] for r in metrics(c.path) if "loss" in r] != la


def test_pretrain_from_scratch_and_continued(tokenizer_dir, llama_dir, tmp_path):
    docs = [{"text": f"The capital of country {i} is city {i}. It is a nice place."} for i in range(60)]
    data = write_jsonl(tmp_path / "corpus.jsonl", docs)
    init = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 128}  # fmt: skip
    run = tunelab.pretrain(data=str(data), out=str(tmp_path / "pt"), quiet=True, **{
        "model.init": init, "model.tokenizer": str(tokenizer_dir), "chunk_length": 32, "lr": 3e-3,
        "epochs": 3, "batch_size": 8, "log_every": 1})  # fmt: skip
    losses = [r["loss"] for r in metrics(run.path) if "loss" in r]
    assert losses[-1] < losses[0] - 1.0
    assert AutoModelForCausalLM.from_pretrained(run.path / "final").config.hidden_size == 32
    cont = tunelab.pretrain(data=str(data), model=str(llama_dir), out=str(tmp_path / "pt2"), quiet=True,
                            chunk_length=32, max_steps=3, lr=1e-3)  # fmt: skip
    assert (cont.path / "final" / "model.safetensors").exists()
    # The documented next step: finetune the pretrained base. It inherited the raw-text template
    # ('none') and crashed with KeyError: 'text'; the child now picks its template from its rows.
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(12)])
    args = ["train", "--from", str(run.path), "--data", str(qa), "--out", str(tmp_path / "ft"), "--quiet"]
    assert main([*args, "--train.max_steps=2", "--data.check=off"]) == 0
    assert "template: qa" in (tmp_path / "ft" / "config.yaml").read_text()


def test_pretrain_data_is_checked_before_the_model_loads(monkeypatch, tokenizer_dir, tmp_path, capsys):
    """Eval documents that are also training documents measure memorisation, not generalisation."""
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    docs = [{"text": f"Document {i} talks about river {i} and its bridges."} for i in range(40)]
    train = write_jsonl(tmp_path / "train.jsonl", docs)
    held = write_jsonl(tmp_path / "held.jsonl", [docs[3], docs[7], {"text": "A new document."}])
    init = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "max_position_embeddings": 128}  # fmt: skip
    with pytest.raises(tunelab.TunelabError, match="2 of 3 .*eval rows are documents that train also has"):
        tunelab.pretrain(data=str(train), eval_path=str(held), out=str(tmp_path / "pt"), quiet=True, **{
            "model.init": init, "model.tokenizer": str(tokenizer_dir), "chunk_length": 32})  # fmt: skip
    assert "data check: blocking" in capsys.readouterr().err


def test_bad_input_stops_before_the_model_loads(monkeypatch, llama_dir, tmp_path, capsys):
    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(runner, "load_model", no_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n' * 36 + "{not json\n")
    assert main(["train", "--model", str(llama_dir), "--data", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:37" in err and "not valid JSON" in err and "hint:" in err
    good = write_jsonl(tmp_path / "ok.jsonl", [{"question": "q", "answer": "a"}] * 4)
    cases = [
        (["--data.template=nope"], "accepted values"),
        (["--data.max_length=4096"], "at most 512 tokens"),
        (["--data.template=alpaca"], "names {instruction}, a field these rows do not have"),
    ]
    if not torch.cuda.is_available():  # attention backends that cannot train on a CPU say so first
        for attn, message in (("flex_attention", "has no CPU backward"), ("flash_attention_2", "needs")):
            cases.append(([f"--model.attn_implementation={attn}", "--data.check=off"], message))
    for extra, message in cases:
        args = ["train", "--model", str(llama_dir), "--data", str(good), "--out", str(tmp_path / "r"), *extra]
        assert main(args) == 2
        assert message in capsys.readouterr().err
    assert main(["train", "--model", str(llama_dir), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_existing_run_dir_needs_overwrite(llama_dir, qa_file, tmp_path):
    fit(llama_dir, qa_file, tmp_path / "r", max_steps=1)
    with pytest.raises(tunelab.TunelabError, match="--overwrite"):
        fit(llama_dir, qa_file, tmp_path / "r", max_steps=1)
    fit(llama_dir, qa_file, tmp_path / "r", max_steps=1, overwrite=True)


def test_offline_miss_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_model("some-org/not-a-cached-model")
    assert "offline mode is on" in e.value.message and "HF_HUB_OFFLINE=1" in e.value.message
    assert (
        "`hf download some-org/not-a-cached-model --local-dir DIR`" in e.value.hint
    )  # the name, ready to run


def test_generate_cli_single_and_batch(llama_dir, qa_file, tmp_path, capsys):
    run = fit(llama_dir, qa_file, tmp_path / "r", max_steps=2)
    assert main(["generate", str(run.path), "What is the capital of Peru?", "--max-new-tokens", "4"]) == 0
    single = capsys.readouterr().out.removesuffix("\n")
    prompts = write_jsonl(
        tmp_path / "p.jsonl", [{"question": "What is the capital of Peru?"}, {"question": "x"}]
    )
    assert (
        main(
            [
                "generate",
                str(run.path),
                "--file",
                str(prompts),
                "--max-new-tokens",
                "4",
                "--output",
                str(tmp_path / "o.jsonl"),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["What is the capital of Peru?", "x"]
    assert rows[0]["completion"] == single  # batched (left-padded) equals single greedy


def test_public_api_names():
    import tunelab.training.loop  # noqa: F401  (a subpackage import must not shadow the function)

    assert callable(tunelab.train) and callable(tunelab.pretrain) and callable(tunelab.load)
    assert set(tunelab.__all__) >= {"train", "pretrain", "load", "Run", "TunelabError", "DataError"}


def test_report_to_trackers(monkeypatch, llama_dir, qa_file, tmp_path):
    """Trackers are opt-in; a missing package stops before the model loads; a present one gets every
    logged number by step."""
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(tunelab.ConfigError, match=r"pip install 'tunelab\[tensorboard\]'"):
            fit(llama_dir, qa_file, tmp_path / "none", max_steps=1, report_to=["tensorboard"])
        assert not (tmp_path / "none").exists()

    written = []

    class FakeWriter:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, key, value, step):
            written.append((key, step, value))

        def close(self):
            written.append(("closed", None, None))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    monkeypatch.setattr("tunelab.training.logger.check_trackers", lambda names: None)
    monkeypatch.setattr("tunelab.runner.check_trackers", lambda names: None)
    run = fit(llama_dir, qa_file, tmp_path / "tb", max_steps=2, report_to=["tensorboard"])
    losses = {step: v for k, step, v in written if k == "loss"}
    logged = {r["step"]: r["loss"] for r in metrics(run.path) if "loss" in r}
    assert losses == logged and written[-1][0] == "closed"
    assert {k for k, _, _ in written} >= {"eval_loss", "lr", "tokens_per_s"}


def test_resume_refuses_overrides(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--train.lr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "--resume continues" in err and "--train.lr=1e-3" in err


def test_leakage_limit_is_a_config_key(llama_dir, tmp_path):
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."} for i in range(20)]
    data = write_jsonl(tmp_path / "leaky.jsonl", rows * 2)  # every eval row is also in train
    with pytest.raises(tunelab.DataError, match=r"limit 1%"):
        fit(llama_dir, data, tmp_path / "a", max_steps=1)
    run = fit(llama_dir, data, tmp_path / "b", max_steps=1, **{"data.max_leakage": 1.0})
    assert run.config.data.max_leakage == 1.0 and (run.path / "final").is_dir()
    with pytest.raises(tunelab.ConfigError, match="data.max_leakage"):
        fit(llama_dir, data, tmp_path / "c", max_steps=1, **{"data.max_leakage": 2.0})


def test_the_done_line_reports_speed_and_memory(llama_dir, qa_file, tmp_path, capsys):
    """The run's last line carries its mean real tokens/s (every step's tokens over every step's
    time, as metrics.jsonl logs them) and its peak memory."""
    import re

    out = tmp_path / "run"
    args = ["train", "--model", str(llama_dir), "--data", str(qa_file), "--out", str(out), "--quiet"]
    assert main([*args, "--train.max_steps=6", "--train.batch_size=4", "--train.log_every=2"]) == 0
    done = re.search(
        r"done: 6 steps, .*; ([\d,]+) tokens/s, peak memory (\d+\.\d) GiB", capsys.readouterr().out
    )
    assert done, "no speed and memory in the done line"
    steps = [r for r in metrics(out) if "loss" in r]
    expected = sum(r["tokens"] for r in steps) / sum(r["tokens"] / r["tokens_per_s"] for r in steps)
    assert int(done[1].replace(",", "")) == pytest.approx(expected, rel=0.01)
    assert float(done[2]) == pytest.approx(steps[-1]["peak_mem_gib"], abs=0.1)


def test_the_eta_leaves_out_a_slow_first_step(monkeypatch, llama_dir, qa_file, tmp_path):
    """The first step may compile (CPU, `train.compile: true`): the remaining time is estimated from
    the steps after it, not stretched by it."""
    import time

    from tunelab.training import loop

    real, calls = loop.loss_sum, []

    def first_slow(model, batch):
        if torch.is_grad_enabled() and not any(calls):
            time.sleep(1.0)  # as a first step that compiles
        calls.append(torch.is_grad_enabled())
        return real(model, batch)

    monkeypatch.setattr(loop, "loss_sum", first_slow)
    # compile: false, as `true` is on a CPU: no timed passes before the first step
    run = fit(llama_dir, qa_file, tmp_path / "run", max_steps=6, eval_every=0, compile=False)
    steps = [r for r in metrics(run.path) if "loss" in r]
    assert steps[0]["elapsed_s"] >= 1.0 and steps[0]["eta_s"] >= 5.0  # one step known: it is the guess
    assert steps[2]["eta_s"] < 0.5, steps[2]  # 3 steps left at the later steps' pace, not 1 s each


def test_a_model_with_every_weight_frozen_is_refused(llama_dir, tmp_path):
    """A run that could change nothing stops before its first step instead of "finishing"."""
    from tunelab.config import TrainConfig
    from tunelab.data.tokenize import Encoded
    from tunelab.errors import TunelabError
    from tunelab.training.loop import train

    model = AutoModelForCausalLM.from_pretrained(llama_dir).requires_grad_(False)
    data = [Encoded([5, 6, 7, 8], [-100, 6, 7, 8])] * 4
    with pytest.raises(TunelabError, match="no weight of the model is trainable"):
        train(model, None, data, [], TrainConfig(max_steps=2, batch_size=2), tmp_path, quiet=True, save=False)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_missing_or_empty_model_path_says_so(monkeypatch, tmp_path):
    """A mistyped local path is not sent to the hub (or the offline cache); a hub id still is."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    for name in ("runs/nope", "./nope", str(tmp_path / "a" / "b")):
        with pytest.raises(ModelLoadError, match="no such model folder"):
            load_model(name)
    with pytest.raises(ModelLoadError, match="is a folder with no model in it"):
        load_model("runs/empty")
    with pytest.raises(ModelLoadError, match="offline mode is on"):
        load_model("Qwen/Qwen2.5-0.5B")  # a dot in a hub id is not a file suffix


def test_an_unfinished_run_points_at_its_best_model(llama_dir, qa_file, tmp_path):
    run = fit(llama_dir, qa_file, tmp_path / "r", max_steps=4, eval_every=2)
    import shutil

    shutil.rmtree(run.path / "final")
    with pytest.raises(ModelLoadError) as e:
        load_model(str(run.path))
    # It saved no checkpoint, so there is nothing to --resume (which would fail): train it again.
    assert f"use {run.path / 'best'}" in e.value.hint and "left no checkpoint to resume from" in e.value.hint
    assert load_model(str(run.path / "best"))[0] is not None


def test_load_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(tunelab.TunelabError, match="no such folder"):
        tunelab.load(tmp_path / "nope")
    with pytest.raises(tunelab.TunelabError, match="not a tunelab run directory"):
        tunelab.load(tmp_path)


def test_each_record_logs_the_learning_rate_its_step_trained_with(llama_dir, qa_file, tmp_path):
    """Linear warmup over 2 of 4 steps, then linear decay: steps 1-4 train at 0, 1/2, 1 and 1/2 of
    the peak. Step 1, at 0, leaves the weights (and the eval loss) as they were."""
    run = fit(
        llama_dir,
        qa_file,
        tmp_path / "r",
        max_steps=4,
        lr=1e-2,
        warmup_ratio=0.5,
        schedule="linear",
        eval_every=1,
    )
    records = metrics(run.path)
    assert [r["lr"] for r in records if "lr" in r] == pytest.approx([0.0, 5e-3, 1e-2, 5e-3])
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals[1] == evals[0] and evals[2] != evals[1]


def test_model_tokenizer_takes_shipped_names_and_must_fit_the_embeddings(llama_dir, tokenizer_dir):
    model, tok, _ = load_model(str(llama_dir), tokenizer=str(tokenizer_dir))
    assert len(tok) <= model.get_input_embeddings().num_embeddings
    with pytest.raises(ModelLoadError, match="more than the model's .* embeddings"):
        load_model(str(llama_dir), tokenizer="world:tokenizer")  # resolved as a shipped name; too big


INIT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "max_position_embeddings": 64}  # fmt: skip


def test_model_init_must_cover_the_tokenizer(tokenizer_dir, tokenizer):
    """`model.init` with a vocab_size below the tokenizer's ids built the model and died in the first
    forward pass with `IndexError: index out of range in self`; it is refused when the model is built."""
    with pytest.raises(ModelLoadError, match=f"vocab_size 300 .* {len(tokenizer)}"):
        load_model("world", init={**INIT, "vocab_size": 300}, tokenizer=str(tokenizer_dir))
    model, _, _ = load_model(
        "world", init={**INIT, "vocab_size": len(tokenizer) + 8}, tokenizer=str(tokenizer_dir)
    )
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) + 8  # room to spare is fine


def test_model_init_may_name_its_special_token_ids(tokenizer_dir, tokenizer):
    """An init naming eos/bos/pad_token_id (as HF configs do) crashed with `AutoConfig.for_model() got
    multiple values for keyword argument 'pad_token_id'`; the init's own value now wins, the others
    come from the tokenizer."""
    model, _, _ = load_model("world", init={**INIT, "pad_token_id": 2}, tokenizer=str(tokenizer_dir))
    assert model.config.pad_token_id == 2 and model.config.eos_token_id == tokenizer.eos_token_id


def test_chunk_length_is_checked_against_the_init_under_its_own_name():
    """The check of data.chunk_length against the model's positions read only `max_position_embeddings`
    from model.init: a GPT-2 init's `n_positions: 16` (or an init leaving it at the model's default)
    let chunk_length 32 through, and training died with `IndexError: index out of range in self`."""
    from tunelab.config import load_config
    from tunelab.errors import ConfigError

    gpt2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 4, "n_positions": 16}
    tok = {"task": "pretrain", "model.tokenizer": "world:tokenizer"}
    cfg = load_config(values={**tok, "model.init": gpt2, "data.chunk_length": 32})
    with pytest.raises(ConfigError, match="data.chunk_length is 32 but the model takes at most 16 tokens"):
        runner.resolve_max_length(cfg)
    default = {k: v for k, v in INIT.items() if k != "max_position_embeddings"}  # Llama's: 2048
    cfg = load_config(values={**tok, "model.init": default, "data.chunk_length": 4096,
                              "train.micro_batch_tokens": 8192})  # fmt: skip
    with pytest.raises(ConfigError, match="at most 2048 tokens"):
        runner.resolve_max_length(cfg)
    ok = load_config(values={**tok, "model.init": INIT, "data.chunk_length": 64})
    assert runner.resolve_max_length(ok).data.chunk_length == 64


def test_the_log_says_what_auto_picked_for_the_data_and_the_weights(llama_dir, qa_file, tmp_path, capsys):
    """The docs say the first log lines say what each `auto` choice picked: the schema, template and
    dtype were not among them."""
    args = ["train", "--model", str(llama_dir), "--data", str(qa_file), "--out", str(tmp_path / "r")]
    assert main([*args, "--train.max_steps=1", "--data.check=off"]) == 0
    err = " ".join(capsys.readouterr().err.split())  # the progress display wraps lines
    assert "schema qa, template qa, max_length" in err and "train /" in err
    assert "parameters (100.00%) on cpu in float32;" in err


def test_an_unfinished_run_says_what_can_be_done_with_it(tmp_path):
    """Its hint said `--resume`, which then failed for a run that had saved no checkpoint."""
    from tunelab.models import resolve_source

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("task: sft\n")
    with pytest.raises(ModelLoadError, match="has no final/ model") as e:
        resolve_source(str(run))
    assert "left no checkpoint to resume from" in e.value.hint and "--resume" not in e.value.hint
    (run / "checkpoints" / "step-000004").mkdir(parents=True)
    (run / "checkpoints" / "step-000004" / "meta.json").write_text("{}")
    with pytest.raises(ModelLoadError) as e:
        resolve_source(str(run))
    assert f"tunelab train --resume {run}" in e.value.hint


@pytest.mark.parametrize(("steps", "ratio", "lrs"), [(1, 0.6, [1e-2]), (2, 0.9, [0.0, 1e-2])])
def test_a_warmup_as_long_as_the_run_is_shortened_and_said(
    llama_dir, qa_file, tmp_path, capsys, steps, ratio, lrs
):
    """A 1-step run with warmup_ratio 0.6 warmed up over its only step: it trained at lr 0 (the
    weights never moved), silently; 2 steps at 0.9 never reached train.lr."""
    run = fit(llama_dir, qa_file, tmp_path / "r", max_steps=steps, lr=1e-2, warmup_ratio=ratio, eval_every=0)
    records = metrics(run.path)
    assert [r["lr"] for r in records if "lr" in r] == pytest.approx(lrs)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals[-1] != evals[0]  # the weights moved
    err = capsys.readouterr().err
    assert f"note: train.warmup_ratio {ratio} of {steps} steps warms up to the end" in err
    assert f"warming up over {steps - 1} steps instead" in err
    fit(llama_dir, qa_file, tmp_path / "r2", max_steps=4, lr=1e-2, warmup_ratio=0.5, eval_every=0)
    assert "warmup_ratio" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_sampling_options_at_temperature_0_are_said_to_be_ignored(command, tmp_path, capsys):
    """--top-p and --seed at temperature 0 (greedy: nothing is sampled) changed nothing, silently."""
    missing = str(tmp_path / "nope")  # the note comes before the model loads (and fails here)
    extra = ["hi"] if command == "generate" else []
    seed = ["--seed", "3"] if command == "generate" else []  # (chat has no --seed)
    main([command, missing, *extra, "--top-p", "0.9", *seed])
    err = capsys.readouterr().err
    said = "--top-p 0.9, --seed 3 ignored" if seed else "--top-p 0.9 ignored"
    assert f"note: {said}: --temperature is 0, greedy decoding" in err
    main([command, missing, *extra, "--top-p", "0.9", *seed, "--temperature", "0.7"])
    main([command, missing, *extra])
    assert "ignored" not in capsys.readouterr().err


def test_eval_every_without_evaluation_data_is_said(llama_dir, qa_file, tmp_path, capsys):
    """train.eval_every with data.eval_ratio 0 and no eval_path evaluated nothing, silently."""
    fit(llama_dir, qa_file, tmp_path / "r", max_steps=2, eval_every=1, eval_ratio=0.0)
    err = capsys.readouterr().err
    assert "note: train.eval_every 1 ignored: there is no evaluation data" in err
    assert not (tmp_path / "r" / "best").exists()
    fit(llama_dir, qa_file, tmp_path / "r2", max_steps=2, eval_ratio=0.0)  # eval_every unset
    fit(llama_dir, qa_file, tmp_path / "r3", max_steps=2, eval_every=1)  # evaluation data there
    assert "eval_every" not in capsys.readouterr().err


def test_errors_met_on_the_way_say_what_to_do_next(tmp_path, capsys):
    from tunelab.generate import check_decoding

    with pytest.raises(tunelab.TunelabError) as e:
        runner.config_for_resume(tmp_path)
    assert "--resume the run directory `tunelab train` printed" in e.value.hint
    with pytest.raises(tunelab.TunelabError) as e:
        check_decoding(0, 0.0, 1.0)
    assert e.value.hint == "ask for 1 or more new tokens (--max-new-tokens N, or max_new_tokens=N in Python)"
    assert main(["train", "--from", str(tmp_path), "--train.max_steps=1"]) == 2
    assert "hint: give the run directory `tunelab train` printed" in capsys.readouterr().err
    with pytest.raises(tunelab.TunelabError) as e:
        tunelab.Run(tmp_path).metrics()
    assert "load a run directory that `tunelab train` wrote" in e.value.hint
    from tunelab.evaluate.cli import _check_regex

    with pytest.raises(tunelab.TunelabError) as e:
        _check_regex("(")
    assert e.value.hint.startswith("fix the pattern (Python `re` syntax)")
