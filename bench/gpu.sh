#!/usr/bin/env bash
# One call on the GPU machine: tunelab's SFT speed beside the peers (BENCH.md), every line to $OUT.
# NOT YET RUN: written in a session without a GPU, for the first session that has one.
#
# Here, before the call:
#   echo /.peers/ >> .git/info/exclude; cp -r ../shared/bench .peers
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .peers/whl \
#       trl datasets dill multiprocess liger-kernel rich pyyaml
# Then: device run(command="bash bench/gpu.sh", carry=[".peers"])
set -u
out=${OUT:-/tmp/tunelab-bench}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
# The image has torch/transformers/peft/accelerate; add what tunelab needs beyond them, offline.
python3 -m pip install -q --no-index --no-deps --find-links .peers/whl rich pyyaml 2>/dev/null
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
res="$out/gpu.jsonl"
# ~16k real tokens per optimizer step, like the peers (44 examples x 368 tokens).
for model in qwen0.5b llama1b; do
  for extra in "" "--compile" "--attn flex_attention" "--gradient-checkpointing" "--method lora"; do
    timeout 300 python3 bench/sft_speed.py --model "$model" --batch 44 --micro-batch-tokens 16384 \
      $extra --results "$res" 2>&1 | tail -2
  done
done
OUT="$out" STEPS=40 bash .peers/run_peers.sh .peers/whl "trl_pack_liger qwen0.5b" "trl_pack_liger llama1b" \
  | tee "$out/peers.txt"
# QLoRA and other CUDA-only tests (issue 5), if bitsandbytes is in .peers/whl:
python3 -m pip install -q --no-index --no-deps --find-links .peers/whl bitsandbytes 2>/dev/null \
  && timeout 300 python3 -m pytest -q -m gpu tests 2>&1 | tail -5 | tee "$out/gpu-tests.txt"
