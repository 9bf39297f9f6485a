"""Crash-safe checkpoints and exact resume, continued training (`--from`), and the divergence guard.

The kill tests SIGKILL a real training process (after a checkpoint exists, and in the middle of a
checkpoint write), resume it with `--resume`, and require the uninterrupted run's final weights bit
for bit and its logged losses exactly: on CPU a resumed run is the same run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import addition_rows, write_jsonl
from tunelab import cli, runner
from tunelab.errors import TunelabError
from tunelab.training import checkpoint

STEPS, SAVE_EVERY = 30, 10  # 43 train rows in steps of 4: epochs turn over at steps 11 and 22
LR = {"full": "1e-3", "lora": "1e-2"}


def train_args(model_dir: Path, data: Path, out: Path, method: str) -> list[str]:
    return [
        "train",
        "--model", str(model_dir),
        "--data", str(data),
        "--out", str(out),
        "--quiet",
        f"--train.method={method}",
        f"--train.max_steps={STEPS}",
        "--train.batch_size=4",
        f"--train.lr={LR[method]}",
        f"--train.save_every={SAVE_EVERY}",
        "--train.keep_last=1",
        "--train.eval_every=5",
        "--train.log_every=1",
        "--lora.r=4",
        "--lora.dropout=0.05",  # draws from the RNG: a resumed LoRA run must restore its state too
    ]  # fmt: skip


def weights_file(run: Path, folder: str = "final") -> Path:
    adapter = run / folder / "adapter_model.safetensors"
    return adapter if adapter.exists() else run / folder / "model.safetensors"


def logged(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("lr"), r.get("grad_norm")) for r in rows]


# What a metrics.jsonl record says about the clock and the machine, not about the run.
WALL_CLOCK = {"time", "elapsed_s", "eta_s", "tokens_per_s", "mfu", "peak_mem_gib", "eval_s"}


def metric_records(run: Path) -> list[dict]:
    """metrics.jsonl, every line and field but the wall-clock ones."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows]


def assert_same_run(run: Path, reference: Path) -> None:
    for folder in ("final", "best"):
        got, want = load_file(weights_file(run, folder)), load_file(weights_file(reference, folder))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), f"{folder}/ weights differ"
    assert logged(run) == logged(reference)
    assert metric_records(run) == metric_records(reference)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", addition_rows())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, llama_dir, data) -> dict[str, Path]:
    """Uninterrupted runs, one per method (in-process: the same computation as the CLI process)."""
    root = tmp_path_factory.mktemp("reference")
    for method in ("full", "lora"):
        assert cli.main(train_args(llama_dir, data, root / method, method)) == 0
    return {m: root / m for m in ("full", "lora")}


def last_logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(line)["step"] for line in lines[:-1]), default=0)  # the last may be half-written


def kill_when(
    ready: Callable[[], bool], args: list[str], log: Path, pause_at: int, timeout: float = 120
) -> None:
    """Run `tunelab ARGS` in a subprocess and SIGKILL it as soon as `ready()`.

    The test hook pauses the process inside checkpoint.save at step `pause_at`: it never finishes alone."""
    env = {**os.environ, checkpoint.SLOW_ENV: str(pause_at)}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tunelab", *args], env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, f"training exited early:\n{log.read_text()}"
            assert time.monotonic() < deadline, "the moment to kill never came"
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("method, moment", [("full", "after"), ("lora", "during")])
def test_sigkill_then_resume_equals_uninterrupted_run(method, moment, llama_dir, data, reference, tmp_path):
    run, log = tmp_path / "run", tmp_path / "train.log"
    args, ckpts = train_args(llama_dir, data, run, method), run / "checkpoints"
    if moment == "after":  # killed while training on from the first checkpoint (steps 11+ are lost)
        kill_when(lambda: last_logged_step(run) >= 13, args, log, pause_at=2 * SAVE_EVERY)
        assert 13 <= last_logged_step(run) < 2 * SAVE_EVERY
    else:  # killed inside the second checkpoint's write, its files on disk but not yet renamed
        kill_when((ckpts / "step-000020.tmp" / "PAUSED").exists, args, log, pause_at=2 * SAVE_EVERY)

    assert not (run / "final").exists()
    assert checkpoint.complete_checkpoints(ckpts) == [ckpts / "step-000010"]  # keep_last=1 kept it
    if moment == "during":
        assert (ckpts / "step-000020.tmp" / checkpoint.STATE_FILE).exists()
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 0

    assert_same_run(run, reference[method])
    # The step-0 evaluation ran once, in the first process: resuming does not start over.
    assert [r[0] for r in logged(run) if r[2] is not None] == [0, 5, 10, 15, 20, 25, 30]
    assert not list(ckpts.glob("*.tmp")) and checkpoint.complete_checkpoints(ckpts) == [ckpts / "step-000020"]


