# Issue 3, session 6, call 6 (one H200): the new default (programs=128) against the old (512) on
# the GQA shape at batch 1 and 8, where 128 gives 2 splits instead of 8 at batch 8.
#   bash scripts/gpu/run34.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama3-8b --ctx 1024 --reps 5 --tp 1 --no-prefill --batch 1 8"
timeout 50 python3 scripts/gpu/variant.py base $A > $OUT/p128.log 2>&1
timeout 50 python3 scripts/gpu/variant.py attn=64,512,4,3 $A > $OUT/p512.log 2>&1
for f in p128 p512; do echo "== $f"; sed -n '/^llama/,$p' $OUT/$f.log; done; grep -iE "error|Traceback" $OUT/*.log | head -3
