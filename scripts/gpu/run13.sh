# Issue 3, session 4, call 3: one-row padding of the projections (committed for row-parallel
# ones) and the Pallas attention's tiles, in the decode step. tp1 b1 on GPU 0 beside tp1 b32 on
# GPU 1, then tp2.   bash scripts/gpu/run13.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
V="python3 scripts/gpu/variant.py"
A="--shape llama2-7b --ctx 1024 --reps 5 --no-prefill"
t() { grep -E "^ +[12] +(xla|custom|shard_map) " "$1" | sed "s|^|$2 |"; }
(
 export CUDA_VISIBLE_DEVICES=0
 timeout 60 $V base $A --tp 1 --batch 1 --kernels xla pallas > $OUT/b1_base.log 2>&1
 timeout 45 $V no_pad $A --tp 1 --batch 1 --kernels xla > $OUT/b1_no_pad.log 2>&1
 timeout 60 $V pad_all $A --tp 1 --batch 1 --kernels xla pallas > $OUT/b1_pad_all.log 2>&1
 for a in 128,512,8,3 64,256,4,3 32,512,4,3; do
   timeout 45 $V attn=$a $A --tp 1 --batch 1 --kernels pallas > $OUT/b1_attn_${a//,/_}.log 2>&1
 done
) &
(
 export CUDA_VISIBLE_DEVICES=1
 timeout 80 $V base $A --tp 1 --batch 32 --kernels xla pallas > $OUT/b32_base.log 2>&1
 for a in 128,512,8,3 64,512,8,3 64,1024,4,4; do
   timeout 55 $V attn=$a $A --tp 1 --batch 32 --kernels pallas > $OUT/b32_attn_${a//,/_}.log 2>&1
 done
) &
wait
timeout 110 $V base $A --tp 2 --batch 1 32 --all-reduce custom --kernels xla pallas > $OUT/tp2_base.log 2>&1
timeout 50 $V pad_all $A --tp 2 --batch 1 --all-reduce custom --kernels xla > $OUT/tp2_pad_all.log 2>&1
for f in $OUT/*.log; do n=$(basename $f .log); t $f $n; done
grep -h "greedy\|Error" $OUT/*.log | head
