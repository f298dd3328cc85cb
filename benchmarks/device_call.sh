#!/usr/bin/env bash
# One lent-GPU call of the benchmark (see benchmarks/README.md). Usage: device_call.sh PHASE
#   main   LoRA set on GPU 0 (baseline, ours + profile, ours-auto, ours-eager) while the QLoRA
#          set runs on GPU 1 (baseline, ours + profile, ours-auto; then LoRA ours-liger)
#   ddp    torchrun 2 GPUs (DDP, NCCL): lora and qlora 'ours'; then lora 'ours' on 1 GPU via torchrun
#   graphs (4 GPUs, session 2) CUDA graphs at micro-batch 2 and DPO, one set per GPU at once:
#          GPU 0 LoRA baseline, ours-graphs; GPU 1 QLoRA baseline, ours-graphs; GPU 2 DPO
#          baseline (plain TRL), ours, ours-graphs; GPU 3 LoRA ours, ours-graphs-auto
#   scale4 (4 GPUs) DDP at 4 GPUs, LoRA and QLoRA, auto micro-batch (issue 9)
#   scale-long (4 GPUs) LoRA at 4 GPUs and 1 GPU with 8 timed steps each
#   scale2 (4 GPUs) DDP at 2 GPUs and the 1-GPU points; a CUDA-graph diagnosis on GPU 3
#   hgraphs (1 GPU, session 3) hand-captured CUDA graphs: GPU test, LoRA/QLoRA at micro-batch 2
#   hprofile (1 GPU, session 4) where a micro-batch-2 step goes: for ours-graphs, the baseline,
#          ours-eager and ours, cProfile over one optimizer step (host Python time, GC pauses)
#          and torch.profiler over 6 micro-batches of the next (GPU busy vs wall, top CPU ops)
#   hgraphs2 (1 GPU, session 4) the graphs with every layer replayed: GPU test, LoRA under
#          autocast (+ profile; without autocast if that fails), QLoRA, DPO, the baseline
#   hgraphs3 (1 GPU, session 4) the whole stack as one graph: GPU test; LoRA eager layers
#          (+ profile), + Liger layers without the fused CE (+ profile), the baseline; QLoRA
#          the same and its baseline; LoRA with the layers compiled inside the graphs; then
#          LoRA and QLoRA as the trainer runs them (compiled inside, the model's own loss)
#   dprofile (1 GPU, session 5) where a DPO micro-batch goes (eager packed, rows of 1024,
#          Liger layers, no checkpointing; the baseline)
#   dgraphs (1 GPU, session 5) DPO under graphs checkpointed inside: GPU tests; eager, Liger
#          and compiled layers inside; the baseline
#   dgraphs2 (1 GPU, session 5) the same, the reference through the policy's graph
#   dfinal (1 GPU, session 5) GPU tests; DPO as the trainer runs it; the baseline; compiled
#   dtests (1 GPU, session 5) the GPU tests, one process each
#   s6a (1 GPU, session 6) GPU tests; DPO as the trainer runs it (lean LoRA, gradients added
#          inside the graph, rows widened to a long sequence's rounded length); the baseline;
#          the same DPO with peft's LoRA forward
#   s6tests (1 GPU, session 6) every GPU test, one process each
#   s6b (1 GPU, session 6) the baseline, then DPO as the trainer runs it (no profiler)
#   s6c (1 GPU, session 6) per-sequence sums in a fixed order: two GPU tests; DPO as trained
# Packages the image lacks (liger-kernel, bitsandbytes with only its CUDA 13.0 library; trl,
# datasets, dill, multiprocess for DPO) travel in .whl/site (carry it). Results: $OUT/results.tgz (JSON per run) and $OUT/log.txt.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; R=/tmp/bench-results; mkdir -p "$R" "$OUT"
B="python3 benchmarks/train_throughput.py --out $R"
phase=${1:-main}
if [ "$phase" != inner ]; then
  timeout "${BUDGET_S:-550}" bash "$0" inner "$phase" 2>&1 | tee "$OUT/log.txt" \
    | grep -E "RESULT|^== |Error|error|FAILED|Traceback|^[0-9]+\.[0-9]+|^name|H200"
  tar czf "$OUT/results.tgz" -C "$R" .
  ls -la "$R"
  exit 0
