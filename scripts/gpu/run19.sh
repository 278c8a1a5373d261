# Issue 3, session 5, call 2: the fused Pallas decode step (rope + cache write + attention):
# correctness against XLA's path in bf16, then the step at batch 1 and 32 (the kernel allowed up
# to 64 rows here), pallas against xla, and two grid sizes at batch 1.
#   bash scripts/gpu/run19.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --reps 5 --no-prefill"
timeout 150 python3 scripts/gpu/pallas_check.py > $OUT/check.log 2>&1
tail -13 $OUT/check.log
timeout 300 python3 scripts/gpu/variant.py rows=64 $A --tp 1 2 --batch 1 32 --kernels pallas xla --json $OUT/t1.json > $OUT/t1.log 2>&1
for p in 256 1024; do
  timeout 100 python3 scripts/gpu/variant.py attn=64,$p,4,3 $A --tp 1 2 --batch 1 --kernels pallas > $OUT/t_$p.log 2>&1
done
for f in $OUT/t*.log; do echo "== $f"; sed -n '/^llama2-7b/,$p' $f; done
grep -il "error\|Traceback" $OUT/*.log
