"""Packing must never let one example attend to another: the loss of a packed batch equals the loss
of the same examples run one by one, for every architecture we test."""

import random
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from tunelab.data.packing import collate, plan_epoch
from tunelab.data.tokenize import IGNORE, Encoded
from tunelab.errors import TunelabError
from tunelab.models import decoder_layers
from tunelab.training import attention
from tunelab.training.loss import (
    LossHead,
    _chunked_ce,
    ce_and_grad,
    fused_head,
    linear_cross_entropy,
    loss_sum,
    per_example_loss,
)

# How a packed micro-batch reaches attention: one row through tunelab's per-example packed attention;
# one row with the block-diagonal mask transformers builds for SDPA; rows padded to the longest.
LAYOUTS = ["packed-attention", "sdpa-mask", "rows"]


def load(path, layout: str = "packed-attention"):
    """An fp32 model, and whether collate should give it varlen rows."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if layout == "packed-attention":
        assert attention.enable(model) is not None  # switched for the test's lifetime
        assert model.config._attn_implementation == attention.NAME
    return model


def pack(exs: list[Encoded], layout: str):
    if layout == "packed-attention":
        return collate(exs, varlen=True)
    return collate(exs, varlen=False, dense_one_row_max=10**6 if layout == "sdpa-mask" else 0)


def examples(n: int, seed: int = 0, vocab: int = 300) -> list[Encoded]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 40)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        cut = rng.randint(1, length - 1)
        out.append(Encoded(ids, [IGNORE] * cut + ids[cut:]))
    return out


def reference_loss(path, exs: list[Encoded]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The plain path: a fresh SDPA model, one example at a time, HF's own forward, summed loss, and
    the gradients of that sum."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    total = torch.zeros(())
    for e in exs:
        logits = model(torch.tensor([e.input_ids])).logits[0, :-1]
        labels = torch.tensor(e.labels[1:])
        total = total + torch.nn.functional.cross_entropy(
            logits, labels, ignore_index=IGNORE, reduction="sum"
        )
    total.backward()
    return total.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "qwen2"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_loss_and_gradients_equal_unpacked(tiny_models, kind, layout):
    """fp32 on CPU: the same loss and the same gradients as running the examples one by one."""
    exs = examples(9)
    expected, expected_grads = reference_loss(tiny_models[kind], exs)
    model = load(tiny_models[kind], layout)
    packed = loss_sum(model, pack(exs, layout))
    packed.backward()
    assert float(packed.detach()) == pytest.approx(float(expected), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():
        alone = sum(float(loss_sum(model, pack([e], layout))) for e in exs)
    assert float(packed.detach()) == pytest.approx(alone, rel=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_attention_across_examples(llama_dir, layout):
    """Changing one example's tokens leaves the other examples' losses in the row untouched."""
    model = load(llama_dir, layout).eval()
    a, b, c = examples(3, seed=1)
    b2 = Encoded([t + 1 for t in b.input_ids], b.labels)
    with torch.no_grad():
        first = per_example_loss(model, pack([a, b, c], layout))
        second = per_example_loss(model, pack([a, b2, c], layout))
    assert first[0] == pytest.approx(second[0], abs=1e-6) and first[2] == pytest.approx(second[2], abs=1e-6)
    assert first[1] != pytest.approx(second[1], abs=1e-4)


def test_collate_layout():
    a = Encoded([5, 6, 7], [IGNORE, 6, 7])
    b = Encoded([8, 9], [IGNORE, 9])
    one = collate([a, b])
    assert one.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert one.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # shifted inside each example; the last token of `a` does not predict the first of `b`
    assert one.targets.tolist() == [[6, 7, IGNORE, 9, IGNORE]]
    assert (one.n_tokens, one.n_targets, one.n_examples) == (5, 3, 2)
    assert one.cu_seqlens.tolist() == [0, 3, 5] and one.max_len == 3
    assert one.keep.tolist() == [0, 1, 3]  # the trained positions, worked out on the host
    dense = collate([a, b], varlen=False)
    assert dense.input_ids.shape == (1, 5) and dense.cu_seqlens is None  # small batches stay one row
    assert dense.attention_kwargs() == {}
    rows = collate([a, b], varlen=False, dense_one_row_max=0)
    assert rows.input_ids.shape == (2, 3) and rows.n_tokens == 5 and rows.n_targets == 3
    assert rows.targets.tolist() == [[6, 7, IGNORE], [9, IGNORE, IGNORE]]
    assert rows.keep.tolist() == [0, 1]  # positions where some row has a target


def test_plan_epoch_keeps_every_example_and_budget():
    lengths = [random.Random(i).randint(1, 100) for i in range(103)]
    plan = plan_epoch(lengths, batch_size=16, micro_batch_tokens=256, seed=3, epoch=0)
    flat = [i for step in plan for mb in step for i in mb]
    assert sorted(flat) == list(range(103))  # nothing dropped, nothing twice
    assert len(plan) == 7 and sum(len(mb) for mb in plan[-1]) == 103 - 96
    assert all(sum(lengths[i] for i in mb) <= 256 for step in plan for mb in step)
    assert plan == plan_epoch(lengths, 16, 256, seed=3, epoch=0)
    assert plan != plan_epoch(lengths, 16, 256, seed=3, epoch=1)


@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "qwen2"])
@pytest.mark.parametrize("layout", ["packed-attention", "rows"])
@pytest.mark.parametrize("chunk", [5, 10**6])
def test_fused_head_loss_and_grads_equal_direct(tiny_models, kind, layout, chunk):
    """The fused output head (gradients computed in the forward, a chunk of positions at a time)
    gives the loss and the gradients of the plain head + cross-entropy, in fp32; in several chunks
    and in one."""
    model = load(tiny_models[kind], layout)
    batch = pack(examples(7, seed=4), layout)
    direct = loss_sum(model, batch)
    direct.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with fused_head(model) as fused:
        assert fused and isinstance(model.get_output_embeddings(), LossHead)
        model.get_output_embeddings().chunk = chunk
        loss = loss_sum(model, batch)
        (loss * 3.0).backward()  # the gradient that reaches the head is scaled like the loop's
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # given back
    assert float(loss.detach()) == pytest.approx(float(direct.detach()), rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 3.0 * grads[n], rtol=1e-4, atol=2e-5, msg=n)


def test_fused_head_matches_the_plain_loss_with_bias_frozen_weights_and_no_grad():
    """linear_cross_entropy against F.linear + cross_entropy in fp64: with a bias, with IGNORE
    targets, with only some inputs needing gradients, and under no_grad (evaluation)."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 13, 8, dtype=torch.float64)
    weight = torch.randn(50, 8, dtype=torch.float64)
    bias = torch.randn(50, dtype=torch.float64)
    targets = torch.randint(0, 50, (2, 13))
    targets[0, :4] = IGNORE
    targets[1, 9:] = IGNORE
    for needs in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        leaves = [x.clone().requires_grad_(r) for x, r in zip((hidden, weight, bias), needs)]
        expected = torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(leaves[0], leaves[1], leaves[2]).flatten(0, 1),
            targets.flatten(),
            ignore_index=IGNORE,
            reduction="sum",
        )
        expected_grads = torch.autograd.grad(expected * 0.5, [x for x in leaves if x.requires_grad])
        got = linear_cross_entropy(*leaves, targets, chunk=4)
        got_grads = torch.autograd.grad(got * 0.5, [x for x in leaves if x.requires_grad])
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        for g, e in zip(got_grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        plain = linear_cross_entropy(hidden, weight, bias, targets, chunk=4)
    assert not plain.requires_grad and float(plain) == pytest.approx(float(expected.detach()), rel=1e-12)
    # No trained position at all: a zero loss, and zero gradients shaped like the inputs.
    leaves = [x.clone().requires_grad_() for x in (hidden[:, :0], weight, bias)]
    empty = linear_cross_entropy(*leaves, targets[:, :0], chunk=4)
    grads = torch.autograd.grad(empty, leaves)
    assert float(empty) == 0.0 and [g.shape for g in grads] == [x.shape for x in leaves]
    assert all(not g.any() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_compiled_chunk_body_gives_the_eager_loss_and_gradients(dtype):
    """`ce_and_grad` compiled (the fused head's body while the layers are compiled) against the
    in-place eager chunk code: a bias, IGNORE targets, a shorter last chunk and a one-row chunk (left
    eager: no second graph); fp64 to rounding, bf16 within its precision."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(15, 8), torch.randn(50, 8), torch.randn(50)
    hidden, weight, bias = (x.to(dtype) for x in (hidden, weight, bias))
    targets = torch.randint(0, 50, (15,))
    targets[:3] = IGNORE
    torch._dynamo.reset()
    counters.clear()
    body = torch.compile(ce_and_grad, dynamic=True)
    for chunk in (4, 7):  # chunks of 4, 4, 4, 3 and of 7, 7, 1
        eager = _chunked_ce(hidden, weight, bias, targets, chunk, (True, True, True))
        fast = _chunked_ce(hidden, weight, bias, targets, chunk, (True, True, True), body)
        tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-2, "atol": 2e-2}
        for e, f in zip(eager, fast):
            torch.testing.assert_close(f, e, **tol)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor's Triton code needs a GPU")
def test_the_compiled_chunk_body_on_cuda_gives_the_eager_loss_and_gradients():
    """The same on a GPU, where Inductor writes Triton kernels, at a real vocabulary's width: bf16
    chunks of 256 x 32,000 and a shorter last one."""
    torch.manual_seed(0)
    hidden = torch.randn(600, 64, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(32_000, 64, device="cuda", dtype=torch.bfloat16) * 0.1
    targets = torch.randint(0, 32_000, (600,), device="cuda")
    targets[:100] = IGNORE
    body = torch.compile(ce_and_grad, dynamic=True)
    eager = _chunked_ce(hidden, weight, None, targets, 256, (True, True, False))
    fast = _chunked_ce(hidden, weight, None, targets, 256, (True, True, False), body)
    torch.testing.assert_close(fast[0], eager[0], rtol=1e-3, atol=1e-2)
    for e, f in zip(eager[1:3], fast[1:3]):
        torch.testing.assert_close(f, e, rtol=2e-2, atol=2e-2)


def test_fused_head_under_compile_equals_eager(llama_dir):
    """The loop compiles the whole model: the fused head runs inside it (left out of the graph), with
    the same loss and gradients as eager."""
    model = load(llama_dir)
    batch = pack(examples(7, seed=4), "packed-attention")
    with fused_head(model):
        model.get_output_embeddings().chunk = 5
        eager = loss_sum(model, batch)
        eager.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        compiled = torch.compile(model, dynamic=True)
        fast = loss_sum(compiled, batch)
        fast.backward()
    assert float(fast.detach()) == pytest.approx(float(eager.detach()), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "qwen2"])
def test_compiled_layers_over_a_packed_row_equal_unpacked_and_keep_examples_apart(tiny_models, kind):
    """What a long run trains through under compile: auto (CPU too): each decoder layer compiled,
    the packed row through per-example attention (compiled, with an empty example appended), the
    fused head's compiled chunk body. The loss and gradients equal running the examples one by one,
    and changing one example's tokens leaves the others' losses untouched."""
    from tunelab.training import compiling

    exs = examples(9, seed=5)
    expected, expected_grads = reference_loss(tiny_models[kind], exs)
    model = load(tiny_models[kind])
    torch._dynamo.reset()
    with compiling.scope(model):
        with fused_head(model):
            model.get_output_embeddings().chunk = 16
            forward = compiling.for_training(model, model)
            packed = loss_sum(forward, pack(exs, "packed-attention"))
            packed.backward()
        a, b, c = examples(3, seed=1)  # per-example losses need the logits: the model's own head
        b2 = Encoded([t + 1 for t in b.input_ids], b.labels)
        with torch.no_grad():
            first = per_example_loss(forward, pack([a, b, c], "packed-attention"))
            second = per_example_loss(forward, pack([a, b2, c], "packed-attention"))
        assert any(layer._compiled_call_impl is not None for layer in decoder_layers(model))
    assert float(packed.detach()) == pytest.approx(float(expected), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert first[0] == pytest.approx(second[0], abs=1e-5) and first[2] == pytest.approx(second[2], abs=1e-5)
    assert first[1] != pytest.approx(second[1], abs=1e-4)


def test_logits_are_refused_while_the_head_computes_the_loss(llama_dir):
    model = load(llama_dir, "sdpa-mask")
    with fused_head(model):
        with pytest.raises(TunelabError, match="computes the training loss"):
            per_example_loss(model, pack(examples(2), "sdpa-mask"))
        with pytest.raises(TunelabError, match="gives no logits"):
            model(torch.tensor([[3, 4, 5]]))


class _WouldWait(TorchDispatchMode):
    """Records the ops that make the host wait for a GPU: reading a value back, or a result whose
    size depends on the data (boolean-mask indexing, nonzero, repeat_interleave without its size)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        for a in args:
            if isinstance(a, (list, tuple)):
                tensors += [x for x in a if isinstance(x, torch.Tensor)]
        if (
            any(
                k in name for k in ("nonzero", "_local_scalar_dense", "masked_select", "is_nonzero", "unique")
            )
            or (
                "repeat_interleave" in name
                and kwargs.get("output_size", args[2] if len(args) > 2 else None) is None
            )
            or (
                name.startswith(("aten.index.", "aten.index_put"))
                and any(t.dtype == torch.bool for t in tensors[1:])
            )
        ):
            self.found.add(name)
        return func(*args, **kwargs)


@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "qwen2"])
def test_a_training_pass_never_makes_the_host_wait(tiny_models, kind):
    """Forward and backward of a packed micro-batch (per-example attention, fused head) use no op
    that would make the host wait for a GPU, so the host can queue the next work while it computes.
    The checker itself is checked: the old on-device mask would have been caught."""
    from tunelab.training.loop import fast_paths

    model = AutoModelForCausalLM.from_pretrained(tiny_models[kind], dtype=torch.float32)
    batch = pack(examples(7, seed=4), "packed-attention")
    with fast_paths(model), _WouldWait() as seen:
        loss_sum(model, batch).backward()
    assert seen.found == set()
    with _WouldWait() as seen:
        (batch.targets != IGNORE).any(0).nonzero()
        batch.input_ids[batch.targets != IGNORE]
    assert seen.found == {"aten.nonzero.default", "aten.index.Tensor"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-GPU overlap needs a GPU")
def test_moving_a_batch_to_the_gpu_does_not_wait_for_queued_work():
    """A micro-batch goes to the GPU while earlier work is still queued there, without the host
    waiting for that work (the copy goes through page-locked memory), and arrives intact."""
    batch = collate(examples(64, seed=2), varlen=True)
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(40):  # a few hundred milliseconds of queued matmuls
        a = a @ a
        a = a / a.norm()
    end.record()
    tick = time.perf_counter()
    moved = batch.to("cuda")
    host_s = time.perf_counter() - tick
    torch.cuda.synchronize()
    gpu_s = start.elapsed_time(end) / 1000
    assert host_s < 0.25 * gpu_s, (host_s, gpu_s)  # the host went on while the GPU computed
    assert torch.equal(moved.input_ids.cpu(), batch.input_ids)
    assert torch.equal(moved.cu_seqlens.cpu(), batch.cu_seqlens) and torch.equal(moved.keep.cpu(), batch.keep)


def test_fused_head_refuses_a_second_backward_rather_than_mis_scale():
    hidden = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, None, torch.randint(0, 10, (6,)), chunk=4)
    (loss * 2).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        (loss * 2).backward()


