# Issue 3 (session 5, not yet run): greedy and logits parity with transformers on the GPUs at
# tp 1 and 2 with the GPU-only paths on (Pallas decode step, NVLink all-reduce, CUDA graphs),
# float32 with full-precision matmuls.
#   bash scripts/gpu/run28.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
timeout 400 python3 scripts/gpu/parity.py --tp 1 2 --tokens 24 > $OUT/parity.log 2>&1
grep -v "Writing model" $OUT/parity.log | tail -14
