#!/usr/bin/env bash
# One lent-GPU call of the benchmark (see benchmarks/README.md). Usage: device_call.sh PHASE
#   lora   smoke (2 layers, lora+qlora 'ours'), then the LoRA set: baseline, ours (+profile),
#          ours-auto, ours-eager, ours-liger
#   qlora  the QLoRA set (baseline, ours, ours-auto) and the 2-GPU DDP runs (lora, qlora ours)
# Packages the image lacks (liger-kernel, bitsandbytes with only its CUDA 13.0 library) travel
# in .whl/site (carry it). Results: $OUT/results.tgz (JSON per run) and $OUT/log.txt.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; R=/tmp/bench-results; mkdir -p "$R" "$OUT"
B="python3 benchmarks/train_throughput.py --out $R"
phase=${1:-lora}
if [ "$phase" != inner ]; then
  timeout "${BUDGET_S:-550}" bash "$0" inner "$phase" 2>&1 | tee "$OUT/log.txt" \
    | grep -E "RESULT|^== |Error|error|FAILED|Traceback|^[0-9]+\.[0-9]+|^name|H200"
  tar czf "$OUT/results.tgz" -C "$R" .
  ls -la "$R"
  exit 0
fi
phase=$2
{
  python3 -c 'import torch, transformers, peft, bitsandbytes, liger_kernel; print(torch.__version__, torch.cuda.device_count(), transformers.__version__, peft.__version__, bitsandbytes.__version__)'
  nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
  if [ "$phase" = lora ]; then
    if ! $B --layers 2 --paths ours --methods lora,qlora --global-batch 8 --steps 2 --tag smoke- --run-timeout 200; then
      echo "SMOKE FAILED: Liger off from here"; export BENCH_NO_LIGER=1
    fi
    $B --paths baseline --methods lora --baseline-steps 2 --run-timeout 150
    $B --paths ours --methods lora --steps 5 --profile-step 5 --run-timeout 200
    $B --paths ours-auto --methods lora --steps 4 --run-timeout 150
    $B --paths ours-eager,ours-liger --methods lora --steps 3 --run-timeout 100
  else
    [ -f .bench_no_liger ] && export BENCH_NO_LIGER=1
    $B --paths baseline --methods qlora --baseline-steps 2 --run-timeout 150
    $B --paths ours --methods qlora --steps 5 --profile-step 5 --run-timeout 200
    $B --paths ours-auto --methods qlora --steps 4 --run-timeout 150
    $B --paths ours --methods lora,qlora --worlds 2 --steps 4 --run-timeout 150
  fi
}
