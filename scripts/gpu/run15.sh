# Issue 3, session 4, call 5: the table with the defaults (now also: batch-1 decode carries its
# zero second row through the layers; synchronous collectives), and the async-collective default
# off for comparison.   bash scripts/gpu/run15.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --reps 5"
timeout 240 python3 scripts/benchmark.py $A --tp 1 2 --batch 1 32 --json $OUT/table.json > $OUT/table.log 2>&1
XLA_FLAGS=--xla_gpu_disable_async_collectives=REDUCESCATTER timeout 90 python3 scripts/benchmark.py $A --tp 2 --batch 1 32 > $OUT/async.log 2>&1
timeout 70 python3 scripts/benchmark.py $A --tp 1 --batch 1 --kernels xla --no-prefill > $OUT/tp1_xla_attention.log 2>&1
for f in async tp1_xla_attention; do grep -E "^ +[12] +(xla|custom)" $OUT/$f.log | sed "s|^|$f |"; grep -i "error" $OUT/$f.log | head -2; done
sed -n '/^llama2-7b/,$p' $OUT/table.log; grep -i "error\|Traceback" $OUT/table.log | head
