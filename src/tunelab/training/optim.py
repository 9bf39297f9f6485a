"""AdamW whose bf16 weights take their update with stochastic rounding.

A bf16 weight holds 8 significant bits: next to a weight of 0.02 the nearest other bf16 values are
1.2e-4 away. AdamW moves a weight by about `lr` per step, so with `lr` = 1e-5 (a usual finetuning rate)
most updates are below half that spacing and round back to the old value: torch's AdamW on bf16
weights (fused or not) computes the update in fp32 and rounds it into bf16 to the nearest value, and
the update is lost. Finetuning the world model fully in bf16 at lr 1e-5 left the eval loss at 1.26
after 120 steps, where fp32 reached 0.31 (bench/results/bf16_rounding.md).

`AdamW` here does torch's AdamW arithmetic (decoupled weight decay, bias-corrected moments, the same
order of operations) in fp32 on a copy of each bf16 weight, then rounds the result into bf16 up or down
with probabilities set by its distance to each: unbiased, so many small updates add up to what fp32
would have reached (the same run: 0.313). Memory as torch's AdamW on bf16 weights (moments in the
weight's dtype); the fp32 copies exist for one chunk of weights at a time (`CHUNK` elements).

The random bits come from a generator seeded by (seed, step, parameter group), so the same step rounds
the same way on every data-parallel replica and after a resume (FSDP's shards mix in their rank). Weights in other dtypes (fp32 adapters, fp32 models)
get the plain update. All arithmetic runs on lists of tensors (`torch._foreach_*`): a few kernel
launches per chunk, not per weight. On a GPU with Triton, bf16 weights take the same update from one
fused kernel instead, all of them in one launch (sr_kernel.py: ~16 bytes moved per weight instead of
~78). FSDP's sharded weights are updated through their local shards.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from tunelab.training import sr_kernel

_log = logging.getLogger(__name__)

CHUNK = 2**24  # elements updated together: ~16 bytes each of transient memory (fp32 copies, noise)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor over the same memory (FSDP2's DTensors: this rank's shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _pieces(tensors: list[tuple[torch.Tensor, ...]], chunk: int) -> Iterator[list[tuple[torch.Tensor, ...]]]:
    """Groups of flat (weight, grad, exp_avg, exp_avg_sq) slices of at most `chunk` elements together;
    a weight larger than `chunk` is cut into slices."""
    group: list[tuple[torch.Tensor, ...]] = []
    size = 0
    for quad in tensors:
        flat = [t.view(-1) for t in quad]
        for start in range(0, flat[0].numel(), chunk):
            piece = tuple(t[start : start + chunk] for t in flat)
            if size + piece[0].numel() > chunk and group:
                yield group
                group, size = [], 0
            group.append(piece)
            size += piece[0].numel()
    if group:
        yield group


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update, with stochastic rounding into bf16 weights (see the module doc)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        seed: int = 0,
        chunk: int = CHUNK,
    ):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.seed = seed
        self.chunk = chunk
        self._generators: dict[torch.device, torch.Generator] = {}
        self._kernel: Any = None  # sr_kernel's launcher once looked up; False: not available
        self._many: Any = None  # its launcher for a whole list of bf16 weights (None: not available)

    def _generator(self, device: torch.device, step: int, group: int, shard: int) -> torch.Generator:
        """Random bits for one step of one parameter group: the same on every data-parallel replica
        (which must stay identical) and after a resume; FSDP's shards (`shard` = rank) draw their own."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        # A tuple of ints hashes the same in every process (PYTHONHASHSEED only salts str and bytes).
        return self._generators[device].manual_seed(hash((self.seed, step, group, shard)) % 2**63)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            by_kind: dict[tuple[torch.device, torch.dtype, int], list[tuple[torch.Tensor, ...]]] = {}
            shard = 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("tunelab's AdamW does not take sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                if hasattr(p, "to_local"):  # an FSDP shard: this rank's part of the weight
                    shard = torch.distributed.get_rank()
                weight = _local(p)
                grad = _local(p.grad).contiguous()
                quad = (weight, grad, _local(state["exp_avg"]), _local(state["exp_avg_sq"]))
                by_kind.setdefault((weight.device, weight.dtype, int(state["step"])), []).append(quad)
            for (device, dtype, step), quads in by_kind.items():
                if dtype == torch.bfloat16 and device.type == "cuda":
                    quads = self._fused(quads, group, step, (self.seed, step, index, shard))
                generator = self._generator(device, step, index, shard) if dtype == torch.bfloat16 else None
                for piece in _pieces(quads, self.chunk):
                    _update(piece, group, step, generator)
        return loss

    def _fused(
        self, quads: list[tuple[torch.Tensor, ...]], group: dict[str, Any], step: int, key: tuple[int, ...]
    ) -> list[tuple[torch.Tensor, ...]]:
        """Update bf16 weights on a GPU with the one-kernel update (sr_kernel.py) where it runs: every
        weight whose four tensors are contiguous bf16 in one launch, the others one launch each;
        returns the weights left for the list path (all of them without Triton, or from a failed
        launch on)."""
        if self._kernel is False:
            return quads
        if self._kernel is None:
            self._kernel = sr_kernel.update_fn() or False
            self._many = sr_kernel.update_many_fn() if self._kernel else None
            if self._kernel is False:
                return quads
        beta1, beta2 = group["betas"]
        hyper = dict(beta1=beta1, beta2=beta2, lr=group["lr"], decay=group["weight_decay"], eps=group["eps"])
        seeds = [hash((*key, i)) % 2**31 for i in range(len(quads))]  # one per weight, as before
        flat = [
            i for i, q in enumerate(quads) if all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in q)
        ]
        done: set[int] = set()
        if self._many is not None and flat:
            try:
                self._many([quads[i] for i in flat], [seeds[i] for i in flat], **hyper, step=step)
                done = set(flat)
            except Exception as e:  # noqa: BLE001 - any failure: one launch per weight from now on
                _log.warning("the one-launch bf16 AdamW kernel failed (%s); launching it per weight", e)
                self._many = None
        left = []
        for i, quad in enumerate(quads):
            if i in done:
                continue
            if not all(t.is_contiguous() for t in quad):  # the kernel reads flat memory
                left.append(quad)
                continue
            try:
                self._kernel(*quad, **hyper, step=step, seed=seeds[i])
            except Exception as e:  # noqa: BLE001 - any failure: the list path, from this weight on
                _log.warning("the fused bf16 AdamW kernel failed (%s); using the list path instead", e)
                self._kernel = False
                return left + [q for j, q in enumerate(quads[i:], i) if j not in done]
        return left


