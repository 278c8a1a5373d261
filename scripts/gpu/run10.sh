# Issue 3, session 3, call 3: decode attention as multiply-and-reduce (model.attention_scores /
# attention_values) with the custom all-reduce: the table, the einsum form at tp1 b1 for
# comparison, and a kernel trace of tp2 b1.
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache
# (The JAXTP_DECODE_ATTENTION switch was removed after this run: the reduce form gained nothing.)
B="python3 scripts/benchmark.py --shape llama2-7b --ctx 1024 --reps 5"
JAXTP_DECODE_ATTENTION=reduce timeout 300 $B --tp 1 2 --batch 1 32 --all-reduce custom --json $OUT/table.json 2>&1 | tee $OUT/table.log
JAXTP_DECODE_ATTENTION=einsum timeout 100 $B --tp 1 --batch 1 --no-prefill 2>&1 | tee $OUT/einsum_b1.log
JAXTP_DECODE_ATTENTION=reduce timeout 120 $B --tp 2 --batch 1 --no-prefill --all-reduce custom --trace /tmp/trace 2>&1 | tail -32 | tee $OUT/trace_reduce.log
