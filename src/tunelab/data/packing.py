"""Examples -> padding-free packed batches.

Each micro-batch is one row of concatenated examples. Position ids restart at 0 for every example, and
the row carries the examples' boundaries (`cu_seqlens`), which varlen attention kernels (flash, and
tunelab's packed attention in training/attention.py) take so that no example attends to another. For
attention that needs a mask, transformers builds a block-diagonal causal one from the position ids
(masking_utils.find_packed_sequence_indices). Targets are shifted inside each example, so the last
token of one example never predicts the first of the next.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch

from tunelab.data.tokenize import IGNORE, Encoded


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L], restarting at 0 for every example
    targets: torch.Tensor  # [R, L], already shifted; IGNORE where no loss (and on row padding)
    n_examples: int
    n_tokens: int  # real tokens (row padding not counted)
    n_targets: int  # tokens that carry loss
    cu_seqlens: torch.Tensor | None = None  # [examples + 1] boundaries in the row (varlen batches only)
    max_len: int = 0  # the longest example (varlen batches only)
    # Positions where some row has a target. Worked out here, on the host, when the batch is built:
    # the same on the GPU would make the host wait for it in every micro-batch.
    keep: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.keep is None:
            self.keep = (self.targets != IGNORE).any(0).nonzero().squeeze(-1)

    def to(self, device: torch.device | str) -> PackedBatch:
        """The batch on `device`. To a GPU the tensors go through page-locked memory: a copy from
        ordinary (pageable) memory may wait for the GPU to finish the work queued before it, which
        would make the host wait for every micro-batch after a step's first."""
        device = torch.device(device)
        pin = device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            if pin and t.device.type == "cpu":
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        return PackedBatch(
            move(self.input_ids),
            move(self.position_ids),
            move(self.targets),
            self.n_examples,
            self.n_tokens,
            self.n_targets,
            None if self.cu_seqlens is None else move(self.cu_seqlens),
            self.max_len,
            move(self.keep),
        )

    def attention_kwargs(self) -> dict:
        """The examples' boundaries under the names transformers passes down to varlen attention."""
        if self.cu_seqlens is None:
            return {}
        return {
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_len,
            "max_length_k": self.max_len,
        }


def _first_fit(sizes: list[int], capacity: int) -> list[list[int]]:
    """Positions 0..len(sizes)-1 into bins of `capacity`, each into the first bin it fits, in the
    order given (callers sort largest first: first-fit-decreasing)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(sizes):
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def _rows(examples: list[Encoded], capacity: int | None) -> list[list[Encoded]]:
    """First-fit-decreasing into rows of `capacity` tokens (None: everything in one row)."""
    if capacity is None:
        return [examples]
    ordered = sorted(examples, key=lambda e: -len(e.input_ids))
    return [[ordered[i] for i in row] for row in _first_fit([len(e.input_ids) for e in ordered], capacity)]


# Up to this many tokens a micro-batch stays one row even with dense-mask attention: the mask and the
# attention over it cost less than padding rows (world demo on 2 CPU cores: 68.8 vs 73.2 ms/step).
DENSE_ONE_ROW_MAX = 512


def collate(
    examples: list[Encoded], varlen: bool = True, dense_one_row_max: int = DENSE_ONE_ROW_MAX
) -> PackedBatch:
    """`varlen`: pack examples into one row with their boundaries, for varlen attention (no padding
    at all). Otherwise, for attention that needs a dense mask (whose cost grows with the square of the
    row length), into several rows as long as the longest example, padded to equal length; small
    micro-batches (at most `dense_one_row_max` tokens) stay one row there too."""
    one_row = varlen or sum(len(e.input_ids) for e in examples) <= dense_one_row_max
    capacity = None if one_row else max(len(e.input_ids) for e in examples)
    ids_rows, pos_rows, tgt_rows = [], [], []
    for row in _rows(examples, capacity):
        ids: list[int] = []
        pos: list[int] = []
        tgt: list[int] = []
        for ex in row:
            n = len(ex.input_ids)
            ids.extend(ex.input_ids)
            pos.extend(range(n))
            tgt.extend(ex.labels[1:])
            tgt.append(IGNORE)  # the last token of an example predicts nothing
        ids_rows.append(ids)
        pos_rows.append(pos)
        tgt_rows.append(tgt)
    width = max(len(r) for r in ids_rows)
    n_tokens = sum(len(r) for r in ids_rows)
    for ids, pos, tgt in zip(ids_rows, pos_rows, tgt_rows):
        pad = width - len(ids)
        # Padding is a sequence of its own (positions from 0), so no real token attends to it.
        ids.extend([0] * pad)
        pos.extend(range(pad))
        tgt.extend([IGNORE] * pad)
    targets = torch.tensor(tgt_rows)
    cu_seqlens, max_len = None, 0
    if varlen:
        lengths = [len(ex.input_ids) for ex in examples]  # one row: examples in this order
        cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        max_len = max(lengths)
    return PackedBatch(
        torch.tensor(ids_rows),
        torch.tensor(pos_rows),
        targets,
        len(examples),
        n_tokens,
        int((targets != IGNORE).sum()),
        cu_seqlens,
        max_len,
    )


def plan_epoch(
    lengths: list[int],
    batch_size: int,
    micro_batch_tokens: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> list[list[list[int]]]:
    """The epoch as optimizer steps -> micro-batches -> example indices; deterministic in (seed, epoch).

    A step takes `batch_size` examples (the last step may take fewer: no example is dropped), then
    packs them first-fit-decreasing into micro-batches of at most `micro_batch_tokens` tokens, so
    gradient accumulation happens only when a step's tokens do not fit one micro-batch.
    """
    order = list(range(len(lengths)))
    if shuffle:
        random.Random(f"{seed}-{epoch}").shuffle(order)
    steps = []
    for start in range(0, len(order), batch_size):
        chosen = sorted(order[start : start + batch_size], key=lambda i: -lengths[i])
        sizes = [min(lengths[i], micro_batch_tokens) for i in chosen]
        steps.append([[chosen[j] for j in mb] for mb in _first_fit(sizes, micro_batch_tokens)])
    return steps


def plan_eval(lengths: list[int], micro_batch_tokens: int) -> list[list[int]]:
    """Eval micro-batches in file order (no shuffling: eval loss must be comparable across steps)."""
    return [
        mb
        for step in plan_epoch(lengths, len(lengths) or 1, micro_batch_tokens, 0, 0, shuffle=False)
        for mb in step
    ]
