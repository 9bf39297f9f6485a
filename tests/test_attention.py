"""tunelab's per-example packed attention (training/attention.py): exact on CPU, including sliding
windows; switched on only while tunelab trains; loud when misused."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import build_model
from test_packing import examples, pack, reference_loss
from tunelab.data.tokenize import IGNORE
from tunelab.errors import TunelabError
from tunelab.training import attention
from tunelab.training.loop import fast_paths
from tunelab.training.loss import LossHead, loss_sum


def test_sliding_window_matches_unpacked(tokenizer, tmp_path):
    """A Qwen2 model attending over a 4-token window: the padded path's banded mask equals HF's."""
    path = build_model("qwen2", tokenizer, tmp_path / "qwen2")
    config = AutoConfig.from_pretrained(path)
    config.update({"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0})
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    AutoModelForCausalLM.from_pretrained(path, config=config).save_pretrained(path)
    exs = examples(6, seed=2)
    expected, _ = reference_loss(path, exs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with attention.packed(model) as varlen:
        assert varlen
        packed = float(loss_sum(model, pack(exs, "packed-attention")).detach())
    assert packed == pytest.approx(float(expected), rel=1e-5)
    assert any(m.sliding_window == 4 for m in model.modules() if hasattr(m, "sliding_window"))
    # and the window mattered: the same weights with full attention give another loss
    full = build_model("qwen2", tokenizer, tmp_path / "full")
    assert float(reference_loss(full, exs)[0]) != pytest.approx(packed, rel=1e-4)


def test_switched_only_while_training_and_not_saved(llama_dir, tmp_path, monkeypatch):
    from tunelab.config import TrainConfig
    from tunelab.training.loop import train

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    seen = []
    real = attention.packed_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["cu_seq_lens_q"].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "packed_attention", spy)  # what _register hands transformers
    exs = examples(12, seed=5)
    cfg = TrainConfig(max_steps=2, batch_size=6, eval_every=0, log_every=1)
    (tmp_path / "run").mkdir()
    train(model, None, exs, exs[:3], cfg, tmp_path / "run", quiet=True, save=False)
    assert seen and all(cu[0] == 0 and len(cu) > 2 for cu in seen)  # packed rows, with boundaries
    assert model.config._attn_implementation == "sdpa"  # given back
    model.save_pretrained(tmp_path / "saved")
    assert attention.NAME not in (tmp_path / "saved" / "config.json").read_text()

    # a run that dies gives the model its attention back too
    from tunelab.training import loop

    def boom(*a, **k):
        raise RuntimeError("killed mid-step")

    monkeypatch.setattr(loop, "loss_sum", boom)
    with pytest.raises(RuntimeError, match="killed mid-step"):
        train(model, None, exs, [], cfg, tmp_path / "run", quiet=True, save=False)
    assert model.config._attn_implementation == "sdpa"


def test_misuse_says_what_to_do(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    with attention.packed(model):
        assert attention.describe(model) == "per-example, padded causal SDPA"  # on a CPU
        with pytest.raises(TunelabError, match="without a packed row") as e:
            model(torch.tensor([[5, 6, 7]]))
    assert "set_attn_implementation('sdpa')" in e.value.hint
    assert model(torch.tensor([[5, 6, 7]])).logits.shape[1] == 3  # back to SDPA after the block


def test_not_switched_where_unsupported(llama_dir):
    eager = AutoModelForCausalLM.from_pretrained(llama_dir, attn_implementation="eager")
    with attention.packed(eager) as varlen:
        assert not varlen and eager.config._attn_implementation == "eager"
        assert attention.describe(eager) == "eager with a block-diagonal mask"
    assert json.loads((llama_dir / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's varlen flash kernel is CUDA-only")
def test_cuda_varlen_kernel_matches_padded_sdpa():
    """On CUDA in bf16 the packed path runs torch's varlen kernel; it must equal the padded SDPA path
    within bf16 tolerance (1e-2 relative), forward and backward."""
    assert attention._varlen_kernel() is not None
    torch.manual_seed(0)
    lengths = [37, 5, 120, 64, 1, 300]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(1, 8, sum(lengths), 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, sum(lengths), 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 2, sum(lengths), 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fast, _ = attention.packed_attention(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=max(lengths))
    assert attention._cuda_kernel["fn"] is not None  # it did not fall back
    slow = attention._padded(q, k, v, cu, max(lengths), 0.0, None, None)
    torch.testing.assert_close(fast.float(), slow.float(), rtol=1e-2, atol=1e-2)
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, (q, k, v), g)
    grads_slow = torch.autograd.grad(slow, (q, k, v), g)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=2e-2)


def test_gradient_checkpointing_recomputes_the_same_packed_attention(llama_dir):
    """Activation checkpointing re-runs each layer in the backward pass; the boundaries must reach
    the recomputation too, or the gradients would differ."""
    exs = examples(8, seed=3)
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with attention.packed(model):
            loss_sum(model, pack(exs, "packed-attention")).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7, msg=n)


def stand_in_varlen(calls, q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=None,
                    is_causal=None, enable_gqa=False):  # fmt: skip
    """torch's varlen_attn contract ([tokens, heads, dim], int32 boundaries, causal or windowed
    through its kwargs), computed per sequence with plain SDPA; records (k/v heads, window_size)."""
    import torch.nn.functional as F

    assert q.dim() == 3 and cu_q.dtype == torch.int32 and max_q == max_k
    assert enable_gqa or k.shape[1] == q.shape[1]
    left = window_size[0] if window_size is not None else -1
    assert (window_size is not None) != (is_causal is not None)
    calls.append((k.shape[1], window_size))
    out = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        i = torch.arange(b - a)
        mask = (i[None, :] <= i[:, None]) & ((left < 0) | (i[:, None] - i[None, :] <= left))
        qi, ki, vi = (x[a:b].transpose(0, 1) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("takes_gqa", [True, False])
def test_varlen_kernel_found_and_called_as_torch_exports_it(monkeypatch, takes_gqa):
    """The kernel's lookup itself, not a pre-filled cache: a stand-in `torch.nn.attention.varlen`
    module whose varlen_attn does or does not take `enable_gqa` (torch releases differ). Every key the
    CUDA branch reads must come from the lookup (a missing one broke every GPU run once)."""
    import sys
    import types

    calls = []
    if takes_gqa:

        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=None, enable_gqa=False):
            return stand_in_varlen(calls, q, k, v, cu_q, cu_k, max_q, max_k, scale=scale,
                                   window_size=window_size, enable_gqa=enable_gqa)  # fmt: skip
    else:

        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=None):
            return stand_in_varlen(calls, q, k, v, cu_q, cu_k, max_q, max_k, scale=scale,
                                   window_size=window_size)  # fmt: skip

    monkeypatch.setitem(
        sys.modules, "torch.nn.attention.varlen", types.SimpleNamespace(varlen_attn=varlen_attn)
    )
    monkeypatch.setattr(attention, "_cuda_kernel", {})
    monkeypatch.setattr(attention, "_kernel_applies", lambda q, d: True)
    torch.manual_seed(0)
    lengths = [5, 9, 2]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, 4, sum(lengths), 8)
    k, v = torch.randn(1, 2, sum(lengths), 8), torch.randn(1, 2, sum(lengths), 8)
    out, _ = attention.packed_attention(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=9)
    assert calls == [(2 if takes_gqa else 4, (-1, 0))]  # the kernel ran; k/v repeated only when it must be
    assert attention._cuda_kernel["fn"] is varlen_attn  # no fallback to the padded path
    torch.testing.assert_close(out, attention._padded(q, k, v, cu, 9, 0.0, 0.3, None), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("signature", ["window_size+gqa", "window_size", "is_causal"])
@pytest.mark.parametrize("window", [None, 5])
def test_varlen_kernel_call_matches_padded_path(monkeypatch, signature, window):
    """The CUDA branch's plumbing, checked on CPU with a stand-in kernel that has varlen_attn's
    contract ([tokens, heads, dim], int32 boundaries, causal or windowed through its kwargs) and
    computes each sequence with plain SDPA: layouts, GQA and windows must give the padded path's result."""
    calls = []
    kernel = functools.partial(stand_in_varlen, calls)
    causal = {"is_causal": True} if signature == "is_causal" else {"window_size": (-1, 0)}
    monkeypatch.setattr(attention, "_kernel_applies", lambda q, d: True)
    monkeypatch.setattr(
        attention, "_cuda_kernel", {"fn": kernel, "causal": causal, "gqa": "gqa" in signature}
    )
    torch.manual_seed(0)
    lengths = [7, 1, 12, 3]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, 4, sum(lengths), 8)
    k, v = torch.randn(1, 2, sum(lengths), 8), torch.randn(1, 2, sum(lengths), 8)
    out, _ = attention.packed_attention(
        None, q, k, v, None, scaling=0.3, sliding_window=window, cu_seq_lens_q=cu, max_length_q=12
    )
    expected = attention._padded(q, k, v, cu, 12, 0.0, 0.3, window)
    if window is not None and signature == "is_causal":
        assert not calls  # an is_causal-only kernel cannot do windows: the padded path ran
    else:
        expected_window = None if signature == "is_causal" else (window - 1 if window else -1, 0)
        assert calls and calls[0] == (2 if "gqa" in signature else 4, expected_window)
    assert out.shape == (1, sum(lengths), 4, 8)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 fast path is CUDA's")
