# Issue 3, session 6, call 5 (one H200): a tp1 b1 trace of the committed defaults (where the time
# goes now), and 4 vs 9 sequence splits (programs 128 vs 512) at batch 1 and 8.
#   bash scripts/gpu/run33.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --reps 7 --tp 1 --no-prefill"
timeout 60 python3 scripts/benchmark.py $A --batch 1 --trace /tmp/tr > $OUT/trace.log 2>&1
timeout 60 python3 scripts/gpu/variant.py attn=64,128,4,3 $A --batch 1 8 > $OUT/p128.log 2>&1
timeout 60 python3 scripts/gpu/variant.py base $A --batch 1 8 > $OUT/p512.log 2>&1
grep -E "^== /device|  [0-9.]+ us/step" $OUT/trace.log | head -16 | cut -c1-150
for f in p128 p512; do echo "== $f"; sed -n '/^llama/,$p' $OUT/$f.log; done
