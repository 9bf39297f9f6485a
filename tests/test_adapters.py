"""LoRA / DoRA / QLoRA through peft: only the adapter trains, it loads with plain peft, and the merged
export generates exactly what base + adapter generates."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import addition_rows, write_jsonl
from tunelab import cli, runner
from tunelab.config import load_config
from tunelab.errors import ModelLoadError
from tunelab.models import quantization_config


def arithmetic(path: Path, n: int = 48) -> Path:
    """Unique Q/A rows (no eval prompt repeats a train one, so the data check passes)."""
    return write_jsonl(path, addition_rows()[:n])


def run_lora(model_dir: Path, data: Path, out: Path, quiet: bool = True, **values: object) -> Path:
    settings = {
        "model.name_or_path": str(model_dir),
        "data.path": str(data),
        "out": str(out),
        "train.method": "lora",
        "train.max_steps": 24,
        "train.batch_size": 8,
        "train.lr": 1e-2,
        "train.eval_every": 8,
        "train.log_every": 1,
        "lora.r": 8,
        "lora.alpha": 16,
        **values,
    }
    runner.run(load_config(values=settings), quiet=quiet)
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def spy(monkeypatch):
    """Catch the model runner.run hands the loop, with a copy of every weight before training."""
    seen: dict = {}
    real = runner.train

    def train(model, *args, **kwargs):
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen["model"] = model
        return real(model, *args, **kwargs)

    monkeypatch.setattr(runner, "train", train)
    return seen


@pytest.mark.parametrize(
    "kind, method, modules_to_save",
    [("llama", "lora", []), ("gpt_neox", "lora", ["lm_head"]), ("qwen2", "dora", [])],
)
def test_adapter_trains_loads_with_peft_and_merges(
    kind, method, modules_to_save, tiny_models, tmp_path, spy, capsys
):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = arithmetic(tmp_path / "qa.jsonl")
    run = run_lora(
        tiny_models[kind],
        data,
        tmp_path / "run",
        quiet=False,
        **{"train.method": method, "lora.modules_to_save": modules_to_save},
    )
    model, before = spy["model"], spy["before"]

    # The count printed at the start is the adapter's (plus modules_to_save), and a small share.
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    err = capsys.readouterr().err
    printed = re.search(r"training ([\d,]+) of ([\d,]+) parameters \(([\d.]+)%\)", err)
    assert printed, "the trainable-parameter line is missing"
    assert int(printed[1].replace(",", "")) == trainable and int(printed[2].replace(",", "")) == total
    assert float(printed[3]) == pytest.approx(100 * trainable / total, abs=0.01)
    # Plain LoRA layers ran the fast forward (training/lora.py); DoRA's keep PEFT's.
    fused, adapted = map(
        int, re.search(r"LoRA\s+in\s+one\s+addmm\s+in\s+(\d+)\s+of\s+(\d+)\s+adapted", err).groups()
    )
    assert adapted > 0 and fused == (adapted if method == "lora" else 0)

    # The loss falls: held-out loss after training is clearly below the start, train loss too.
    rows = metrics(run)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert evals[-1] < evals[0] - 0.3, evals
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.9, losses

    # Only the adapter (and modules_to_save) trained; every frozen weight is bit-for-bit unchanged.
    named = dict(model.named_parameters())
    trained = {n for n, p in named.items() if p.requires_grad}
    assert trained and all("lora_" in n or "modules_to_save" in n for n in trained)
    if method == "dora":
        assert any("lora_magnitude_vector" in n for n in trained)
    if modules_to_save:
        assert any("lm_head.modules_to_save" in n for n in trained)
    frozen = set(named) - trained
    assert all(torch.equal(before[n], named[n]) for n in frozen)
    assert all(not torch.equal(before[n], named[n]) for n in trained if "lora_B" in n)

    # final/ is a PEFT adapter that plain peft loads, finding the base through base_model_name_or_path.
    final = run / "final"
    adapter_cfg = json.loads((final / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_models[kind].resolve())
    assert adapter_cfg["use_dora"] is (method == "dora")
    peft_model = AutoPeftModelForCausalLM.from_pretrained(final).eval()
    loaded = dict(peft_model.named_parameters())
    assert all(torch.equal(loaded[n], named[n]) for n in trained)

    # The merged export: a plain HF model that generates the same greedy tokens as base + adapter.
    assert cli.main(["export", str(run), "--merge", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n or "modules_to_save" in n for n in merged.state_dict())
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 7 plus 5?"}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=1e-4)
        greedy = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected = peft_model.generate(input_ids=ids, **greedy)
        assert torch.equal(merged.generate(input_ids=ids, **greedy), expected)
    assert expected.shape[1] == ids.shape[1] + 12


def test_qlora_on_cpu_says_it_needs_a_gpu(tiny_models, tmp_path, capsys):
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU") as e:
        quantization_config("qlora", torch.device("cpu"))
    assert "--train.method=lora" in e.value.hint
    assert quantization_config("lora", torch.device("cpu")) is None

    data = arithmetic(tmp_path / "qa.jsonl")
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_models["llama"]), "--data", str(data), "--out", str(out)]
    # --model.device=cpu: on a GPU machine "auto" would pick CUDA, where QLoRA runs.
    assert cli.main([*argv, "--train.method=qlora", "--model.device=cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "qlora' needs a CUDA GPU" in err and "--train.method=lora" in err
    assert not out.exists()  # refused before a run directory was made


# bitsandbytes backpropagating through a kernel with no autograd formula would give wrong gradients.
@pytest.mark.filterwarnings("error:.*autograd kernel was not registered")
def test_qlora_trains_a_4bit_base(tokenizer, tmp_path, spy, monkeypatch):
    """The whole QLoRA path: NF4 base through transformers + bitsandbytes, prepare_model_for_kbit_training,
    LoRA on Linear4bit layers, training, the adapter loading with plain peft, and a merged export.

    On CUDA it runs as users run it. Without CUDA it runs on bitsandbytes' CPU 4-bit kernels (>= 0.46)
    with the "needs a CUDA GPU" guard lifted for this test only: users still get the message above,
    because the CPU kernels are far too slow to be the product, but every line of tunelab's QLoRA path
    is executed here."""
    bnb = pytest.importorskip("bitsandbytes", reason="pip install bitsandbytes (in the dev extra)")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import build_model
    from tunelab.models import quantization_config as real

    cuda = torch.cuda.is_available()
    if not cuda:
        if tuple(int(x) for x in bnb.__version__.split(".")[:2]) < (0, 46):
            pytest.skip("bitsandbytes < 0.46 has no CPU 4-bit kernels")
        monkeypatch.setattr(runner, "quantization_config", lambda m, d: real(m, torch.device("cuda")))
        # bitsandbytes 0.50 on an AVX512-BF16 CPU repacks 4-bit weights for inference the first time a
        # layer runs in eval mode (our step-0 eval) and keeps that layout when training resumes, where
        # its kernel has no backward. Not a path users reach (QLoRA is CUDA-only in tunelab).
        monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)
    # bitsandbytes' CPU layout needs in_features divisible by its block size (64): a 64-wide model.
    model_dir = build_model("llama", tokenizer, tmp_path / "llama64", width=64)
    run = run_lora(
        model_dir, arithmetic(tmp_path / "qa.jsonl"), tmp_path / "run", **{"train.method": "qlora"}
    )
    model = spy["model"]
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # every attention and MLP projection of both layers
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    after = dict(model.named_parameters())
    frozen = [n for n in spy["before"] if "lora_" not in n]
    assert all(torch.equal(spy["before"][n], after[n].detach()) for n in frozen)  # 4-bit base untouched
    evals = [r["eval_loss"] for r in metrics(run) if "eval_loss" in r]
    assert evals[-1] < evals[0]

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    loaded = PeftModel.from_pretrained(base, run / "final")
    assert sum("lora_A" in n for n, _ in loaded.named_parameters()) == 2 * 7
    # The merged export folds the adapter into the full-precision base (the usual QLoRA export).
    assert cli.main(["export", str(run), "--merge", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, loaded(ids).logits, atol=1e-4, rtol=1e-4)


def test_lora_target_modules_by_name_and_a_name_the_model_lacks(llama_dir, qa_file, tmp_path, capsys):
    """`--lora.target_modules=q_proj,v_proj` names modules as the list form does; a name the model
    lacks stops with the model's linear layer names, and leaves no empty run directory."""
    from tunelab.cli import main

    base = ["train", "--model", str(llama_dir), "--data", str(qa_file), "--quiet", "--train.method=lora",
            "--train.max_steps=1", "--train.batch_size=2"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "ok"), "--lora.target_modules=q_proj,v_proj"]) == 0
    adapter = json.loads((tmp_path / "ok" / "final" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "bad"), "--lora.target_modules=[q_prj]"]) == 2
    err = capsys.readouterr().err
    assert "lora.target_modules: q_prj names no module of this model" in err and "q_proj" in err
    assert not (tmp_path / "bad").exists()
