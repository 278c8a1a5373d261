# Issue 3, session 4, call 6: the all-reduce fused with the residual add and RMSNorm
# (one_shot_add_norm): checked against the unfused steps, then the table with it.
#   bash scripts/gpu/run16.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --reps 5"
timeout 150 python3 scripts/gpu/all_reduce_check.py --tp 2 --sizes 4096 > $OUT/check.log 2>&1
tail -6 $OUT/check.log
timeout 240 python3 scripts/benchmark.py $A --tp 1 2 --batch 1 32 --json $OUT/table.json > $OUT/table.log 2>&1
timeout 80 python3 scripts/benchmark.py $A --tp 2 --batch 1 --no-prefill --all-reduce shard_map > $OUT/unfused.log 2>&1
grep -E "^ +2 +shard_map|\"tokens\"" $OUT/unfused.log | cut -c1-160
sed -n '/^llama2-7b/,$p' $OUT/table.log; grep -h "\"tokens\"" $OUT/table.log | cut -c1-120; grep -il "error\|Traceback" $OUT/*.log
