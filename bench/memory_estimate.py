"""Peak training memory of BENCH.md's GPU workload, predicted on a machine without a GPU.

    python bench/memory_estimate.py --model qwen0.5b --batch 44 [--gradient-checkpointing] [--method lora]

Runs tunelab's training step (packed batches, per-example varlen attention, the fused loss head,
LoRA's fused forward, bf16 weights, AdamW with moments in the weights' dtype) on fake tensors
(`FakeTensorMode`: shapes, no data, no arithmetic) for the first steps of the benchmark's epoch,
and counts what is alive with torch's `MemTracker`. It prints a RESULT line: the peak in GiB and
what it holds (weights, gradients, optimizer state, activations, temporaries).

What it leaves out, so a measurement on the GPU may differ:
- torch.compile: it runs eagerly. Compiled layers save fewer activations (measured on an H200
  without checkpointing: 19.63 GiB compiled where this predicts ~24.6 eager for qwen0.5b);
- the CUDA caching allocator's rounding, cuBLAS and flash-attention workspaces;
- the optimizer update's transients: tunelab's bf16 AdamW on a GPU with Triton has none (one
  kernel per weight); the foreach fallback holds up to 256 MiB (optim.CHUNK).
It is a prediction to check against `bench/gpu.sh`'s measurement, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sft_speed import MODELS, make_examples  # noqa: E402


class _NoHook:
    def remove(self) -> None:
        pass


def _to_fake(model) -> None:
    """Every weight and buffer of a meta-device `model` as a fake CPU tensor (under FakeTensorMode),
    tied weights staying tied."""
    import torch

    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table, wrap in ((module._parameters, True), (module._buffers, False)):
            for name, t in list(table.items()):
                if t is None:
                    continue
                if id(t) not in made:
                    fake = torch.empty_like(t, device="cpu")
                    made[id(t)] = torch.nn.Parameter(fake, requires_grad=t.requires_grad) if wrap else fake
                table[name] = made[id(t)]


def estimate(
    model_name: str,
    batch: int,
    micro_batch_tokens: int,
    method: str = "full",
    gradient_checkpointing: bool = False,
    steps: int = 3,
) -> dict:
    from transformers import AutoConfig

    from tunelab.data.packing import collate, plan_epoch
    from tunelab.training import attention
    from tunelab.training import loss as loss_module

    spec = dict(MODELS[model_name])
    arch = spec.pop("arch")
    config = AutoConfig.for_model(arch, **spec, max_position_embeddings=4096)
    examples = make_examples(4000, spec["vocab_size"], short=model_name == "world")
    plan = plan_epoch([len(e.input_ids) for e in examples], batch, micro_batch_tokens, 0, 0)[:steps]
    # Real (host) batches: their boundaries and trained positions are worked out from data.
    batches = [[collate([examples[i] for i in mb]) for mb in step] for step in plan]
    # As on a GPU in bf16: torch's varlen flash kernel (its fake implementation gives its outputs and
    # the log-sum-exp it saves); the probe that checks the head returns its output untouched cannot
    # run on fake tensors (the HF models here do return it).
    with (
        mock.patch.object(attention, "_kernel_applies", lambda query, dropout: True),
        mock.patch.object(loss_module, "_returns_head_output", lambda base, head: True),
    ):
        row = _estimate(model_name, method, gradient_checkpointing, config, batches)
    return {"examples_per_step": batch, "micro_batch_tokens": micro_batch_tokens, **row}


def _estimate(model_name: str, method: str, gradient_checkpointing: bool, config, batches) -> dict:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import AutoModelForCausalLM

    from tunelab.models import apply_lora, count_parameters
    from tunelab.training import loss as loss_module
    from tunelab.training.loop import checkpoint_activations, fast_paths

    with torch.device("meta"):  # the model's structure, no memory; PEFT cannot convert fake weights
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
        if method == "lora":
            model = apply_lora(model, "lora", 16, 32, 0.0, "all-linear", [])
    with FakeTensorMode(allow_non_fake_inputs=True):
        _to_fake(model)
        if gradient_checkpointing:
            checkpoint_activations(model)
        model.train()
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=True)
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        for p in model.parameters():  # frozen weights: no gradient hook (MemTracker would try one)
            if not p.requires_grad:
                tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
        with fast_paths(model), tracker:
            for step in batches:
                n_targets = sum(b.n_targets for b in step)
                for b in step:
                    tracker.reset_mod_stats()  # it follows one forward per module at a time
                    (loss_module.loss_sum(model, b) / n_targets).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        (peak,) = tracker.get_tracker_snapshot("peak").values()
    n_trained, n_total = count_parameters(model)
    parts = {str(k).split(".")[-1].split(":")[0].lower(): v for k, v in peak.items() if k != "Total"}
    return {
        "model": model_name,
        "method": method,
        "gradient_checkpointing": gradient_checkpointing,
        "largest_micro_batch": max(b.n_tokens for s in batches for b in s),
        "steps": len(batches),
        "real_tokens_per_step": round(sum(b.n_tokens for s in batches for b in s) / len(batches)),
        "trained_parameters": n_trained,
        "parameters": n_total,
        "predicted_peak_GiB": round(peak["Total"] / 2**30, 2),
        "parts_GiB": {k: round(v / 2**30, 3) for k, v in parts.items() if v},
        "parts_bytes": {k: v for k, v in parts.items() if v},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="qwen0.5b")
    p.add_argument("--batch", type=int, default=44, help="examples per optimizer step")
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--method", choices=["full", "lora"], default="full")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--steps", type=int, default=3, help="steps to follow (the optimizer's state exists from the 2nd)"
    )
    p.add_argument("--results", type=Path, help="append the JSON line to this file")
    args = p.parse_args()
    started = time.perf_counter()
    row = estimate(
        args.model, args.batch, args.micro_batch_tokens, args.method, args.gradient_checkpointing, args.steps
    )
    row["seconds"] = round(time.perf_counter() - started, 1)
    del row["parts_bytes"]
    row["when"] = time.strftime("%Y-%m-%d %H:%M")
    print("RESULT " + json.dumps(row), flush=True)
    if args.results:
        with args.results.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
