"""SFT training speed on BENCH.md's workload: tunelab's loop, and the peers side by side.

    python bench/sft_speed.py --model world --batch 16 --peers ../shared/bench   # CPU, 2 cores
    python bench/sft_speed.py --model qwen0.5b --batch 44                        # GPU (bench/gpu.sh)

Full finetune and LoRA r=16 by default (`--method full|lora|full,lora`); each line reports real
tokens/s, MFU (GPU) and peak memory (CUDA allocations on a GPU, the process's peak RSS on a CPU).
Random-weight models with the shapes of real small LLMs (speed does not depend on the values) and
synthetic SFT examples with the peers' length distribution (same generator, same seed), loss on the
response only. The figure is real (non-pad) tokens per second over steps 9-40, as the peers measure.
Each configuration runs in its own process so one cannot warm or fragment memory for another.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "qwen0.5b": dict(arch="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "llama1b": dict(arch="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "world": dict(arch="llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, intermediate_size=640, vocab_size=4096, tie_word_embeddings=True),
}  # fmt: skip
WARM = 8


def make_examples(n: int, vocab: int, short: bool, seed: int = 0, max_len: int = 2048):
    """The peers' generator (log-normal prompt and response lengths), so both sides see the same data."""
    import torch

    from tunelab.data.tokenize import IGNORE, Encoded

    g = torch.Generator().manual_seed(seed)
    mp, mr, sp, sr = (2.6, 2.3, 0.2, 0.2) if short else (4.8, 4.9, 0.8, 0.9)
    out = []
    for _ in range(n):
        p = int(min(max_len // 2, max(4, math.exp(torch.randn(1, generator=g).item() * sp + mp))))
        r = int(min(max_len - p, max(2, math.exp(torch.randn(1, generator=g).item() * sr + mr))))
        ids = torch.randint(100, vocab - 100, (p + r,), generator=g).tolist()
        out.append(Encoded(ids, [IGNORE] * p + ids[p:]))
    return out


def run_tunelab(args: argparse.Namespace) -> dict:
    import torch
    import torch._dynamo.utils
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.config import TrainConfig
    from tunelab.models import apply_lora, count_parameters, pick_dtype
    from tunelab.training import attention, compiling
    from tunelab.training import lora as lora_module
    from tunelab.training import loss as loss_module
    from tunelab.training.loop import train

    spec = dict(MODELS[args.model])
    arch = spec.pop("arch")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.attention == "mask":
        attention.supported = lambda model: False  # keep transformers' own SDPA + dense mask
    if args.head == "plain":
        loss_module._returns_head_output = lambda base, head: False  # keep the model's own head
    compiling.HEAD = args.head != "fused-eager"
    if args.head_chunk:  # the fused head's chunk: a budget of fp32 logits that gives this many positions
        loss_module.LOGITS_BUDGET = args.head_chunk * spec["vocab_size"]
        loss_module.MIN_CHUNK = args.head_chunk
    compiling.SCOPE = args.compile_scope
    if args.lora_forward == "peft":
        lora_module._layers = lambda model: []  # every LoRA layer keeps PEFT's forward
    if args.lora_forward == "single":
        lora_module._siblings_of = lambda model, layers: []  # no A matmul shared between siblings
    cfg = AutoConfig.for_model(arch, **spec, max_position_embeddings=4096)
    torch.manual_seed(0)
    with device:  # the random weights made where they are used: no init on the host, no copy
        model = AutoModelForCausalLM.from_config(
            cfg, dtype=pick_dtype("auto", device), attn_implementation=args.attn
        )
    if args.method != "full":
        model = apply_lora(model, args.method, 16, 32, args.lora_dropout, "all-linear", [])
        if args.lora_dtype == "model":  # the adapters in the base's dtype: no casts, bf16 AdamW
            dtype = next(p for p in model.parameters() if not p.requires_grad).dtype
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(dtype)
    examples = make_examples(4000, spec["vocab_size"], short=args.model == "world")
    # --eval-every: a run as users run it, evaluating (its time is in overhead_s, its graphs in graphs)
    held_out = (
        make_examples(200, spec["vocab_size"], short=args.model == "world", seed=1) if args.eval_every else []
    )
    train_cfg = TrainConfig(
        lr=1e-5, max_steps=args.steps, batch_size=args.batch, micro_batch_tokens=args.micro_batch_tokens,
        log_every=1, eval_every=args.eval_every, warmup_ratio=0.0, grad_clip=1.0, compile={"auto": "auto", "true": True, "false": False}[args.compile],
        gradient_checkpointing=args.gradient_checkpointing, method=args.method, bf16_rounding=args.bf16_rounding,
    )  # fmt: skip
    # Asked to compile (true; under auto the loop may decide against it for a short run, or fall
    # back where compiling fails); result.compiled: what it did.
    wanted = train_cfg.compile is True
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        torch._dynamo.utils.counters.clear()
        result = train(model, None, examples, held_out, train_cfg, Path(tmp), quiet=True, save=False)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        wall = time.perf_counter() - started
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    timeline = gpu_timeline(model, examples, train_cfg) if args.profile and device.type == "cuda" else {}
    steps = [r for r in records if "loss" in r and r["step"] > WARM]
    tokens = sum(r["tokens"] for r in steps)
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in steps)
    _, total = count_parameters(model)
    tps = tokens / seconds
    return {
        "config": f"tunelab_{args.method}"
        + ("_compile" if result.compiled else "_compilefailed" if wanted else "")
        + ("_whole" if result.compiled and args.compile_scope == "model" else "")
        + ("_mask" if args.attention == "mask" else "")
        + ("_plainhead" if args.head == "plain" else "")
        + ("_eagerheadbody" if args.head == "fused-eager" and result.compiled else "")
        + (f"_chunk{args.head_chunk}" if args.head_chunk else "")
        + (f"_{args.attn}" if args.attn != "sdpa" else "")
        + ("_gc" if args.gradient_checkpointing else "")
        + (f"_dropout{args.lora_dropout:g}" if args.method != "full" and args.lora_dropout else "")
        + ("_peftforward" if args.method != "full" and args.lora_forward == "peft" else "")
        + ("_nosiblings" if args.method != "full" and args.lora_forward == "single" else "")
        + ("_adaptersinmodeldtype" if args.method != "full" and args.lora_dtype == "model" else "")
        + ("_nearest" if args.bf16_rounding == "nearest" else "")
        + (f"_eval{args.eval_every}" if args.eval_every else ""),
        "model": args.model,
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()}",
        "examples_per_step": args.batch,
        "timed_steps": len(steps),
        "real_tokens_per_step": round(tokens / len(steps)),
        "real_tokens_per_s": round(tps),
        "mfu_6N_vs_989T": round(6 * total * tps / 989e12, 3) if device.type == "cuda" else None,
        # What the loop logs: CUDA allocations on a GPU, the process's peak RSS on a CPU.
        "peak_mem_GiB": round(max(r["peak_mem_gib"] for r in steps), 2),
        # train()'s wall time beyond what its steps would take at the steady speed: compiling, the
        # memory probe (GPU), setup. What a user waits for on top of the tokens.
        "overhead_s": round(wall - seconds / len(steps) * args.steps, 1),
        "mean_example_tokens": round(sum(len(e.input_ids) for e in examples) / len(examples), 1),
        **({"graphs": graphs} if result.compiled else {}),  # compiled graphs: each one a warm-up
        **timeline,
    }


