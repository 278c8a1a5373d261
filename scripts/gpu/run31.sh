# Issue 3, session 6, call 3 (one H200): the split-K sum + residual add + RMSNorm kernel at tp 1
# (kernels/add_norm.py): parity with transformers on the GPU first, A/B/A against XLA's three
# kernels at tp1 b1, fewer attention splits, a trace, then the tables (default, and 4 splits).
# (kernels/add_norm.py and variant no_add_norm were removed after this call measured them slower)
#   bash scripts/gpu/run31.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --reps 9 --tp 1"
V=scripts/gpu/variant.py
timeout 110 python3 scripts/gpu/parity.py --tp 1 --tokens 24 > $OUT/parity.log 2>&1
for v in base no_add_norm base attn=64,128,4,3; do
  echo "== $v" >> $OUT/ab.log; timeout 60 python3 $V $v $A --batch 1 --no-prefill >> $OUT/ab.log 2>&1; done
timeout 70 python3 $V base $A --batch 1 --no-prefill --trace /tmp/tr > $OUT/trace.log 2>&1
timeout 80 python3 $V base $A --batch 1 32 --json $OUT/table.json > $OUT/table.log 2>&1
timeout 80 python3 $V attn=64,128,4,3 $A --batch 1 32 --json $OUT/table4.json > $OUT/table4.log 2>&1
grep -v "Writing model" $OUT/parity.log | tail -7
grep -E "^== /device|  [0-9.]+ us/step" $OUT/trace.log | head -24 | cut -c1-150
grep -iE "error|Traceback" $OUT/*.log | head -5
grep -E "^==|^  1 " $OUT/ab.log
for f in table table4; do sed -n '/^llama2-7b/,$p' $OUT/$f.log; done
