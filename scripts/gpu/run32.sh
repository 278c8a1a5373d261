# Issue 3, session 6, call 4 (one H200): the table with the defaults as committed (splits merged in
# the decode kernel), b1 again and with 4 splits, the GQA shape, int8 weights, parity at tp 1.
#   bash scripts/gpu/run32.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --reps 9 --tp 1"
timeout 100 python3 scripts/benchmark.py $A --batch 1 32 --json $OUT/table.json > $OUT/table.log 2>&1
timeout 50 python3 scripts/gpu/variant.py attn=64,128,4,3 $A --batch 1 --no-prefill > $OUT/attn.log 2>&1
timeout 50 python3 scripts/benchmark.py $A --batch 1 --no-prefill > $OUT/again.log 2>&1
timeout 80 python3 scripts/benchmark.py --shape llama3-8b --ctx 1024 --reps 5 --tp 1 --batch 1 32 --no-prefill > $OUT/gqa.log 2>&1
timeout 80 python3 scripts/benchmark.py $A --batch 1 32 --no-prefill --quantization int8 > $OUT/int8.log 2>&1
timeout 100 python3 scripts/gpu/parity.py --tp 1 --tokens 24 > $OUT/parity.log 2>&1
grep -v "Writing model" $OUT/parity.log | tail -7
grep -iE "error|Traceback" $OUT/*.log | head -5
for f in table attn again gqa int8; do echo "== $f"; grep bandwidth $OUT/$f.log; sed -n '/^llama/,$p' $OUT/$f.log; done