@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "qwen2"])
def test_cuda_per_example_loss_matches_unpacked_bf16(tiny_models, kind):
    """The GPU fast path (bf16, packed row, varlen kernel) against the plain path (each example alone
    through HF's own SDPA forward): every example's loss within 1e-2 relative."""
    from tunelab.data.tokenize import IGNORE
    from tunelab.training.loss import per_example_loss

    exs = examples(12, seed=6)
    model = AutoModelForCausalLM.from_pretrained(tiny_models[kind], dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        plain = []
        for e in exs:
            logits = model(torch.tensor([e.input_ids], device="cuda")).logits[0, :-1].float()
            labels = torch.tensor(e.labels[1:], device="cuda")
            if (labels != IGNORE).any():
                plain.append(float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE)))
        with attention.packed(model) as varlen:
            assert varlen
            fast = per_example_loss(model, pack(exs, "packed-attention").to("cuda"))
    assert attention._cuda_kernel.get("fn") is not None  # the varlen kernel ran, no fallback
    assert fast == pytest.approx(plain, rel=1e-2)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 24), min_size=1, max_size=7),
    kv_heads=st.sampled_from([1, 2, 4]),
    window=st.one_of(st.none(), st.integers(1, 10)),
)
def test_padded_path_equals_each_sequence_alone(lengths, kv_heads, window):
    """Any mix of lengths (1-token sequences too), GQA ratios and windows: the padded path gives each
    sequence exactly what SDPA gives it alone."""
    import torch.nn.functional as F

    torch.manual_seed(len(lengths))
    total = sum(lengths)
    q = torch.randn(1, 4, total, 8)
    k, v = torch.randn(1, kv_heads, total, 8), torch.randn(1, kv_heads, total, 8)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = attention._padded(q, k, v, cu, max(lengths), 0.0, None, window)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        i = torch.arange(b - a)
        mask = i[None, :] <= i[:, None]
        if window is not None:
            mask &= i[:, None] - i[None, :] < window
        alone = F.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], attn_mask=mask, enable_gqa=kv_heads != 4
        )
        torch.testing.assert_close(out[0, a:b], alone[0].transpose(0, 1), rtol=1e-5, atol=1e-6)


