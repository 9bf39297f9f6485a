"""The loss of a packed batch, computed only where targets are set, never as [tokens, vocab] logits.

`logits_to_keep` (a tensor of positions, supported by HF causal LMs in transformers 5) makes the model
project only the trained positions through its output head: with completion-only SFT most positions
carry no loss. The positions come with the batch, worked out on the host when it was collated, so
nothing here waits for the GPU (a boolean mask or `nonzero` on device would, in every micro-batch).

While tunelab trains, a model whose head is a plain linear projection (most decoders) gets `LossHead`
in its place (`fused_head`): fed the hidden states at the trained positions and their targets, it
returns the summed cross-entropy as the model's "logits". It runs `linear_cross_entropy`: the head and
the cross-entropy a chunk of positions at a time, with the gradients computed in the same pass (as
Liger's fused linear cross-entropy does), so at most one chunk of fp32 logits is alive and the head's
matmul is never recomputed. Because the loss is computed inside the model's own forward, it runs
wherever that forward runs: compiled, under DDP (gradient hooks) and under FSDP (gathered weights).
Models that scale or soft-cap their logits after the head (Gemma 2, Cohere, Granite, ...) keep their
head; a probe forward finds them, and they take the plain path (logits at the trained positions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.data.packing import PackedBatch
from tunelab.data.tokenize import IGNORE
from tunelab.errors import TunelabError
from tunelab.training import attention

# fp32 logits alive at once in the fused head: 2**25 values = 128 MiB (256 positions of a 128k vocab).
LOGITS_BUDGET = 2**25
MIN_CHUNK = 256


def _chunked_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk: int,
    grads: tuple[bool, bool, bool] = (False, False, False),
    body: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """sum CE(hidden @ weight.T + bias, targets) over the set targets, and (where `grads` asks) its
    gradients with respect to hidden, weight and bias. hidden [N, H], targets [N]. `body`: where the
    gradients are asked, `ce_and_grad` compiled, for each chunk's loss and d loss / d logits."""
    acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 loss for bf16/fp16 models
    total = torch.zeros((), dtype=acc, device=hidden.device)
    grad_h = torch.empty_like(hidden) if grads[0] else None
    grad_w = torch.zeros_like(weight) if grads[1] else None
    grad_b = torch.zeros_like(bias) if grads[2] and bias is not None else None
    for i in range(0, hidden.shape[0], chunk):
        h, t = hidden[i : i + chunk], targets[i : i + chunk]
        logits = F.linear(h, weight, bias)
        valid = t != IGNORE
        t = t.clamp(min=0)  # IGNORE -> class 0, masked out
        if body is not None and any(grads) and h.shape[0] > 1:  # one row: torch would make a 2nd graph
            part, g = body(logits, t, valid)
        else:
            part, g = eager_ce_and_grad(logits, t, valid, any(grads))
        total = total + part
        if g is None:
            continue
        if grad_h is not None:
            torch.mm(g, weight, out=grad_h[i : i + chunk])
        if grad_w is not None:
            grad_w.addmm_(g.t(), h)
        if grad_b is not None:
            grad_b += g.sum(0)
    return total, grad_h, grad_w, grad_b


def _loss(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits in fp32 (fp64 stays), their log-sum-exp per row and the summed cross-entropy."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(x, dim=-1)
    return x, lse, ((lse - x.gather(1, targets[:, None]).squeeze(1)) * valid).sum()


def ce_and_grad(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed cross-entropy (fp32; fp64 for fp64 logits) and its gradient with respect
    to `logits` [n, V] (in their dtype; zero where `valid` is False), written for torch.compile:
    compiled (`LossHead.body`, while the layers are) it reads the head's output in two fused passes,
    where `eager_ce_and_grad` makes about eight over fp32 logits, and no fp32 copy of them is alive.
    `targets` [n] are class indices (no IGNORE)."""
    x, lse, loss = _loss(logits, targets, valid)
    p = torch.exp(x - lse[:, None])
    hit = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    return loss, (torch.where(hit, p - 1, p) * valid[:, None]).to(logits.dtype)


def eager_ce_and_grad(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`ce_and_grad` eagerly: one fp32 copy of the logits (none for fp32 logits, which it overwrites)
    turned into their gradient in place, no other [n, V] buffer. Without `grad`, the loss alone."""
    x, lse, loss = _loss(logits, targets, valid)
    if not grad:
        return loss, None
    # d loss / d logits = softmax - one-hot, zero where no target.
    g = x.sub_(lse[:, None]).exp_()
    g.scatter_add_(1, targets[:, None], torch.full_like(targets[:, None], -1, dtype=g.dtype))
    return loss, g.mul_(valid[:, None]).to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden, weight, bias, targets, chunk, body):  # type: ignore[override]
        total, *grads = _chunked_ce(
            hidden, weight, bias, targets, chunk, tuple(ctx.needs_input_grad[:3]), body
        )
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        # In place: no second copy of the head's weight gradient (0.5 GB for a 1B model's 128k vocab).
        # A second backward through the same graph would find them modified and raise, not mis-scale.
        scaled = [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in ctx.saved_tensors]
        return *scaled, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk: int,
    body: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The summed cross-entropy of `hidden @ weight.T + bias` against `targets` (IGNORE = no loss),
    `chunk` positions at a time; equal to the plain computation, without its [N, vocab] logits."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    inputs = (hidden, weight) if bias is None else (hidden, weight, bias)
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, body)
    return _chunked_ce(hidden, weight, bias, targets, chunk)[0]


