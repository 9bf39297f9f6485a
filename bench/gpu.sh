#!/usr/bin/env bash
# tunelab's SFT speed beside the peers (BENCH.md) and the CUDA-only tests, on the GPU machine, in ONE
# device call. Run 2026-11-26 on an H200 (bench/results/gpu_h200.md) and on an H100
# (bench/results/gpu_h100.md); the default order below puts what those runs did not settle first.
#
# A session gets 15 minutes of device time, the machine's start (a minute or more) included, and
# one command may run 10 minutes. So:
#   bash bench/gpu.sh stage                                  # here: .peers/ = ../shared/bench + wheels
#   run(command="bash bench/gpu.sh", carry=[".peers"], timeout_s=600)
# runs the items below in order of worth, each only while BUDGET (default 540 s) lasts, each under its
# own time limit, everything into $OUT: log.txt (all output), gpu.jsonl (tunelab's lines), the peers'
# logs, tests.txt, and summary.md (bench/summarize.py: every line beside the peer's, with the ratio,
# printed last). Items skipped for time are named at the end; `bash bench/gpu.sh ITEM ...` runs
# only those (a second call, if device time is left).
#
# DRY=1 bash bench/gpu.sh [ITEM ...]  runs the same items on a CPU machine with the world model for a
# few steps (peers: TRL without packing or Liger, which need CUDA), to check the plumbing first.
set -u
if [ "${1:-}" = stage ]; then
  grep -qx '/.peers/' .git/info/exclude || echo /.peers/ >> .git/info/exclude
  rm -rf .peers && cp -r ../shared/bench .peers && chmod -R u+w .peers
  # Python 3.12 wheels for the GPU image (BENCH.md's list, plus bitsandbytes for the QLoRA tests); trl and
  # liger-kernel pinned to the versions BENCH.md measured, so the peer stays the same peer.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
    -d .peers/whl trl==1.16.0 datasets dill multiprocess liger-kernel==0.8.5 bitsandbytes
  # bitsandbytes ships a library per CUDA release (43 MB); the image's torch is built for CUDA 13,
  # and the working tree that travels is limited to 64 MiB: keep the CUDA 13 and CPU libraries.
  python3 - .peers/whl/bitsandbytes-*.whl <<'EOF'
import sys, zipfile, re, os
src = sys.argv[1]; tmp = src + ".slim"
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[0-2]\d|rocm\d+)\.(so|dll|dylib)$")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if drop.search(item.filename):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):  # the dropped files out of the manifest too
            data = b"\n".join(l for l in data.split(b"\n") if not drop.search(l.split(b",")[0].decode()))
        zout.writestr(item, data)
os.replace(tmp, src)
EOF
  ls -la .peers/whl; du -sh .peers; git ls-files -z | du -ch --files0-from=- | tail -1  # what travels besides
  exit
fi

out=${OUT:-/tmp/tunelab-bench}
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
dry=${DRY:-}
deadline=$((SECONDS + ${BUDGET:-540}))
# The image has torch, transformers, peft, accelerate, rich, pyyaml: tunelab runs from src/ as it is.
# The peers' packages and bitsandbytes go to /tmp/site.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .peers/whl/*.whl 2>&1 | tail -2
export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -n "$dry" ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
res="$out/gpu.jsonl"
skipped=()

# item NAME LIMIT_S LOG|- COMMAND...: run COMMAND if at least 45 s of the budget are left, for at most
# LIMIT_S (or what is left); LOG: its output there, and its RESULT lines here.
item() {
  local name=$1 limit=$2 log=$3 left=$((deadline - SECONDS)) t0=$SECONDS rc
  shift 3
  if [ "$left" -lt 45 ]; then skipped+=("$name"); echo "== $name: skipped, ${left} s of the budget left"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s, $(date +%T))"
  if [ "$log" = - ]; then timeout "$limit" "$@"; rc=$?
  else timeout "$limit" "$@" > "$log" 2>&1; rc=$?; grep -h '^RESULT' "$log" || tail -5 "$log"; fi
  echo "== $name: rc=$rc after $((SECONDS - t0)) s"
}

# ~16k real tokens per optimizer step, like the peers (44 examples x 368 tokens; TRL: 4 x 4096 packed).
if [ -n "$dry" ]; then
  q=(--model world --batch 16 --steps 10); l=("${q[@]}"); peer=trl_nopack; pq=world; pl=world
  export STEPS=10 BATCH=16
else
  q=(--model qwen0.5b --batch 44 --micro-batch-tokens 16384); l=(--model llama1b --batch 44 --micro-batch-tokens 16384)
  peer=trl_pack_liger; pq=qwen0.5b; pl=llama1b
  export STEPS=40
fi
speed=(python3 bench/sft_speed.py --results "$res")
# Compiled, as `compile: auto` trains a run long enough to pay for the warm-up (40 steps are not);
# qwen_eager passes false after this.
[ -n "$dry" ] || speed+=(--compile true)

