# Issue 3, session 4, call 1: the Pallas decode kernels (GEMV, flash-decoding attention) against
# XLA's, stand-alone (GPU 0) and in the decode step at tp1 (GPU 1, at the same time), then tp2.
#   bash scripts/gpu/run11.sh   (as of commit 28f4760: the Pallas GEMV and pallas_check's
#   --configs sweep were removed after this call)
set -o pipefail
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
nvidia-smi -L; python3 -c "import jax, jaxlib; print('jax', jax.__version__)"; pip list 2>/dev/null | grep -i triton
B="python3 scripts/benchmark.py --shape llama2-7b --ctx 1024 --reps 5 --no-prefill"
CUDA_VISIBLE_DEVICES=0 timeout 250 python3 scripts/gpu/pallas_check.py --batch 1 32 --configs > $OUT/pallas_check.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 250 $B --tp 1 --batch 1 32 --kernels xla pallas --json $OUT/tp1.json > $OUT/tp1.log 2>&1
wait
cat $OUT/pallas_check.log | grep -v Warning
timeout ${TP2_TIMEOUT:-280} $B --tp 2 --batch 1 32 --all-reduce custom --kernels xla pallas --json $OUT/tp2.json 2>&1 | tee $OUT/tp2.log | grep -v Warning | tail -12
echo ==== tp1; tail -8 $OUT/tp1.log