class LossHead(torch.nn.Module):
    """Stands in for a model's linear output head while tunelab trains: given the hidden states at the
    trained positions, and `targets` set by `loss_sum` just before the forward, it returns the summed
    cross-entropy. Holds the head's own parameters under the same names, so state dicts, weight tying,
    DDP and FSDP see the model unchanged."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.weight = head.weight
        self.register_parameter("bias", head.bias)
        self.chunk = max(MIN_CHUNK, LOGITS_BUDGET // head.weight.shape[0])
        self.targets: torch.Tensor | None = None
        # `ce_and_grad` compiled, while the decoder layers are (training/compiling.py); None: eager.
        self.body: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    @torch.compiler.disable  # a Python loop over chunks: compiled, it would recompile per chunk count
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            raise TunelabError(
                "this model's output head computes tunelab's training loss and gives no logits",
                "call tunelab.training.loss.loss_sum, or use the model after training has finished",
            )
        return linear_cross_entropy(hidden, self.weight, self.bias, self.targets, self.chunk, self.body)


class _Probe(torch.nn.Module):
    def __init__(self, marker: torch.Tensor):
        super().__init__()
        self.marker = marker

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.marker


def _base(model: Any) -> Any:
    """The HF model under torch.compile's, DDP's and peft's wrappers (FSDP2 shards in place)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _returns_head_output(base: Any, head: torch.nn.Module) -> bool:
    """Does the model hand its head's output back as its logits, untouched? One 1-token forward with
    a probe as the head: models that scale or soft-cap logits after the head return something else."""
    device = head.weight.device
    marker = torch.zeros((), device=device)
    one = torch.zeros((1, 1), dtype=torch.long, device=device)
    batch = PackedBatch(one, one, one, 1, 1, 0, torch.tensor([0, 1], dtype=torch.int32, device=device), 1)
    varlen = batch.attention_kwargs() if attention.is_varlen(base) else {}  # a packed row of one token
    probe = _Probe(marker)
    try:
        base.set_output_embeddings(probe)
    except (AttributeError, NotImplementedError):  # a model whose head cannot be swapped: keep it
        return False
    try:
        if base.get_output_embeddings() is not probe:
            return False
        with torch.no_grad():
            out = base(input_ids=one, position_ids=one, use_cache=False, **varlen)
        return getattr(out, "logits", None) is marker
    except Exception:  # noqa: BLE001 - any failure means: keep the model's own head
        return False
    finally:
        base.set_output_embeddings(head)


@contextmanager
def fused_head(model: Any) -> Iterator[bool]:
    """`LossHead` in place of the model's output head for the block (where the head is a plain linear
    projection whose output the model returns as is); yields whether it is in place. The model gets
    its head back afterwards, holding whatever parameters the block left (FSDP shards them)."""
    base = _base(model)
    try:
        head = base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if type(head) is not torch.nn.Linear or not _returns_head_output(base, head):
        yield False
        return
    stand_in = LossHead(head)
    base.set_output_embeddings(stand_in)
    try:
        yield True
    finally:
        head.weight = stand_in.weight
        head.bias = stand_in.bias
        base.set_output_embeddings(head)


def loss_head(model: Any) -> LossHead | None:
    """The model's `LossHead`, while `fused_head` has it in place."""
    head = _base(model).get_output_embeddings()
    return head if isinstance(head, LossHead) else None


def describe(model: Any) -> str:
    """Where the loss is computed, for the run's first log line."""
    return "loss in a fused head" if loss_head(model) is not None else "loss after the model's own head"


def _forward(model: Any, batch: PackedBatch) -> Any:
    return model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=batch.keep,
        **batch.attention_kwargs(),
    )


def _logits(model: Any, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets at the positions where some row has a target: [R, n, V] and [R, n]."""
    if loss_head(model) is not None:
        raise TunelabError(
            "per-position logits were asked of a model whose head computes the training loss",
            "leave `fused_head` first",
        )
    return _forward(model, batch).logits.float(), batch.targets[:, batch.keep]


def loss_sum(model: Any, batch: PackedBatch) -> torch.Tensor:
    """Sum (not mean) of token cross-entropies, so micro-batches add up to the exact step mean."""
    if batch.n_targets == 0:
        return torch.zeros((), device=batch.input_ids.device)
    head = loss_head(model)
    if head is not None:
        head.targets = batch.targets[:, batch.keep]
        try:
            return _forward(model, batch).logits  # the head's output: the loss
        finally:
            head.targets = None
    logits, targets = _logits(model, batch)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def per_example_loss(model: Any, batch: PackedBatch) -> list[float]:
    """Mean loss of each example in the batch, in row order (for tests and error analysis)."""
    logits, targets = _logits(model, batch)
    losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    starts = (batch.position_ids == 0) & (batch.input_ids >= 0)
    example_of = starts.flatten().cumsum(0).view_as(batch.position_ids) - 1  # example index per token
    ids = example_of[:, batch.keep]
    valid = targets != IGNORE
    result = []
    for e in range(int(example_of.max()) + 1):
        sel = losses[(ids == e) & valid]
        if sel.numel():
            result.append(float(sel.mean()))
    return result
