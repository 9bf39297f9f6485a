"""Per-example causal attention over one packed row, for models that would otherwise run SDPA.

A packed micro-batch is one row of concatenated examples. Handed to SDPA, transformers builds a dense
[tokens x tokens] block-diagonal mask from the position ids and the kernel computes every block,
masked or not: cost and memory grow with the square of the row, not of the examples.

While tunelab trains, an SDPA model runs `packed_attention` instead (registered with transformers'
AttentionInterface as "tunelab_varlen"); the model's config is switched back when training ends. It
takes the examples' boundaries as `cu_seq_lens_q/k` and `max_length_q/k` (the kwargs transformers
defines for flash-attention varlen, which every AttentionInterface model passes down to attention) and:

- on CUDA in bf16/fp16: runs PyTorch's own variable-length flash kernel
  (`torch.nn.attention.varlen.varlen_attn`), no padding and no mask;
- elsewhere: scatters the row into a [examples, longest, heads, dim] batch and runs SDPA with
  `is_causal=True`. Padding sits after every real token, so the causal mask alone keeps real queries
  off it, and the padded queries' outputs are dropped. Cost: examples x longest^2, not tokens^2.

No mask function is registered for the name, so transformers builds no mask at all.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.errors import TunelabError
from tunelab.training.modes import eval_mode

NAME = "tunelab_varlen"
_log = logging.getLogger(__name__)
# "fn": varlen_attn (None when absent or once it failed); "causal": the kwargs that make it causal;
# "gqa": whether it takes fewer k/v heads than query heads itself.
_cuda_kernel: dict[str, Any] = {}


def _varlen_kernel() -> tuple[Any, dict[str, Any]] | None:
    """torch's varlen flash kernel and the kwargs that make it causal (its signature moved between
    torch releases: `is_causal=True` earlier, `window_size=(-1, 0)` later)."""
    if "fn" not in _cuda_kernel:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _cuda_kernel["fn"] = None
        else:
            params = inspect.signature(varlen_attn).parameters
            _cuda_kernel["fn"] = varlen_attn
            _cuda_kernel["causal"] = (
                {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
            )
            _cuda_kernel["gqa"] = "enable_gqa" in params
    fn = _cuda_kernel["fn"]
    return None if fn is None else (fn, _cuda_kernel["causal"])


def _padded(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    dropout: float,
    scale: float | None,
    window: int | None,
) -> torch.Tensor:
    """[1, H, T, D] packed -> [1, T, H, D], each example attending only to itself, through SDPA."""
    tokens = query.shape[2]
    if torch.compiler.is_compiling():
        # An empty example at the end: compiled, tensors sized by the example count would make torch
        # specialise a second graph for a micro-batch of one example (its outputs are never read).
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens[-1:]])
    n = cu_seqlens.shape[0] - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    example = torch.repeat_interleave(torch.arange(n, device=query.device), lengths, output_size=tokens)
    position = torch.arange(tokens, device=query.device) - cu_seqlens[:-1].long()[example]
    slot = example * max_len + position  # each token's place in the padded [n * max_len] layout

    def pad(x: torch.Tensor) -> torch.Tensor:
        heads, dim = x.shape[1], x.shape[3]
        out = x.new_zeros(n * max_len, heads, dim)
        out = out.index_copy(0, slot, x[0].transpose(0, 1))
        return out.view(n, max_len, heads, dim).transpose(1, 2)

    mask = None
    if window is not None and window < max_len:  # sliding-window models (Mistral, Qwen2 with it on)
        i = torch.arange(max_len, device=query.device)
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    out = F.scaled_dot_product_attention(
        pad(query),
        pad(key),
        pad(value),
        attn_mask=mask,
        dropout_p=dropout,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=key.shape[1] != query.shape[1],
    )  # [n, H, max_len, D]
    return (
        out.transpose(1, 2)
        .reshape(n * max_len, out.shape[1], out.shape[3])
        .index_select(0, slot)
        .unsqueeze(0)
    )


def _kernel_applies(query: torch.Tensor, dropout: float) -> bool:
    """torch's varlen flash kernel: CUDA, half precision, no attention dropout."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and not dropout


def packed_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q/k/v are [batch, heads, tokens, dim]; returns
    ([batch, tokens, heads, dim], no weights)."""
    if cu_seq_lens_q is None or max_length_q is None or query.shape[0] != 1:
        raise TunelabError(
            "tunelab's packed attention was called without a packed row (cu_seq_lens_q / max_length_q)",
            "it is meant for tunelab's training loop only; call model.set_attn_implementation('sdpa')",
        )
    max_len = int(max_length_q)
    if _kernel_applies(query, dropout):
        kernel = _varlen_kernel()
        if kernel is not None:
            fn, causal = kernel
            if sliding_window is not None:
                causal = {"window_size": (sliding_window - 1, 0)} if "window_size" in causal else None
            if causal is not None:
                groups = query.shape[1] // key.shape[1]
                if groups > 1:
                    if _cuda_kernel["gqa"]:
                        causal = {**causal, "enable_gqa": True}
                    else:
                        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
                try:
                    out = fn(
                        query[0].transpose(0, 1),
                        key[0].transpose(0, 1),
                        value[0].transpose(0, 1),
                        cu_seq_lens_q.int(),
                        cu_seq_lens_q.int(),
                        max_len,
                        max_len,
                        scale=scaling,
                        **causal,
                    )
                    return out.unsqueeze(0), None
                except (RuntimeError, TypeError, ValueError) as e:  # e.g. a GPU its kernel does not support
                    _log.warning("torch varlen_attn failed (%s); using padded SDPA instead", e)
                    _cuda_kernel["fn"] = None
    out = _padded(query, key, value, cu_seq_lens_q, max_len, dropout, scaling, sliding_window)
    return out, None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention)


def _config(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base, base.config


def supported(model: Any) -> bool:
    """SDPA models written on transformers' AttentionInterface, with no attention-score soft-capping."""
    base, config = _config(model)
    return (
        getattr(config, "_attn_implementation", None) == "sdpa"
        and getattr(base, "_supports_attention_backend", False)
        and not getattr(config, "attn_logit_softcapping", None)
        and getattr(config, "is_causal", True)
    )


