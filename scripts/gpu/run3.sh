#!/usr/bin/env bash
# Device call 3: after the vocab-parallel embedding fix. Each config in its own process with its
# own time limit, so one hang cannot eat the call. Tables last.
set -u
export PYTHONUNBUFFERED=1
B="python3 scripts/benchmark.py --shape llama2-7b --ctx 1024"
XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_module_re=.*(decode|prefill).*" timeout 170 $B --tp 2 \
  --batch 1 32 --json $OUT/tp2.json > $OUT/tp2.log 2>&1
tar czf $OUT/hlo.tgz -C /tmp/hlo --exclude='*.ll' --exclude='*buffer-assignment*' . 2>/dev/null
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,COLLECTIVES --xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true" \
  timeout 100 $B --tp 2 --batch 1 --no-prefill --json $OUT/tp2cb.json > $OUT/tp2cb.log 2>&1
timeout 130 $B --tp 1 --batch 1 32 --json $OUT/tp1.json > $OUT/tp1.log 2>&1
for f in tp2 tp2cb tp1; do echo "== $f"; grep -v '^{' $OUT/$f.log | grep -v bfc_alloc | tail -5; done
