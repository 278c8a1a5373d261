# Issue 3, session 5, call 5: the table with the defaults (fused Pallas decode step at every
# batch size, CUDA graphs over the collectives).
#   bash scripts/gpu/run22.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
timeout 400 python3 scripts/benchmark.py --shape llama2-7b --ctx 1024 --reps 5 --tp 1 2 --batch 1 32 --json $OUT/table.json > $OUT/table.log 2>&1
grep -E "bandwidth" $OUT/table.log; sed -n '/^llama2-7b/,$p' $OUT/table.log; grep -i "error\|Traceback" $OUT/table.log
