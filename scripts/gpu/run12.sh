# Issue 3, session 4, call 2: where the Pallas decode step loses time, and XLA-side tweaks, all in
# the real decode step (scripts/gpu/variant.py patches one change per run). Traces print kernel tables.
#   bash scripts/gpu/run12.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
V="python3 scripts/gpu/variant.py"
A="--shape llama2-7b --ctx 1024 --reps 5 --no-prefill --bandwidth-mib 1024"
t() { grep -E "^ +[12] +(xla|custom|shard_map) " "$1" | sed "s|^|$2 |"; }
(
 export CUDA_VISIBLE_DEVICES=0
 timeout 150 $V base $A --tp 1 --batch 1 --kernels xla pallas --trace /tmp/tr1 > $OUT/tp1_trace.log 2>&1
) &
(
 export CUDA_VISIBLE_DEVICES=1
 for v in gemv_only attn_only "gemv=128,64,0,4,4,auto" "gemv=256,32,0,8,3,auto" "gemv=64,64,0,4,3,auto"; do
   timeout 70 $V "$v" $A --tp 1 --batch 1 --kernels pallas > "$OUT/tp1_$v.log" 2>&1
 done
 timeout 60 $V norm_barrier $A --tp 1 --batch 1 --kernels xla > $OUT/tp1_norm_barrier.log 2>&1
) &
wait
timeout 100 $V base $A --tp 2 --batch 1 --all-reduce custom --kernels xla --trace /tmp/tr2 > $OUT/tp2_trace.log 2>&1
timeout 60 $V pad_rows $A --tp 2 --batch 1 --all-reduce custom --kernels xla > $OUT/tp2_pad_rows.log 2>&1
timeout 80 $V attn_only $A --tp 2 --batch 1 32 --all-reduce custom --kernels pallas > $OUT/tp2_attn_only.log 2>&1
timeout 60 $V gemv_only $A --tp 2 --batch 1 --all-reduce custom --kernels pallas > $OUT/tp2_gemv_only.log 2>&1
for f in $OUT/*.log; do n=$(basename $f .log); t $f $n; done
grep -E "^==|us/step" $OUT/tp1_trace.log | head -70
grep -E "^==|us/step" $OUT/tp2_trace.log | head -30
