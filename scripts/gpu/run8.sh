# Issue 3, session 3: the one-shot NVLink all-reduce on 2x H200. Check it, then time decode.
#   bash scripts/gpu/run8.sh [benchmark args...]
set -o pipefail
export PYTHONUNBUFFERED=1 JAXTP_CACHE=/tmp/jaxtp-cache
nvidia-smi -L; nvcc --version | tail -1
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout 200 python3 scripts/gpu/all_reduce_check.py --tp 2 2>&1 | tee $OUT/check.log
timeout ${BENCH_TIMEOUT:-360} python3 scripts/benchmark.py --shape llama2-7b --ctx 1024 --json $OUT/bench.json "$@" \
    2>&1 | tee $OUT/bench.log
