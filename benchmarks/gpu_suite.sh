#!/usr/bin/env bash
# The GPU checks and the decode table at the given tensor-parallel sizes, on one machine:
#   1. pallas_check.py   the Pallas decode step against XLA's (bitwise caches, repeat-stable merge)
#   2. all_reduce_check.py   the one-shot all-reduce against NCCL (only when some tp > 1)
#   3. parity.py         greedy and logits parity with transformers, every family, each tp
#   4. benchmark.py      ms/token, tokens/s, prefill and roofline at $SHAPE (default llama2-7b)
# Logs go to $OUT (default /tmp/gpu_suite); the summaries print in that order, the table last.
#   bash benchmarks/gpu_suite.sh 1 [2 4 8]
set -u
cd "$(dirname "$0")/.."
TPS=("${@:-1}")
OUT=${OUT:-/tmp/gpu_suite}; mkdir -p "$OUT"
SHAPE=${SHAPE:-llama2-7b}
export PYTHONUNBUFFERED=1 JAXTP_CACHE=${JAXTP_CACHE:-/tmp/jaxtp-cache} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
MAX_TP=$(printf '%s\n' "${TPS[@]}" | sort -n | tail -1)

timeout 240 python3 benchmarks/pallas_check.py --repeats 100 > "$OUT/pallas.log" 2>&1
[ "$MAX_TP" -gt 1 ] && timeout 180 python3 benchmarks/all_reduce_check.py --tp "$MAX_TP" > "$OUT/all_reduce.log" 2>&1
timeout 300 python3 benchmarks/parity.py --tp "${TPS[@]}" --tokens 24 > "$OUT/parity.log" 2>&1
timeout 400 python3 benchmarks/benchmark.py --shape "$SHAPE" --ctx 1024 --tp "${TPS[@]}" --batch 1 8 32 \
  --reps 7 --json "$OUT/table.json" > "$OUT/table.log" 2>&1

echo "== pallas_check"; tail -8 "$OUT/pallas.log"
[ -f "$OUT/all_reduce.log" ] && { echo "== all_reduce_check"; tail -14 "$OUT/all_reduce.log"; }
echo "== parity"; grep -v "Writing model" "$OUT/parity.log" | tail -$((2 + 5 * ${#TPS[@]}))
echo "== errors"; grep -il "error\|Traceback" "$OUT"/*.log
echo "== table"; grep "^device:\|^bandwidth at the end" "$OUT/table.log"; sed -n "/^$SHAPE/,\$p" "$OUT/table.log"
