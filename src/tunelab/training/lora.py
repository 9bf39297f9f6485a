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

Sibling adapters share one matmul. q/k/v (and gate/up) take the same input, so their `A`s are
concatenated and applied once, each layer taking its slice of the product:

    a_q, a_k, a_v = (x @ cat([A_q, A_k, A_v]).T).split([r, r, r], -1)

one matmul instead of three forward, two instead of six backward (the `A` gradients and x's), and two
fewer [tokens, hidden] gradient sums for x. Which layers are siblings is seen, not guessed: a 2-token
forward at the start of the block (eval mode, no gradients, no random draws) records the layers
called one after another with the very same input tensor. At each call a layer takes its slice only
if it is called with that same tensor (identity) and the same adapter is active; anything else (an
input changed in place, another adapter, a model that calls its layers differently than in the
probe) computes its own product. Only adapters without dropout are grouped: PEFT draws a mask per
layer, which one shared input cannot honour. On CUDA only (`SHARE_ON`): on a CPU, where the small
matmuls cost their dispatch rather than their memory traffic, it measured no faster.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.training.modes import eval_mode


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
    # The base matmul first: the order the CPU demo's figures were measured with (on a CPU the
    # buffers' places can change a matmul's rounding, and so a greedy answer or two).
    result = self.base_layer(x, *args)
    siblings = self.__dict__.get(_GROUP)  # layers fed the same x: their A's applied in one matmul
    a = None if siblings is None else siblings.take(self, x, name)
    if a is None:
        a = F.linear(self.lora_dropout[name](x), self.lora_A[name].weight.to(x.dtype))
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        a.reshape(-1, a.shape[-1]),
        self.lora_B[name].weight.to(x.dtype).t(),
        alpha=self.scaling[name],
    )
    return out.view(result.shape)


class _Siblings:
    """LoRA layers fed the same input: their `A`s' product, computed once per input by whichever of
    them is called first, and the slices not yet taken."""

    def __init__(self, members: list[Any]) -> None:
        self.members = members
        self.x: torch.Tensor | None = None  # the input the slices were computed from
        self.version = 0  # and its version counter then (an in-place change invalidates them)
        self.names: list[str | None] = []  # the adapter each slice was computed for
        self.parts: list[torch.Tensor | None] = []

    def take(self, layer: Any, x: torch.Tensor, name: str) -> torch.Tensor | None:
        """`layer`'s `dropout(x) @ A.T` as a slice of the siblings' product, or None where its own
        matmul must do (a sibling's adapter unfit for the shared product)."""
        i = self.members.index(layer)
        # Compiled, the version counter is not traced (torch.compile reads it as data); HF's layers
        # do not change their input in place between the projections.
        version = 0 if torch.compiler.is_compiling() else x._version
        if not (
            self.x is x and self.version == version and self.parts[i] is not None and self.names[i] == name
        ):
            names = [_adapter(m) for m in self.members]
            if any(
                n is None or type(m.lora_dropout[n]) is not torch.nn.Identity
                for m, n in zip(self.members, names)
            ):
                return None
            weights = [m.lora_A[n].weight for m, n in zip(self.members, names)]
            product = F.linear(x, torch.cat(weights).to(x.dtype))
            self.parts = list(product.split([w.shape[0] for w in weights], dim=-1))
            self.x, self.version, self.names = x, version, names
        part, self.parts[i] = self.parts[i], None
        if all(p is None for p in self.parts):  # every sibling served: hold no tensor past the layer
            self.x, self.parts = None, []
        return part


def _siblings_of(model: Any, layers: list[Any]) -> list[list[Any]]:
    """Groups of `layers` called one after another with the same input tensor, seen in a 2-token
    forward of `model` (eval mode, no gradients: no random draws, nothing trained). Grouped only:
    adapters without dropout, the same input width and `A` dtype, layers called once each."""
    calls: list[tuple[Any, Any]] = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, args: calls.append((m, args[0] if args else None)))
        for layer in layers
    ]
    try:
        with eval_mode(model), torch.no_grad():
            device = next(model.parameters()).device
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device), use_cache=False)
    except Exception:  # noqa: BLE001 - a model this probe cannot run: every layer on its own
        return []
    finally:
        for hook in hooks:
            hook.remove()
    seen = [m for m, _ in calls]
    runs: list[list[Any]] = []
    for i, (layer, x) in enumerate(calls):
        if i and x is not None and x is calls[i - 1][1]:
            runs[-1].append(layer)
        else:
            runs.append([layer])

    def fits(group: list[Any]) -> bool:
        names = [_adapter(m) for m in group]
        if any(n is None or seen.count(m) != 1 for m, n in zip(group, names)):
            return False
        if any(type(m.lora_dropout[n]) is not torch.nn.Identity for m, n in zip(group, names)):
            return False
        weights = [m.lora_A[n].weight for m, n in zip(group, names)]
        return len({(w.shape[1], w.dtype, w.device) for w in weights}) == 1

    return [run for run in runs if len(run) > 1 and fits(run)]


_GROUP = "_tunelab_siblings"
# Devices where siblings share their A matmul. Not on a CPU: there it saved nothing (world model, 16
# examples per step, three alternating pairs: 6,793 real tokens/s with it against 6,947 without).
SHARE_ON = ("cuda",)


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
    share = bool(layers) and layers[0].lora_A[_adapter(layers[0])].weight.device.type in SHARE_ON
    groups = _siblings_of(model, layers) if share else []
    for layer in layers:
        layer.forward = types.MethodType(_forward, layer)
    for group in groups:
        siblings = _Siblings(group)
        for layer in group:
            layer.__dict__[_GROUP] = siblings
    try:
        yield len(layers)
    finally:
        for layer in layers:
            if "forward" in vars(layer):
                del layer.forward
            layer.__dict__.pop(_GROUP, None)


def describe(model: Any) -> str | None:
    """How the LoRA layers run, for the run's first log line (None: the model has none)."""
    types_ = _peft_types()
    lora = [] if types_ is None else [m for m in model.modules() if isinstance(m, types_[0])]
    if not lora:
        return None
    fused = sum("forward" in vars(m) for m in lora)
    groups = {id(g) for m in lora if (g := vars(m).get(_GROUP)) is not None}
    shared = sum(_GROUP in vars(m) for m in lora)
    siblings = f"; {shared} share an A matmul with siblings ({len(groups)} groups)" if groups else ""
    return f"LoRA in one addmm in {fused} of {len(lora)} adapted layers{siblings}"
