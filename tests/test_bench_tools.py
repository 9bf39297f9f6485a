"""bench/: the speed benchmark runs (the GPU call cannot find out it is broken for us, at a price of
device time) and its summary puts each line beside the peer's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import summarize  # noqa: E402


def test_summary_of_the_recorded_h200_run_puts_tunelab_beside_the_peer():
    ours, peers = summarize.load(BENCH / "results" / "h200_2026-11-26")
    assert set(peers) == {"qwen0.5b", "llama1b"} and len(ours) == 2
    text = summarize.table(ours, peers)
    assert "| qwen0.5b | tunelab_full_compile | 86,476 | 4.45 |" in text
    assert "llama1b full finetune: 63,222 real tokens/s, target 55,000 (115%); 4.58x the peer" in text


def test_summary_of_the_h100_run_uses_bench_md_peer_figures_and_says_so():
    """The 2026-11-26 H100 call ran out of device time before the peer: its ratios are against
    BENCH.md's H100 figures for TRL + Liger, labelled as not re-run; both qwen0.5b runs are reported."""
    ours, peers = summarize.load(BENCH / "results" / "h100_2026-11-26")
    assert peers["qwen0.5b"]["source"] == "BENCH.md" and peers["llama1b"]["real_tokens_per_s"] == 13_346
    text = summarize.table(ours, peers)
    assert "| qwen0.5b | trl_pack_liger (checkpointing) (BENCH.md, H100) | 19,693 | 1.00 |" in text
    assert (
        "qwen0.5b full finetune (run 1 of 2): 88,711 real tokens/s, target 80,000 (111%); 4.50x the peer (BENCH.md"
        in text
    )
    assert "qwen0.5b full finetune (run 2 of 2): 97,128" in text
    assert "qwen0.5b LoRA r=16: 72,199 real tokens/s, 0.74-0.81x our full finetune" in text
    assert "qwen0.5b peak memory with checkpointing: 4.59 GiB, 0.87x the peer with checkpointing" in text
    # the cold-cache run's warm-up (the first call's) and the warm one's, each against the eager line
    assert (
        "(22.1 s more warm-up, 1.57x the speed)" in text and "(3.7 s more warm-up, 1.72x the speed)" in text
    )
    # an H200 call's peer is never replaced by BENCH.md's H100 figure
    h200, h200_peers = summarize.load(BENCH / "results" / "h200_2026-11-26")
    assert all("source" not in p for p in h200_peers.values())


def test_a_failed_line_is_shown_as_failed(tmp_path):
    (tmp_path / "gpu.jsonl").write_text(json.dumps({"config": "tunelab_full", "error": "KeyError: 'gqa'"}))
    text = summarize.table(*summarize.load(tmp_path))
    assert "failed: \"KeyError: 'gqa'\"" in text and "target" not in text


