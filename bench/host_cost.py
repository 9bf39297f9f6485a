"""The host's cost of a training step, without a GPU: tunelab's loop over a model with a real model's
structure (its layer count and kinds) at tiny widths, on one CPU thread, so that the arithmetic is
next to nothing and the step time is what Python, autograd, dispatch and the compiled layers'
wrappers cost. On a GPU the host pays that (plus ~5 us per kernel launch) while the GPU computes; if
it approaches the GPU's time per step, the GPU waits for the host and CUDA graphs would pay.

    python bench/host_cost.py --model qwen0.5b --compile true|false [--compile-scope model] [--method lora]

Prints ms per step over steps 21-60 (4 short examples per step, one micro-batch).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import sft_speed


def host_ms_per_step(
    model_name: str,
    compile: bool,
    scope: str = "layers",
    steps: int = 60,
    inspect: Any = None,
    method: str = "full",
) -> float:
    """ms per step over the steps after the first third (at most 20 left out); `inspect` is given
    {"model": the model} (tests)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.config import TrainConfig
    from tunelab.training import compiling
    from tunelab.training.loop import train

    spec = dict(sft_speed.MODELS[model_name])
    arch = spec.pop("arch")
    heads, kv = spec["num_attention_heads"], spec["num_key_value_heads"]
    # The real layer count, head counts and vocabulary kind; widths of 2 per head, 32 for the MLP.
    spec.update(hidden_size=2 * heads, intermediate_size=32, vocab_size=512, num_key_value_heads=kv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, **spec, max_position_embeddings=4096)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    if (
        method == "lora"
    ):  # every linear layer adapted, as bench/sft_speed.py's LoRA (r 2: the widths are tiny)
        from tunelab.models import apply_lora

        model = apply_lora(model, "lora", 2, 4, 0.0, "all-linear", [])
    if inspect is not None:
        inspect({"model": model})
    examples = sft_speed.make_examples(4 * steps, 512, short=True)
    train_cfg = TrainConfig(
        lr=1e-5, max_steps=steps, batch_size=4, log_every=1, eval_every=0, warmup_ratio=0.0, compile=compile
    )
    before, compiling.SCOPE = compiling.SCOPE, scope
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train(model, None, examples, [], train_cfg, Path(tmp), quiet=True, save=False)
            lines = (Path(tmp) / "metrics.jsonl").read_text().splitlines()
    finally:
        compiling.SCOPE = before
    records = [r for r in map(json.loads, lines) if "loss" in r and r["step"] > min(20, steps // 3)]
    return 1000 * sum(r["tokens"] / r["tokens_per_s"] for r in records) / len(records)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(sft_speed.MODELS), default="qwen0.5b")
    p.add_argument("--compile", choices=["true", "false"], default="true")
    p.add_argument("--compile-scope", choices=["layers", "model"], default="layers")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--method", choices=["full", "lora"], default="full")
    args = p.parse_args()
    ms = host_ms_per_step(
        args.model, args.compile == "true", args.compile_scope, args.steps, method=args.method
    )
    print(json.dumps({"model": args.model, "method": args.method, "compile": args.compile,
                      "scope": args.compile_scope, "host_ms_per_step": round(ms, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
