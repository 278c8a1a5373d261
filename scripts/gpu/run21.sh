# Issue 3, session 5, call 4: CUDA graphs over the collectives (and the decode loop), and the
# Pallas decode step's grid at batch 1 (the kernel took 9 us at tp1 in call 3: two waves?).
#   bash scripts/gpu/run21.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --reps 5 --no-prefill --tp 1 2 --batch 1"
CB=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,COLLECTIVES
for flags in "" "--xla_gpu_enable_command_buffer=+COLLECTIVES" "--xla_gpu_enable_command_buffer=$CB" "--xla_gpu_enable_command_buffer=$CB,WHILE,CONDITIONAL"; do
  echo "== XLA_FLAGS=$flags" >> $OUT/flags.log
  XLA_FLAGS="$flags" timeout 100 python3 scripts/benchmark.py $A >> $OUT/flags.log 2>&1
done
for v in attn=64,512,4,2 attn=32,512,4,3 attn=64,128,4,3; do
  echo "== $v" >> $OUT/variants.log
  XLA_FLAGS="--xla_gpu_enable_command_buffer=$CB" timeout 100 python3 scripts/gpu/variant.py $v $A >> $OUT/variants.log 2>&1
done
grep -E "^==|^  [12] |rror|bandwidth" $OUT/flags.log $OUT/variants.log