def test_sft_speed_runs_the_loop_and_writes_its_line(tmp_path):
    out = tmp_path / "gpu.jsonl"
    cmd = [sys.executable, str(BENCH / "sft_speed.py"), "--model", "world", "--batch", "8", "--steps", "10"]
    run = subprocess.run([*cmd, "--method", "full", "--results", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert "error" not in row, row
    assert row["config"] == "tunelab_full" and row["timed_steps"] == 2  # steps 9-10
    assert row["real_tokens_per_s"] > 0 and row["real_tokens_per_step"] > 0
    assert "| world | tunelab_full |" in summarize.table(*summarize.load(tmp_path))


def test_the_summary_says_from_how_many_tokens_compiling_pays(tmp_path):
    rows = [
        {"config": "tunelab_full_compile", "model": "m", "real_tokens_per_s": 100_000, "overhead_s": 22.0},
        {"config": "tunelab_full", "model": "m", "real_tokens_per_s": 50_000, "overhead_s": 2.0},
    ]
    (tmp_path / "gpu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = summarize.table(*summarize.load(tmp_path))
    # 20 s more warm-up; 1/50k - 1/100k = 10 us saved per token: 2M tokens, 40 s at 50k/s
    assert (
        "m: compiling pays from 2,000,000 real tokens per run, 40 s of steps uncompiled (compiling.WORTH_S) "
        "(20.0 s more warm-up, 2.00x the speed)" in text
    )


def test_the_memory_estimate_counts_weights_and_adamw_state_and_sees_checkpointing_save():
    import memory_estimate

    from tunelab.training import attention

    kernel_applies = attention._kernel_applies
    full = memory_estimate.estimate("world", 8, 16384, steps=2)
    assert attention._kernel_applies is kernel_applies  # the stand-ins are gone: tests go on in this process
    n = full["parameters"]
    weights, state = full["parts_bytes"]["param"], full["parts_bytes"]["opt"]
    assert weights == 2 * n  # bf16; the tied embedding and head counted once
    assert 4 * n <= state <= 4 * n + 4 * 64  # two bf16 moments, and a step count per tensor
    checkpointed = memory_estimate.estimate("world", 8, 16384, gradient_checkpointing=True, steps=2)
    assert checkpointed["parts_bytes"]["act"] < full["parts_bytes"]["act"] / 2
    lora = memory_estimate.estimate("world", 8, 16384, method="lora", steps=2)
    trained = lora["trained_parameters"]
    assert (
        trained < n / 10 and 8 * trained <= lora["parts_bytes"]["opt"] <= 8 * trained + 4 * 200
    )  # fp32 adapters


def test_the_gpu_timeline_splits_idle_time_into_launch_gaps_and_stalls():
    import sft_speed

    us = [(0, 100), (110, 200), (150, 250), (1250, 1300), (200_000, 200_050)]  # overlap; 1 ms; setup
    shares = sft_speed.timeline_shares(us)
    # busy 100 + 90 + 50 (the overlap once) + 50 + 50; a 10 us launch gap; a 1 ms stall; the 198.7 ms
    # setup gap left out
    assert shares == {
        "gpu_busy_share": round(340 / 1350, 3),
        "gpu_launch_gap_share": round(10 / 1350, 3),
        "gpu_stall_share": round(1000 / 1350, 3),
        "kernels": 5,
    }
    row = {"config": "tunelab_full_compile", "model": "m", "real_tokens_per_s": 1, **shares}
    (row_line,) = [x for x in summarize.table([row], {}).splitlines() if "| m |" in x]
    assert row_line.endswith(f"| {shares['gpu_busy_share']} (0.007, 0.741) |")


def test_the_gpu_profile_splits_kernel_time_by_kind():
    import sft_speed

    named = [
        ("sm90_xmma_gemm_bf16bf16_bf16f32", 50.0),
        ("sm90_xmma_gemm_bf16bf16_bf16f32", 30.0),
        ("triton_poi_fused_add_mul_0", 10.0),
        ("void at::native::vectorized_elementwise_kernel<4, ...>", 6.0),
        ("flash_fwd_kernel", 3.0),
        ("something_else", 1.0),
    ]
    got = sft_speed.kernel_shares(named, steps=2, top=2)
    assert got["kernel_time_by_kind"] == {
        "matmul": 0.8, "triton (compiled)": 0.1, "elementwise": 0.06, "attention": 0.03, "other": 0.01,
    }  # fmt: skip
    assert got["top_kernels"] == [
        ["sm90_xmma_gemm_bf16bf16_bf16f32", 0.8, 1.0],
        ["triton_poi_fused_add_mul_0", 0.1, 0.5],
    ]
    assert sft_speed.kernel_shares([], steps=1) == {}
    timed = [(0, 100, "a"), (150, 200, "b"), (700, 800, "c"), (2000, 2100, "c"), (90_000, 90_100, "d")]
    # 50 us before b: a launch gap; 500 us before c and 1,200 before the second c: stalls; 87.9 ms
    # before d: setup, left out
    assert sft_speed.stalls_before(timed, steps=2) == {"stalls_before_ms_per_step": [["c", 0.85]]}
    row = {"config": "tunelab_lora_compile", "model": "m", "real_tokens_per_s": 1, **got}
    row.update(sft_speed.stalls_before(timed, steps=2))
    assert "m tunelab_lora_compile kernel time: matmul 80%, triton (compiled) 10%, elementwise 6%" in (
        summarize.table([row], {})
    ) and "stalls before (per step): c 0.85 ms" in summarize.table([row], {})


def test_the_summary_puts_lora_beside_full_and_memory_beside_the_peer_like_with_like(tmp_path):
    rows = [
        {"config": "tunelab_full_compile", "model": "qwen0.5b", "real_tokens_per_s": 80_000, "peak_mem_GiB": 19.6},
        {"config": "tunelab_lora_compile", "model": "qwen0.5b", "real_tokens_per_s": 112_000, "peak_mem_GiB": 15.0},
        {"config": "tunelab_full_compile_gc", "model": "qwen0.5b", "real_tokens_per_s": 60_000, "peak_mem_GiB": 4.9},
    ]  # fmt: skip
    (tmp_path / "gpu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    peer = {"config": "trl_pack_liger", "model": "qwen0.5b", "grad_ckpt": True, "real_tokens_per_s": 20_000}
    (tmp_path / "peer_qwen0.5b.log").write_text("RESULT " + json.dumps({**peer, "peak_mem_GiB": 5.34}) + "\n")
    text = summarize.table(*summarize.load(tmp_path))
    assert "qwen0.5b LoRA r=16: 112,000 real tokens/s, 1.40x our full finetune, target 1.3x" in text
    assert (
        "qwen0.5b peak memory with checkpointing: 4.9 GiB, 0.92x the peer with checkpointing measured here: 5.34"
        in text
    )
    assert (
        "peak memory without checkpointing: 19.6 GiB, 0.61x the peer without checkpointing (BENCH.md, H100)"
        in text
    )
    assert "predicted 4.89 GiB" in text  # bench/results/memory_estimate.jsonl


def test_host_cost_times_the_loop_over_a_real_models_structure_at_tiny_widths():
    import host_cost

    from tunelab.models import decoder_layers

    seen = {}
    real = host_cost.sft_speed.MODELS["world"]
    ms = host_cost.host_ms_per_step("world", compile=False, steps=6, inspect=seen.update)
    assert 0 < ms < 5_000
    model = seen["model"]
    assert len(decoder_layers(model)) == real["num_hidden_layers"]  # the structure kept
    assert model.config.num_attention_heads == real["num_attention_heads"]
    assert model.config.hidden_size == 2 * real["num_attention_heads"]  # the widths not
