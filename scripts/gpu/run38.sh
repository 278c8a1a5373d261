# Issue 3, session 7, call 3 (one H200): the decode kernel prefetching o_proj's weight into L2
# (extra programs read it while the attention programs wait on their loads) against no prefetch:
# traces at tp1 b1 (o_proj's GEMM and the kernel's times), then b1/8/32 timings, programs 64/256.
#   bash scripts/gpu/run38.sh
# (The prefetch code these ran was dropped after call 4: slower; see NOTES session 7. Its variants
# noprefetch / prefetch=N,F,U are gone from variant.py with it.)
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --reps 7 --tp 1 --no-prefill"
timeout 100 python3 scripts/gpu/pallas_check.py --batch 1 8 32 --repeats 20 > $OUT/check.log 2>&1
timeout 70 python3 scripts/benchmark.py $A --batch 1 --trace /tmp/t0 > $OUT/tr_pre.log 2>&1
timeout 70 python3 scripts/gpu/variant.py noprefetch $A --batch 1 --trace /tmp/t1 > $OUT/tr_nopre.log 2>&1
timeout 80 python3 scripts/benchmark.py $A --batch 1 8 32 > $OUT/pre.log 2>&1
timeout 80 python3 scripts/gpu/variant.py noprefetch $A --batch 1 8 32 > $OUT/nopre.log 2>&1
timeout 60 python3 scripts/gpu/variant.py prefetch=64 $A --batch 1 > $OUT/pre64.log 2>&1
timeout 60 python3 scripts/gpu/variant.py prefetch=256 $A --batch 1 > $OUT/pre256.log 2>&1
tail -4 $OUT/check.log
grep -iE "error|Traceback" $OUT/*.log | head -5
for f in tr_pre tr_nopre; do echo "== $f"; sed -n '/^== \/device/,/^{/p' $OUT/$f.log | head -12 | cut -c1-150; done
for f in pre nopre pre64 pre256; do echo "== $f"; grep bandwidth $OUT/$f.log | head -1; sed -n '/^llama/,$p' $OUT/$f.log | tail -3; done
