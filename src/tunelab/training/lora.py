"""LoRA layers as one matmul-and-add while tunelab trains.

PEFT's LoRA linear layer computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: after the base
matmul, the adapter's output [tokens, out] is written, read and written again by the scaling, and read
again by the add. Over a bf16 model the adapters are fp32 (PEFT's default), so `x` is first copied to
fp32 and the whole adapter branch, its [tokens, out] output included, runs in fp32 before the result
is cast back: on a GPU, where these passes are limited by memory bandwidth, they can cost as much as
the base matmul they sit beside.

While tunelab trains or evaluates, PEFT's LoRA linear layers run `_forward` instead:

    a = dropout(x) @ A.T                         # [tokens, r], in x's dtype
    y = addmm(base(x), a, B.T, alpha=scaling)    # the scaled product added inside the matmul

`addmm` scales and accumulates within the GEMM, so the adapter's [tokens, out] product never exists
on its own, and autograd folds `scaling` into the two small gradient matmuls. The adapter weights are
cast to x's dtype for the matmuls (the fp32 weights, their gradients and AdamW's state stay fp32):
what autocast does for PEFT under mixed precision. Equal to PEFT's forward up to rounding (fp32:
~1e-6; bf16: the adapter product rounded to bf16 once, before it is added).

The same for QLoRA's layers over a 4-bit base, whose PEFT forward also copies the base output before
adding to it (the add here is out of place). Layers that need PEFT's own forward keep it: DoRA and
other LoRA variants, adapters with a bias, several active adapters, merged or disabled adapters,
per-call adapter selection, 8-bit base layers.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F


def _peft_types() -> tuple[type, tuple[type, ...]] | None:
    """PEFT's LoRA layer base class, and the LoRA layers `_forward` stands in for: the plain linear
    one and, where bitsandbytes is installed, the one over a 4-bit base (QLoRA). None without PEFT."""
    try:
        from peft.tuners.lora.layer import Linear, LoraLayer
    except ImportError:
        return None
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except (ImportError, RuntimeError):  # no (working) bitsandbytes
        return LoraLayer, (Linear,)
    return LoraLayer, (Linear, Linear4bit)


def _adapter(layer: Any) -> str | None:
    """The one adapter this layer would apply, if `_forward` computes it exactly as PEFT would."""
    if layer.merged or layer.disable_adapters or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):  # DoRA and friends
        return None
    if layer.lora_B[name].bias is not None or not getattr(layer, "cast_input_dtype_enabled", True):
        return None
    return name


def _forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = None if kwargs else _adapter(self)  # `adapter_names=...` and other options: PEFT's path
    weight = self.base_layer.weight  # a 4-bit base's is packed integers; its output has x's dtype
    if name is None or (weight.is_floating_point() and weight.dtype != x.dtype):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args)
    a = F.linear(self.lora_dropout[name](x), self.lora_A[name].weight.to(x.dtype))
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        a.reshape(-1, a.shape[-1]),
        self.lora_B[name].weight.to(x.dtype).t(),
        alpha=self.scaling[name],
    )
    return out.view(result.shape)


def _layers(model: Any) -> list[Any]:
    types_ = _peft_types()
    if types_ is None:
        return []
    return [m for m in model.modules() if type(m) in types_[1] and _adapter(m) is not None]


@contextmanager
def fused_lora(model: Any) -> Iterator[int]:
    """LoRA linear layers (plain, or over a 4-bit base) compute their adapter inside one `addmm` for
    the block; yields how many do. PEFT's forward is back afterwards, also when the block fails."""
    layers = _layers(model)
    for layer in layers:
        layer.forward = types.MethodType(_forward, layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            if "forward" in vars(layer):
                del layer.forward


def describe(model: Any) -> str | None:
    """How the LoRA layers run, for the run's first log line (None: the model has none)."""
    types_ = _peft_types()
    lora = [] if types_ is None else [m for m in model.modules() if isinstance(m, types_[0])]
    if not lora:
        return None
    fused = sum("forward" in vars(m) for m in lora)
    return f"LoRA in one addmm in {fused} of {len(lora)} adapted layers"
