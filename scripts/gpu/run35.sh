# Issue 3, for session 7 on nvidia-h200-x2 (not yet run): session 6's decode kernel (splits merged
# in the kernel, ~128 programs) at tp 2 for the first time -- checks, GPU parity with transformers
# at tp 1 and 2, then the table at tp 1 and 2, batch 1, 8 and 32, with the defaults.
#   bash scripts/gpu/run35.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
timeout 100 python3 scripts/gpu/pallas_check.py --batch 1 8 32 --repeats 50 > $OUT/check.log 2>&1; tail -12 $OUT/check.log
timeout 150 python3 scripts/gpu/parity.py --tp 1 2 --tokens 24 > $OUT/parity.log 2>&1
timeout 300 python3 scripts/benchmark.py --shape llama2-7b --ctx 1024 --reps 7 --tp 1 2 --batch 1 8 32 --json $OUT/table.json > $OUT/table.log 2>&1
grep -v "Writing model" $OUT/parity.log | tail -12
grep -iE "error|Traceback" $OUT/*.log | head -5
grep bandwidth $OUT/table.log; sed -n '/^llama2-7b/,$p' $OUT/table.log
