"""Full training state on disk, written atomically, so a run can resume exactly.

A checkpoint is written to `step-NNNNNN.tmp/` and renamed only when complete: a kill at any moment
leaves either a whole checkpoint or a `.tmp` folder that resume ignores.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"


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


def save(
    folder: Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    meta: dict[str, Any],
    keep_last: int,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    tmp = folder / f"step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(
        {
            "model": _trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
        },
        tmp / STATE_FILE,
    )
    (tmp / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)  # atomic on one filesystem: the checkpoint exists whole or not at all
    for old in complete_checkpoints(folder)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def complete_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    done = [
        p
        for p in folder.glob("step-*")
        if p.is_dir() and not p.name.endswith(".tmp") and (p / META_FILE).exists()
    ]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def load(path: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["model"].items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return json.loads((path / META_FILE).read_text())