def gpu_timeline(model, examples, cfg, steps: int = 8) -> dict:
    """Where the GPU's time goes over a few more steps of the warm model, under the profiler
    (`timeline_shares`): busy in kernels, idle for a launch (the host issuing kernels no faster than
    the GPU runs them: what CUDA graphs would win back), or idle for longer (the host waiting for
    the GPU, packing, Python between steps: what CUDA graphs of the layers would not)."""
    import dataclasses

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from tunelab.training.loop import train

    cfg = dataclasses.replace(cfg, max_steps=steps, seed=cfg.seed + 1)
    with tempfile.TemporaryDirectory() as tmp, profile(activities=[ProfilerActivity.CUDA]) as prof:
        train(model, None, examples, [], cfg, Path(tmp), quiet=True, save=False)
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    spans = [(e.time_range.start, e.time_range.end) for e in kernels]
    named = [(e.name, e.time_range.end - e.time_range.start) for e in kernels]
    timed = [(e.time_range.start, e.time_range.end, e.name) for e in kernels]
    return {**timeline_shares(spans), **kernel_shares(named, steps), **stalls_before(timed, steps)}


def stalls_before(kernels: list[tuple[float, float, str]], steps: int, top: int = 6) -> dict:
    """The stalls (idle gaps of 100 us to 50 ms, as `timeline_shares` counts them) by the kernel the
    GPU then waited for, in ms per step: the host's slow spots (a compiled layer's call, the loss head's
    chunks, the optimizer, the step's end) named by the first kernel each one launched."""
    waited: dict[str, float] = {}
    end = None
    for s, e, name in sorted(kernels):
        if end is not None and 100 <= s - end < 50_000:
            waited[name[:80]] = waited.get(name[:80], 0.0) + (s - end)
        end = e if end is None else max(end, e)
    ranked = sorted(waited.items(), key=lambda kv: -kv[1])[:top]
    return (
        {"stalls_before_ms_per_step": [[n, round(t / 1000 / steps, 2)] for n, t in ranked]} if ranked else {}
    )


