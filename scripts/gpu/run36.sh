# Issue 3, session 7, call 1 (one H200): where tp1 b1 time goes, and what the GEMM splits cost.
# base trace; 128-step chunks (the per-chunk host cost); qkv / o / down contractions split by
# the model (batched GEMMs, traced: their kernel times); a short-context trace (the decode
# kernel's fixed cost).
#   bash scripts/gpu/run36.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --reps 7 --tp 1 --no-prefill --batch 1"
timeout 70 python3 scripts/benchmark.py $A --trace /tmp/t0 > $OUT/base.log 2>&1
timeout 60 python3 scripts/benchmark.py $A --steps 128 --reps 5 > $OUT/steps128.log 2>&1
timeout 70 python3 scripts/gpu/variant.py qkv_split=4+rowsplit=o:16 $A --trace /tmp/t1 > $OUT/v1.log 2>&1
timeout 70 python3 scripts/gpu/variant.py qkv_split=2+rowsplit=o:4,down:16 $A --trace /tmp/t2 > $OUT/v2.log 2>&1
timeout 70 python3 scripts/gpu/variant.py rowsplit=o:32,down:4 $A --trace /tmp/t3 > $OUT/v3.log 2>&1
timeout 60 python3 scripts/benchmark.py --shape llama2-7b --ctx 128 --reps 5 --tp 1 --no-prefill --batch 1 --trace /tmp/t4 > $OUT/ctx128.log 2>&1
grep -iE "error|Traceback" $OUT/*.log | head -5
for f in base v1 v2 v3 ctx128; do echo "== $f"; grep -E "^== /device|  [0-9.]+ us/step" $OUT/$f.log | head -14 | cut -c1-160; done
for f in base steps128 v1 v2 v3 ctx128; do echo "== $f"; grep bandwidth $OUT/$f.log | head -1; sed -n '/^llama/,$p' $OUT/$f.log | tail -1; done
