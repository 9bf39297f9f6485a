"""Several processes on one machine (CPU, gloo, loopback): DDP and FSDP train the tiny Llama to one
process's losses and weights for the same global batch, full and LoRA; checkpoints move between world
sizes (2 -> 1 and 1 -> 2); a rank that fails stops the whole launch within seconds, with its error.

A torchrun launch pays about 30 s of process start and imports on a 2-core machine, so the four
2-process trainings share one launch (tests/distributed_runs.py calls `tunelab.cli.main`, as
`python -m tunelab` does); the failure test launches `python -m tunelab train` itself.

What is exact and what is within tolerance: the plan, the step count and the global batch are the
same; the float sums are taken in another order (per rank, then across ranks), so losses and weights
agree to fp32 rounding (rel 1e-4 on losses, 1e-5 on weights after 6 AdamW steps), not bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import qa_rows, write_jsonl
from tunelab import cli
from tunelab.data.packing import PackedBatch
from tunelab.errors import TunelabError
from tunelab.training import distributed
from tunelab.training.distributed import Dist

STEPS, SAVE_EVERY = 6, 3
LR = {"full": "1e-3", "lora": "1e-2"}
# 32 training rows in steps of 8, packed into micro-batches of at most 64 tokens: 5 to 7 per step,
# so two ranks get unequal shares and the stand-in pass is exercised; the epoch turns at step 4.
SETTINGS = [
    f"--train.max_steps={STEPS}",
    "--train.batch_size=8",
    "--train.micro_batch_tokens=64",
    f"--train.save_every={SAVE_EVERY}",
    "--train.keep_last=1",
    "--train.eval_every=3",
    "--train.log_every=1",
    "--lora.r=4",
    "--lora.dropout=0",  # dropout masks depend on which rank draws them; without it LoRA is comparable
]
LAUNCHES = {  # name -> (train.method, train.distributed)
    "ddp-full": ("full", "ddp"),
    "fsdp-full": ("full", "fsdp"),
    "ddp-lora": ("lora", "auto"),  # auto = ddp under several processes
}
ENV = {**os.environ, distributed.TIMEOUT_ENV: "30"}  # a hang fails the test in 30 s, not 5 min


def train_args(model_dir: Path, data: Path, out: Path, method: str, engine: str = "auto") -> list[str]:
    return [
        "train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--quiet",
        f"--train.method={method}", f"--train.lr={LR[method]}", f"--train.distributed={engine}", *SETTINGS,
    ]  # fmt: skip


def torchrun(port: int, *command: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(port), *command,
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(run: Path, folder: str = "final") -> dict[str, torch.Tensor]:
    adapter = run / folder / "adapter_model.safetensors"
    return load_file(adapter if adapter.exists() else run / folder / "model.safetensors")


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(
    run: Path,
    reference: Path,
    keys: tuple[str, ...] = ("loss", "eval_loss", "grad_norm", "lr"),
    weight_tolerance: tuple[float, float] = (1e-4, 1e-5),
) -> None:
    """The same logged steps and evaluations with losses within fp32 rounding, and the same weights
    (to `weight_tolerance`: rtol, atol)."""
    got, want = logged(run), logged(reference)
    assert [(r["step"], "loss" in r) for r in got] == [(r["step"], "loss" in r) for r in want]
    for g, w in zip(got, want):
        for key in keys:
            if w.get(key) is not None:
                assert g[key] == pytest.approx(w[key], rel=1e-4), (g["step"], key)
    a, b = weights(run), weights(reference)
    assert a.keys() == b.keys()
    rtol, atol = weight_tolerance
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # the same rows as the qa_file fixture, at module scope so one launch serves every test
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", qa_rows())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama_dir, data) -> dict[str, Path]:
    """One-process references (in this process), then one 2-process launch: DDP full, FSDP full,
    DDP LoRA from scratch, the one-process LoRA run resumed from its step-3 checkpoint by two
    processes under FSDP, DDP full in bf16, and FSDP full with compiled layers."""
    root = tmp_path_factory.mktemp("dist")
    paths = {f"single-{m}": root / f"single-{m}" for m in ("full", "lora")}
    for method in ("full", "lora"):
        assert cli.main(train_args(llama_dir, data, paths[f"single-{method}"], method)) == 0

    resumed = paths["lora-1to2"] = root / "lora-1to2"
    shutil.copytree(paths["single-lora"], resumed)
    shutil.rmtree(resumed / "final")
    config = resumed / "config.yaml"
    config.write_text(config.read_text().replace("distributed: auto", "distributed: fsdp"))

    commands = []
    for name, (method, engine) in LAUNCHES.items():
        paths[name] = root / name
        commands.append(train_args(llama_dir, data, paths[name], method, engine))
    commands.append(["train", "--resume", str(resumed), "--quiet"])
    # bf16 weights: stochastic rounding in the update, which must draw alike on both replicas.
    paths["ddp-full-bf16"] = root / "ddp-full-bf16"
    commands.append(
        [*train_args(llama_dir, data, paths["ddp-full-bf16"], "full", "ddp"), "--model.dtype=bfloat16"]
    )
    # train.compile (on by default on CUDA): each decoder layer compiled, sharded by FSDP.
    paths["fsdp-full-compiled"] = root / "fsdp-full-compiled"
    commands.append(
        [*train_args(llama_dir, data, paths["fsdp-full-compiled"], "full", "fsdp"), "--train.compile=true"]
    )
    (root / "runs.json").write_text(json.dumps(commands))
    driver = Path(__file__).with_name("distributed_runs.py")
    done = subprocess.run(
        torchrun(free_port(), str(driver), str(root / "runs.json")),
        env=ENV, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAUNCHES))
def test_two_processes_train_like_one(runs, name):
    method = LAUNCHES[name][0]
    run, reference = runs[name], runs[f"single-{method}"]
    assert_same_training(run, reference)
    # Rank 0 alone wrote the run directory: one line per logged step, not one per rank.
    assert len(logged(run)) == len(logged(reference)) == STEPS + 3  # + evaluations at steps 0, 3, 6
    assert f"method: {method}" in (run / "config.yaml").read_text()
    assert (run / "best").is_dir() and (run / "final").is_dir()
    if method == "lora":  # the adapter only, as on one process
        assert all("lora_" in k for k in weights(run))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp-full", "fsdp-full"])
def test_checkpoint_of_two_processes_resumes_on_one(runs, name, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs[name], run)
    shutil.rmtree(run / "final")
    ckpt = run / "checkpoints" / f"step-{SAVE_EVERY:06d}"
    # Written whole, in the one-process layout (FSDP shards gathered), plus every rank's RNG state.
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    one = torch.load(runs["single-full"] / "checkpoints" / ckpt.name / "trainer_state.pt", weights_only=False)
    assert state["model"].keys() == one["model"].keys()
    assert all(state["model"][k].shape == one["model"][k].shape for k in one["model"])
    assert state["optimizer"]["param_groups"] == one["optimizer"]["param_groups"]
    assert state["optimizer"]["state"].keys() == one["optimizer"]["state"].keys()
    assert len(state["rank_rng"]) == 2

    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 0
    assert_same_training(run, runs[name])  # the uninterrupted 2-process run
    assert_same_training(run, runs["single-full"])


@pytest.mark.slow
def test_checkpoint_of_one_process_resumes_on_two_under_fsdp(runs):
    run = runs["lora-1to2"]
    assert "distributed: fsdp" in (run / "config.yaml").read_text()
    assert_same_training(run, runs["single-lora"])
    assert all("lora_" in k for k in weights(run))


@pytest.mark.slow
def test_bf16_replicas_round_alike_under_ddp(runs):
    """The replicas' weights were compared (a checksum per rank) at the step-3 checkpoint and at the
    end; the run finished, so they were the same, with stochastic rounding drawing on both ranks."""
    run = runs["ddp-full-bf16"]
    assert (run / "final").is_dir() and "bf16_rounding: stochastic" in (run / "config.yaml").read_text()
    assert weights(run)["model.embed_tokens.weight"].dtype == torch.bfloat16
    losses = [r["loss"] for r in logged(run) if "loss" in r]
    assert len(losses) == STEPS and losses[-1] < losses[0]


@pytest.mark.slow
def test_compiled_layers_under_fsdp_train_like_one_eager_process(runs):
    """Each decoder layer compiled and sharded: the same steps, losses and weights as the one eager
    process, to fp32 rounding (Inductor orders the float sums its own way)."""
    run, reference = runs["fsdp-full-compiled"], runs["single-full"]
    assert_same_training(run, reference, ("loss", "eval_loss"), weight_tolerance=(1e-3, 1e-4))


def test_replicas_that_differ_stop_the_run(monkeypatch):
    """What the check does when the ranks' weights differ (the comparison, without a launch)."""
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    mine = distributed.weights_checksum(model)
    with torch.no_grad():
        model.weight[0, 0] += 0.25
    assert distributed.weights_checksum(model) != mine
    dist = Dist(mode="ddp", rank=0, world_size=2)
    monkeypatch.setattr(
        distributed.tdist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj, mine])
    )
    with pytest.raises(TunelabError, match="replicas hold different weights at the end"):
        distributed.check_replicas(model, dist, "at the end of training")
    monkeypatch.setattr(
        distributed.tdist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj, obj])
    )
    distributed.check_replicas(model, dist, "at the end of training")  # equal: nothing to say


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_with_its_error(llama_dir, data, tmp_path):
    out = tmp_path / "run"
    env = {**ENV, distributed.FAIL_ENV: "1:2"}  # rank 1 raises when step 2 starts
    command = torchrun(free_port(), "-m", "tunelab", *train_args(llama_dir, data, out, "full", "fsdp"))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), li) for li in proc.stdout))
    reader.start()
    try:
        code = proc.wait(timeout=240)
    finally:
        proc.kill()
    ended = time.monotonic()
    reader.join(timeout=10)
    output = "".join(line for _, line in lines)

    assert code != 0
    message = "error (rank 1): RuntimeError: TUNELAB_TEST_FAIL_RANK: simulated failure on rank 1 at step 2"
    failed_at = next((t for t, line in lines if line.startswith(message)), None)
    assert failed_at is not None, output[-4000:]
    # Well inside the 30 s collective timeout: the launcher tore the other rank down, nothing hung.
    assert ended - failed_at < 10, output[-4000:]
    root_cause = output.split("Root Cause")[-1]  # torchrun's summary names rank 1 and its error
    assert "rank      : 1" in root_cause and "simulated failure on rank 1" in root_cause, root_cause
    assert "error (rank 0): stopped because another rank failed" in output or "SIGTERM" in output
    assert not (out / "final").exists()
    assert [r["step"] for r in logged(out) if "loss" in r] in ([], [1])  # it stopped in step 2


