#!/usr/bin/env bash
# Device call 7 (the session's last ~10 minutes): issue 6's load time / peak host memory at
# Llama-2-7B shape, and issue 3's cuBLAS-GEMV lead (tp 1, batch 1, Triton GEMMs off) on the other
# GPU at the same time. Every step has its own time limit and appends its row to $OUT/summary.txt
# at once, so a cut-short call still returns what finished.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHAPE=${SHAPE:-llama2-7b}; S=$OUT/summary.txt; CK=/tmp/ck7b; ORB=/tmp/ck7b-orbax
row() { echo "$*" | tee -a $S; }
bench() {  # name flags
  XLA_FLAGS="$2" CUDA_VISIBLE_DEVICES=1 timeout 110 python3 scripts/benchmark.py --shape $SHAPE \
    --ctx 1024 --tp 1 --batch 1 --no-prefill --reps 7 --json $OUT/$1.json > $OUT/$1.log 2>&1
  python3 -c "import json,sys; r=json.load(open(sys.argv[1]))[0]; print(f\"bench $1: tp1 b1 {r['ms_per_step']:.3f} ms/token {r['tokens_per_s']:.1f} tok/s roofline {r['roofline']:.1%} (floor {r['roofline_ms']:.3f} ms)\")" $OUT/$1.json >> $S 2>&1 || row "bench $1 failed rc=$?"
}
( bench default "" ; bench cublas "--xla_gpu_enable_triton_gemm=false" ) &
timeout 100 python3 scripts/load_memory.py write $CK --shape $SHAPE --dtype bfloat16 2>&1 | tail -1 | tee -a $S
M="python3 scripts/load_memory.py measure"
CUDA_VISIBLE_DEVICES=0 timeout 90 $M $CK --tp 1 --json $OUT/st_tp1.json 2>&1 | tail -1 | tee -a $S
wait  # the benchmark holds GPU 1
timeout 90 $M $CK --tp 2 --json $OUT/st_tp2.json 2>&1 | tail -1 | tee -a $S
timeout 120 python3 scripts/convert.py $CK $ORB --tp 2 2>&1 | tail -1 | tee -a $S
timeout 90 $M $ORB --tp 2 --json $OUT/orbax_tp2.json 2>&1 | tail -1 | tee -a $S
echo; cat $S