def test_checkpoint_holds_the_full_training_state(reference):
    ckpt = checkpoint.complete_checkpoints(reference["lora"] / "checkpoints")[-1]
    meta = json.loads((ckpt / checkpoint.META_FILE).read_text())
    assert (
        meta["step"] == 20
        and meta["total_steps"] == STEPS
        and meta["epoch"] == pytest.approx(20 / 11, abs=1e-4)
    )
    assert meta["best_step"] == 20 and meta["best_eval_loss"] is not None
    state = torch.load(ckpt / checkpoint.STATE_FILE, weights_only=False)
    assert state["model"] and all("lora_" in name for name in state["model"])  # the adapter only
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 20
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    saved_metrics = (ckpt / checkpoint.METRICS_FILE).read_text().splitlines()
    assert json.loads(saved_metrics[-1])["step"] == 20


def test_resume_refuses_changed_data(reference, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference["full"], run)
    shutil.rmtree(run / "final")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    config = (run / "config.yaml").read_text().replace(str(data), str(tmp_path / "other.jsonl"))
    write_jsonl(tmp_path / "other.jsonl", [{**r, "answer": r["answer"] + "!"} for r in rows])
    (run / "config.yaml").write_text(config)
    with pytest.raises(TunelabError, match=r"changed since: the training data \(its tokenized examples\)"):
        runner.run(runner.config_for_resume(run), quiet=True, resume=run)


def test_resume_refuses_changed_eval_data(llama_dir, data, tmp_path):
    """A run's eval file edited since the checkpoint resumed silently: the evaluations after it were
    of other examples, and best/ was chosen comparing losses on two eval sets (the old set's best
    step kept against the new set's larger losses)."""
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    train, held_out = write_jsonl(tmp_path / "train.jsonl", rows[:40]), tmp_path / "eval.jsonl"
    write_jsonl(held_out, rows[40:44])
    run = tmp_path / "run"
    args = [a for a in train_args(llama_dir, train, run, "lora") if not a.startswith("--train.max_steps")]
    args += ["--train.max_steps=3", "--train.save_every=2", f"--data.eval_path={held_out}"]
    assert cli.main(args) == 0
    shutil.rmtree(run / "final")
    write_jsonl(held_out, rows[44:48])
    metrics = (run / "metrics.jsonl").read_text()
    with pytest.raises(TunelabError, match=r"changed since: the evaluation data \(its tokenized examples\)"):
        runner.run(runner.config_for_resume(run), quiet=True, resume=run)
    assert (run / "metrics.jsonl").read_text() == metrics


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (("lr: 0.01", "lr: 0.005"), "train.lr (0.01 then, 0.005 now)"),
        (("schedule: cosine", "schedule: constant"), "train.schedule ('cosine' then, 'constant' now)"),
        (("seed: 0", "seed: 1"), "train.seed (0 then, 1 now)"),
        (("batch_size: 4", "batch_size: 8"), "train.batch_size (4 then, 8 now)"),
        (("max_steps: 30", "max_steps: 40"), "the step count (30 planned, 40 now"),
        (("alpha: 32", "alpha: 8"), "lora.alpha (32 then, 8 now)"),
        (("dropout: 0.05", "dropout: 0.3"), "lora.dropout (0.05 then, 0.3 now)"),
    ],
)
def test_resume_refuses_an_edited_config_and_says_what_changed(reference, tmp_path, edit, said):
    """An edited config.yaml resumed silently: a new lr was ignored (the checkpoint's scheduler won),
    a new schedule applied halfway, a new seed or batch size changed the data order mid-epoch, a new
    lora.alpha or lora.dropout trained the adapter on with another scaling or mask rate. And the
    refused resume had already cut metrics.jsonl back to the checkpoint's copy: a finished run kept
    its final/ but lost the records of its last steps."""
    run = tmp_path / "run"
    shutil.copytree(reference["lora"], run)
    shutil.rmtree(run / "final")
    config = (run / "config.yaml").read_text()
    assert edit[0] in config, config
    (run / "config.yaml").write_text(config.replace(edit[0], edit[1]))
    metrics = (run / "metrics.jsonl").read_text()
    with pytest.raises(TunelabError, match="cannot resume") as e:
        runner.run(runner.config_for_resume(run), quiet=True, resume=run)
    assert said in str(e.value) and "--from" in e.value.hint
    assert (run / "metrics.jsonl").read_text() == metrics  # the refused resume changed nothing


