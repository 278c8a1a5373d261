# Issue 3, session 5, call 8: the fused decode step on a GQA model (Llama-3-8B shape: 4 query
# heads per KV head), against XLA's kernels, tp 1 and 2, batch 1 and 32.
#   bash scripts/gpu/run25.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
timeout 280 python3 scripts/benchmark.py --shape llama3-8b --ctx 1024 --reps 3 --no-prefill --tp 1 2 --batch 1 32 --kernels pallas xla > $OUT/gqa.log 2>&1
grep -E "bandwidth"  $OUT/gqa.log; sed -n '/^llama3-8b/,$p' $OUT/gqa.log; grep -i "error\|Traceback" $OUT/gqa.log
