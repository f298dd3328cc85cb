#!/usr/bin/env bash
# One lent-GPU call of the benchmarks (see benchmarks/README.md). Usage: device_call.sh PHASE
#   world   (2 GPUs) the 7B model saved once; `finetune-train` LoRA on GPU 0 and QLoRA on GPU 1
#           at world 1, then each at world 2 (--nproc 2), in the same call
#   final   (2 GPUs) LoRA at world 1 alone, then at world 2; DPO and plain TRL side by side on
#           the same pairs; `method: full` under DeepSpeed ZeRO-2 at world 2 (8 layers); DPO at 2
#   dpo     (2 GPUs) DPO `finetune-train` on GPU 0 and plain TRL on GPU 1 on the same pairs; DPO
#           at world 2; `method: full` under DeepSpeed ZeRO-2 at world 2 (8 layers); the GPU
#           tests of the graphs
# Packages the image lacks (trl, datasets, dill, multiprocess, liger-kernel, bitsandbytes with
# only its CUDA 13.0 library, pydantic, deepspeed and its pure-Python dependencies) travel in
# .whl/site (carry it). Results: $OUT/results.tgz (JSON per run) and $OUT/log.txt.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD/trainer:$PWD/operator:$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache PATH=$PWD/.whl/site/bin:$PATH
OUT=${OUT:-/tmp/out}; R=/tmp/bench-results; W=/tmp/bench-work; mkdir -p "$R" "$OUT" "$W"
B="python3 benchmarks/train_throughput.py --out $R --work $W"
phase=${1:-world}
if [ "$phase" != inner ]; then
  timeout "${BUDGET_S:-570}" bash "$0" inner "$phase" 2>&1 | tee "$OUT/log.txt" \
    | grep -E "RESULT|^== |Error|error|FAILED|passed|failed|Traceback|H200"
  tar czf "$OUT/results.tgz" -C "$R" .
  exit 0
fi
phase=$2
python3 -c 'import torch, transformers, peft, trl; print(torch.__version__, torch.cuda.device_count(), transformers.__version__, peft.__version__, trl.__version__)'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 - <<'EOF'  # the 7B model, saved once for every finetune-train run of this call
import sys; sys.path.insert(0, "benchmarks")
import fp32_reference as r
r.make_model(__import__("pathlib").Path("/tmp/bench-work/model-4096x32"), 4096, 32, 11008, 32)
EOF
if [ "$phase" = world ]; then
  ( $B --gpu 0 --paths finetune-train --methods lora --steps 6 --run-timeout 200 ) > "$OUT/gpu0.log" 2>&1 &
  ( $B --gpu 1 --paths finetune-train --methods qlora --steps 5 --run-timeout 200 ) > "$OUT/gpu1.log" 2>&1 &
  wait; cat "$OUT/gpu0.log" "$OUT/gpu1.log" | grep -E "RESULT|^== |Error"
  $B --paths finetune-train --methods lora --worlds 2 --steps 6 --run-timeout 170
  $B --paths finetune-train --methods qlora --worlds 2 --steps 5 --run-timeout 170
elif [ "$phase" = final ]; then
  $B --gpu 0 --paths finetune-train --methods lora --steps 5 --run-timeout 120
  $B --paths finetune-train --methods lora --worlds 2 --steps 5 --run-timeout 120
  ( $B --gpu 0 --paths finetune-train --methods dpo --global-batch 16 --micro-batch 4 \
      --examples 512 --steps 6 --run-timeout 130 ) > "$OUT/gpu0.log" 2>&1 &
  ( $B --gpu 1 --paths baseline --methods dpo --global-batch 16 --micro-batch 4 --examples 512 \
      --baseline-steps 4 --run-timeout 130 ) > "$OUT/gpu1.log" 2>&1 &
  wait; cat "$OUT/gpu0.log" "$OUT/gpu1.log" | grep -E "RESULT|^== |Error"
  $B --paths finetune-train --methods full --worlds 2 --layers 8 --zero-stage 2 --steps 3 \
    --run-timeout 100
  $B --paths finetune-train --methods dpo --worlds 2 --global-batch 16 --micro-batch 4 \
    --examples 512 --steps 6 --run-timeout 120
elif [ "$phase" = dpo ]; then
  ( $B --gpu 0 --paths finetune-train --methods dpo --global-batch 16 --micro-batch 4 \
      --examples 512 --steps 6 --run-timeout 200 ) > "$OUT/gpu0.log" 2>&1 &
  ( $B --gpu 1 --paths baseline --methods dpo --global-batch 16 --micro-batch 4 --examples 512 \
      --baseline-steps 4 --run-timeout 200 ) > "$OUT/gpu1.log" 2>&1 &
  wait; cat "$OUT/gpu0.log" "$OUT/gpu1.log" | grep -E "RESULT|^== |Error"
  $B --paths finetune-train --methods dpo --worlds 2 --global-batch 16 --micro-batch 4 \
    --examples 512 --steps 6 --run-timeout 150
  $B --paths finetune-train --methods full --worlds 2 --layers 8 --zero-stage 2 --steps 4 \
    --run-timeout 150
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/trainer/test_cuda_graphs.py 2>&1 | tail -3
fi