# More decoder families than the three every test uses: learned positions (GPT-2, OPT), Gemma's
# scaled embeddings, sliding windows (Mistral, Gemma 3's mixed layers), Phi-3's fused projections,
# Qwen3's q/k norms, SmolLM3's layers without rotary.
_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)  # fmt: skip
FAMILIES = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=512),
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=512, word_embed_proj_dim=32, pad_token_id=0),
    "gemma": {**_SMALL, "head_dim": 8},
    "mistral": {**_SMALL, "sliding_window": 6},
    "phi3": _SMALL,
    "qwen3": {**_SMALL, "head_dim": 8},
    "gemma3_text": {**_SMALL, "head_dim": 8, "sliding_window": 4},
    "smollm3": _SMALL,
    # These scale their logits after the head, so they keep it (the fused loss head would skip that).
    "granite": {**_SMALL, "logits_scaling": 4.0},
    "cohere": {**_SMALL, "logit_scale": 0.5},
}  # fmt: skip
KEEP_HEAD = {"granite", "cohere"}


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_packed_attention_is_exact_for_more_families(tokenizer, tmp_path, kind):
    cfg = AutoConfig.for_model(
        kind, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, **FAMILIES[kind],
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / kind)
    exs = examples(9)
    expected, expected_grads = reference_loss(tmp_path / kind, exs)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / kind, dtype=torch.float32)
    with fast_paths(model) as varlen:
        assert varlen and model.config._attn_implementation == attention.NAME
        fused = isinstance(model.get_output_embeddings(), LossHead)
        assert fused == (kind not in KEEP_HEAD)  # the probe found the models that change logits
        packed = loss_sum(model, pack(exs, "packed-attention"))
        packed.backward()
    assert float(packed.detach()) == pytest.approx(float(expected), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[n], rtol=1e-4, atol=1e-5, msg=n)


