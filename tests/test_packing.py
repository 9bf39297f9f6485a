"""Packing must never let one example attend to another: the loss of a packed batch equals the loss
of the same examples run one by one, for every architecture we test."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunelab.data.packing import collate, plan_epoch
from tunelab.data.tokenize import IGNORE, Encoded
from tunelab.training.loss import loss_sum, per_example_loss


def examples(n: int, seed: int = 0, vocab: int = 300) -> list[Encoded]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 40)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        cut = rng.randint(1, length - 1)
        out.append(Encoded(ids, [IGNORE] * cut + ids[cut:]))
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "qwen2"])
@pytest.mark.parametrize("one_row", [True, False], ids=["one-row", "rows"])
def test_packed_loss_equals_unpacked(tiny_models, kind, one_row):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[kind], dtype=torch.float32).eval()
    exs = examples(9)
    with torch.no_grad():
        packed = float(loss_sum(model, collate(exs, one_row, dense_one_row_max=0)))
        alone = sum(float(loss_sum(model, collate([e]))) for e in exs)
        # and against the plain HF forward with its own shifted loss, one example at a time
        reference = 0.0
        for e in exs:
            logits = model(torch.tensor([e.input_ids])).logits[0, :-1]
            labels = torch.tensor(e.labels[1:])
            reference += float(
                torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
            )
    assert packed == pytest.approx(alone, rel=1e-5)
    assert packed == pytest.approx(reference, rel=1e-5)


def test_no_attention_across_examples(llama_dir):
    """Changing one example's tokens leaves the other examples' losses in the row untouched."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    a, b, c = examples(3, seed=1)
    b2 = Encoded([t + 1 for t in b.input_ids], b.labels)
    with torch.no_grad():
        first = per_example_loss(model, collate([a, b, c]))
        second = per_example_loss(model, collate([a, b2, c]))
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
    assert collate([a, b], one_row=False).input_ids.shape == (1, 5)  # small batches stay one row
    rows = collate([a, b], one_row=False, dense_one_row_max=0)
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
def test_chunked_head_loss_and_grads_equal_direct(tiny_models, kind):
    """The chunked output head (for large vocabularies) gives the same loss and gradients in fp32."""
    from tunelab.training.loss import chunked_loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_models[kind], dtype=torch.float32)
    batch = collate(examples(7, seed=4), one_row=False, dense_one_row_max=0)
    direct = loss_sum(model, batch)
    direct.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = chunked_loss_sum(model, batch, chunk=5)
    chunked.backward()
    assert float(chunked) == pytest.approx(float(direct), rel=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-6), (
            n,
            float((p.grad - grads[n]).abs().max()),
        )
