#!/usr/bin/env bash
# Next device call for issue 3 (NOT YET RUN): where does the committed model's step time go?
# Kernel tables (benchmark.py --trace) for tp 1 and 2 at batch 1, with XLA's Triton GEMMs and with
# them turned off (dots to cuBLAS, whose GEMV ran at 91% of bandwidth in call 5 against 57-81%
# for the Triton ones), and tp 2 with its all-reduces synchronous and inside the command buffer.
# Then batch 32 under the fastest tp 2 flags. One process per config, own time limit; table last.
set -u
export PYTHONUNBUFFERED=1
O=/tmp/o; mkdir -p $O
SHAPE=${SHAPE:-llama2-7b}
export SYNCCB="--xla_gpu_disable_async_collectives=ALLREDUCE --xla_gpu_enable_command_buffer=+COLLECTIVES"
export CUBLAS="--xla_gpu_enable_triton_gemm=false"
PROF="--xla_enable_command_buffers_during_profiling=true"
go() {  # name timeout xla_flags benchmark-args...
  local name=$1 t=$2 flags=$3; shift 3
  XLA_FLAGS="$flags" timeout $t python3 scripts/benchmark.py --shape $SHAPE --ctx 1024 "$@" \
    --json $O/$name.json > $O/$name.log 2>&1
  echo "$name rc=$? $(date +%T)"
}
python3 scripts/gpu/flags.py triton_gemm cublas disable_async command_buffer > $O/flags.txt 2>&1
CUDA_VISIBLE_DEVICES=0 go tp1 100 "$PROF" --tp 1 --batch 1 --no-prefill --trace $O/tr_a &
CUDA_VISIBLE_DEVICES=1 go tp1_cublas 100 "$CUBLAS $PROF" --tp 1 --batch 1 --no-prefill --trace $O/tr_b &
wait
go tp2 80 "$PROF" --tp 2 --batch 1 --no-prefill --trace $O/tr_c
go tp2_synccb 80 "$SYNCCB $PROF" --tp 2 --batch 1 --no-prefill --trace $O/tr_d
go tp2_cublas_synccb 80 "$CUBLAS $SYNCCB" --tp 2 --batch 1 --no-prefill
best=$(python3 - <<'PY'
import json, os
flags = {"tp2": "", "tp2_synccb": os.environ["SYNCCB"], "tp2_cublas_synccb": os.environ["CUBLAS"] + " " + os.environ["SYNCCB"]}
ms = {}
for n in flags:
    try: ms[n] = json.load(open(f"/tmp/o/{n}.json"))[0]["ms_per_step"]
    except Exception: pass
print(flags[min(ms, key=ms.get)] if ms else "")
PY
)
echo "batch 32 flags: '$best'"
go b32 230 "$best" --tp 1 2 --batch 32
tar czf $OUT/res.tgz -C $O --exclude='*.pb' --exclude='*.json.gz' .
for f in $O/*.log; do echo "== $(basename $f)"; grep -E "^==|us/step|Error|error:|Traceback" $f | grep -v bfc_alloc | head -14 | cut -c1-150; done
echo; for f in $O/*.json; do python3 -c "
import json,sys; n=sys.argv[1].split('/')[-1][:-5]
for r in json.load(open(sys.argv[1])): print(f\"{n:18s} tp{r['tp']} b{r['batch']:<3d} {r['ms_per_step']:7.3f} ms {r['tokens_per_s']:8.1f} tok/s {r['roofline']:5.0%} floor {r['roofline_ms']:.3f}\")" $f; done
