"""Full training state on disk, written atomically, so a run can resume exactly.

A checkpoint holds what training changes (all weights for a full finetune, only the adapter for LoRA),
the optimizer and scheduler states, every RNG state (LoRA dropout draws from torch's), the metrics
logged so far, and meta.json (step, epoch, best eval so far, a fingerprint of the training data). The
data position needs no more than the step: each epoch's order is a pure function of (seed, epoch).

Under several processes rank 0 writes the same whole checkpoint (plus every rank's RNG state), so a
run resumes under any world size (training/distributed.py).

It is written to `step-NNNNNN.tmp/`, every file fsynced, then renamed: a kill at any moment leaves
either a whole checkpoint or a `.tmp` folder that resume ignores and the next save removes. A folder
that is replaced (`best/`) is moved aside to `.old` first and removed last (`atomic_dir`, `recover`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.errors import TunelabError

STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
METRICS_FILE = "metrics.jsonl"
# Tests only: `TUNELAB_TEST_SLOW_CHECKPOINT=STEP` pauses that step's save after its files are written
# and before the rename, so a test can kill the process at the worst moment.
SLOW_ENV = "TUNELAB_TEST_SLOW_CHECKPOINT"
_NAME = re.compile(r"step-(\d+)")


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    # Only what training changes: all weights for a full finetune, the adapter for LoRA.
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fingerprint(examples: list[Any]) -> str:
    """A hash of the encoded training data, so resuming on changed data is refused, not silently wrong."""
    h = hashlib.sha256()
    for e in examples:
        h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(e.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk: a rename is only durable after its contents are."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on Windows; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover(final: Path) -> None:
    """Finish a replacement of `final` that a kill interrupted (see `atomic_dir`): with `final`
    gone, `<final>.old` means the new `<final>.tmp` was whole (the old one is moved aside only
    then), so it takes the place (or, without it, the old one goes back); a `.old` beside a
    `final` is a leftover."""
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    if not final.exists() and old.exists():
        (tmp if tmp.is_dir() else old).rename(final)
        _fsync(final.parent)
    if final.exists() and old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh `<final>.tmp` folder to write into; on success it replaces `final` whole: the
    old one is renamed to `<final>.old`, the new one into place, then the old one removed, so a kill
    at any moment leaves a whole `final` or one that `recover` puts back."""
    recover(final)  # a replacement a kill interrupted: its `.tmp` may be the only new copy
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a killed write
    tmp.mkdir(parents=True)
    yield tmp
    for f in tmp.rglob("*"):
        if f.is_file():
            _fsync(f)
    _fsync(tmp)
    if final.exists():
        final.rename(old)
    tmp.rename(final)  # atomic on one filesystem
    _fsync(final.parent)
    if old.exists():
        shutil.rmtree(old)


