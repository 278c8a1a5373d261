# Issue 3, session 3, call 2: is tp2 decode host-launch-bound? Whole decode loop in one CUDA graph
# (XLA command buffers around the while loop) against the default, plus a trace.
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache
B="python3 scripts/benchmark.py --shape llama2-7b --ctx 1024 --no-prefill --reps 5"
W="--xla_gpu_enable_command_buffer=+WHILE"
XLA_FLAGS="$W" timeout 150 $B --tp 2 1 --batch 1 --all-reduce custom --json $OUT/while_b1.json 2>&1 | tee $OUT/while_b1.log
timeout 120 $B --tp 2 --batch 1 --all-reduce custom --trace /tmp/trace 2>&1 | tee $OUT/trace_default.log
XLA_FLAGS="$W" timeout 120 $B --tp 2 --batch 1 --all-reduce custom --trace /tmp/trace 2>&1 | tail -30 | tee $OUT/trace_while.log
XLA_FLAGS="$W" timeout 170 $B --tp 2 1 --batch 32 --all-reduce custom --json $OUT/while_b32.json 2>&1 | tee $OUT/while_b32.log
