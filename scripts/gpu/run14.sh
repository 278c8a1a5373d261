# Issue 3, session 4, call 4: the table with the defaults (custom all-reduce, Pallas attention up
# to 8 rows, one-row projections padded to two), then where tp2 b1 idles (trace per stream) and
# two flags that change streams/graphs.   bash scripts/gpu/run14.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --reps 5"
timeout 240 python3 scripts/benchmark.py $A --tp 1 2 --batch 1 32 --json $OUT/table.json > $OUT/table.log 2>&1
timeout 60 python3 scripts/benchmark.py $A --tp 2 --batch 1 --no-prefill --trace /tmp/tr > $OUT/trace.log 2>&1
XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 50 python3 scripts/benchmark.py $A --tp 2 --batch 1 --no-prefill > $OUT/no_graphs.log 2>&1
XLA_FLAGS=--xla_gpu_disable_async_collectives=ALLREDUCE,ALLGATHER timeout 50 python3 scripts/benchmark.py $A --tp 2 --batch 1 --no-prefill > $OUT/sync_coll.log 2>&1
for f in no_graphs sync_coll; do grep -E "^ +2 +custom" $OUT/$f.log | sed "s|^|$f |"; grep -i "error" $OUT/$f.log | head -2; done
grep -E "^==|stream|us/step" $OUT/trace.log | head -30 | cut -c1-220
sed -n '/^llama2-7b/,$p' $OUT/table.log