def test_resume_takes_the_memory_and_logging_knobs_and_refuses_another_lora_rank(reference, tmp_path):
    """What the out-of-memory advice says to change (tokens per micro-batch, checkpointing) and what
    is only logged may change on resume; a changed lora.r was a raw size-mismatch traceback."""
    from tunelab.training.checkpoint import FREE_ON_RESUME, changes

    free = {k: "anything" for k in FREE_ON_RESUME if k not in ("max_steps", "epochs")}
    assert changes({"data": "d", "total_steps": 5, "train": {"lr": 1.0, **free}}, "d", 5, {"lr": 1.0}) == []
    run = tmp_path / "run"
    shutil.copytree(reference["lora"], run)
    shutil.rmtree(run / "final")
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("  r: 4\n", "  r: 2\n"))
    assert "  r: 2\n" in (run / "config.yaml").read_text()
    with pytest.raises(TunelabError, match=r"other shapes .* a changed lora.r"):
        runner.run(runner.config_for_resume(run), quiet=True, resume=run)


def test_from_a_lora_run_refuses_adapter_settings_it_cannot_apply(reference, data, tmp_path, capsys):
    """--from a LoRA run with --lora.r=32 trained the parent's r=4 adapter, saying nothing."""
    args = [
        "train",
        "--from",
        str(reference["lora"]),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "c"),
        "--quiet",
    ]
    assert cli.main([*args, "--train.max_steps=1", "--lora.r=32", "--lora.dropout=0.2"]) == 2
    err = capsys.readouterr().err
    assert "lora.r=32 (the adapter has 4)" in err and "lora.dropout=0.2 (the adapter has 0.05)" in err
    assert "tunelab export RUN --merge DIR" in err


