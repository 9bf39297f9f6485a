"""One table from a bench/gpu.sh call: tunelab's lines beside the peer's (TRL+Liger on a GPU), ratios and
BENCH.md's targets.

    python bench/summarize.py OUT_DIR      # gpu.jsonl (tunelab) and peer_*.log (RESULT lines)

Printed at the end of the call, so the figures are in the call's output even if no file comes back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {"qwen0.5b": 80_000, "llama1b": 55_000}  # BENCH.md: full finetune, real tokens/s
TIMES_PEER = 4  # BENCH.md: >= 4x TRL SFTTrainer (packing + Liger) on the same machine
LORA_TIMES_FULL = 1.3  # BENCH.md: LoRA r=16 >= 1.3x our own full finetune
# BENCH.md (H100): TRL + Liger's peak without activation checkpointing (its default has it on).
PEER_PEAK_NO_CHECKPOINTING = {"qwen0.5b": 31.9}
# BENCH.md's TRL + Liger figures on an H100 (2026-11-25, its default: activation checkpointing on). Used
# only for a call on an H100 in which the peer did not run, and labelled so.
BENCH_H100_PEER = {
    "qwen0.5b": {
        "config": "trl_pack_liger",
        "real_tokens_per_s": 19_693,
        "peak_mem_GiB": 5.3,
        "grad_ckpt": True,
    },
    "llama1b": {
        "config": "trl_pack_liger",
        "real_tokens_per_s": 13_346,
        "peak_mem_GiB": 11.5,
        "grad_ckpt": True,
    },
}
# bench/memory_estimate.py's predictions, to check against what was measured.
PREDICTED = Path(__file__).resolve().parent / "results" / "memory_estimate.jsonl"


def load(out: Path) -> tuple[list[dict], dict[str, dict]]:
    """tunelab's lines and the peer's, by model. On an H100, a model whose peer did not run in the call
    gets BENCH.md's H100 figure for it, marked `"source": "BENCH.md"` (said so in the table)."""
    lines = (out / "gpu.jsonl").read_text().splitlines() if (out / "gpu.jsonl").exists() else []
    ours = [json.loads(line) for line in lines if line.strip()]
    peers = {}
    for log in sorted(out.glob("peer_*.log")):
        for line in log.read_text().splitlines():
            if line.startswith("RESULT "):
                row = json.loads(line[len("RESULT ") :])
                peers[row["model"]] = row
    for row in ours:
        model = row.get("model")
        if "H100" in str(row.get("device", "")) and model in BENCH_H100_PEER and model not in peers:
            peers[model] = {**BENCH_H100_PEER[model], "model": model, "source": "BENCH.md"}
    return ours, peers


def _where(peer: dict) -> str:
    return "(BENCH.md's H100 figure, not re-run in this call)" if peer.get("source") else "measured here"


def _timeline(row: dict) -> str:
    """The GPU's time: busy share, then (where measured) the idle shares between launches and stalled."""
    busy = row.get("gpu_busy_share", "")
    if "gpu_launch_gap_share" in row:
        return f"{busy} ({row['gpu_launch_gap_share']}, {row['gpu_stall_share']})"
    return f"{busy}"


