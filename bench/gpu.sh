#!/usr/bin/env bash
# tunelab's SFT speed beside the peers (BENCH.md) on the GPU machine, every line to $OUT.
# NOT YET RUN: written in sessions without a GPU, for the first session that has one.
#
# Here, before the calls (on the development machine, not the GPU one):
#   bash bench/gpu.sh stage      # .peers/ = ../shared/bench + the wheels the GPU image lacks
# Then one device call per part, in this order (each fits the 10-minute limit; the machine stays warm
# between calls; the session's 30 device minutes cover the first four):
#   run(command="bash bench/gpu.sh qwen0.5b", carry=[".peers"])  # full + LoRA (compiled), full with checkpointing
#   run(command="bash bench/gpu.sh llama1b", carry=[".peers"])
#   run(command="bash bench/gpu.sh peers", carry=[".peers"])     # TRL + Liger, both shapes
#   run(command="bash bench/gpu.sh tests", carry=[".peers"])     # QLoRA, varlen kernel: CUDA-only tests
#   run(command="bash bench/gpu.sh ablations", carry=[".peers"]) # if time is left: round-to-nearest AdamW,
#          # PEFT's LoRA forward, eager, dense mask, plain head, flex on qwen0.5b (`ablations llama1b` for the other)
#
# DRY=1 bash bench/gpu.sh qwen0.5b|tests  runs the same commands on a CPU machine with the world model
# for a few steps, to check the plumbing before GPU time is spent on it.
set -u
part=${1:?usage: bash bench/gpu.sh stage|qwen0.5b|llama1b|peers|tests|ablations [MODEL]}
if [ "$part" = stage ]; then
  grep -qx '/.peers/' .git/info/exclude || echo /.peers/ >> .git/info/exclude
  rm -rf .peers && cp -r ../shared/bench .peers
  # Python 3.12 wheels for the GPU image (BENCH.md's list, plus bitsandbytes for the QLoRA test).
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
    -d .peers/whl trl datasets dill multiprocess liger-kernel bitsandbytes
  ls .peers/whl; du -sh .peers
  exit
fi
out=${OUT:-/tmp/tunelab-bench}
mkdir -p "$out"
dry=${DRY:-}
# ~16k real tokens per optimizer step, like the peers (44 examples x 368 tokens).
shape() { if [ -n "$dry" ]; then echo --model world --batch 16 --steps 10; else
  echo --model "$1" --batch 44 --micro-batch-tokens 16384; fi; }
[ -n "$dry" ] || nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
# The image has torch, transformers, peft, accelerate, rich, pyyaml: tunelab runs from src/ as it is.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
res="$out/gpu.jsonl"
case "$part" in
  qwen0.5b|llama1b)
    # Defaults (compile on CUDA, packed varlen attention): full and LoRA; then full with activation
    # checkpointing, the like-for-like memory comparison with TRL's default.
    # --profile: the share of step time the GPU is busy (near 1: CUDA graphs could not help).
    timeout 300 python3 bench/sft_speed.py $(shape "$part") --profile --results "$res" 2>&1 | tail -2
    timeout 200 python3 bench/sft_speed.py $(shape "$part") --method full --gradient-checkpointing \
      --results "$res" 2>&1 | tail -1 ;;
  ablations)
    # Each choice changed alone: torch's fused AdamW rounding to the nearest instead of stochastic
    # rounding (the cost of the correct update); LoRA through PEFT's own forward (fp32 adapter branch)
    # instead of the one-addmm forward; then full finetune eager, the dense-mask path, the model's own
    # head (fp32 logits at every trained position), flex attention. One shape per call (`ablations
    # llama1b`): twelve runs of up to 100 s would not fit one call's 10 minutes.
    for model in ${2:-qwen0.5b}; do
      variants=("--method full --bf16-rounding nearest" "--method lora --lora-forward peft"
                "--method full --compile false" "--method full --attention mask" "--method full --head plain")
      [ -n "$dry" ] || variants+=("--method full --attn flex_attention --attention mask")  # no CPU backward
      for extra in "${variants[@]}"; do
        timeout 95 python3 bench/sft_speed.py $(shape "$model") $extra --results "$res" 2>&1 | tail -1
      done
    done ;;
  peers)
    OUT="$out" STEPS=40 bash .peers/run_peers.sh .peers/whl "trl_pack_liger qwen0.5b" "trl_pack_liger llama1b" \
      | tee "$out/peers.txt" ;;
  tests)
    python3 -m pip install -q --no-index --no-deps --find-links .peers/whl bitsandbytes 2>/dev/null
    # The CUDA-only tests, QLoRA + its fast LoRA forward (on CUDA here; on bitsandbytes' CPU kernels
    # elsewhere), and the optimizer's CUDA path.
    { timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -8
      timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_adapters.py tests/test_lora_fast.py \
        -k "qlora or 4bit" 2>&1 | tail -8
      # bf16 AdamW on CUDA: the Triton kernel against the list path and the exact update.
      timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_optim.py 2>&1 | tail -8
    } | tee "$out/gpu-tests.txt" ;;
esac
