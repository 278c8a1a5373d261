# Issue 3, session 7, call 7 (one H200): the closing table with the session's defaults, and the
# Engine's own loop (jaxtp.generate's: 16-step chunks queued ahead) timed beside the benchmark's.
#   bash scripts/gpu/run42.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
timeout 170 python3 scripts/benchmark.py --shape llama2-7b --ctx 1024 --tp 1 --reps 7 --batch 1 32 --engine 129 \
  --json $OUT/table.json > $OUT/table.log 2>&1
grep -iE "error|Traceback" $OUT/*.log | head -5
grep bandwidth $OUT/table.log; sed -n '/^llama/,$p' $OUT/table.log
