# Issue 3, session 7, call 4 (one H200): the L2 prefetch with 4 tiles in flight per program and
# only part of o_proj's weight (call 3: the whole weight with one tile in flight made the decode
# kernel 24.6 us against 10.1, o_proj 6.7 against 10.1), tp1 b1.
#   bash scripts/gpu/run39.sh
# (The prefetch code these ran was dropped after call 4: slower; see NOTES session 7. Its variants
# noprefetch / prefetch=N,F,U are gone from variant.py with it.)
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --reps 7 --tp 1 --no-prefill --batch 1"
timeout 60 python3 scripts/gpu/variant.py noprefetch $A > $OUT/none.log 2>&1
timeout 70 python3 scripts/benchmark.py $A --trace /tmp/t0 > $OUT/default.log 2>&1
for v in 256,0.5,4 128,0.25,4 256,1.0,4; do
  timeout 60 python3 scripts/gpu/variant.py prefetch=$v $A > $OUT/p${v//,/_}.log 2>&1; done
timeout 60 python3 scripts/gpu/variant.py noprefetch $A > $OUT/none2.log 2>&1
grep -iE "error|Traceback" $OUT/*.log | head -5
sed -n '/^== \/device/,/^{/p' $OUT/default.log | head -8 | cut -c1-150
for f in none default p256_0.5_4 p128_0.25_4 p256_1.0_4 none2; do echo "== $f"; grep bandwidth $OUT/$f.log | head -1; sed -n '/^llama/,$p' $OUT/$f.log | tail -1; done