def table(ours: list[dict], peers: dict[str, dict]) -> str:
    lines = [
        "| model | configuration | real tokens/s | × the peer | MFU | peak GiB | overhead s | GPU busy (launch gaps, stalls) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, peer in peers.items():
        lines.append(
            f"| {model} | {peer['config']}{' (checkpointing)' if peer.get('grad_ckpt') else ''}"
            f"{' (BENCH.md, H100)' if peer.get('source') else ''} | "
            f"{peer['real_tokens_per_s']:,} | 1.00 | {peer.get('mfu_6N_vs_989T')} | {peer.get('peak_mem_GiB')} | | |"
        )
    for row in ours:
        if "error" in row:
            lines.append(
                f"| {row.get('model', '?')} | {row['config']} | failed: {row['error'][-120:]!r} | | | | | |"
            )
            continue
        peer = peers.get(row["model"])
        ratio = f"{row['real_tokens_per_s'] / peer['real_tokens_per_s']:.2f}" if peer else ""
        lines.append(
            f"| {row['model']} | {row['config']} | {row['real_tokens_per_s']:,} | {ratio} | "
            f"{row.get('mfu_6N_vs_989T')} | {row.get('peak_mem_GiB')} | {row.get('overhead_s', '')} | "
            f"{_timeline(row)} |"
        )
    lines.append("")
    for model, target in TARGETS.items():
        full = [r for r in ours if r.get("model") == model and r.get("config") == "tunelab_full_compile"]
        for i, row in enumerate(full):
            got = row["real_tokens_per_s"]
            run = f" (run {i + 1} of {len(full)})" if len(full) > 1 else ""
            line = (
                f"{model} full finetune{run}: {got:,} real tokens/s, target {target:,} ({got / target:.0%})"
            )
            if model in peers:
                times = got / peers[model]["real_tokens_per_s"]
                line += (
                    f"; {times:.2f}x the peer {_where(peers[model])}, target {TIMES_PEER}x "
                    f"({times / TIMES_PEER:.0%})"
                )
            lines.append(line)
    lines += _lora_and_memory(ours, peers)
    for row in ours:  # --profile: where the kernel time goes, and what the GPU stalled waiting for
        if "kernel_time_by_kind" in row:
            kinds = ", ".join(f"{k} {v:.0%}" for k, v in row["kernel_time_by_kind"].items())
            stalls = "; ".join(f"{n} {ms} ms" for n, ms in row.get("stalls_before_ms_per_step", []))
            lines.append(
                f"{row['model']} {row['config']} kernel time: {kinds}; stalls before (per step): {stalls}"
            )
    for model in sorted({r.get("model") for r in ours}):
        rows = {r["config"]: r for r in ours if r.get("model") == model and "error" not in r}
        eager = rows.get("tunelab_full")
        runs = [r for r in ours if r.get("model") == model and r.get("config") == "tunelab_full_compile"]
        for compiled in runs if eager else []:  # each compiled run: the first one's warm-up is cold
            if compiled["real_tokens_per_s"] <= eager["real_tokens_per_s"]:
                continue
            # compile: auto pays from this many tokens per run: its extra warm-up over the time it saves per token
            saved = 1 / eager["real_tokens_per_s"] - 1 / compiled["real_tokens_per_s"]
            extra = compiled["overhead_s"] - eager["overhead_s"]
            tokens = max(extra, 0) / saved
            lines.append(
                f"{model}: compiling pays from {tokens:,.0f} real tokens per run, "
                f"{tokens / eager['real_tokens_per_s']:.0f} s of steps uncompiled (compiling.WORTH_S) "
                f"({extra:.1f} s more warm-up, {compiled['real_tokens_per_s'] / eager['real_tokens_per_s']:.2f}x the speed)"
            )
    return "\n".join(lines)


def _predicted(model: str, checkpointing: bool) -> float | None:
    """bench/memory_estimate.py's latest prediction for the full finetune at 16,384-token micro-batches."""
    if not PREDICTED.exists():
        return None
    found = None
    for line in PREDICTED.read_text().splitlines():
        row = json.loads(line)
        if (row["model"], row["method"], row["gradient_checkpointing"], row["micro_batch_tokens"]) == (
            model, "full", checkpointing, 16384,
        ):  # fmt: skip
            found = row["predicted_peak_GiB"]
    return found


def _lora_and_memory(ours: list[dict], peers: dict[str, dict]) -> list[str]:
    """LoRA against our full finetune (target LORA_TIMES_FULL), and peak memory like with like: with
    activation checkpointing against the peer's default (it checkpoints), without against the peer
    without; each beside bench/memory_estimate.py's prediction where there is one."""
    lines = []
    for model in sorted({r.get("model") for r in ours if "error" not in r}):
        rows = {r["config"]: r for r in ours if r.get("model") == model and "error" not in r}
        fulls = [r["real_tokens_per_s"] for r in ours if r.get("model") == model and r.get("config") == "tunelab_full_compile"]  # fmt: skip
        lora = rows.get("tunelab_lora_compile")
        if fulls and lora:
            lo, hi = (lora["real_tokens_per_s"] / f for f in (max(fulls), min(fulls)))
            times = f"{hi:.2f}x" if lo == hi else f"{lo:.2f}-{hi:.2f}x"
            lines.append(
                f"{model} LoRA r=16: {lora['real_tokens_per_s']:,} real tokens/s, {times} our full "
                f"finetune, target {LORA_TIMES_FULL}x"
            )
        peer = peers.get(model, {})
        for config, checkpointing in (("tunelab_full_compile_gc", True), ("tunelab_full_compile", False)):
            row = rows.get(config)
            if not row or row.get("peak_mem_GiB") is None:
                continue
            ours_gib = row["peak_mem_GiB"]
            if checkpointing:
                theirs = peer.get("peak_mem_GiB") if peer.get("grad_ckpt") else None
                where = f"the peer with checkpointing {_where(peer)}:"
            else:
                theirs = PEER_PEAK_NO_CHECKPOINTING.get(model)
                where = "the peer without checkpointing (BENCH.md, H100):"
            line = (
                f"{model} peak memory {'with' if checkpointing else 'without'} checkpointing: {ours_gib} GiB"
            )
            if theirs:
                line += f", {ours_gib / theirs:.2f}x {where} {theirs} GiB"
            predicted = _predicted(model, checkpointing)
            if predicted is not None:
                line += f"; predicted {predicted} GiB (eager, bench/memory_estimate.py)"
            lines.append(line)
    return lines


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tunelab-bench")
    print(table(*load(out)))
