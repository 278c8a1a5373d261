# Issue 3, session 4, call 7: the fused all-reduce + add + RMSNorm exchanging whole rows per
# block (no wait on every block's flags): check, the table, and a trace of tp2 b32 for next time.
#   bash scripts/gpu/run17.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --reps 5"
timeout 120 python3 scripts/gpu/all_reduce_check.py --tp 2 --sizes 4096 > $OUT/check.log 2>&1
tail -8 $OUT/check.log
timeout 240 python3 scripts/benchmark.py $A --tp 1 2 --batch 1 32 --json $OUT/table.json > $OUT/table.log 2>&1
timeout 70 python3 scripts/benchmark.py $A --tp 2 --batch 32 --no-prefill --trace /tmp/tr > $OUT/trace_b32.log 2>&1
grep -E "^==|stream|us/step" $OUT/trace_b32.log | head -24 | cut -c1-160
sed -n '/^llama2-7b/,$p' $OUT/table.log; grep -il "error\|Traceback" $OUT/*.log
