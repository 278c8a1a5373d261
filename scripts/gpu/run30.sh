# Issue 3, session 6, call 2 (one H200): the in-kernel merge reworked after call 1 (one round of
# loads for all splits instead of a loop of dependent loads; the arrival counters handed from
# layer to layer, reset by the kernel, instead of a memset per layer): check, then A/B/A against
# XLA's merge at tp1 b1, split counts, exhaustive GEMM tiling search, parity at tp 1.
# (variant merge_xla, XLA's merge, was removed after run30 measured it slower)
#   bash scripts/gpu/run30.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --reps 9 --tp 1 --batch 1 --no-prefill"
V=scripts/gpu/variant.py
timeout 100 python3 scripts/gpu/pallas_check.py --batch 1 8 --repeats 100 > $OUT/check.log 2>&1; tail -8 $OUT/check.log
for v in base merge_xla base attn=64,256,4,3 attn=64,128,4,3 attn=64,512,4,2; do
  echo "== $v" >> $OUT/ab.log; timeout 60 python3 $V $v $A >> $OUT/ab.log 2>&1; done
echo "== exhaustive tiling" >> $OUT/ab.log
XLA_FLAGS=--xla_gpu_exhaustive_tiling_search=true timeout 120 python3 $V base $A --trace /tmp/tr >> $OUT/ab.log 2>&1
timeout 120 python3 scripts/gpu/parity.py --tp 1 --tokens 24 > $OUT/parity.log 2>&1
grep -v "Writing model" $OUT/parity.log | tail -7
grep -E "^== /device|gemm_fusion|  kernel " $OUT/ab.log | cut -c1-150
grep -iE "error|Traceback" $OUT/*.log | head -5
grep -E "^==|^  1 " $OUT/ab.log