def test_a_head_that_cannot_be_swapped_is_kept(llama_dir, monkeypatch):
    """A model whose output head cannot be replaced (a setter that refuses, or one that does
    nothing) keeps its head and trains on the plain path."""
    model = load(llama_dir)
    batch = pack(examples(5, seed=3), "packed-attention")
    expected = float(loss_sum(model, batch))
    head = model.get_output_embeddings()

    def refuses(new):
        raise NotImplementedError

    for setter in (refuses, lambda new: None):
        monkeypatch.setattr(model, "set_output_embeddings", setter)
        with fused_head(model) as fused:
            assert not fused and model.get_output_embeddings() is head
            assert float(loss_sum(model, batch)) == pytest.approx(expected, rel=1e-6)


def token_mixer(kind: str):
    """A tiny fp32 model with layers that mix tokens outside attention: LFM2's short convolutions,
    Mamba's state-space layers; or OPT on eager attention, whose mask ignores the restarting
    position ids (larger initial weights, so one example reaching another shows)."""
    shapes = {
        "lfm2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, layer_types=["conv", "full_attention"]),
        "mamba": dict(hidden_size=32, num_hidden_layers=2, state_size=4),
        "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    word_embed_proj_dim=32, init_std=0.2, dropout=0.0),
    }[kind]  # fmt: skip
    from transformers import AutoConfig

    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, vocab_size=100, initializer_range=0.2, **shapes)
    impl = "eager" if kind == "opt" else None
    return AutoModelForCausalLM.from_config(config, attn_implementation=impl).float()


