"""The loss of a packed batch, computed only where targets are set.

`logits_to_keep` (a tensor of positions, supported by HF causal LMs in transformers 5) makes the model
project only the trained positions through the output head: with completion-only SFT most positions
carry no loss, and the full [tokens, vocab] logits tensor is never built.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tunelab.data.packing import PackedBatch
from tunelab.data.tokenize import IGNORE


def _logits(model: Any, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets at the positions where some row has a target: [R, n, V] and [R, n]."""
    keep = (batch.targets != IGNORE).any(0).nonzero().squeeze(-1)
    out = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=keep,
    )
    return out.logits.float(), batch.targets[:, keep]


def loss_sum(model: Any, batch: PackedBatch) -> torch.Tensor:
    """Sum (not mean) of token cross-entropies, so micro-batches add up to the exact step mean."""
    if batch.n_targets == 0:
        return torch.zeros((), device=batch.input_ids.device)
    logits, targets = _logits(model, batch)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def per_example_loss(model: Any, batch: PackedBatch) -> list[float]:
    """Mean loss of each example in the batch, in row order (for tests and error analysis)."""
    keep = (batch.targets != IGNORE).any(0).nonzero().squeeze(-1)
    logits, targets = _logits(model, batch)
    losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    starts = (batch.position_ids == 0) & (batch.input_ids >= 0)
    example_of = starts.flatten().cumsum(0).view_as(batch.position_ids) - 1  # example index per token
    ids = example_of[:, keep]
    valid = targets != IGNORE
    result = []
    for e in range(int(example_of.max()) + 1):
        sel = losses[(ids == e) & valid]
        if sel.numel():
            result.append(float(sel.mean()))
    return result
