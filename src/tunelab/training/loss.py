"""The loss of a packed batch, computed only where targets are set.

`logits_to_keep` (a tensor of positions, supported by HF causal LMs in transformers 5) makes the model
project only the trained positions through the output head: with completion-only SFT most positions
carry no loss, and the full [tokens, vocab] logits tensor is never built.

When the kept positions times the vocabulary would still be large (pretraining, long completions,
150k-token vocabularies), the head and the cross-entropy run in chunks of positions, each chunk
recomputed in the backward pass, so at most one chunk of fp32 logits is alive at a time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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
        **batch.attention_kwargs(),
    )
    return out.logits.float(), batch.targets[:, keep]


# Above this many logits (positions x vocab) the chunked path is used: 2**25 fp32 values = 128 MiB.
LOGITS_BUDGET = 2**25
CHUNK_POSITIONS = 2048


def _head_parts(model: Any) -> tuple[Any, Any] | None:
    """The decoder stack and the output head, when the head is a plain projection we may apply
    ourselves (not for models that scale or soft-cap their logits)."""
    wrapper = model if hasattr(model, "_orig_mod") else None  # torch.compile's wrapper around the model
    model = model._orig_mod if wrapper is not None else model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if wrapper is not None:
        # The loop compiled the whole model, but this path calls the decoder directly: compile it too
        # (once, kept on the wrapper, so it lives as long as the loop's compiled model), or a compiled
        # run would train its decoder eagerly.
        if "_tunelab_decoder" not in wrapper.__dict__:
            object.__setattr__(wrapper, "_tunelab_decoder", torch.compile(decoder, dynamic=True))
        decoder = wrapper.__dict__["_tunelab_decoder"]
    return decoder, head


def _chunk_ce(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE, reduction="sum")


def chunked_loss_sum(model: Any, batch: PackedBatch, chunk: int = CHUNK_POSITIONS) -> torch.Tensor | None:
    """The same sum as `loss_sum`, with the head applied `chunk` positions at a time; None when the
    model's head cannot be applied separately."""
    parts = _head_parts(model)
    if parts is None:
        return None
    decoder, head = parts
    hidden = decoder(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        use_cache=False,
        **batch.attention_kwargs(),
    ).last_hidden_state
    mask = batch.targets != IGNORE
    hidden, targets = hidden[mask], batch.targets[mask]
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk):
        h, t = hidden[i : i + chunk], targets[i : i + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce, head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_ce(head, h, t)
    return total


def loss_sum(model: Any, batch: PackedBatch) -> torch.Tensor:
    """Sum (not mean) of token cross-entropies, so micro-batches add up to the exact step mean."""
    if batch.n_targets == 0:
        return torch.zeros((), device=batch.input_ids.device)
    vocab = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") else 0
    # Not under DDP/FSDP (several processes): calling the decoder and head apart would go around the
    # wrapped forward, where gradients are hooked for syncing and sharded weights are gathered.
    if batch.n_targets * vocab > LOGITS_BUDGET and not torch.distributed.is_initialized():
        chunked = chunked_loss_sum(model, batch)
        if chunked is not None:
            return chunked
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
