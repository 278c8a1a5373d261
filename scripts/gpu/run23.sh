# Issue 3, session 5, call 6: collectives in CUDA graphs or not, at tp2, batch 1 and 32 with
# prefill, interleaved A B A (call 5's tp2 figures came out below call 4's).
#   bash scripts/gpu/run23.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --reps 5 --tp 2 --batch 1 32"
for flags in "--xla_gpu_enable_command_buffer=+COLLECTIVES" "--xla_gpu_enable_command_buffer=-COLLECTIVES" "--xla_gpu_enable_command_buffer=+COLLECTIVES"; do
  echo "== XLA_FLAGS=$flags" >> $OUT/ab.log
  XLA_FLAGS="$flags" timeout 120 python3 scripts/benchmark.py $A >> $OUT/ab.log 2>&1
done
grep -E "^==|^  2 |rror" $OUT/ab.log
