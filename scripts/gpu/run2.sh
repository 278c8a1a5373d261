#!/usr/bin/env bash
# Device call 2: llama2-7b tp 1/2 x batch 1/32 with default flags, then tp 2 with XLA's one-shot
# all-reduce kernel. Tables last.
set -u
export PYTHONUNBUFFERED=1
B="python3 scripts/benchmark.py --shape llama2-7b --ctx 1024"
XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_module_re=.*decode.*" timeout 300 $B --tp 1 2 --batch 1 32 \
  --json $OUT/base.json > $OUT/base.log 2>&1
tar czf $OUT/hlo.tgz -C /tmp/hlo . 2>/dev/null
XLA_FLAGS="--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true" timeout 200 $B --tp 2 --batch 1 32 \
  --no-prefill --json $OUT/oneshot.json > $OUT/oneshot.log 2>&1
grep -v '^{' $OUT/base.log | grep -v bfc_alloc | tail -8; grep -v '^{' $OUT/oneshot.log | grep -v bfc_alloc | tail -4
