"""training/lora.py: while tunelab trains, PEFT's LoRA linear layers add their adapter inside one
addmm. Same loss and gradients as PEFT's own forward (fp32 to rounding, bf16 within bf16 tolerance),
the same dropout draws, PEFT's forward wherever the fast one would differ, and nothing left behind."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from test_packing import examples
from tunelab.data.packing import collate
from tunelab.models import apply_lora
from tunelab.training import attention, lora
from tunelab.training.loop import fast_paths
from tunelab.training.loss import fused_head, loss_sum


@pytest.fixture(autouse=True)
def siblings_on_cpu(monkeypatch):
    """Sibling adapters share their A matmul on CUDA only (lora.SHARE_ON); tested here on the CPU."""
    monkeypatch.setattr(lora, "SHARE_ON", ("cpu", "cuda"))


def adapted(path, method: str = "lora", dtype=torch.float32, dropout: float = 0.0):
    """A tiny model with LoRA on every linear layer, B drawn at random so the adapters count; the
    same adapters for the same arguments, whatever the dtype."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model = apply_lora(model, method, 8, 16, dropout, "all-linear", [])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    return model


def loss_and_grads(model, batch, fast: bool, seed: int = 0):
    """Summed loss and the adapters' gradients, through the fast LoRA forward or PEFT's own."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if fast:
        with fast_paths(model):
            loss = loss_sum(model, batch)
            loss.backward()
    else:
        with fused_head(model), attention.packed(model):
            loss = loss_sum(model, batch)
            loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def count_fused(model) -> int:
    with lora.fused_lora(model) as n:
        return n


@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "qwen2"])
def test_fast_lora_equals_peft_in_fp32(tiny_models, kind):
    model = adapted(tiny_models[kind])
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert count_fused(model) == len(layers) > 0
    batch = collate(examples(6), varlen=attention.supported(model))
    loss, grads = loss_and_grads(model, batch, fast=True)
    ref_loss, ref_grads = loss_and_grads(model, batch, fast=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    for name in grads:
        # The shared A matmul blocks its sums otherwise than three: on some CPUs' BLAS (an AMD EPYC
        # here) an element that cancels to near 0 differs by ~1e-6 of the tensor's largest, so the
        # absolute tolerance is relative to that scale (a wrong slice would be off by the scale itself).
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    assert all("forward" not in vars(m) for m in layers)  # PEFT's forward is back


def test_fast_lora_draws_the_same_dropout_as_peft(llama_dir):
    model = adapted(llama_dir, dropout=0.3).train()
    batch = collate(examples(6), varlen=True)
    loss, grads = loss_and_grads(model, batch, fast=True, seed=7)
    ref_loss, ref_grads = loss_and_grads(model, batch, fast=False, seed=7)
    other, _ = loss_and_grads(model, batch, fast=False, seed=8)
    assert not torch.allclose(ref_loss, other)  # the dropout is live
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")]
        ),
    ],
)
def test_fast_lora_in_bf16_as_accurate_as_peft(llama_dir, device):
    """bf16 base, fp32 adapters (PEFT's default): the adapter matmuls run in bf16, as under autocast,
    while the adapters, their gradients and so AdamW's state stay fp32. Measured against the same
    model in fp32, the loss and the gradients are as close as PEFT's own bf16 forward gets them
    (on CUDA through the varlen flash kernel)."""
    batch = collate(examples(8), varlen=True).to(device)
    exact_loss, exact = loss_and_grads(adapted(llama_dir).to(device), batch, fast=True)
    model = adapted(llama_dir, dtype=torch.bfloat16).to(device)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    errors = {}
    for fast in (True, False):
        loss, grads = loss_and_grads(model, batch, fast=fast)
        assert abs(float(loss) - float(exact_loss)) <= 1e-2 * float(exact_loss)
        assert all(g.dtype == torch.float32 for g in grads.values())
        errors[fast] = [float((grads[n] - exact[n]).norm() / exact[n].norm()) for n in exact]
    print(f"worst gradient error vs fp32: fast {max(errors[True]):.4f}, PEFT {max(errors[False]):.4f}")
    assert max(errors[True]) < 6e-2, max(errors[True])  # measured: 3.3 % (PEFT: 4.6 %)
    assert sum(errors[True]) <= 1.25 * sum(errors[False]), (sum(errors[True]), sum(errors[False]))


def test_layers_that_need_peft_keep_its_forward(tiny_models, llama_dir):
    assert count_fused(adapted(tiny_models["qwen2"], method="dora")) == 0  # DoRA: PEFT's variant
    model = adapted(llama_dir)
    batch = collate(examples(4), varlen=True)
    with fast_paths(model):
        with model.disable_adapter():  # switched off inside the block: the base model alone
            off = loss_sum(model, batch)
        on = loss_sum(model, batch)
    with attention.packed(model), model.disable_adapter():
        base = loss_sum(model, batch)
    torch.testing.assert_close(off, base)
    assert not torch.allclose(on, base)


def test_peft_forward_is_back_after_a_failure(llama_dir):
    model = adapted(llama_dir)
    with pytest.raises(RuntimeError, match="boom"), lora.fused_lora(model) as n:
        assert n > 0
        raise RuntimeError("boom")
    assert all("forward" not in vars(m) for m in model.modules())
    assert lora.describe(model) == f"LoRA in one addmm in 0 of {n} adapted layers"
    with lora.fused_lora(model):  # 2 layers: q/k/v and gate/up are siblings
        siblings = "; 10 share an A matmul with siblings (4 groups)"
        assert lora.describe(model) == f"LoRA in one addmm in {n} of {n} adapted layers" + siblings
    assert lora.describe(AutoModelForCausalLM.from_pretrained(llama_dir)) is None


def test_fast_lora_under_compile_equals_eager(llama_dir):
    """The loop compiles the whole model, the fast LoRA forward traced into the graph."""
    model = adapted(llama_dir)
    batch = collate(examples(7, seed=4), varlen=True)
    loss, grads = loss_and_grads(model, batch, fast=True)
    model.zero_grad(set_to_none=True)
    with fast_paths(model):
        compiled = torch.compile(model, dynamic=True)
        fast = loss_sum(compiled, batch)
        fast.backward()
    torch.testing.assert_close(fast.detach(), loss, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:  # fused differently, rounded differently: measured 1.2e-6
            assert float((p.grad - grads[name]).norm()) <= 1e-5 * float(grads[name].norm()), name


def test_fast_lora_over_a_4bit_base_equals_peft(tokenizer, tmp_path, monkeypatch):
    """QLoRA's layers (LoRA over bitsandbytes' NF4 base, after peft's prepare_model_for_kbit_training)
    take the fast forward too, with PEFT's loss and gradients. On CUDA as users run it; elsewhere on
    bitsandbytes' CPU 4-bit kernels (see test_adapters.test_qlora_trains_a_4bit_base)."""
    bnb = pytest.importorskip("bitsandbytes", reason="pip install bitsandbytes (in the dev extra)")
    from conftest import build_model
    from tunelab.models import quantization_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if tuple(int(x) for x in bnb.__version__.split(".")[:2]) < (0, 46):
            pytest.skip("bitsandbytes < 0.46 has no CPU 4-bit kernels")
        monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)  # see the QLoRA test
    model_dir = build_model("llama", tokenizer, tmp_path / "llama64", width=64)  # 64: bnb's CPU block
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=quantization_config("qlora", torch.device("cuda")),
        device_map={"": device},
    )
    torch.manual_seed(1)
    model = apply_lora(model, "qlora", 8, 16, 0.0, "all-linear", [])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert count_fused(model) == len(four_bit) == 2 * 7
    batch = collate(examples(6), varlen=attention.supported(model)).to(device)
    loss, grads = loss_and_grads(model, batch, fast=True)
    ref_loss, ref_grads = loss_and_grads(model, batch, fast=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    # The siblings' shared A product rounds apart from three separate ones in fp32 (~1e-7), which the
    # base's bf16 compute can round to a bf16 step apart: measured 1.2e-4 at worst (0 without siblings).
    for name in grads:
        assert float((grads[name] - ref_grads[name]).norm()) <= 1e-3 * float(ref_grads[name].norm()), name


def sibling_groups(model) -> list[list[str]]:
    """The sibling groups fused_lora formed, by the layers' names, while in the block."""
    names = {id(m): n.split(".")[-1] for n, m in model.named_modules()}
    with lora.fused_lora(model):
        groups = {id(g): g for m in model.modules() if (g := vars(m).get(lora._GROUP)) is not None}
        return [[names[id(m)] for m in g.members] for g in groups.values()]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_siblings_share_one_a_matmul_and_hold_nothing_after(tiny_models, kind):
    """q/k/v and gate/up take one input each: one group per kind and layer, found by the probe
    forward (whose random state and train/eval modes are as before). After a forward no group
    holds a tensor; the loss and gradients are PEFT's (test_fast_lora_equals_peft_in_fp32)."""
    model = adapted(tiny_models[kind]).train()
    model.base_model.model.model.layers[0].mlp.eval()  # a mixed train/eval state comes back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    state = torch.random.get_rng_state()
    assert sibling_groups(model) == [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]] * 2
    assert torch.equal(torch.random.get_rng_state(), state)
    assert {n: m.training for n, m in model.named_modules()} == modes
    batch = collate(examples(5), varlen=True)
    with fast_paths(model):
        loss_sum(model, batch).backward()
        groups = {vars(m)[lora._GROUP] for m in model.modules() if lora._GROUP in vars(m)}
        assert len(groups) == 4 and all(g.x is None and g.parts == [] for g in groups)
    assert not any(lora._GROUP in vars(m) for m in model.modules())  # nothing left on the layers


