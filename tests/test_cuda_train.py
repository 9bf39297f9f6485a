"""The whole loop on a GPU with its defaults (bf16, each decoder layer compiled, the varlen flash
kernel, the fused loss head, stochastic-rounding AdamW through its Triton kernel, the fail-fast
memory probe, MFU): it trains, it says what it runs, and a resumed run lands where the uninterrupted
one does. CUDA only; on a CPU these paths are covered piece by piece elsewhere."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import addition_rows, write_jsonl
from test_resume import STEPS, logged, train_args, weights_file
from tunelab import cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_defaults_on_cuda_train_say_so_and_resume(llama_dir, tmp_path, capsys, method):
    data = write_jsonl(tmp_path / "qa.jsonl", addition_rows())
    run = tmp_path / "run"
    args = train_args(llama_dir, data, run, method)
    args[args.index("--quiet")] = "--model.device=cuda"  # not quiet: the first lines are checked
    assert cli.main(args) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert "torch varlen flash kernel" in said, said
    assert "compile on (each of 2 decoder layers)" in said, said
    assert "loss in a fused head" in said, said
    assert "it fits: peak" in said and "compiling included" in said, said
    if method == "full":
        assert "bf16 weights updated with stochastic rounding" in said, said
    else:
        assert "LoRA in one addmm in" in said, said

    records = logged(run)
    losses = [loss for _, loss, *_ in records if loss is not None]
    evals = [e for _, _, e, *_ in records if e is not None]
    assert len(losses) == STEPS and losses[-1] < losses[0] and evals[-1] < evals[0], records

    # Killed after the checkpoint of step 20 (as test_resume does on a CPU) and resumed.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "final")
    assert cli.main(["train", "--resume", str(resumed), "--quiet"]) == 0
    got, want = logged(resumed), records
    assert [r[0] for r in got] == [r[0] for r in want]
    # On a GPU some backward kernels add with atomics (the embedding's, the compiled reductions'),
    # so bit-for-bit is not promised; within bf16 rounding it must be.
    torch.testing.assert_close(
        torch.tensor([r[1] for r in got if r[1] is not None]),
        torch.tensor([r[1] for r in want if r[1] is not None]),
        rtol=2e-2,
        atol=1e-3,
    )
    a, b = load_file(weights_file(resumed)), load_file(weights_file(run))
    assert a.keys() == b.keys()
    same = all(torch.equal(a[k], b[k]) for k in b)
    print(f"resumed {method} run bit-identical to the uninterrupted one: {same}")  # reported, not required
    for k in b:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=5e-2, atol=5e-3, msg=k)
