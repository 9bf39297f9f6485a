"""The whole loop on a GPU with its defaults (bf16, the varlen flash kernel, the fused loss head,
stochastic-rounding AdamW through its Triton kernel, the fail-fast memory probe, MFU, compile: auto)
and compiled (each decoder layer): it trains, it says what it runs, and a resumed run lands where the
uninterrupted one does. CUDA only; on a CPU these paths are covered piece by piece elsewhere."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import addition_rows, write_jsonl
from test_resume import STEPS, logged, train_args, weights_file
from tunelab import cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")]


@pytest.mark.parametrize("compile", ["auto", "true"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_defaults_on_cuda_train_say_so_and_resume(llama_dir, tmp_path, capsys, method, compile):
    data = write_jsonl(tmp_path / "qa.jsonl", addition_rows())
    run = tmp_path / "run"
    args = train_args(llama_dir, data, run, method) + [f"--train.compile={compile}"]
    args[args.index("--quiet")] = "--model.device=cuda"  # not quiet: the first lines are checked
    assert cli.main(args) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert "torch varlen flash kernel" in said, said
    if compile == "auto":  # a run of seconds: not worth the compiler's warm-up
        assert "compile auto (each of 2 decoder layers, if the run is long enough)" in said, said
        assert re.search(
            r"a short run \(about \d+ s of steps uncompiled\): training without torch.compile", said
        ), said
        assert "it fits: peak" in said and "compiling included" not in said, said
    else:
        assert "compile on (each of 2 decoder layers)" in said, said
        assert "it fits: peak" in said and "compiling included" in said, said
    assert "loss in a fused head" in said, said
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


@pytest.mark.parametrize("compile", [False, True])
def test_the_loop_waits_for_the_gpu_once_per_step(llama_dir, tmp_path, compile):
    """What makes the host wait for the GPU, counted by torch's sync debug mode: a run four steps
    longer waits exactly four times more (the step's loss and clipping norm, read together after the
    update is queued). Whatever the run does once (the memory probe, compiling, evaluation) cancels."""
    import json
    import warnings

    from transformers import AutoModelForCausalLM

    from test_packing import examples
    from tunelab.config import TrainConfig
    from tunelab.training.loop import train

    def waits(steps: int) -> int:
        torch.manual_seed(0)
        runs = len(list(tmp_path.iterdir()))
        model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).cuda()
        cfg = TrainConfig(lr=1e-3, max_steps=steps, batch_size=8, micro_batch_tokens=64, log_every=1,
                          eval_every=0, seed=0, compile=compile)  # fmt: skip
        out = tmp_path / f"run-{runs}-{steps}"  # a fresh folder each time: the warm-up run has 8 steps too
        out.mkdir()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train(model, None, examples(64, seed=2), [], cfg, out, quiet=True, save=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert sum("loss" in r for r in records) == steps
        return sum("synchroniz" in str(w.message) for w in seen)

    waits(8)  # the same batches first: every shape compiled and every kernel tuned before counting
    short, long = waits(4), waits(8)
    print(f"host waits: {short} in 4 steps, {long} in 8")
    assert long - short == 4, (short, long)
