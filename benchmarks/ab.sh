#!/usr/bin/env bash
# A/B of benchmark.py: another checkout of the project (A, e.g. the parent commit made with
# `git worktree add .ab/base HEAD~1`) against this one (B), run alternately A B A B with the same
# arguments on the same machine, so a change is judged against its parent within one lease.
# Logs go to $OUT (default /tmp/ab); each run's table prints in run order, then the comparison:
# per config the median ms/step of each side, B / A, and whether the greedy tokens agree.
#   bash benchmarks/ab.sh OTHER_TREE --shape llama2-7b --tp 1 --batch 1 8 32 --ctx 1024
set -u
cd "$(dirname "$0")/.."
OTHER=$(cd "$1" && pwd); shift
OUT=${OUT:-/tmp/ab}; mkdir -p "$OUT"
ROUNDS=${ROUNDS:-2}; LIMIT=${LIMIT:-150}
export PYTHONUNBUFFERED=1 JAXTP_CACHE=${JAXTP_CACHE:-/tmp/jaxtp-cache}

bench() {  # the benchmark script of a tree (benchmarks/ now, scripts/ before)
  for f in "$1/benchmarks/benchmark.py" "$1/scripts/benchmark.py"; do [ -f "$f" ] && { echo "$f"; return; }; done
}
for i in $(seq 1 "$ROUNDS"); do
  for side in A B; do
    tree=$([ $side = A ] && echo "$OTHER" || echo "$PWD")
    PYTHONPATH=$tree timeout "$LIMIT" python3 "$(bench "$tree")" "$@" > "$OUT/$side$i.log" 2>&1
  done
done
grep -il "error\|Traceback" "$OUT"/*.log
for i in $(seq 1 "$ROUNDS"); do
  for side in A B; do
    echo "== $side$i ($([ $side = A ] && echo "$OTHER" || echo this tree))"
    grep "bandwidth at the end" "$OUT/$side$i.log"; sed -n '/ ms\/step /,/^$/p' "$OUT/$side$i.log"
  done
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, pathlib, statistics, sys
out, rounds = pathlib.Path(sys.argv[1]), int(sys.argv[2])
runs = {side: [json.loads(line) for i in range(1, rounds + 1) for line in (out / f"{side}{i}.log").read_text().splitlines()
               if line.startswith("{")] for side in "AB"}
key = lambda r: (r["tp"], r["all_reduce"], r["kernels"], r["batch"])  # noqa: E731
print(f"\n{'tp':>3} {'all_reduce':>10} {'kernels':>7} {'batch':>5} {'A ms/step':>10} {'B ms/step':>10} {'B/A':>7} "
      f"{'A prefill':>10} {'B prefill':>10} tokens")
for k in sorted({key(r) for r in runs["A"]}):
    a, b = ([r for r in runs[s] if key(r) == k] for s in "AB")
    ms = [statistics.median(r["ms_per_step"] for r in x) if x else float("nan") for x in (a, b)]
    pre = [statistics.median(r["prefill_tokens_per_s"] or 0 for r in x) if x else 0 for x in (a, b)]
    same = "same" if {r["tokens"] for r in a} == {r["tokens"] for r in b} else "DIFFERENT"
    print(f"{k[0]:>3} {k[1]:>10} {k[2]:>7} {k[3]:>5} {ms[0]:>10.3f} {ms[1]:>10.3f} {ms[1] / ms[0]:>7.3f} "
          f"{pre[0]:>10.0f} {pre[1]:>10.0f} {same}")
PY
