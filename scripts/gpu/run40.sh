# Issue 3, session 7, call 5 (one H200): qkv's split-K partials summed in the decode kernel (one
# XLA reduction kernel fewer per layer): GPU parity with transformers at tp 1, the table at
# b1/8/32 with prefill, and A/B/A against XLA's sum.
#   bash scripts/gpu/run40.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --tp 1"
timeout 120 python3 scripts/gpu/parity.py --tp 1 --tokens 24 > $OUT/parity.log 2>&1
timeout 110 python3 scripts/benchmark.py $A --reps 9 --batch 1 8 32 --json $OUT/table.json > $OUT/table.log 2>&1
timeout 60 python3 scripts/gpu/variant.py noqkvfold $A --reps 7 --no-prefill --batch 1 8 > $OUT/nofold.log 2>&1
timeout 60 python3 scripts/benchmark.py $A --reps 7 --no-prefill --batch 1 8 > $OUT/fold.log 2>&1
grep -v "Writing model" $OUT/parity.log | tail -7
grep -iE "error|Traceback" $OUT/*.log | head -5
for f in table nofold fold; do echo "== $f"; grep bandwidth $OUT/$f.log; sed -n '/^llama/,$p' $OUT/$f.log; done