run_item() {
  case "$1" in
    # tunelab's defaults for a long run (compiled, packed varlen attention, fused head); --profile: the
    # shares of the GPU's time busy, idle between launches (what CUDA graphs could win back) and
    # stalled (the host between steps: what graphs of the layers could not).
    qwen_full) item "$1" 200 - "${speed[@]}" "${q[@]}" --method full --profile ;;
    qwen_peer) item "$1" 200 "$out/peer_$pq.log" python3 .peers/peers_gpu.py "$peer" "$pq" ;;
    # --profile: LoRA ran slower than the full finetune on the H100; busy, launch gaps or stalls, and
    # which kernels (kernel_time_by_kind, top_kernels: beside qwen_full's, where the time goes)?
    qwen_lora) item "$1" 150 - "${speed[@]}" "${q[@]}" --method lora --profile ;;
    # The whole loop on CUDA with its defaults (test_cuda_train), QLoRA and its fast LoRA forward on
    # CUDA, the varlen kernel, the bf16 optimizer's Triton kernel.
    # The quick ones first; -v: each result is in tests.txt as it comes, even if the limit cuts the run.
    tests) item "$1" 240 "$out/tests.txt" bash -c 'python3 -m pytest -q -p no:cacheprovider tests/test_optim.py;
      python3 -m pytest -q -p no:cacheprovider tests/test_adapters.py tests/test_lora_fast.py -k "qlora or 4bit";
      python3 -m pytest -v -p no:cacheprovider --durations=12 -m gpu tests' ;;
    llama_full) item "$1" 200 - "${speed[@]}" "${l[@]}" --method full ;;
    llama_peer) item "$1" 200 "$out/peer_$pl.log" python3 .peers/peers_gpu.py "$peer" "$pl" ;;
    # Eager: what compiling gains per token, against its warm-up (overhead_s), for `compile: auto`.
    qwen_eager) item "$1" 150 - "${speed[@]}" "${q[@]}" --method full --compile false ;;
    # Activation checkpointing: the like-for-like memory comparison with TRL's default (which uses it;
    # 5.34 / 11.51 GiB). Predicted without a GPU by bench/memory_estimate.py (bench/results/memory.md).
    qwen_gc) item "$1" 150 - "${speed[@]}" "${q[@]}" --method full --gradient-checkpointing ;;
    llama_gc) item "$1" 150 - "${speed[@]}" "${l[@]}" --method full --gradient-checkpointing ;;
    # The whole model as one graph: its warm-up (overhead_s) and steady speed against per-layer compile.
    qwen_whole) item "$1" 200 - "${speed[@]}" "${q[@]}" --method full --compile-scope model ;;
    llama_lora) item "$1" 150 - "${speed[@]}" "${l[@]}" --method lora ;;
    # Each choice changed alone on qwen0.5b, full finetune unless said (each its own item, so the most
    # wanted go first): the loss head's chunk body left eager (what compiling it gains), flex
    # attention (the other fast kernel #8 names; no CPU backward), the dense-mask SDPA path,
    # round-to-nearest AdamW (the cost of stochastic rounding), PEFT's LoRA forward, the model's own head.
    abl_head) item "ablation $1" 100 - "${speed[@]}" "${q[@]}" --method full --head fused-eager ;;
    abl_flex) [ -n "$dry" ] && { echo "== $1: not on a CPU (flex attention has no CPU backward)"; return; }
      item "ablation $1" 100 - "${speed[@]}" "${q[@]}" --method full --attn flex_attention --attention mask ;;
    abl_mask) item "ablation $1" 100 - "${speed[@]}" "${q[@]}" --method full --attention mask ;;
    abl_nearest) item "ablation $1" 100 - "${speed[@]}" "${q[@]}" --method full --bf16-rounding nearest ;;
    abl_peft) item "ablation $1" 100 - "${speed[@]}" "${q[@]}" --method lora --lora-forward peft ;;
    abl_plainhead) item "ablation $1" 100 - "${speed[@]}" "${q[@]}" --method full --head plain ;;
    # The fused head at 1,024 positions a chunk instead of 256: a quarter of the head-weight traffic
    # (estimated ~25 ms of a qwen0.5b step at 256), ~0.5 GiB more peak memory.
    abl_siblings) item "ablation $1" 100 - "${speed[@]}" "${q[@]}" --method lora --lora-forward single ;;
    # The adapters in bf16 like the base: no fp32->bf16 cast of each adapter weight in every forward, nor
    # back in the backward. Inductor's CPU code for a qwen2 layer, forward + backward: 33 kernels full,
    # 86 LoRA (77 with siblings), of which the casts are 14 forward and 4 backward.
    abl_lora_bf16) item "ablation $1" 100 - "${speed[@]}" "${q[@]}" --method lora --lora-dtype model ;;
    abl_chunk) item "ablation $1" 100 - "${speed[@]}" "${q[@]}" --method full --head-chunk 1024 ;;
    ablations) for a in abl_head abl_flex abl_mask abl_nearest abl_peft abl_siblings abl_lora_bf16 abl_plainhead abl_chunk; do run_item $a; done ;;
    *) echo "unknown item $1"; exit 2 ;;
  esac
}

items=("$@")
# qwen_full first (since the H100 run every bf16 weight's AdamW update is one launch: does it close
# the gap to round-to-nearest, abl_nearest, 101,895 there against 88,711-97,128?), then the peer
# beside it on the same card (the H100 run had no time left for it), the CUDA tests (the sync count
# never ran), LoRA profiled, whole-model compile, then the rest. One 600 s call reaches about
# qwen_whole; a second, `bash bench/gpu.sh ITEM ...`, takes what was skipped.
[ ${#items[@]} -gt 0 ] || items=(qwen_full abl_nearest qwen_peer tests qwen_lora abl_siblings abl_lora_bf16 abl_chunk qwen_whole llama_full
  llama_peer llama_lora abl_mask abl_plainhead qwen_eager qwen_gc llama_gc abl_head abl_peft abl_flex)
for it in "${items[@]}"; do run_item "$it"; done
python3 bench/summarize.py "$out" | tee "$out/summary.md"
echo "== done at $(date +%T); skipped for time: ${skipped[*]:-none}"