# Kernel kinds by name, first match wins (cuBLAS/CUTLASS GEMMs, flash attention, Inductor's fused
# Triton kernels, tunelab's AdamW kernel, torch's own elementwise/reduction/copy kernels).
KINDS = [
    ("attention", ("flash", "fmha", "attention")),
    ("optimizer", ("adam", "_sr_", "update_many")),
    (
        "matmul",
        ("gemm", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "ampere_", "hopper", "splitk", "matmul"),
    ),
    ("triton (compiled)", ("triton",)),
    ("reduction", ("reduce", "norm")),
    ("copy", ("copy", "memcpy", "memset", "cat", "fill")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
]


def kernel_shares(named: list[tuple[str, float]], steps: int, top: int = 8) -> dict:
    """(kernel name, microseconds) -> the share of kernel time by kind (KINDS, else "other") and the
    `top` kernels by time, each with its share and calls per step: where a configuration's GPU time
    goes (LoRA's small matmuls and elementwise passes against the full finetune's, say)."""
    total = sum(t for _, t in named)
    if not total:
        return {}
    kinds: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for name, t in named:
        low = name.lower()
        kind = next((k for k, words in KINDS if any(w in low for w in words)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + t
        by_name.setdefault(name, []).append(t)
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "kernel_time_by_kind": {
            k: round(t / total, 3) for k, t in sorted(kinds.items(), key=lambda kv: -kv[1])
        },
        "top_kernels": [[n[:80], round(sum(ts) / total, 3), round(len(ts) / steps, 1)] for n, ts in ranked],
    }


def timeline_shares(
    spans: list[tuple[float, float]], launch_max_us: float = 100, setup_min_us: float = 50_000
) -> dict:
    """Kernel spans (start, end in us) -> the shares of the GPU's time busy, idle in gaps shorter than
    `launch_max_us` (launches) and idle in longer ones (stalls). Gaps of `setup_min_us` or more are
    left out: the new train() compiling its layers again (from the cache) and setting up, not steps."""
    busy = launch = stall = 0.0
    end = None
    for s, e in sorted(spans):
        if end is not None and s > end:
            gap = s - end
            if gap < launch_max_us:
                launch += gap
            elif gap < setup_min_us:
                stall += gap
        if end is None or e > end:
            busy += e - max(s, end) if end is not None else e - s
            end = e
    total = busy + launch + stall
    if not total:
        return {}
    return {
        "gpu_busy_share": round(busy / total, 3),
        "gpu_launch_gap_share": round(launch / total, 3),
        "gpu_stall_share": round(stall / total, 3),
        "kernels": len(spans),
    }


def run_peer(peers: Path, conf: str, model: str, batch: int, gc: str | None) -> dict:
    env = {**os.environ, "BATCH": str(batch), "STEPS": "40", "TOKENIZERS_PARALLELISM": "false"}
    if gc is not None:
        env["GC"] = gc
    proc = subprocess.run([sys.executable, str(peers / "peers_gpu.py"), conf, model], env=env,
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"config": conf, "error": (proc.stderr or proc.stdout)[-800:]}
    result = json.loads(line[len("RESULT ") :])
    result["examples_per_step"] = batch
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="world")
    p.add_argument("--batch", type=int, default=16, help="examples per optimizer step")
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=0, help="evaluate 200 held-out examples every N steps")
    p.add_argument(
        "--method", default="full,lora", help="full, lora (r=16, all linear layers) or both, comma-separated"
    )
    p.add_argument("--attn", default="sdpa")
    p.add_argument(
        "--compile",
        nargs="?",
        const="true",
        default="auto",
        choices=["auto", "true", "false"],
        help="train.compile: auto = the loop's rule (only for a run whose steps would take 1 minute uncompiled "
        "on CUDA, 5 on a CPU, which 40 steps do not: gpu.sh passes true), bare --compile = true",
    )
    p.add_argument(
        "--attention",
        choices=["packed", "mask"],
        default="packed",
        help="packed = tunelab's per-example varlen attention (default); mask = SDPA with the dense "
        "block-diagonal mask transformers builds (the path before it)",
    )
    p.add_argument(
        "--head",
        choices=["fused", "fused-eager", "plain"],
        default="fused",
        help="fused = the loss computed in a fused output head, a chunk at a time (default; compiled runs "
        "compile its chunk body); fused-eager = the same, its chunk body eager; plain = the model's own "
        "head, fp32 logits at every trained position, then cross-entropy",
    )
    p.add_argument(
        "--head-chunk",
        type=int,
        default=0,
        help="positions per chunk of the fused head (0 = its rule: 2**25 fp32 logits, at least 256). On a "
        "GPU each chunk reads the whole head weight three times (logits, input gradient, weight "
        "gradient): at 256 positions of a 151,936 vocabulary that traffic, not the arithmetic, bounds it",
    )
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (LoRA)")
    p.add_argument(
        "--bf16-rounding",
        choices=["stochastic", "nearest"],
        default="stochastic",
        help="how bf16 weights take AdamW's update (train.bf16_rounding): stochastic (default) or torch's "
        "fused AdamW, rounding to the nearest",
    )
    p.add_argument(
        "--lora-forward",
        choices=["fused", "single", "peft"],
        default="fused",
        help="fused = the adapter added inside one addmm, on CUDA sibling adapters (q/k/v, gate/up) sharing "
        "one A matmul (default); single = the same without the shared A matmul (on a CPU: the same as fused); "
        "peft = PEFT's own LoRA forward",
    )
    p.add_argument(
        "--lora-dtype",
        choices=["fp32", "model"],
        default="fp32",
        help="fp32 = the adapters in fp32, cast to the base's dtype in every forward (PEFT's default, "
        "tunelab's); model = the adapters in the base's dtype (bf16 on a GPU: no casts, updated by the "
        "bf16 AdamW with stochastic rounding, as torchtune and LitGPT keep them), to measure what the "
        "casts cost",
    )
    p.add_argument(
        "--compile-scope",
        choices=["layers", "model"],
        default="layers",
        help="compiled runs: each decoder layer in place (default) or the whole model as one graph",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="GPU only: also report the shares of the GPU's time busy, idle between launches and stalled, "
        "the kernel time by kind (matmul, attention, compiled Triton, elementwise, ...) and the top kernels",
    )
    p.add_argument(
        "--peers", type=Path, help="folder with the peers' peers_gpu.py: run them too, same machine"
    )
    p.add_argument("--peer-configs", default="hf_pad,trl_nopack", help="comma-separated peer configurations")
    p.add_argument("--only-tunelab", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--results", type=Path, help="append the JSON lines to this file")
    args = p.parse_args()
    if args.only_tunelab:
        print("RESULT " + json.dumps(run_tunelab(args)), flush=True)
        return
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if not methods or set(methods) - {"full", "lora"}:
        p.error(f"--method: expected full, lora or full,lora, got {args.method!r}")
    rows = []
    for method in methods:  # each in its own process
        cmd = [sys.executable, __file__, "--only-tunelab", "--model", args.model, "--batch", str(args.batch),
               "--micro-batch-tokens", str(args.micro_batch_tokens), "--steps", str(args.steps),
               "--eval-every", str(args.eval_every),
               "--method", method, "--attn", args.attn, "--compile", args.compile,
               "--attention", args.attention, "--head", args.head, "--head-chunk", str(args.head_chunk)]  # fmt: skip
        cmd += ["--gradient-checkpointing"] * args.gradient_checkpointing + ["--profile"] * args.profile
        cmd += ["--lora-dropout", str(args.lora_dropout), "--lora-forward", args.lora_forward]
        cmd += ["--lora-dtype", args.lora_dtype]
        cmd += ["--bf16-rounding", args.bf16_rounding, "--compile-scope", args.compile_scope]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        rows.append(
            json.loads(line[7:]) if line else {"config": f"tunelab_{method}", "error": proc.stderr[-800:]}
        )
    if args.peers:
        for conf in args.peer_configs.split(","):
            conf, _, gc = conf.partition(":")  # e.g. trl_nopack:0 = activation checkpointing off
            rows.append(run_peer(args.peers, conf, args.model, args.batch, gc or None))
    stamp = time.strftime("%Y-%m-%d %H:%M")
    for row in rows:
        row["when"] = stamp
        print(json.dumps(row), flush=True)
        if args.results:
            with args.results.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
