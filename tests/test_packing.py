"""Packing must never let one example attend to another: the loss of a packed batch equals the loss
of the same examples run one by one, for every architecture we test."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.data.packing import collate, plan_epoch
from tunelab.data.tokenize import IGNORE, Encoded
from tunelab.training import attention
from tunelab.training.loss import loss_sum, per_example_loss

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
    dense = collate([a, b], varlen=False)
    assert dense.input_ids.shape == (1, 5) and dense.cu_seqlens is None  # small batches stay one row
    assert dense.attention_kwargs() == {}
    rows = collate([a, b], varlen=False, dense_one_row_max=0)
    assert rows.input_ids.shape == (2, 3) and rows.n_tokens == 5 and rows.n_targets == 3
    assert rows.targets.tolist() == [[6, 7, IGNORE], [9, IGNORE, IGNORE]]


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
def test_chunked_head_loss_and_grads_equal_direct(tiny_models, kind, layout):
    """The chunked output head (for large vocabularies) gives the same loss and gradients in fp32."""
    from tunelab.training.loss import chunked_loss_sum

    model = load(tiny_models[kind], layout)
    batch = pack(examples(7, seed=4), layout)
    direct = loss_sum(model, batch)
    direct.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = chunked_loss_sum(model, batch, chunk=5)
    chunked.backward()
    assert float(chunked.detach()) == pytest.approx(float(direct.detach()), rel=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-6), (
            n,
            float((p.grad - grads[n]).abs().max()),
        )


def test_chunked_head_under_compile_runs_a_compiled_decoder(llama_dir):
    """The loop compiles the whole model; the chunked head (large vocabularies) calls the decoder
    directly, so it must get a compiled decoder too, with the same loss and gradients."""
    from tunelab.training import loss as loss_module

    model = load(llama_dir)
    batch = pack(examples(7, seed=4), "packed-attention")
    eager = loss_module.chunked_loss_sum(model, batch, chunk=5)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, dynamic=True)
    fast = loss_module.chunked_loss_sum(compiled, batch, chunk=5)
    fast.backward()
    assert compiled._tunelab_decoder._orig_mod is model.get_decoder()  # the decoder ran compiled
    assert "_tunelab_decoder" not in dict(compiled.named_modules())  # not registered as a submodule
    assert float(fast.detach()) == pytest.approx(float(eager.detach()), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