@pytest.mark.parametrize("kind", ["lfm2", "mamba", "opt"])
def test_models_that_mix_tokens_outside_attention_take_each_example_alone(kind, tmp_path):
    """A packed row carried one example into the next through LFM2's convolutions, Mamba's state and
    OPT's eager mask (blind to the restarting position ids): the eval loss and the trained step's loss of several examples differed from the examples run one
    by one (by ~1 %). Such models now take each example in a pass of its own."""
    from tunelab.config import TrainConfig
    from tunelab.training.loop import evaluate, fast_paths, train

    exs = examples(4, seed=1, vocab=100)
    weights = [sum(t != IGNORE for t in e.labels[1:]) for e in exs]

    def alone(losses: list[float]) -> float:
        return sum(x * n for x, n in zip(losses, weights)) / sum(weights)

    model = token_mixer(kind)
    with fast_paths(model):
        together = evaluate(model, exs, 4096, torch.device("cpu"))
        each = [evaluate(model, [e], 4096, torch.device("cpu")) for e in exs]
    assert together == pytest.approx(alone(each), rel=1e-6)
    # The training loop: one step over all four; its logged loss is the loss before the update.
    cfg = TrainConfig(max_steps=1, batch_size=4, lr=0.0, compile=False, log_every=1, eval_every=0)
    result = train(model, None, exs, [], cfg, tmp_path, quiet=True, save=False)
    assert result.final_loss == pytest.approx(alone(each), rel=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "qwen2"])
@pytest.mark.parametrize("varlen", [True, False])
def test_attention_models_keep_examples_apart_in_one_row(tiny_models, kind, varlen):
    """Decoders whose only token mixer is attention stay packed (the probe must not split them)."""
    model = load(tiny_models[kind], "packed-attention" if varlen else "sdpa-mask").train()
    next(m for n, m in model.named_modules() if n.endswith("mlp")).eval()  # a mixed state comes back
    modes = {n: m.training for n, m in model.named_modules()}
    assert attention.keeps_examples_apart(model, varlen)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())  # nothing trained, no gradient left
    assert not attention.keeps_examples_apart(token_mixer("lfm2"), False)