def _update(
    piece: list[tuple[torch.Tensor, ...]], group: dict[str, Any], step: int, generator: torch.Generator | None
) -> None:
    """One AdamW step over flat slices of weights, as torch's AdamW orders it; with a generator, the
    new weights are computed in fp32 and rounded into bf16 stochastically."""
    weights, grads, exp_avgs, exp_avg_sqs = (list(x) for x in zip(*piece))
    beta1, beta2 = group["betas"]
    lr, decay = group["lr"], group["weight_decay"]
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(1 - beta2**step))
    torch._foreach_add_(denom, group["eps"])
    if generator is None:
        if decay:
            torch._foreach_mul_(weights, 1 - lr * decay)
        torch._foreach_addcdiv_(weights, exp_avgs, denom, -step_size)
        return
    sizes = [w.numel() for w in weights]
    device = weights[0].device
    exact = torch.empty(sum(sizes), dtype=torch.float32, device=device)
    exact_views = list(exact.split(sizes))
    torch._foreach_copy_(exact_views, weights)  # bf16 -> fp32, exact
    if decay:
        torch._foreach_mul_(exact_views, 1 - lr * decay)
    torch._foreach_addcdiv_(exact_views, exp_avgs, denom, -step_size)  # fp32 += bf16 / bf16, in fp32
    del denom
    # Stochastic rounding: add a uniform number below 2^16 to the 16 low bits that bf16 drops, then
    # drop them: the magnitude rounds up with probability equal to its distance from the bf16 value
    # below it (sign and exponent sit above those bits: zero stays zero, signs never flip).
    noise = torch.randint(0, 2**16, exact.shape, dtype=torch.int32, device=device, generator=generator)
    exact.view(torch.int32).add_(noise).bitwise_and_(-(2**16))
    torch._foreach_copy_(weights, exact_views)  # fp32 -> bf16, exact now


def describe(optimizer: torch.optim.Optimizer) -> str | None:
    """For the run's first log line: says so when bf16 weights are updated with stochastic rounding."""
    return "bf16 weights updated with stochastic rounding" if isinstance(optimizer, AdamW) else None