fi
phase=$2
{
  python3 -c 'import torch, transformers, peft, bitsandbytes, liger_kernel, trl, datasets; print(torch.__version__, torch.cuda.device_count(), transformers.__version__, peft.__version__, bitsandbytes.__version__, trl.__version__, datasets.__version__)'
  nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
  if [ "$phase" = main ]; then
    # LoRA set on GPU 0 and QLoRA set on GPU 1, at the same time (one process per GPU)
    ( $B --gpu 0 --paths baseline --methods lora --baseline-steps 2 --run-timeout 150
      $B --gpu 0 --paths ours --methods lora --steps 5 --profile-step 5 --run-timeout 200
      $B --gpu 0 --paths ours-auto --methods lora --steps 4 --run-timeout 150
      $B --gpu 0 --paths ours-eager --methods lora --steps 3 --run-timeout 80 ) > "$OUT/gpu0.log" 2>&1 &
    ( $B --gpu 1 --paths baseline --methods qlora --baseline-steps 2 --run-timeout 150
      $B --gpu 1 --paths ours --methods qlora --steps 5 --profile-step 5 --run-timeout 200
      $B --gpu 1 --paths ours-auto --methods qlora --steps 4 --run-timeout 150
      $B --gpu 1 --paths ours-liger --methods lora --steps 3 --run-timeout 80 ) > "$OUT/gpu1.log" 2>&1 &
    wait
    echo "---- GPU 0"; grep -E "RESULT|^== |Error|FAILED" "$OUT/gpu0.log"; echo "---- GPU 1"; grep -E "RESULT|^== |Error|FAILED" "$OUT/gpu1.log"
  elif [ "$phase" = final ]; then
    # the compiled path at micro-batch 2 (no profiler), the profile of one optimizer step of
    # the auto path, then DDP on 2 GPUs (auto micro-batch: 32 per rank, accumulation 2)
    ( $B --gpu 0 --paths ours --methods lora --steps 3 --run-timeout 170
      $B --gpu 0 --paths ours-auto --methods lora --steps 3 --profile-step 3 --tag profile- --run-timeout 130 ) > "$OUT/gpu0.log" 2>&1 &
    ( $B --gpu 1 --paths ours --methods qlora --steps 3 --run-timeout 170 ) > "$OUT/gpu1.log" 2>&1 &
    wait
    echo "---- GPU 0"; grep -E "RESULT|^== |Error|FAILED" "$OUT/gpu0.log"; echo "---- GPU 1"; grep -E "RESULT|^== |Error|FAILED" "$OUT/gpu1.log"
    $B --paths ours-auto --methods lora,qlora --worlds 2 --steps 3 --run-timeout 130
  elif [ "$phase" = graphs ]; then
    ( $B --gpu 0 --paths baseline --methods lora --baseline-steps 2 --run-timeout 150
      $B --gpu 0 --paths ours-graphs --methods lora --steps 6 --warmup-steps 2 --profile-step 6 --run-timeout 300 ) > "$OUT/gpu0.log" 2>&1 &
    ( $B --gpu 1 --paths baseline --methods qlora --baseline-steps 2 --run-timeout 150
      $B --gpu 1 --paths ours-graphs --methods qlora --steps 6 --warmup-steps 2 --run-timeout 300 ) > "$OUT/gpu1.log" 2>&1 &
    ( D="--methods dpo --global-batch 16 --micro-batch 4 --examples 512 --bucket 256"
      $B --gpu 2 $D --paths baseline --baseline-steps 5 --warmup-steps 2 --run-timeout 150
      $B --gpu 2 $D --paths ours --steps 6 --warmup-steps 2 --run-timeout 170
      $B --gpu 2 $D --paths ours-graphs --steps 7 --warmup-steps 3 --run-timeout 200 ) > "$OUT/gpu2.log" 2>&1 &
    ( $B --gpu 3 --paths ours --methods lora --steps 4 --run-timeout 200
      $B --gpu 3 --paths ours-graphs-auto --methods lora --steps 4 --run-timeout 200 ) > "$OUT/gpu3.log" 2>&1 &
    wait
    for g in 0 1 2 3; do echo "---- GPU $g"; grep -E "RESULT|^== |Error|FAILED|skipping cudagraphs" "$OUT/gpu$g.log" | head -20; done
  elif [ "$phase" = hgraphs ]; then
    # (1 GPU, session 3) hand-captured CUDA graphs: the GPU test of their math, then micro-batch
    # 2 against the baseline in the same call (host noise), rows rounded up to 128 tokens
    [ -z "${SKIP_TESTS:-}" ] && PYTHONPATH=$PWD/trainer:$PWD/operator:$PYTHONPATH timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short tests/trainer/test_cuda_graphs.py 2>&1 | grep -v Warning | tail -40
    BENCH_GRAPHS_NO_AUTOCAST=1 $B --paths ours-graphs --methods lora --steps ${STEPS:-5} --warmup-steps 2 --bucket 128 --run-timeout 150 ${EXTRA:-}
    [ -n "${WITH_QLORA:-}" ] && BENCH_GRAPHS_NO_AUTOCAST=1 $B --paths ours-graphs --methods qlora --steps 5 --warmup-steps 2 --bucket 128 --run-timeout 150
    [ -n "${WITH_BASELINE:-}" ] && $B --paths baseline --methods lora,qlora --baseline-steps 2 --run-timeout 130
  elif [ "$phase" = hprofile ]; then
    C="timeout 200 python3 benchmarks/train_throughput.py --child --out $R --method lora --profile-micro-batches 6"
    BENCH_GRAPHS_NO_AUTOCAST=1 $C --path ours-graphs --bucket 128 --steps 4 --warmup-steps 2 --cprofile-step 3 --profile-step 4
    $C --path baseline --steps 3 --cprofile-step 2 --profile-step 3
    $C --path ours-eager --steps 3 --cprofile-step 2 --profile-step 3
    $C --path ours --steps 4 --warmup-steps 2 --cprofile-step 3 --profile-step 4
  elif [ "$phase" = hgraphs2 ]; then
    save() { tar czf "$OUT/results.tgz" -C "$R" . ; }  # after every run: a later timeout keeps it
    PYTHONPATH=$PWD/trainer:$PWD/operator:$PYTHONPATH timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short tests/trainer/test_cuda_graphs.py 2>&1 | grep -v Warning | tail -30
    C="timeout 170 python3 benchmarks/train_throughput.py --child --out $R --bucket 128"
    $C --path ours-graphs --method lora --steps 7 --warmup-steps 2 --cprofile-step 6 --profile-step 7 --profile-micro-batches 8; save
    [ -f "$R/lora-ours-graphs-w1.json" ] || { BENCH_GRAPHS_NO_AUTOCAST=1 $C --tag noac- --path ours-graphs --method lora --steps 5 --warmup-steps 2; save; }
    $C --path ours-graphs --method qlora --steps 5 --warmup-steps 2; save
    timeout 60 python3 benchmarks/train_throughput.py --child --out $R --path baseline --method lora --steps 2; save
    $C --path ours-graphs --method dpo --global-batch 16 --micro-batch 4 --examples 512 --bucket 256 --steps 6 --warmup-steps 2; save
  elif [ "$phase" = hgraphs3 ]; then
    save() { tar czf "$OUT/results.tgz" -C "$R" . ; }
    PYTHONPATH=$PWD/trainer:$PWD/operator:$PYTHONPATH timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short tests/trainer/test_cuda_graphs.py 2>&1 | grep -v Warning | tail -30
    C="timeout 120 python3 benchmarks/train_throughput.py --child --out $R --bucket 128 --steps 7 --warmup-steps 2 --profile-step 7 --profile-micro-batches 8"
    $C --path ours-graphs --method lora; save
    BENCH_LIGER_LAYERS=1 BENCH_NO_LIGER_LOSS=1 $C --tag ligerl- --path ours-graphs --method lora; save
    timeout 60 python3 benchmarks/train_throughput.py --child --out $R --path baseline --method lora --steps 2; save
    BENCH_LIGER_LAYERS=1 BENCH_NO_LIGER_LOSS=1 $C --tag ligerl- --path ours-graphs --method qlora; save
    timeout 75 python3 benchmarks/train_throughput.py --child --out $R --path baseline --method qlora --steps 2; save
    BENCH_GRAPHS_COMPILE=1 timeout 200 python3 benchmarks/train_throughput.py --child --out $R --bucket 128 --steps 6 --warmup-steps 2 --profile-step 6 --profile-micro-batches 8 --tag compiled- --path ours-graphs --method lora; save
    # the trainer's default since: compiled inside the graphs, the model's own loss (ran as two
    # calls right after the above, the inductor cache warm)
    for m in lora qlora; do
      BENCH_GRAPHS_COMPILE=1 BENCH_NO_LIGER_LOSS=1 timeout 230 python3 benchmarks/train_throughput.py --child --out $R --bucket 128 --steps 6 --warmup-steps 2 --tag compiled-noflce- --path ours-graphs --method $m; save
    done
  elif [ "$phase" = dprofile ]; then
    # (session 5) where a DPO micro-batch goes: the eager packed path (TRL's checkpointing on),
    # with rows of 1024, with Liger layers, without checkpointing; compiled; the baseline
    save() { tar czf "$OUT/results.tgz" -C "$R" . ; }
    C="timeout 110 python3 benchmarks/train_throughput.py --child --out $R --method dpo --global-batch 16 --micro-batch 4 --examples 256 --bucket 128 --steps 4 --profile-step 4 --profile-micro-batches 2"
    BENCH_NO_COMPILE=1 $C --path ours; save
    BENCH_NO_COMPILE=1 BENCH_DPO_ROW_TOKENS=1024 $C --tag row1024- --path ours; save
    BENCH_NO_COMPILE=1 BENCH_LIGER_LAYERS=1 $C --tag ligerl- --path ours; save
    BENCH_NO_COMPILE=1 BENCH_DPO_NO_CKPT=1 BENCH_DPO_ROW_TOKENS=1024 $C --tag nockpt-row1024- --path ours; save
    timeout 80 python3 benchmarks/train_throughput.py --child --out $R --method dpo --global-batch 16 --micro-batch 4 --examples 256 --path baseline --steps 3; save
  elif [ "$phase" = dgraphs ]; then
    # (session 5) DPO under CUDA graphs of the stack, checkpointed inside (capture-safe RNG):
    # the GPU tests; rows of 1024 packed tightly, eager layers inside, Liger layers, compiled
    # inside; the baseline (plain TRL, its checkpointing) in the same call
    save() { tar czf "$OUT/results.tgz" -C "$R" . ; }
    PYTHONPATH=$PWD/trainer:$PWD/operator:$PYTHONPATH timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short tests/trainer/test_cuda_graphs.py 2>&1 | grep -v Warning | tail -30
    C="python3 benchmarks/train_throughput.py --child --out $R --method dpo --global-batch 16 --micro-batch 4 --examples 256 --bucket 1024 --steps 6 --warmup-steps 2 --profile-step 6 --profile-micro-batches 2"
    export BENCH_DPO_ROW_TOKENS=1024
    timeout 120 $C --path ours-graphs; save
    BENCH_LIGER_LAYERS=1 timeout 100 $C --tag ligerl- --path ours-graphs; save
    BENCH_GRAPHS_COMPILE=1 timeout 170 $C --tag compiled- --path ours-graphs; save
    timeout 80 python3 benchmarks/train_throughput.py --child --out $R --method dpo --global-batch 16 --micro-batch 4 --examples 256 --path baseline --steps 3; save
  elif [ "$phase" = dgraphs2 ]; then
    # (session 5) the reference pass through the policy's graph (B zeroed): compiled inside,
    # Liger layers inside; more warm-up steps (each new row count is a capture); the baseline
    save() { tar czf "$OUT/results.tgz" -C "$R" . ; }
    PYTHONPATH=$PWD/trainer:$PWD/operator:$PYTHONPATH timeout 120 python3 -m pytest -x -q -p no:cacheprovider -m gpu --tb=long tests/trainer/test_cuda_graphs.py > "$OUT/pytest.txt" 2>&1; tail -5 "$OUT/pytest.txt"
    C="python3 benchmarks/train_throughput.py --child --out $R --method dpo --global-batch 16 --micro-batch 4 --examples 256 --bucket 1024 --steps 9 --warmup-steps 5 --profile-step 9 --profile-micro-batches 2"
    export BENCH_DPO_ROW_TOKENS=1024
    BENCH_GRAPHS_COMPILE=1 timeout 200 $C --tag compiled- --path ours-graphs; save
    BENCH_LIGER_LAYERS=1 timeout 110 $C --tag ligerl- --path ours-graphs; save
    timeout 80 python3 benchmarks/train_throughput.py --child --out $R --method dpo --global-batch 16 --micro-batch 4 --examples 256 --path baseline --steps 3; save
  elif [ "$phase" = dfinal ]; then
    # (session 5) the GPU tests (the product's DPO path end to end too); DPO as the trainer
    # runs it (graphs, Liger layers inside, checkpointed inside, the reference through the
    # policy's graph, logits only where labels are); the baseline; then compiled inside
    save() { tar czf "$OUT/results.tgz" -C "$R" . ; }
    PYTHONPATH=$PWD/trainer:$PWD/operator:$PYTHONPATH timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short tests/trainer/test_cuda_graphs.py > "$OUT/pytest.txt" 2>&1; tail -12 "$OUT/pytest.txt"
    C="python3 benchmarks/train_throughput.py --child --out $R --method dpo --global-batch 16 --micro-batch 4 --examples 256 --bucket 1024 --steps 9 --warmup-steps 5 --profile-step 9 --profile-micro-batches 2"
    export BENCH_DPO_ROW_TOKENS=1024
    BENCH_LIGER_LAYERS=1 timeout 100 $C --tag ligerl- --path ours-graphs; save
    timeout 75 python3 benchmarks/train_throughput.py --child --out $R --method dpo --global-batch 16 --micro-batch 4 --examples 256 --path baseline --steps 3; save
    BENCH_GRAPHS_COMPILE=1 timeout 150 $C --tag compiled- --path ours-graphs; save
  elif [ "$phase" = dtests ]; then
    # (session 5) the GPU tests one process each (a failed capture leaves the CUDA generator
    # in capture mode, failing every later test of the process)
    T=tests/trainer/test_cuda_graphs.py
    for t in "test_graphed_layers_same_loss_and_accumulated_grads and bf16-checkpointed" "test_reference_pass" "test_finetune_train_dpo" "test_checkpointed_graphs_recompute" "bf16-base-no-autocast"; do
      echo "== $t"; PYTHONPATH=$PWD/trainer:$PWD/operator:$PYTHONPATH timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short -k "$t" $T > "$OUT/t.txt" 2>&1; grep -E "passed|failed|Error|error:|assert" "$OUT/t.txt" | grep -v Warning | tail -6
    done
  elif [ "$phase" = s6a ]; then
    # (session 6) the GPU tests one process each (the in-graph gradients, the lean LoRA
    # reference pass, the product's DPO end to end); DPO as the trainer runs it (+ lean LoRA,
    # gradients added inside the backward graph, rows widened only to a long sequence's
    # rounded length), per-step peaks; the baseline
    save() { tar czf "$OUT/results.tgz" -C "$R" . ; }
    T=tests/trainer/test_cuda_graphs.py
    for t in "bf16-checkpointed or test_in_graph_gradients" "test_reference_pass" "test_finetune_train_dpo"; do
      echo "== $t"; PYTHONPATH=$PWD/trainer:$PWD/operator:$PYTHONPATH timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short -k "$t" $T > "$OUT/t.txt" 2>&1; grep -E "passed|failed|Error|error:|assert" "$OUT/t.txt" | grep -v Warning | tail -8
    done
    C="python3 benchmarks/train_throughput.py --child --out $R --method dpo --global-batch 16 --micro-batch 4 --examples 256 --bucket 1024 --steps 9 --warmup-steps 5 --profile-step 9 --profile-micro-batches 2"
    BENCH_LIGER_LAYERS=1 timeout 110 $C --tag ligerl- --path ours-graphs; save
    timeout 75 python3 benchmarks/train_throughput.py --child --out $R --method dpo --global-batch 16 --micro-batch 4 --examples 256 --path baseline --steps 3; save
    BENCH_LIGER_LAYERS=1 BENCH_NO_LEAN_LORA=1 timeout 100 $C --tag ligerl-peft- --path ours-graphs; save
  elif [ "$phase" = s6b ]; then
    # (session 6) a second call: the baseline first this time, then DPO as the trainer runs it
    save() { tar czf "$OUT/results.tgz" -C "$R" . ; }
    timeout 75 python3 benchmarks/train_throughput.py --child --out $R --method dpo --global-batch 16 --micro-batch 4 --examples 256 --path baseline --steps 3; save
    BENCH_LIGER_LAYERS=1 timeout 110 python3 benchmarks/train_throughput.py --child --out $R --method dpo --global-batch 16 --micro-batch 4 --examples 256 --steps 9 --warmup-steps 5 --tag ligerl- --path ours-graphs; save
  elif [ "$phase" = s6c ]; then
    # (session 6) per-sequence sums in a fixed order: the product's DPO test (step 1 exactly
    # log 2), the bf16-autocast graphs test (no longer marked xfail); DPO as the trainer runs it
    save() { tar czf "$OUT/results.tgz" -C "$R" . ; }
    T=tests/trainer/test_cuda_graphs.py
    for t in "test_finetune_train_dpo" "bf16-autocast"; do
      echo "== $t" | tee -a "$OUT/tests.txt"
      PYTHONPATH=$PWD/trainer:$PWD/operator:$PYTHONPATH timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short -k "$t" $T > "$OUT/t.txt" 2>&1; echo "rc=$?" | tee -a "$OUT/tests.txt"
      grep -E "passed|failed|assert|Error" "$OUT/t.txt" | tail -5 | tee -a "$OUT/tests.txt"
    done
    BENCH_LIGER_LAYERS=1 timeout 110 python3 benchmarks/train_throughput.py --child --out $R --method dpo --global-batch 16 --micro-batch 4 --examples 256 --steps 9 --warmup-steps 5 --tag ligerl- --path ours-graphs; save
  elif [ "$phase" = s6tests ]; then
    # (session 6) every GPU test, one process each, each one's last lines kept in tests.txt
    T=tests/trainer/test_cuda_graphs.py
    for t in $(PYTHONPATH=$PWD/trainer:$PWD/operator:$PYTHONPATH python3 -m pytest -q -p no:cacheprovider -m gpu --collect-only $T 2>/dev/null | grep "::"); do
      echo "== $t" | tee -a "$OUT/tests.txt"
      PYTHONPATH=$PWD/trainer:$PWD/operator:$PYTHONPATH timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short "$t" > "$OUT/t.txt" 2>&1; echo "rc=$?" >> "$OUT/t.txt"
      grep -v -i "warn\|liger_kernel.backends\|^  " "$OUT/t.txt" | tail -12 >> "$OUT/tests.txt"; tail -2 "$OUT/t.txt"
    done
  elif [ "$phase" = scale4 ]; then
    $B --paths ours-auto --methods lora,qlora --worlds 4 --steps 4 --run-timeout 240
  elif [ "$phase" = scale-long ]; then
    # 8 timed steps instead of 3: is the 4-GPU efficiency real or step-to-step noise?
    $B --paths ours-auto --methods lora --worlds 4 --steps 10 --warmup-steps 2 --tag long- --run-timeout 200
    $B --gpu 0 --paths ours-auto --methods lora --steps 10 --warmup-steps 2 --tag long- --run-timeout 200
  elif [ "$phase" = scale2 ]; then
    # world 2 on GPUs 0-1 while the world-1 points run on GPU 2 and a CUDA-graph diagnosis on 3
    ( CUDA_VISIBLE_DEVICES=0,1 $B --paths ours-auto --methods lora,qlora --worlds 2 --steps 4 --run-timeout 240 ) > "$OUT/gpu01.log" 2>&1 &
    ( $B --gpu 2 --paths ours-auto --methods lora,qlora --steps 4 --run-timeout 240 ) > "$OUT/gpu2.log" 2>&1 &
    ( export CUDA_VISIBLE_DEVICES=3 PYTHONFAULTHANDLER=1 TORCH_LOGS=cudagraphs
      timeout 200 python3 benchmarks/train_throughput.py --child --out $R --tag diag- --path ours-graphs --method lora --layers 4 --steps 3 --examples 1024; echo "diag rc=$?"
      timeout 150 python3 benchmarks/train_throughput.py --child --out $R --tag diag-nodrop- --path ours-graphs --method lora --layers 4 --steps 3 --examples 1024 --lora-dropout 0; echo "diag-nodrop rc=$?" ) > "$OUT/gpu3.log" 2>&1 &
    wait
    for f in gpu01 gpu2 gpu3; do echo "---- $f"; grep -E "RESULT|^== |Error|FAILED|rc=|Fatal|Segmentation|skipping" "$OUT/$f.log" | head -20; done
  else
    $B --paths ours --methods lora,qlora --worlds 2 --steps 4 --run-timeout 150
    $B --paths ours --methods lora --worlds 1 --torchrun --steps 4 --tag torchrun- --run-timeout 120
  fi
}
