"""Looking at a model without training it (the probes of attention.py and lora.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """`model` in eval mode for the block (no dropout: no random draws); afterwards every module has
    its own mode back, also a mixed train/eval state and also when the block fails."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in modes.items():
            m.training = flag
