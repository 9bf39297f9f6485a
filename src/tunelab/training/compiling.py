"""torch.compile for training: each decoder layer compiled in place, not the whole model at once.

A decoder is one layer class repeated N times. Compiled layer by layer, the layers share one compiled
graph (torch.compile inlines module attributes, so the parameters are graph inputs, not constants):
the warm-up compiles one layer's forward and backward instead of all N, and stays about the same as
N grows. Compiled as one graph, the whole model's Python is traced and Inductor works through N
copies of the layer. On the world model (4 layers, 2 CPU cores; `bench/results/cpu_world.md`) the
first step took 11 s instead of 45 s cold (1 s instead of 14 s with Inductor's on-disk cache warm).
What is left out of the graphs: the embedding, the final norm and the rotary tables. tunelab's fused
loss head stays a Python loop over chunks of positions (compiled whole, it would recompile for each
chunk count); what it does to each chunk's logits, `loss.ce_and_grad`, is compiled as a graph of its
own, which reads the logits in two fused passes instead of about eight eager ones.

The layers are compiled in place (`nn.Module.compile`), so parameter names, state dicts, DDP and FSDP
see the model unchanged; the layers run eagerly again after training (`scope`). A model whose decoder
layers cannot be found (no `_no_split_modules`, the class name HF models declare them by) is compiled
whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch._dynamo.exc import BackendCompilerFailed  # Inductor's own errors (InductorError) derive from it

from tunelab.errors import TunelabError
from tunelab.models import decoder_layers
from tunelab.training import loss

_log = logging.getLogger(__name__)
FIX = "set train.compile: false (--train.compile=false) and run again"

# "layers" (default) or "model": what `for_training` compiles; bench/sft_speed.py --compile-scope sets it.
SCOPE = "layers"
# Whether `for_training` compiles the fused loss head's chunk body too; bench/sft_speed.py
# --head fused-eager sets False (what compiling it gains).
HEAD = True
BACKEND: Any = "inductor"  # torch.compile's backend (tests stand a failing one in)


def for_training(module: Any, model: Any) -> Callable[..., Any]:
    """What to run forward through: `module` (the model, or DDP around it) with `model`'s decoder
    layers compiled in place, or `module` compiled whole where none are found (or SCOPE says so).
    `scope` undoes the in-place part."""
    head = loss.loss_head(model)
    if head is not None and HEAD:
        head.body = _HeadBody()
    found = decoder_layers(model) if SCOPE == "layers" else []
    if not found:  # dynamic: packed rows change length from step to step
        return torch.compile(module, dynamic=True, backend=BACKEND)
    for layer in found:
        layer.compile(dynamic=True, backend=BACKEND)
    _first_input_needs_grad(model)
    return module


class _HeadBody:
    """`loss.ce_and_grad` compiled (dynamic: a micro-batch's last chunk is shorter). Where compiling
    it fails, the eager code takes over for the rest of the run, said in the log: the layers, which
    compiled, stay so."""

    def __init__(self) -> None:
        self.compiled: Callable[..., Any] | None = torch.compile(
            loss.ce_and_grad, dynamic=True, backend=BACKEND
        )

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(logits, targets, valid)
            except BackendCompilerFailed as e:
                _log.warning("torch.compile failed on the loss head (%s); its loss runs eagerly", failed(e))
                self.compiled = None
        return loss.eager_ce_and_grad(logits, targets, valid)


def _head_body(model: Any, body: Any = None) -> Any:
    """Sets the fused loss head's per-chunk body (None: eager); returns the one it had."""
    head = loss.loss_head(model)
    if head is None:
        return None
    before, head.body = head.body, body
    return before


def _first_input_needs_grad(model: Any) -> None:
    """With the embedding frozen (LoRA, QLoRA) the first layer's input needs no gradient and every
    other layer's does: torch.compile would make the first layer a graph of its own, one more warm-up.
    While training, the embedding's output asks for a gradient too (as transformers'
    enable_input_require_grads does): one graph for every layer, for the gradient of one layer's input
    projections. `scope` takes the hook off."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is None or any(p.requires_grad for p in embedding.parameters()):
        return

    def needs_grad(module: Any, inputs: Any, output: Any) -> None:
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
            output.requires_grad_(True)

    model.__dict__[_HOOK] = embedding.register_forward_hook(needs_grad)


_HOOK = "_tunelab_first_input_needs_grad"


def _remove_hook(model: Any) -> None:
    handle = model.__dict__.pop(_HOOK, None)
    if handle is not None:
        handle.remove()


@contextmanager
def paused(model: Any) -> Iterator[None]:
    """For the block, `model`'s compiled decoder layers (and its loss head's body) run eagerly:
    evaluation, forward only and a few batches, would otherwise compile a graph of its own (no
    gradients), one more warm-up."""
    stash = [(m, m._compiled_call_impl) for m in decoder_layers(model) if m._compiled_call_impl is not None]
    for layer, _ in stash:
        layer._compiled_call_impl = None
    body = _head_body(model)
    try:
        yield
    finally:
        for layer, impl in stash:
            layer._compiled_call_impl = impl
        _head_body(model, body)


# `compile: auto` compiles a run whose steps would take at least this long uncompiled (estimated from
# one timed micro-batch), by device type.
# - cuda: measured on an H100 (bench/results/gpu_h100.md), Qwen2.5-0.5B's shapes: compiled trains
#   1.57x (cold) to 1.72x the eager tokens/s, after ~22 s more warm-up with an empty compiler cache
#   (the same on an H200, for Llama-3.2-1B too) and ~4 s with a warm one (the same model again). So
#   compiling breaks even at ~61 s of eager steps cold, ~9 s warm: from 60 s a first run loses
#   nothing and every later one gains. A finetune of ~1,000 examples of a 0.5B model (~20 s
#   uncompiled) stays eager.
WORTH_S = {"cuda": 60.0, "cpu": 300.0}

# Graphs one decoder layer's code may get before torch gives up compiling it (torch's default: 8).
# A run may make a few (a model whose code torch specialises by size), and the layer code is shared by
# every model of that class in the process: a second run would fall back to eager, silently slower.
RECOMPILE_LIMIT = 64


def eager(module: Any, model: Any) -> Any:
    """`module` to run forward through with nothing compiled: `model`'s decoder layers back to their
    eager forward (what nn.Module.compile set is unset)."""
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None
    _remove_hook(model)
    _head_body(model)
    return module


def failed(error: BaseException) -> str:
    """The compiler's error in one line (its first line names the backend and the exception)."""
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    return " ".join(lines[:2])[:300] or type(error).__name__


