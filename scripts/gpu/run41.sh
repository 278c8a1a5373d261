# Issue 3, session 7, call 6 (one H200): the GQA shape (Llama-3-8B) with this session's defaults
# (queued chunks, qkv partials summed in the decode kernel), A/B against XLA's qkv sum at b1/b8;
# int8 weights (which keep XLA's sum) still run.
#   bash scripts/gpu/run41.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama3-8b --ctx 1024 --tp 1 --reps 7 --no-prefill"
timeout 90 python3 scripts/benchmark.py $A --batch 1 8 32 > $OUT/gqa.log 2>&1
timeout 60 python3 scripts/gpu/variant.py noqkvfold $A --batch 1 8 > $OUT/gqa_nofold.log 2>&1
timeout 60 python3 scripts/benchmark.py --shape llama2-7b --ctx 1024 --tp 1 --reps 7 --no-prefill --batch 1 --quantization int8 > $OUT/int8.log 2>&1
grep -iE "error|Traceback" $OUT/*.log | head -5
for f in gqa gqa_nofold int8; do echo "== $f"; grep bandwidth $OUT/$f.log; sed -n '/^llama/,$p' $OUT/$f.log; done
