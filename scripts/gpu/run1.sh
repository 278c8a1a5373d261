#!/usr/bin/env bash
# Device call 1: environment, flags, baseline benchmark (llama2-7b, tp 1/2, batch 1/32).
set -u
export PYTHONUNBUFFERED=1
python3 -c "import jax, flax, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'transformers', transformers.__version__); print(jax.devices())"
nvidia-smi -L; nvidia-smi topo -m | head -5
python3 scripts/gpu/flags.py > $OUT/flags.txt; wc -l $OUT/flags.txt; grep -E "one_shot|command_buffer" $OUT/flags.txt
XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_module_re=.*decode.*" timeout 420 python3 scripts/benchmark.py \
  --shape llama2-7b --tp 1 2 --batch 1 32 --ctx 1024 --json $OUT/base.json 2>&1 | tee $OUT/base.log | grep -v '^{'
tar czf $OUT/hlo.tgz -C /tmp/hlo . 2>/dev/null; ls -la $OUT