@contextmanager
def scope(model: Any) -> Iterator[None]:
    """For the block: room for the compiled layers' graphs (RECOMPILE_LIMIT), and a compiler failure
    raised as a TunelabError that says what to do; afterwards the decoder layers that `for_training`
    compiled run eagerly again (layers compiled before it stay so)."""
    config = torch._dynamo.config
    limit = config.recompile_limit
    config.recompile_limit = max(limit, RECOMPILE_LIMIT)
    before = {id(m) for m in decoder_layers(model) if m._compiled_call_impl is not None}
    try:
        yield
    except BackendCompilerFailed as e:
        raise TunelabError(f"torch.compile failed: {failed(e)}", FIX) from e
    finally:
        config.recompile_limit = limit
        _remove_hook(model)
        _head_body(model)
        for layer in decoder_layers(model):
            if id(layer) not in before:
                layer._compiled_call_impl = None  # what nn.Module.compile sets: back to eager


def describe(compiled: bool, model: Any, auto: bool = False) -> str:
    """What is compiled, for the run's first log line (`auto`: if the run proves long enough)."""
    if not compiled:
        return "compile off"
    found = decoder_layers(model) if SCOPE == "layers" else []
    what = f"each of {len(found)} decoder layers" if found else "whole model"
    return f"compile auto ({what}, if the run is long enough)" if auto else f"compile on ({what})"
