"""optim.AdamW's update of a bf16 weight as one Triton kernel (CUDA, where Triton is installed).

The list-of-tensors path in optim.py moves about 78 bytes per weight per step (moments, the fp32
copy, the denominator, the random bits, the rounding: a dozen passes over the weights); this kernel
reads the weight, its gradient and both moments once and writes the weight and the moments once
(~16 bytes per weight), drawing the random bits in registers (Philox, seeded per weight and step).
One launch per weight. Its arithmetic is torch's AdamW's in fp32; the moments are rounded into their
dtype once per step where the list path rounds the second moment twice, so the two paths agree to
the moments' rounding, not bit for bit.

`update_fn()` gives the launcher, or None where Triton is missing; optim.AdamW falls back to the list
path for good if a launch fails (a GPU or Triton release this kernel does not compile on).

`update_many_fn()` gives a launcher that updates a whole list of bf16 weights in one launch: each
program finds its weight and its slice in a table (built once per list of sizes, kept on the device)
and the weight's four addresses in a small per-step table (one host-to-device copy). A model has
hundreds of weight tensors (Qwen2.5-0.5B: 290): one launch each costs the host ~20 us apiece in
Triton's Python launcher while the GPU updates the small ones in a few, so the GPU waited through the
update (on an H100, round-to-nearest AdamW, torch's multi-tensor kernel, trained qwen0.5b at 101,895
real tokens/s against 88,711 and 97,128 with one launch per weight; bench/results/gpu_h100.md). Same
arithmetic, same random bits (the seed per weight, the offsets within it): bit for bit the update of
`update_fn()`'s kernel (tested under the interpreter).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

BLOCK = 1024
triton: Any = None
tl: Any = None
_step: Any = None  # the Triton function both kernels call (`_define_step`)


def _language() -> bool:
    """Imports Triton into the module globals (the kernels' language); False without it."""
    # Module globals, not locals: Triton's interpreter swaps the language module in the kernel's globals.
    global triton, tl
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return False
    return True


def _define_step() -> None:
    """`_step`, the update of one slice of a weight: a module global, where Triton finds the
    functions a kernel calls; defined once (Triton refuses a kernel whose globals changed since it
    was compiled)."""
    global _step
    if _step is not None:
        return

    @triton.jit
    def step(w_ptr, g_ptr, m_ptr, v_ptr, offsets, mask, beta1, beta2, keep, step_size, bc2_sqrt, eps, seed):
        w = tl.load(w_ptr + offsets, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offsets, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=mask).to(tl.float32)
        m = m + (1.0 - beta1) * (g - m)  # lerp towards the gradient, as torch's
        v = v * beta2 + (1.0 - beta2) * g * g
        w = w * keep  # decoupled weight decay: keep = 1 - lr * weight_decay
        w = w - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
        # Stochastic rounding into bf16, as optim._update: 16 random bits added below bf16's last bit.
        noise = tl.randint(seed, offsets).to(tl.uint32, bitcast=True) & 0xFFFF
        bits = (w.to(tl.uint32, bitcast=True) + noise) & 0xFFFF0000
        tl.store(w_ptr + offsets, bits.to(tl.float32, bitcast=True).to(w_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offsets, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offsets, v.to(v_ptr.dtype.element_ty), mask=mask)

    _step = step


def _step_scalars(
    lr: float, decay: float, beta1: float, beta2: float, step: int
) -> tuple[float, float, float]:
    """The step's scalars both kernels take, computed in one place (the kernels agree bit for bit):
    keep = 1 - lr * weight_decay, the bias-corrected step size, sqrt of the second bias correction."""
    return 1.0 - lr * decay, lr / (1.0 - beta1**step), (1.0 - beta2**step) ** 0.5


def update_fn() -> Callable[..., None] | None:
    """The kernel's launcher: update(weight, grad, exp_avg, exp_avg_sq, beta1=, beta2=, lr=, decay=,
    eps=, step=, seed=) on flat, contiguous tensors; None without Triton. Built on each call (under
    TRITON_INTERPRET=1 it runs on the CPU: that is how the tests check it without a GPU)."""
    if not _language():
        return None
    _define_step()

    @triton.jit
    def _adamw_sr(w_ptr, g_ptr, m_ptr, v_ptr, n, beta1, beta2, keep, step_size, bc2_sqrt, eps, seed,
                  BLOCK: tl.constexpr):  # fmt: skip
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        _step(w_ptr, g_ptr, m_ptr, v_ptr, offsets, offsets < n, beta1, beta2, keep, step_size, bc2_sqrt, eps,
              seed)  # fmt: skip

    def update(weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               *, beta1: float, beta2: float, lr: float, decay: float, eps: float, step: int,
               seed: int) -> None:  # fmt: skip
        n = weight.numel()
        grid: Any = (triton.cdiv(n, BLOCK),)
        _adamw_sr[grid](
            weight, grad, exp_avg, exp_avg_sq, n, beta1, beta2, *_step_scalars(lr, decay, beta1, beta2, step),
            eps, seed, BLOCK=BLOCK,
        )  # fmt: skip

    update.kernel = _adamw_sr  # type: ignore[attr-defined]  # for tests: compiled ahead for a GPU
    return update


def update_many_fn() -> Callable[..., None] | None:
    """The one-launch launcher: update_many(quads, seeds, beta1=, beta2=, lr=, decay=, eps=, step=)
    over (weight, grad, exp_avg, exp_avg_sq) quads of flat, contiguous bf16 tensors on one device,
    `seeds[i]` the random seed of quad i; None without Triton."""
    if not _language():
        return None
    _define_step()

    @triton.jit
    def _adamw_sr_many(
        blocks_ptr, rows_ptr, beta1, beta2, keep, step_size, bc2_sqrt, eps, BLOCK: tl.constexpr
    ):
        # blocks [programs, 2]: which weight, and where in it the program's slice starts;
        # rows [weights, 6]: its four tensors' addresses, its size and its random seed.
        pid = tl.program_id(0)
        row = rows_ptr + 6 * tl.load(blocks_ptr + 2 * pid).to(tl.int64)
        offsets = tl.load(blocks_ptr + 2 * pid + 1) + tl.arange(0, BLOCK)
        w_ptr = tl.load(row).to(tl.pointer_type(tl.bfloat16))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(tl.bfloat16))
        m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.bfloat16))
        v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.bfloat16))
        mask = offsets < tl.load(row + 4)
        _step(w_ptr, g_ptr, m_ptr, v_ptr, offsets, mask, beta1, beta2, keep, step_size, bc2_sqrt, eps,
              tl.load(row + 5))  # fmt: skip

    tables: dict[tuple[Any, ...], torch.Tensor] = {}

    def blocks_of(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """[programs, 2] int32 (weight index, slice start), built on the device once per list of sizes
        (an optimizer's parameter groups: a few lists, the same every step)."""
        key = (device, sizes)
        if key not in tables:
            if len(tables) >= 8:
                tables.clear()
            per = [-(-n // BLOCK) for n in sizes]
            counts, total = torch.tensor(per, device=device), sum(per)  # output_size: no wait for the GPU
            which = torch.repeat_interleave(
                torch.arange(len(sizes), device=device), counts, output_size=total
            )
            first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts, output_size=total)
            start = (torch.arange(total, device=device) - first) * BLOCK
            tables[key] = torch.stack([which, start], 1).to(torch.int32).contiguous()
        return tables[key]

    def update_many(quads: Sequence[tuple[torch.Tensor, ...]], seeds: Sequence[int], *, beta1: float,
                    beta2: float, lr: float, decay: float, eps: float, step: int) -> None:  # fmt: skip
        if any(t.dtype != torch.bfloat16 or not t.is_contiguous() for quad in quads for t in quad):
            raise ValueError("update_many takes contiguous bf16 tensors only")
        device = quads[0][0].device
        blocks = blocks_of(tuple(q[0].numel() for q in quads), device)
        rows = torch.tensor(
            [[*(t.data_ptr() for t in q), q[0].numel(), seed] for q, seed in zip(quads, seeds)],
            dtype=torch.int64,
        )
        if device.type == "cuda":  # one small copy, queued: the host does not wait for the GPU
            rows = rows.pin_memory().to(device, non_blocking=True)
        _adamw_sr_many[(blocks.shape[0],)](
            blocks, rows, beta1, beta2, *_step_scalars(lr, decay, beta1, beta2, step), eps, BLOCK=BLOCK,
        )  # fmt: skip

    update_many.kernel = _adamw_sr_many  # type: ignore[attr-defined]
    return update_many
