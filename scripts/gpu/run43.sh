# Issue 3, session 7, call 8 (one H200): the Engine's loop at batch 32 with all rows prefilled at
# once (call 7's engine.run admitted 8 prompts of 1024 tokens per step: 4 prefills in the timing).
#   bash scripts/gpu/run43.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
timeout 120 python3 scripts/benchmark.py --shape llama2-7b --ctx 1024 --tp 1 --reps 5 --batch 32 --engine 129 \
  --no-prefill > $OUT/table.log 2>&1
grep -iE "error|Traceback" $OUT/*.log | head -5
grep bandwidth $OUT/table.log; sed -n '/^llama/,$p' $OUT/table.log
