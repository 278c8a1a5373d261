# Issue 3, session 5, call 7: batch 1 without splitting the sequence (one program per row and KV
# head, no merge kernels after it), with longer tiles to keep each SM streaming.
#   bash scripts/gpu/run24.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --reps 5 --no-prefill --tp 1 2 --batch 1"
for v in base attn=128,16,8,3 attn=128,16,8,2 attn=64,16,4,4; do
  echo "== $v" >> $OUT/variants.log
  timeout 100 python3 scripts/gpu/variant.py $v $A >> $OUT/variants.log 2>&1
done
grep -E "^==|^  [12] |rror" $OUT/variants.log
