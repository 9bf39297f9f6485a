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


def loss_sum(model: Any, batch: PackedBatch) -> torch.Tensor:
    """Sum (not mean) of token cross-entropies, so micro-batches add up to the exact step mean."""
    targets = batch.targets[0]
    keep = (targets != IGNORE).nonzero().squeeze(-1)
    if keep.numel() == 0:
        return batch.input_ids.new_zeros((), dtype=torch.float32)
    out = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=keep,
    )
    logits = out.logits[0].float()
    return F.cross_entropy(logits, targets[keep], reduction="sum")


def per_example_loss(model: Any, batch: PackedBatch) -> list[float]:
    """Mean loss of each example in the batch (for tests and error analysis)."""
    targets = batch.targets[0]
    keep = (targets != IGNORE).nonzero().squeeze(-1)
    out = model(
        input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, logits_to_keep=keep
    )
    losses = F.cross_entropy(out.logits[0].float(), targets[keep], reduction="none")
    example_of = (batch.position_ids[0] == 0).cumsum(0) - 1
    ids = example_of[keep]
    result = []
    for e in range(batch.n_examples):
        sel = losses[ids == e]
        result.append(float(sel.mean()) if sel.numel() else float("nan"))
    return result