def test_siblings_fall_back_to_their_own_matmul(llama_dir):
    """A sibling called with another tensor, or with its input changed in place since the shared
    product was computed, computes its own product: the result is PEFT's either way."""
    model = adapted(llama_dir)
    attn = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        want = {n: getattr(attn, n)(x.clone()) for n in ("q_proj", "k_proj", "v_proj")}  # PEFT's forward
        with lora.fused_lora(model):
            q = attn.q_proj(x)  # computes the three slices
            k = attn.k_proj(x.clone())  # another tensor: its own
            x.add_(0)  # in place: the stored slices no longer count
            v_in_place = attn.v_proj(x)
            again = attn.q_proj(x)  # q's slice was taken: the product again
            v = attn.v_proj(x)
    for got, name in ((q, "q_proj"), (k, "k_proj"), (v_in_place, "v_proj"), (again, "q_proj"), (v, "v_proj")):
        torch.testing.assert_close(got, want[name], rtol=1e-6, atol=1e-6, msg=name)


def test_adapters_with_dropout_are_not_siblings(llama_dir):
    """PEFT draws a dropout mask per layer; one shared product cannot honour that."""
    model = adapted(llama_dir, dropout=0.1)
    assert sibling_groups(model) == []
    with lora.fused_lora(model) as n:
        assert n == 14 and "siblings" not in lora.describe(model)


def test_siblings_compile_without_graph_breaks(llama_dir):
    """The loop's per-layer compile traces the shared product into each layer's one graph."""
    from tunelab.training import compiling

    model = adapted(llama_dir)
    batch = collate(examples(7, seed=4), varlen=True)
    eager, grads = loss_and_grads(model, batch, fast=True)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with fast_paths(model), compiling.scope(model):
        forward = compiling.for_training(model, model)
        loss = loss_sum(forward, batch)
        loss.backward()
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    torch.testing.assert_close(loss.detach(), eager, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert float((p.grad - grads[name]).norm()) <= 1e-5 * float(grads[name].norm()), name


def test_siblings_share_only_where_it_pays(llama_dir, monkeypatch):
    """On a CPU the shared A matmul measured no faster: there every layer keeps its own."""
    monkeypatch.setattr(lora, "SHARE_ON", ("cuda",))
    model = adapted(llama_dir)
    assert sibling_groups(model) == []
    with lora.fused_lora(model) as n:
        assert lora.describe(model) == f"LoRA in one addmm in {n} of {n} adapted layers"