def _implementation(model: Any) -> str:
    return str(getattr(_config(model)[1], "_attn_implementation", "") or "")


def is_varlen(model: Any) -> bool:
    """Does this model take a packed row with no mask (flash kernels, or tunelab's packed attention)?"""
    impl = _implementation(model)
    return impl.startswith("flash") or impl == NAME


def enable(model: Any) -> Callable[[], None] | None:
    """Switch an SDPA model to per-example packed attention; returns the function that switches it
    back, or None where the model keeps its own attention (see `supported`)."""
    if not supported(model):
        return None
    base, config = _config(model)
    _register()
    before = config._attn_implementation
    base.set_attn_implementation(NAME)
    return lambda: base.set_attn_implementation(before)


def describe(model: Any) -> str:
    """How packed rows reach attention, for the run's first log line."""
    impl = _implementation(model)
    if impl == NAME:
        fast = _kernel_applies(next(model.parameters()), 0.0) and _varlen_kernel() is not None
        return "per-example, " + ("torch varlen flash kernel" if fast else "padded causal SDPA")
    if impl.startswith("flash"):
        return f"per-example, {impl} varlen"
    return f"{impl or 'default'} with a block-diagonal mask"


class _Seen(Exception):
    pass


def keeps_examples_apart(model: Any, varlen: bool) -> bool:
    """Does a packed row keep its examples apart in this model? Attention does (per-example kernels,
    or the block-diagonal mask), but layers that mix tokens outside attention (LFM2's convolutions,
    Mamba's and other state-space layers, linear attention) carry one example into the next, and so
    does a model whose own mask ignores the restarting position ids (OPT, BLOOM, MPT, BioGPT, XGLM
    eager). Eval forwards of a row of two 3-token examples: the gradient of the second's hidden
    states with respect to the first's input embeddings must be exactly zero (masked attention and
    routing give exact zeros, however small a leak), and changing the first example must leave the
    second's hidden states as they were, up to rounding (a mixture of experts' matmuls change shape
    with the other tokens, so not bit for bit; this catches a leak with no gradient, e.g. MPT's).
    No parameter gradients, no random draws; False where the probe cannot run."""
    base, _ = _config(model)
    seen: list[torch.Tensor] = []

    def grab(module: Any, args: tuple) -> None:
        seen.append(args[0])
        raise _Seen  # the hidden states are all it needs: the head does not run

    try:
        head = base.get_output_embeddings()
        embed = base.get_input_embeddings()
        device = next(base.parameters()).device
        handle = head.register_forward_pre_hook(grab)
    except Exception:  # noqa: BLE001 - a model the probe cannot run: each example alone is always right
        return False
    ids = torch.arange(1, 7, device=device)[None] % embed.num_embeddings
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]], device=device)
    bounds = torch.tensor([0, 3, 6], dtype=torch.int32, device=device)
    kwargs = (
        {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": 3, "max_length_k": 3}
        if varlen
        else {}
    )
    try:
        with eval_mode(base), torch.enable_grad():
            embeds = embed(ids).detach().requires_grad_()
            try:
                base(inputs_embeds=embeds, position_ids=positions, use_cache=False, **kwargs)
            except _Seen:
                pass
            if len(seen) != 1:
                return False
            (grad,) = torch.autograd.grad(seen[0][:, 3:].float().sum(), embeds)
            with torch.no_grad():
                other = torch.cat([embed((ids[:, :3] + 3) % embed.num_embeddings), embeds[:, 3:]], 1)
                try:
                    base(inputs_embeds=other, position_ids=positions, use_cache=False, **kwargs)
                except _Seen:
                    pass
    except Exception:  # noqa: BLE001
        return False
    finally:
        handle.remove()
    if len(seen) != 2 or grad[:, :3].any():
        return False
    first, second = (h[:, 3:].float() for h in seen)
    return bool((first - second).abs().max() <= 1e-2 * first.abs().max())


@contextmanager
def packed(model: Any) -> Iterator[bool]:
    """Per-example packed attention for the block (where supported); yields whether the model now
    takes one packed row with boundaries (True for flash models too)."""
    restore = enable(model)
    try:
        yield is_varlen(model)
    finally:
        if restore is not None:
            restore()
