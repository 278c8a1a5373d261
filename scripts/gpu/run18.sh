# Issue 3, session 5, call 1: check the refactored all_reduce.cu on 2 GPUs, then per-kernel
# traces of batch 1 at tp 1 and 2 (the HLO text comes back to fix trace_summary's fusion names).
#   bash scripts/gpu/run18.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --reps 3 --no-prefill"
timeout 120 python3 scripts/gpu/all_reduce_check.py --tp 2 --sizes 4096 > $OUT/check.log 2>&1
tail -8 $OUT/check.log
timeout 200 python3 scripts/benchmark.py $A --tp 1 2 --batch 1 --trace /tmp/tr > $OUT/trace_b1.log 2>&1
for d in /tmp/tr/*; do gzip -c $d/decode.hlo.txt > $OUT/$(basename $d).hlo.txt.gz; done
grep -E "^==|stream|us/step" $OUT/trace_b1.log | cut -c1-180
sed -n '/^llama2-7b/,$p' $OUT/trace_b1.log; grep -il "error\|Traceback" $OUT/*.log
