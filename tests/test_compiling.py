"""training/compiling.py: a compiled run compiles each decoder layer in place (one graph shared by
the layers), trains as the eager run does, and leaves the model eager afterwards, also when it fails."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from test_packing import examples
from tunelab.config import TrainConfig
from tunelab.errors import TunelabError
from tunelab.models import apply_lora, decoder_layers
from tunelab.training import compiling, loop
from tunelab.training.loop import train


def run(path, tmp_path, compile, method: str = "full", dropout: float = 0.0, quiet: bool = True, **settings):
    """Eight steps on a tiny Llama: the model and its metrics."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if method == "lora":
        model = apply_lora(model, "lora", 8, 16, dropout, "all-linear", [])
    cfg = TrainConfig(
        lr=3e-3, max_steps=8, batch_size=4, log_every=1, eval_every=4, seed=0, compile=compile, method=method,
        **settings,
    )  # fmt: skip
    out = tmp_path / f"run-{compile}-{method}"
    out.mkdir()
    train(model, None, examples(32, seed=2), examples(6, seed=3), cfg, out, quiet=quiet, save=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return model, records


def losses(records, key="loss"):
    return torch.tensor([r[key] for r in records if key in r])


@pytest.mark.parametrize(
    ("kind", "method", "settings"),
    [
        ("llama", "full", {}),
        ("llama", "lora", {}),
        ("llama", "full", {"gradient_checkpointing": True}),
        # compile: auto compiles a long run of whatever model it is given, on a CPU too: Pythia's
        # (GPT-NeoX: parallel residual, partial rotary) and Qwen2's (q/k/v biases) layers as Llama's.
        ("gpt_neox", "full", {}),
        ("qwen2", "full", {}),
    ],
    ids=["full", "lora", "checkpointing", "gpt_neox", "qwen2"],
)
def test_compiled_layers_train_as_eager_does(tiny_models, tmp_path, kind, method, settings):
    eager_model, eager = run(tiny_models[kind], tmp_path, False, method, **settings)
    model, compiled = run(tiny_models[kind], tmp_path, True, method, **settings)
    # Inductor fuses and orders the float arithmetic differently: rounding apart, over eight updates.
    torch.testing.assert_close(losses(compiled), losses(eager), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        losses(compiled, "eval_loss"), losses(eager, "eval_loss"), rtol=1e-4, atol=1e-5
    )
    layers = decoder_layers(model)
    assert layers and all(layer._compiled_call_impl is None for layer in layers)  # eager again
    for (name, a), (_, b) in zip(model.named_parameters(), eager_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_the_layers_share_one_compiled_graph(llama_dir):
    """Compiled layer by layer, the warm-up compiles one layer, not N: the layers' forward code is
    traced once (parameters are graph inputs), whatever the number of layers."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    layers = decoder_layers(model)
    assert len(layers) >= 2
    with compiling.scope(model):
        forward = compiling.for_training(model, model)
        assert forward is model  # compiled in place: the same module, the same parameter names
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        forward(input_ids=ids, use_cache=False).logits.sum().backward()
        assert all(layer._compiled_call_impl is not None for layer in layers)
    assert counters["stats"]["unique_graphs"] == 1
    assert all(layer._compiled_call_impl is None for layer in layers)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_run_with_evaluation_compiles_one_graph(llama_dir, tmp_path, method):
    """The whole warm-up is one layer's training graph and the loss head's chunk body: evaluation
    runs both eagerly (no forward-only graphs), and with the embedding frozen (LoRA) the first
    layer's input asks for a gradient like every other layer's (no graph of its own). Undone after
    the run."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, records = run(llama_dir, tmp_path, True, method)
    assert len(losses(records, "eval_loss")) == 3  # steps 0, 4 and 8
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not model.get_input_embeddings()._forward_hooks  # the hook is gone
    assert not any(compiling._HOOK in vars(m) for m in (model, getattr(model, "base_model", model)))


def test_paused_layers_run_eagerly_and_are_compiled_again_after(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    layers = decoder_layers(model)
    with compiling.scope(model):
        compiling.for_training(model, model)
        impls = [layer._compiled_call_impl for layer in layers]
        with compiling.paused(model):
            assert all(layer._compiled_call_impl is None for layer in layers)
        assert [layer._compiled_call_impl for layer in layers] == impls and all(impls)


def test_a_failed_run_leaves_the_layers_eager_and_user_compiled_ones_alone(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    layers = decoder_layers(model)
    layers[0].compile()  # the user's own
    with pytest.raises(RuntimeError, match="boom"), compiling.scope(model):
        compiling.for_training(model, model)
        assert all(layer._compiled_call_impl is not None for layer in layers)
        raise RuntimeError("boom")
    assert layers[0]._compiled_call_impl is not None
    assert all(layer._compiled_call_impl is None for layer in layers[1:])


def test_without_decoder_layers_the_whole_model_is_compiled(llama_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    n = len(decoder_layers(model))
    assert compiling.describe(True, model) == f"compile on (each of {n} decoder layers)"
    assert compiling.describe(False, model) == "compile off"
    monkeypatch.setattr(model, "_no_split_modules", [])
    assert compiling.describe(True, model) == "compile on (whole model)"
    whole = compiling.for_training(model, model)
    assert whole is not model and whole._orig_mod is model
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)


def test_training_makes_room_for_the_layers_graphs_and_gives_it_back(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    before = torch._dynamo.config.recompile_limit
    with compiling.scope(model):
        assert torch._dynamo.config.recompile_limit >= compiling.RECOMPILE_LIMIT > before
    assert torch._dynamo.config.recompile_limit == before


attempts: list[int] = []


def broken_compiler(graph, example_inputs):
    attempts.append(1)
    raise RuntimeError("no C++ compiler found")  # as Inductor says where it cannot build its kernels


def test_a_compiler_that_fails_says_what_to_do(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", broken_compiler)
    torch._dynamo.reset()
    with pytest.raises(TunelabError, match="torch.compile failed: .*no C\\+\\+ compiler found") as e:
        run(llama_dir, tmp_path, True)
    assert "train.compile: false" in e.value.hint


# compile: auto times the largest micro-batch uncompiled before training: on a CPU that is all it
# does there; on a GPU it is also the fail-fast memory probe ({"cpu"} stands the CPU in for one).
WHERE = {"cpu": set(), "gpu": {"cpu"}}


@pytest.mark.parametrize("where", WHERE)
def test_auto_trains_without_compiling_where_compiling_fails(llama_dir, tmp_path, monkeypatch, where):
    """compile: auto: the probe is the first compiled pass; where it fails, the run goes on eagerly,
    says so, and trains exactly as an eager run does."""
    monkeypatch.setattr(loop, "FAIL_FAST_DEVICES", WHERE[where])
    eager_model, eager = run(llama_dir, tmp_path, False)
    monkeypatch.setattr(compiling, "BACKEND", broken_compiler)
    monkeypatch.setitem(compiling.WORTH_S, "cpu", 0.0)  # the run is long enough
    torch._dynamo.reset()
    attempts.clear()
    model, fell_back = run(llama_dir, tmp_path, "auto")
    assert attempts  # it did try
    assert losses(fell_back).tolist() == losses(eager).tolist()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), eager_model.parameters()))
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))


@pytest.mark.parametrize("where", WHERE)
def test_auto_compiles_a_long_run_and_not_a_short_one(llama_dir, tmp_path, monkeypatch, capsys, where):
    """compile: auto times one uncompiled pass and compiles only a run whose steps would take at least
    WORTH_S uncompiled: a short run would wait longer for the warm-up than it saves. Either way the
    log says which and why."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(loop, "FAIL_FAST_DEVICES", WHERE[where])
    _, eager = run(llama_dir, tmp_path, False)
    for worth, long_enough in ((1e9, False), (0.0, True)):
        monkeypatch.setitem(compiling.WORTH_S, "cpu", worth)
        torch._dynamo.reset()
        counters.clear()
        (tmp_path / str(worth)).mkdir()
        model, records = run(llama_dir, tmp_path / str(worth), "auto", quiet=False)
        said = " ".join(capsys.readouterr().err.split())
        assert "compile auto (each of 2 decoder layers, if the run is long enough)" in said, said
        if long_enough:
            assert "of steps uncompiled: compiling the model, its warm-up pays" in said, said
            assert ("it fits:" if where == "gpu" else "compiled in") in said, said
            assert "compiling included" in said if where == "gpu" else re.search(r"compiled in \d+ s", said)
            assert counters["stats"]["unique_graphs"] == 2  # a layer and the loss head's chunk body
            torch.testing.assert_close(losses(records), losses(eager), rtol=1e-4, atol=1e-5)
        else:
            assert re.search(
                r"a short run \(about \d+ s of steps uncompiled\): training without torch.compile", said
            ), said
            assert (
                "--train.compile=true compiles anyway" in said and "compiling" not in said.split("anyway")[1]
            )
            assert ("it fits:" in said) == (where == "gpu"), said  # the timed passes were the probe
            assert not counters["stats"]["unique_graphs"]  # nothing compiled
            assert losses(records).tolist() == losses(eager).tolist()  # the timed passes changed nothing
        assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))


def test_auto_on_a_cpu_compiles_one_process_only():
    """Several processes would time apart and could decide apart: compile: auto leaves them eager on a
    CPU (on CUDA they compile); QLoRA's 4-bit layers are never compiled by auto."""
    from tunelab.training.loop import compiles

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compiles(TrainConfig(), cpu) and compiles(TrainConfig(), cuda, world_size=2)
    assert not compiles(TrainConfig(), cpu, world_size=2)
    assert compiles(TrainConfig(compile=True), cpu, world_size=2)
    assert not compiles(TrainConfig(compile=False), cuda)
    assert not compiles(TrainConfig(method="qlora"), cuda)


def test_the_probe_draws_no_random_numbers_from_the_run(llama_dir, tmp_path, monkeypatch):
    """The memory probe's passes run dropout too, and a resumed run probes again: they must leave the
    random state as they found it, or the resumed run would draw other dropout masks than the
    uninterrupted one."""
    runs = []
    for probe in (set(), {"cpu"}):
        monkeypatch.setattr(loop, "FAIL_FAST_DEVICES", probe)
        (tmp_path / str(len(runs))).mkdir()
        runs.append(run(llama_dir, tmp_path / str(len(runs)), False, "lora", dropout=0.3)[1])
    assert losses(runs[1]).tolist() == losses(runs[0]).tolist()


def test_auto_compiles_where_the_uncompiled_pass_does_not_fit(llama_dir, tmp_path, monkeypatch, capsys):
    """Compiled code may need less memory than eager: where the timed uncompiled pass runs out of
    memory, auto goes on to the compiled probe (which says whether that fits) instead of failing."""
    from contextlib import contextmanager

    real, calls = compiling.paused, []

    @contextmanager
    def out_of_memory(model):  # the first use is the timed uncompiled pass; evaluation comes later
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")
        with real(model):
            yield

    monkeypatch.setattr(loop, "FAIL_FAST_DEVICES", {"cpu"})
    monkeypatch.setitem(compiling.WORTH_S, "cpu", 1e9)  # it would be a short run, if timed
    monkeypatch.setattr(compiling, "paused", out_of_memory)
    torch._dynamo.reset()
    _, records = run(llama_dir, tmp_path, "auto", quiet=False)
    said = " ".join(capsys.readouterr().err.split())
    assert "a short run" not in said and "compiling included" in said, said
    assert len(losses(records)) == 8


def test_a_micro_batch_of_one_example_compiles_no_graph_of_its_own(llama_dir):
    """Compiled, per-example attention over a CPU's padded batch sizes its tensors by the example
    count; torch would specialise a second graph for a count of one (a long example alone in its
    micro-batch, or a batch size of one). An empty slot keeps the count at two or more."""
    from torch._dynamo.utils import counters

    from tunelab.data.packing import collate
    from tunelab.training.loop import fast_paths
    from tunelab.training.loss import loss_sum

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    data = examples(8, seed=2)
    torch._dynamo.reset()
    counters.clear()
    got = []
    with fast_paths(model) as varlen, compiling.scope(model):
        forward = compiling.for_training(model, model)
        for group in (data[:3], data[3:7], data[7:8], data[:2]):
            batch = collate(group, varlen)
            loss = loss_sum(forward, batch)
            loss.backward()
            got.append(float(loss))
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # a layer and the head's body
    model.zero_grad()
    with fast_paths(model) as varlen:  # eager: the same losses
        want = [
            float(loss_sum(model, collate(g, varlen))) for g in (data[:3], data[3:7], data[7:8], data[:2])
        ]
    assert got == pytest.approx(want, rel=1e-5)


def test_a_loss_head_that_fails_to_compile_runs_eagerly_and_says_so(monkeypatch, caplog):
    """The layers compiled and the head's chunk body did not: the run goes on with the eager body
    (the same loss and gradient), says so once, and does not try again."""
    from tunelab.training import loss

    monkeypatch.setattr(compiling, "BACKEND", broken_compiler)
    torch._dynamo.reset()
    attempts.clear()
    body = compiling._HeadBody()
    torch.manual_seed(0)
    logits, targets, valid = (
        torch.randn(5, 11),
        torch.randint(0, 11, (5,)),
        torch.tensor([1, 1, 0, 1, 1]).bool(),
    )
    want = loss.ce_and_grad(logits, targets, valid)
    for _ in range(2):
        got = body(logits.clone(), targets, valid)
        torch.testing.assert_close(got, want)
    assert len(attempts) == 1 and body.compiled is None
    (record,) = [r for r in caplog.records if "loss head" in r.getMessage()]
    assert "no C++ compiler found" in record.getMessage() and "runs eagerly" in record.getMessage()


def test_a_first_step_that_compiles_says_so(llama_dir, tmp_path, capsys):
    """compile: true on a CPU compiles in the first step, with no probe before it: the log says why that
    step takes long (the bar stood at 0 with no word); an uncompiled run says nothing of it."""
    torch._dynamo.reset()
    run(llama_dir, tmp_path, True, quiet=False)
    said = " ".join(capsys.readouterr().err.split())
    assert (
        "the first step compiles the model (torch.compile's warm-up): it takes longer than the rest" in said
    )
    run(llama_dir, tmp_path, False, quiet=False)
    assert "first step compiles" not in capsys.readouterr().err