@pytest.mark.parametrize("parent_method, method", [("full", "full"), ("lora", "lora"), ("lora", "full")])
def test_from_continues_a_finished_run(parent_method, method, reference, data, tmp_path):
    parent = reference[parent_method]
    child = tmp_path / "child"
    args = ["train", "--from", str(parent), "--data", str(data), "--out", str(child), "--quiet"]
    settings = [f"--train.method={method}", "--train.max_steps=4", "--train.batch_size=4", "--train.lr=1e-3"]
    assert cli.main(args + settings) == 0

    config = (child / "config.yaml").read_text()
    assert f"parent: {parent}" in config and f"name_or_path: {parent}" in config
    # The child starts exactly where the parent ended: same weights, same held-out loss.
    parent_eval = [r[2] for r in logged(parent) if r[2] is not None][-1]
    child_eval = [r[2] for r in logged(child) if r[2] is not None][0]
    if (parent_method, method) == ("lora", "full"):  # merged into the base: float rounding differs
        assert child_eval == pytest.approx(parent_eval, abs=1e-5)
    else:
        assert child_eval == parent_eval

    got, before = load_file(weights_file(child)), load_file(weights_file(parent))
    if method == parent_method:  # the parent's weights or adapter kept training: same tensors, new values
        assert got.keys() == before.keys()
        assert any(not torch.equal(got[k], before[k]) for k in got)
    else:  # LoRA merged, then every weight trained: they moved from the merged parent's
        assert cli.main(["export", str(parent), "--merge", str(tmp_path / "merged")]) == 0
        merged = load_file(tmp_path / "merged" / "model.safetensors")
        moved = [k for k in got if not torch.equal(got[k], merged[k])]
        assert any("q_proj" in k for k in moved) and any("mlp" in k for k in moved), moved
    if method == "lora":
        adapter = json.loads((child / "final" / "adapter_config.json").read_text())
        parent_adapter = json.loads((parent / "final" / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == parent_adapter["base_model_name_or_path"]
        assert adapter["r"] == 4 and "r: 4" in config  # the parent's adapter shape, recorded
    else:  # a full model, also when the parent was LoRA (merged before training)
        assert not (child / "final" / "adapter_config.json").exists()
        assert "model.layers.0.self_attn.q_proj.weight" in got


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(llama_dir, data, tmp_path, capsys):
    run = tmp_path / "run"
    args = train_args(llama_dir, data, run, "full")
    args += ["--train.lr=1e30", "--train.save_every=1", "--train.keep_last=2", "--train.eval_every=0"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    found = re.search(r"error: loss became (nan|inf|-inf) at step (\d+)", err)
    assert found, err
    bad = int(found[2])
    assert 2 < bad < STEPS  # step 1 trained (lr 1e30 blows the weights up), a later step's loss is not finite
    # The weights of step bad-1 gave the bad loss; those of step bad-2 still gave a finite one.
    good = run / "checkpoints" / f"step-{bad - 2:06d}"
    assert f"last good checkpoint: {good}" in err
    assert checkpoint.complete_checkpoints(run / "checkpoints") == [
        good,
        good.with_name(f"step-{bad - 1:06d}"),
    ]
    assert [r[0] for r in logged(run) if r[1] is not None][-1] == bad - 1  # the bad step was not logged
    assert all(math.isfinite(r[1]) for r in logged(run) if r[1] is not None)
    assert not (run / "final").exists()


def test_out_of_memory_says_what_to_do_and_the_run_resumes_with_a_lower_budget(
    llama_dir, data, reference, tmp_path, monkeypatch, capsys
):
    """A micro-batch that does not fit stops the run with the knobs to turn and how to continue; the
    run then resumes with a lower `micro_batch_tokens` (steps split into more micro-batches) and ends
    where the uninterrupted run ended, up to float rounding (the sums are grouped differently)."""
    from tunelab.training import loop

    run = tmp_path / "run"
    real, calls = loop.loss_sum, []

    def runs_out(model, batch):
        if torch.is_grad_enabled():
            calls.append(batch.n_tokens)
            if len(calls) == 13:  # step 13: after the checkpoint of step 10
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, batch)

    monkeypatch.setattr(loop, "loss_sum", runs_out)
    # compile: false: under auto the passes timed before training would come first among the calls
    assert cli.main(train_args(llama_dir, data, run, "full") + ["--train.compile=false"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: out of memory at step 13, in a \d+-token micro-batch", err), err
    hint = err.replace("\n", "")
    assert "lower train.micro_batch_tokens (now 8,192) or set train.gradient_checkpointing: true" in hint
    assert f"then continue: tunelab train --resume {run}" in hint and "--train.method=lora" in hint
    assert min(calls) > 100  # a step is one micro-batch of all 4 examples under the default budget

    monkeypatch.setattr(loop, "loss_sum", real)
    calls.clear()
    config = run / "config.yaml"
    text = config.read_text().replace("micro_batch_tokens: 8192", "micro_batch_tokens: 80")
    # (the budget must hold the longest example: every example here is shorter than 48 tokens)
    config.write_text(text.replace("max_length: 512", "max_length: 48"))
    monkeypatch.setattr(loop, "loss_sum", lambda m, b: calls.append(b.n_tokens) or real(m, b))
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 0
    assert calls and max(calls) <= 80  # resumed with the lower budget: several micro-batches per step
    got, want = load_file(weights_file(run)), load_file(weights_file(reference["full"]))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    losses = [r[1] for r in logged(run) if r[1] is not None]
    assert losses == pytest.approx([r[1] for r in logged(reference["full"]) if r[1] is not None], rel=1e-4)


def test_the_largest_micro_batch_runs_first_on_a_gpu_so_memory_fails_fast(
    llama_dir, data, reference, tmp_path, monkeypatch, capsys
):
    """On a GPU the largest micro-batch goes forward and backward once before anything else (here
    enabled on the CPU): a budget that does not fit stops the run before the first step and before
    the step-0 evaluation, and a budget that fits says so with its peak memory. The pass leaves no
    trace: the run ends with the uninterrupted reference run's weights, bit for bit."""
    from tunelab.training import loop

    monkeypatch.setattr(loop, "FAIL_FAST_DEVICES", {"cpu"})
    real, seen = loop.loss_sum, []

    def too_big(model, batch):
        seen.append((torch.is_grad_enabled(), batch.n_tokens))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "loss_sum", too_big)
    run = tmp_path / "run"
    # compile: false: under auto an uncompiled pass is timed first (test_compiling.py covers that)
    assert cli.main(train_args(llama_dir, data, run, "full") + ["--train.compile=false"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: out of memory on the largest micro-batch \((\d+) tokens\)", err), err
    assert seen == [(True, int(re.search(r"largest micro-batch \((\d+) tokens\)", err)[1]))]  # nothing before
    assert "then start the run again" in err
    assert not any(r[0] > 0 for r in logged(run))  # no step trained

    monkeypatch.setattr(loop, "loss_sum", real)
    args = train_args(llama_dir, data, tmp_path / "ok", "full") + ["--train.compile=false"]
    args[args.index("--quiet")] = "--train.eval_every=0"  # not quiet: the fitting line is printed
    assert cli.main(args) == 0
    out = capsys.readouterr()
    assert re.search(
        r"checking that the largest micro-batch \(\d+ tokens\) fits\n.*it fits: peak \d+\.\d GiB; \d+ s\n",
        out.err + out.out,
    )
    got, want = load_file(weights_file(tmp_path / "ok")), load_file(weights_file(reference["full"]))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_out_of_memory_in_the_optimizer_update_points_at_the_trained_parameters(
    llama_dir, data, tmp_path, monkeypatch, capsys
):
    """A full finetune whose AdamW state does not fit fails in its first update: the message says
    so and points at an adapter, not at the micro-batch budget (which cannot help there)."""

    def no_room(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(torch.optim.AdamW, "step", no_room)
    assert cli.main(train_args(llama_dir, data, tmp_path / "run", "full")) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: out of memory in the update at step 1 \(peak \d+\.\d GiB so far\)", err), err
    assert "AdamW's two moments" in err and "--train.method=lora" in err and "micro_batch_tokens" not in err


@pytest.mark.parametrize("where", ["cpu", "gpu"])
def test_a_resumed_run_compiles_or_not_as_the_run_began(
    llama_dir, data, tmp_path, monkeypatch, capsys, where
):
    """compile: auto decides from the steps left, and a resumed run has fewer: timed again, it could
    decide otherwise and go on with other rounding than the uninterrupted run (compiled code rounds
    differently). It goes on as the run began, which its checkpoint records, and ends with the
    uninterrupted run's weights and losses (gpu: with the memory probe, here on the CPU)."""
    from tunelab.training import compiling, loop

    monkeypatch.setattr(loop, "FAIL_FAST_DEVICES", {"cpu"} if where == "gpu" else set())

    class Stop(Exception):
        pass

    real_save = checkpoint.save

    def save_then_stop(folder, step, *args, **kwargs):
        real_save(folder, step, *args, **kwargs)
        if step == SAVE_EVERY:
            raise Stop

    for began_compiled in (True, False):
        # A long run (compiled) or a short one (uncompiled); resumed, the other way round if timed.
        monkeypatch.setitem(compiling.WORTH_S, "cpu", 0.0 if began_compiled else 1e9)
        torch._dynamo.reset()
        root = tmp_path / str(began_compiled)
        assert cli.main(train_args(llama_dir, data, root / "reference", "full")) == 0
        monkeypatch.setattr(checkpoint, "save", save_then_stop)
        with pytest.raises(Stop):
            cli.main(train_args(llama_dir, data, root / "run", "full"))
        monkeypatch.setattr(checkpoint, "save", real_save)
        meta = json.loads((root / "run" / "checkpoints" / "step-000010" / checkpoint.META_FILE).read_text())
        assert meta["compiled"] is began_compiled
        monkeypatch.setitem(compiling.WORTH_S, "cpu", 1e9 if began_compiled else 0.0)
        capsys.readouterr()
        assert cli.main(["train", "--resume", str(root / "run")]) == 0
        said = " ".join(capsys.readouterr().err.split())
        way = "compiled" if began_compiled else "uncompiled"
        assert f"resumed {way}, as the run began (compile: auto)" in said, said
        assert "of steps uncompiled" not in said  # not timed again
        assert ("it fits:" in said) == (where == "gpu"), said
        assert_same_run(root / "run", root / "reference")


def test_the_logged_loss_is_the_windows_and_a_resume_inside_a_window_logs_it_alike(
    llama_dir, data, tmp_path, monkeypatch
):
    """With log_every=4 each record's loss is the mean over its four steps per trained token (the
    steps' own losses from a log_every=1 run, which trains alike); a run stopped at step 10's
    checkpoint, inside the window of steps 9-12, resumes to the same records: every field, also the
    window's real `tokens` (the record of step 12 counted only the tokens of steps 11-12)."""

    class Stop(Exception):
        pass

    def args(out, log_every):
        return [a if not a.startswith("--train.log_every") else f"--train.log_every={log_every}"
                for a in train_args(llama_dir, data, out, "full")]  # fmt: skip

    assert cli.main(args(tmp_path / "each", 1)) == 0
    assert cli.main(args(tmp_path / "window", 4)) == 0
    steps = {r[0]: r[1] for r in logged(tmp_path / "each") if r[1] is not None}
    records = {r[0]: r[1] for r in logged(tmp_path / "window") if r[1] is not None}
    assert sorted(records) == [4, 8, 12, 16, 20, 24, 28, 30]
    # Trained tokens per step, as each record says.
    rows = [json.loads(line) for line in (tmp_path / "each" / "metrics.jsonl").read_text().splitlines()]
    targets = {r["step"]: r["targets"] for r in rows if "targets" in r}
    previous = 0
    for end, loss in sorted(records.items()):
        window = range(previous + 1, end + 1)
        expected = sum(steps[s] * targets[s] for s in window) / sum(targets[s] for s in window)
        assert loss == pytest.approx(expected, rel=1e-12), end
        previous = end
    assert len(set(records.values())) == len(records)

    real_save = checkpoint.save

    def save_then_stop(folder, step, *a, **k):
        real_save(folder, step, *a, **k)
        if step == SAVE_EVERY:
            raise Stop

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    with pytest.raises(Stop):
        cli.main(args(tmp_path / "stopped", 4))
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert cli.main(["train", "--resume", str(tmp_path / "stopped"), "--quiet"]) == 0
    assert logged(tmp_path / "stopped") == logged(tmp_path / "window")
    assert metric_records(tmp_path / "stopped") == metric_records(tmp_path / "window")


def test_resuming_a_finished_run_without_checkpoints_says_it_finished(llama_dir, data, tmp_path):
    run = tmp_path / "run"
    args = [a for a in train_args(llama_dir, data, run, "lora") if not a.startswith("--train.save_every")]
    assert cli.main([*args, "--train.max_steps=2"]) == 0
    with pytest.raises(TunelabError, match="finished .* and wrote no checkpoint") as e:
        runner.run(runner.config_for_resume(run), quiet=True, resume=run)
    assert f"--from {run}" in e.value.hint
    shutil.rmtree(run / "final")  # interrupted before any checkpoint
    with pytest.raises(TunelabError, match="no complete checkpoint"):
        runner.run(runner.config_for_resume(run), quiet=True, resume=run)


def test_a_save_every_the_run_never_reaches_is_said(llama_dir, data, tmp_path, capsys):
    """train.save_every at or above the run's steps wrote no checkpoint without a word: a run
    believed resumable after a crash had nothing to resume from."""
    run = tmp_path / "run"
    args = [a for a in train_args(llama_dir, data, run, "lora") if not a.startswith("--train.save_every")]
    assert cli.main([*args, "--train.max_steps=2", "--train.save_every=2"]) == 0
    err = capsys.readouterr().err
    assert "note: train.save_every is 2 and the run has 2 steps: no checkpoint is written" in err
    assert not (run / "checkpoints").exists()
    assert cli.main([*args, "--train.max_steps=3", "--train.save_every=2", "--overwrite"]) == 0
    assert "save_every" not in capsys.readouterr().err


class Killed(BaseException):
    """The process killed at this point (nothing after it runs)."""


@pytest.mark.parametrize("kill_at", ["writing", "rename old aside", "rename new in", "remove old"])
def test_replacing_best_survives_a_kill_at_every_point(kill_at, monkeypatch, tmp_path):
    """best/ was replaced by removing it, then renaming best.tmp: a kill in between left best.tmp
    and no best/ (the run's best model gone from where it is looked for)."""
    best = tmp_path / "best"

    def write(content: str, kill: bool = False) -> None:
        with checkpoint.atomic_dir(best) as tmp:
            (tmp / "model.txt").write_text(content)
            if kill and kill_at == "writing":
                raise Killed

    write("old")  # the best model so far
    renames = []
    real_rename, real_rmtree = Path.rename, shutil.rmtree

    def rename(self, target):
        renames.append(Path(target).name)
        if (kill_at, len(renames)) in (("rename old aside", 1), ("rename new in", 2)):
            raise Killed
        return real_rename(self, target)

    def rmtree(path, *args, **kwargs):
        if kill_at == "remove old" and Path(path).name == "best.old":
            (Path(path) / "model.txt").unlink()  # halfway through
            raise Killed
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        write("new", kill=True)
    monkeypatch.undo()
    # The next start (resume) finishes the replacement: one whole best/, nothing left beside it.
    checkpoint.recover(best)
    expected = "old" if kill_at in ("writing", "rename old aside") else "new"
    assert (best / "model.txt").read_text() == expected
    assert not (tmp_path / "best.old").exists()
    write("newer")  # and the next write replaces it
    assert (best / "model.txt").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_resume_finishes_an_interrupted_replacement_of_best(reference, tmp_path):
    """Killed between moving the old best/ aside and renaming the new one in: resume puts it back."""
    run = tmp_path / "run"
    shutil.copytree(reference["full"], run)
    shutil.rmtree(run / "final")
    shutil.copytree(run / "best", run / "best.old")
    (run / "best").rename(run / "best.tmp")
    runner.run(runner.config_for_resume(run), quiet=True, resume=run)
    assert (run / "best").is_dir() and not (run / "best.old").exists() and not (run / "best.tmp").exists()


def test_a_checkpoint_from_before_newer_meta_resumes_and_says_what_it_could_not_check(
    reference, tmp_path, capsys
):
    """A checkpoint whose meta.json predates the eval fingerprint, the train and adapter settings
    and the window's token count resumes, saying which checks it skipped."""
    run = tmp_path / "run"
    shutil.copytree(reference["lora"], run)
    shutil.rmtree(run / "final")
    newest = checkpoint.complete_checkpoints(run / "checkpoints")[-1]
    meta = json.loads((newest / checkpoint.META_FILE).read_text())
    for key in ("eval_data", "train", "lora", "compiled"):
        del meta[key]
    meta["loss_window"] = meta["loss_window"][:2]
    (newest / checkpoint.META_FILE).write_text(json.dumps(meta))
    capsys.readouterr()
    result = runner.run(runner.config_for_resume(run), quiet=True, resume=run)
    assert result.steps == STEPS and (run / "final").is_dir()
    err = capsys.readouterr().err
    assert (
        "was written by an older tunelab and does not record the evaluation data, the train settings" in err
    )
    assert "the adapter's lora.alpha and lora.dropout: resuming without checking" in err
    # The weights are the uninterrupted run's: only what is checked was missing, not what is restored.
    got, want = load_file(weights_file(run)), load_file(weights_file(reference["lora"]))
    assert all(torch.equal(got[k], want[k]) for k in want)