def training_state(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What a checkpoint holds besides the scheduler (one process; see distributed.training_state)."""
    return {"model": _trainable_state(model), "optimizer": optimizer.state_dict(), "rng": rng_state()}


def save(
    folder: Path,
    step: int,
    state: dict[str, Any],
    scheduler: Any,
    meta: dict[str, Any],
    keep_last: int,
    metrics: Path | None = None,
) -> Path:
    """Write checkpoint `step` (`state` from `training_state`) and keep only the newest `keep_last`
    (all of them when < 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("step-*.tmp"):
        shutil.rmtree(stale)  # a write a kill interrupted; one run has one writer
    # The newest complete checkpoint is older than `step` (resume starts from it), so a folder already
    # named like this one was never completed and atomic_dir may replace it.
    with atomic_dir(folder / f"step-{step:06d}") as tmp:
        torch.save({**state, "scheduler": scheduler.state_dict()}, tmp / STATE_FILE)
        if metrics is not None and metrics.exists():
            shutil.copyfile(metrics, tmp / METRICS_FILE)
        (tmp / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=2))
        if os.environ.get(SLOW_ENV) == str(step):
            (tmp / "PAUSED").touch()
            time.sleep(60)
            (tmp / "PAUSED").unlink()
    done = complete_checkpoints(folder)
    # Pruned only after the new one is whole, so the newest complete checkpoint always survives.
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return folder / f"step-{step:06d}"


def step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def complete_checkpoints(folder: Path) -> list[Path]:
    """Finished checkpoints, oldest first (`.tmp` folders are writes that never completed)."""
    if not folder.is_dir():
        return []
    done = [p for p in folder.iterdir() if _NAME.fullmatch(p.name) and (p / META_FILE).exists()]
    return sorted(done, key=step_of)


def restore_metrics(path: Path, metrics: Path) -> None:
    """Put back metrics.jsonl as it was at checkpoint `path`: what came after is about to be redone
    (a checkpoint without a copy: the records after its step are dropped)."""
    saved = path / METRICS_FILE
    if saved.exists():
        shutil.copyfile(saved, metrics)
    elif metrics.exists():
        keep = []
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # blank, or cut in half by the kill
            if record.get("step", 0) <= step_of(path):
                keep.append(line)
        metrics.write_text("".join(line + "\n" for line in keep))


def read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The saved state and meta.json of checkpoint `path`."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    return state, json.loads((path / META_FILE).read_text())


def check_fits(path: Path, saved: dict[str, Any], params: dict[str, Any]) -> None:
    """The checkpoint holds exactly this model's trainable tensors, by name and shape."""
    hint = "resume with the run's own config.yaml (same model, train.method and lora settings)"
    if set(saved) != set(params):
        missing, unexpected = set(params) - set(saved), set(saved) - set(params)
        raise TunelabError(
            f"checkpoint {path} does not fit this model: {len(missing)} trainable tensors missing "
            f"(e.g. {sorted(missing)[:2]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]})",
            hint,
        )
    shapes = [n for n in sorted(saved) if tuple(saved[n].shape) != tuple(params[n].shape)]
    if shapes:
        n = shapes[0]
        raise TunelabError(
            f"checkpoint {path} does not fit this model: {len(shapes)} trainable tensors have other shapes "
            f"(e.g. {n}: {tuple(saved[n].shape)} saved, {tuple(params[n].shape)} now; a changed lora.r?)",
            hint,
        )


# Training settings a resumed run may change: they decide what is logged, evaluated, saved, how fast
# it runs and in how much memory (a step's micro-batches add up to the same step whatever their size:
# the out-of-memory advice is to resume with fewer tokens per micro-batch or with checkpointing), not
# which updates the weights get. The step count is checked on its own (`changes`).
FREE_ON_RESUME = {"eval_every", "save_every", "keep_last", "log_every", "compile", "report_to", "distributed",
                  "micro_batch_tokens", "gradient_checkpointing", "max_steps", "epochs"}  # fmt: skip


def trajectory(cfg: Any) -> dict[str, Any]:
    """The train settings that decide the run's updates (as JSON values), for checkpoint meta."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in FREE_ON_RESUME}
    return json.loads(json.dumps(values, default=str))


def adapter_settings(model: Any) -> dict[str, Any] | None:
    """The LoRA settings that decide the updates and that the adapter's tensors do not show (its
    shapes and names say r and the targets); None without an adapter."""
    config = getattr(model, "peft_config", None)
    if not isinstance(config, dict) or "default" not in config:
        return None
    return {"alpha": config["default"].lora_alpha, "dropout": config["default"].lora_dropout}


def changes(
    meta: dict[str, Any],
    data: str,
    total_steps: int,
    train: dict[str, Any],
    lora: dict[str, Any] | None = None,
    eval_data: str | None = None,
) -> list[str]:
    """What differs between a checkpoint's run and the run resuming it, each said with both values
    (checkpoints written before the train settings were kept are checked for data and steps only)."""
    out = []
    if meta.get("data") != data:
        out.append("the training data (its tokenized examples)")
    if "eval_data" in meta and meta["eval_data"] != eval_data:  # (not kept by older checkpoints)
        out.append("the evaluation data (its tokenized examples)")
    if meta.get("total_steps") != total_steps:
        out.append(
            f"the step count ({meta.get('total_steps')} planned, {total_steps} now: train.max_steps or epochs)"
        )
    for key, before in (meta.get("train") or {}).items():
        if key in train and train[key] != before:
            out.append(f"train.{key} ({before!r} then, {train[key]!r} now)")
    for key, before in (meta.get("lora") or {}).items():
        if lora and key in lora and lora[key] != before:
            out.append(f"lora.{key} ({before!r} then, {lora[key]!r} now)")
    return out


def unchecked(meta: dict[str, Any], adapter: bool) -> list[str]:
    """What a checkpoint written before its meta.json kept it cannot be checked against on resume."""
    kept = {
        "eval_data": "the evaluation data",
        "train": "the train settings (lr, schedule, seed, batch size, ...)",
        **({"lora": "the adapter's lora.alpha and lora.dropout"} if adapter else {}),
    }
    return [what for key, what in kept.items() if key not in meta]


def load(path: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG states; returns meta.json."""
    state, meta = read(path)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    check_fits(path, state["model"], params)
    with torch.no_grad():
        for name, value in state["model"].items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return meta
