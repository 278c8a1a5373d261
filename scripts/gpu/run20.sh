# Issue 3, session 5, call 3: where the time goes with the fused decode step: traces of tp1 b1,
# tp2 b1 and tp2 b32 (kernels and host events: are the steps CUDA graphs?), then XLA flags that
# change the GEMMs and the command buffers, timed at batch 1.
#   bash scripts/gpu/run20.sh
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache PYTHONPATH=$PWD
A="--shape llama2-7b --ctx 1024 --reps 5 --no-prefill"
timeout 150 python3 scripts/benchmark.py $A --tp 1 2 --batch 1 --trace /tmp/tr > $OUT/trace_b1.log 2>&1
timeout 100 python3 scripts/benchmark.py $A --tp 2 --batch 32 --trace /tmp/tr > $OUT/trace_b32.log 2>&1
for d in /tmp/tr/*; do gzip -c $d/decode.hlo.txt > $OUT/$(basename $d).hlo.txt.gz; done
f=$(ls /tmp/tr/tp2_b1*/plugins/profile/*/*.xplane.pb | head -1); gzip -c $f > $OUT/tp2_b1.xplane.pb.gz
for flags in "--xla_gpu_enable_triton_gemm=false" "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,COLLECTIVES" "--xla_gpu_graph_min_graph_size=1"; do
  echo "== XLA_FLAGS=$flags" >> $OUT/flags.log
  XLA_FLAGS="$flags" timeout 100 python3 scripts/benchmark.py $A --tp 1 2 --batch 1 >> $OUT/flags.log 2>&1
done
for f in $OUT/trace_b1.log $OUT/trace_b32.log; do grep -E "^==|stream|us/step|x/step" $f | cut -c1-200; done
grep -E "^==|^  [12] |Error|error" $OUT/flags.log
for f in $OUT/trace*.log; do sed -n '/^llama2-7b/,$p' $f; done
