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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

BLOCK = 1024
triton: Any = None
tl: Any = None


def update_fn() -> Callable[..., None] | None:
    """The kernel's launcher: update(weight, grad, exp_avg, exp_avg_sq, beta1=, beta2=, lr=, decay=,
    eps=, step=, seed=) on flat, contiguous tensors; None without Triton. Built on each call (under
    TRITON_INTERPRET=1 it runs on the CPU: that is how the tests check it without a GPU)."""
    # Module globals, not locals: Triton's interpreter swaps the language module in the kernel's globals.
    global triton, tl
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _adamw_sr(w_ptr, g_ptr, m_ptr, v_ptr, n, beta1, beta2, keep, step_size, bc2_sqrt, eps, seed,
                  BLOCK: tl.constexpr):  # fmt: skip
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
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

    def update(weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               *, beta1: float, beta2: float, lr: float, decay: float, eps: float, step: int,
               seed: int) -> None:  # fmt: skip
        n = weight.numel()
        grid: Any = (triton.cdiv(n, BLOCK),)
        _adamw_sr[grid](
            weight, grad, exp_avg, exp_avg_sq, n, beta1, beta2, 1.0 - lr * decay,
            lr / (1.0 - beta1**step), (1.0 - beta2**step) ** 0.5, eps, seed, BLOCK=BLOCK,
        )  # fmt: skip

    return update
