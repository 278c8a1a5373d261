# Issue 3, session 6, call 1 (one H200: the 2-GPU kind is not lent): the decode step's splits
# merged in the Pallas kernel (last program to arrive merges) -- checked (bitwise caches, 100
# repeats equal), then A/B/A against XLA's merge at tp 1, a trace of tp1 b1, int8 weights, and
# greedy parity with transformers at tp 1 on the GPU.
# (variant merge_xla, XLA's merge, was removed after run30 measured it slower)
#   bash scripts/gpu/run29.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --reps 7 --tp 1"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
timeout 120 python3 scripts/gpu/pallas_check.py --batch 1 8 32 --repeats 100 > $OUT/check.log 2>&1; tail -13 $OUT/check.log
timeout 130 python3 scripts/gpu/variant.py base $A --batch 1 32 --json $OUT/base.json > $OUT/base.log 2>&1
timeout 80 python3 scripts/gpu/variant.py merge_xla $A --batch 1 --no-prefill > $OUT/mx.log 2>&1
timeout 80 python3 scripts/gpu/variant.py base $A --batch 1 --no-prefill --trace /tmp/tr > $OUT/trace.log 2>&1
timeout 70 python3 scripts/benchmark.py $A --batch 1 32 --no-prefill --quantization int8 > $OUT/int8.log 2>&1
timeout 60 python3 scripts/gpu/parity.py --tp 1 --tokens 24 > $OUT/parity.log 2>&1
grep -E "^==|stream|us/step|x/step" $OUT/trace.log | head -40 | cut -c1-200
grep -v "Writing model" $OUT/parity.log | tail -6
grep -il "error\|Traceback" $OUT/*.log
for f in base mx trace int8; do echo "== $f"; sed -n '/^llama2-7b/,$p' $OUT/$f.log; done