def test_cuda_branch_compiles(llama_dir, monkeypatch):
    """The CUDA branch under torch.compile (the default on a GPU), checked on CPU with a traceable
    stand-in for varlen_attn: the same loss and gradients as eager, and no graph break but the fused
    loss head's (left out of the graph by design). Dynamo and AOTAutograd as the loop runs them, then
    the graph run as traced (`aot_eager`): a GPU compiles it to Triton kernels, not to the C++ that
    inductor writes for a CPU (torch 2.11's, the GPU image's, fails to build for this stand-in)."""
    import torch._dynamo

    traced = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=None, enable_gqa=False):
        traced.append(window_size)
        out = attention._padded(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                cu_q, max_q, 0.0, scale, None)  # fmt: skip
        return out[0]

    exs = examples(9, seed=6)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        monkeypatch.setattr(attention, "_kernel_applies", lambda q, d: True)
        monkeypatch.setattr(
            attention, "_cuda_kernel", {"fn": kernel, "causal": {"window_size": (-1, 0)}, "gqa": True}
        )
        model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
        with fast_paths(model):
            forward = torch.compile(model, dynamic=True, backend="aot_eager") if compiled else model
            loss = loss_sum(forward, pack(exs, "packed-attention"))
            loss.backward()
        results.append((float(loss.detach()), {n: p.grad for n, p in model.named_parameters()}))
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert traced and traced[-1] == (-1, 0)  # the kernel branch ran (compiled: traced)
    assert breaks and all("LossHead.forward" in reason for reason in breaks), breaks
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")]
        ),
    ],
)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_bf16_fast_path_loss_and_gradients_match_unpacked(tiny_models, kind, device):
    """The whole training fast path in bf16 (packed row, per-example attention — the varlen kernel on
    CUDA —, fused loss head) against the plain path (each example alone through HF's own forward and
    the model's own head, bf16): the summed loss within 1e-2 relative, the gradient within 2e-2 in
    norm of the difference, relative."""
    exs = examples(12, seed=7)

    def grads(model):
        return torch.cat([p.grad.float().flatten() for p in model.parameters()])

    plain_model = AutoModelForCausalLM.from_pretrained(tiny_models[kind], dtype=torch.bfloat16).to(device)
    plain = torch.zeros((), device=device)
    for e in exs:
        logits = plain_model(torch.tensor([e.input_ids], device=device)).logits[0, :-1].float()
        labels = torch.tensor(e.labels[1:], device=device)
        plain = plain + torch.nn.functional.cross_entropy(
            logits, labels, ignore_index=IGNORE, reduction="sum"
        )
    plain.backward()
    model = AutoModelForCausalLM.from_pretrained(tiny_models[kind], dtype=torch.bfloat16).to(device)
    with fast_paths(model) as varlen:
        assert varlen and isinstance(model.get_output_embeddings(), LossHead)
        fast = loss_sum(model, pack(exs, "packed-attention").to(device))
        fast.backward()
    assert float(fast) == pytest.approx(float(plain), rel=1e-2)
    g, ref = grads(model), grads(plain_model)
    assert float((g - ref).norm() / ref.norm()) < 2e-2