# ---------------------------------------------------------------- the pieces, in one process


def batch(n_targets: int) -> PackedBatch:
    ids = torch.zeros(1, 4, dtype=torch.long)
    return PackedBatch(ids, ids, ids, 1, 4, n_targets)


@pytest.mark.parametrize("world, counts", [(2, [3, 1, 2, 5, 4]), (3, [1, 2]), (2, [2, 0, 1, 3]), (1, [0, 2])])
def test_deal_gives_every_micro_batch_once_and_every_rank_as_many_passes(world, counts):
    micro_batches = [batch(n) for n in counts]
    shares = [distributed.deal(micro_batches, Dist("ddp", r, world)) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # the same number of passes everywhere
    assert len(shares[0]) == -(-len(counts) // world)
    counted = [b for s in shares for b, c in s if c]
    # Each micro-batch with a trained token is counted exactly once (one process: every micro-batch).
    expected = micro_batches if world == 1 else [b for b in micro_batches if b.n_targets]
    assert sorted(map(id, counted)) == sorted(map(id, expected))
    richest = max(micro_batches, key=lambda b: b.n_targets)
    assert all(b is richest for s in shares for b, c in s if not c)  # stand-ins carry a forward pass
    if world > 1:
        assert [b for b, c in shares[1] if c] == [b for b in micro_batches[1::world] if b.n_targets]


def test_optimizer_state_layouts_round_trip(llama_dir):
    """distributed.py converts between torch.distributed.checkpoint's name-keyed optimizer state and
    the numbered one a checkpoint holds; the round trip gives back the optimizer's own state_dict."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    params = [p for p in model.parameters()]
    optimizer = torch.optim.AdamW([{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}])
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    saved = optimizer.state_dict()
    by_name = distributed._by_name(saved, model, optimizer)
    assert "model.embed_tokens.weight" in by_name["state"]
    again = distributed._by_index(by_name)
    assert again["param_groups"] == saved["param_groups"]
    assert again["state"].keys() == saved["state"].keys()
    assert all(again["state"][i] is saved["state"][i] for i in saved["state"])
