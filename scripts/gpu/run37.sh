# Issue 3, session 7, call 2 (one H200): decode chunks queued back to back (dispatched before the
# one ahead is waited for) against dispatch-wait-repeat, at 32- and 16-step chunks.
#   bash scripts/gpu/run37.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --reps 9 --tp 1 --no-prefill --batch 1 32"
timeout 80 python3 scripts/benchmark.py $A --chunks queued > $OUT/q32.log 2>&1
timeout 80 python3 scripts/benchmark.py $A --chunks sync > $OUT/s32.log 2>&1
timeout 80 python3 scripts/benchmark.py $A --chunks queued --steps 16 > $OUT/q16.log 2>&1
timeout 80 python3 scripts/benchmark.py $A --chunks sync --steps 16 > $OUT/s16.log 2>&1
grep -iE "error|Traceback" $OUT/*.log | head -5
for f in q32 s32 q16 s16; do echo "== $f"; grep bandwidth $OUT/$f.log | head -1; sed -n '/^llama/,$p' $OUT/$f.log | tail -2; done
