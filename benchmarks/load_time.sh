#!/usr/bin/env bash
# Load time and peak host memory of jaxtp.load at Llama-2-7B shape (bf16, ~12.6 GiB in 3 HF-style
# shards of random weights on local disk), tp 1 and 2, from safetensors (page cache warm, then
# cold) and from an orbax conversion (saved at tp 2). Each load runs in its own process with its
# own time limit. Made for 2 GPUs, 128 GiB of RAM, a 10-minute limit; results in $OUT, table last.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/load7b}; mkdir -p $OUT
CK=${CK:-/tmp/ck7b}; ORB=$CK-orbax
rm -rf $CK $ORB
python3 -c "import jax, orbax.checkpoint as o; print('jax', jax.__version__, 'orbax', o.__version__, jax.devices())"
free -g | head -2; df -h /tmp | tail -1
timeout 120 python3 benchmarks/load_memory.py write $CK --shape llama2-7b --dtype bfloat16 2>&1 | tail -1
M="python3 benchmarks/load_memory.py measure"
for tp in 1 2; do
  timeout 100 $M $CK --tp $tp --json $OUT/st_tp$tp.json 2>&1 | tail -1
done
timeout 100 $M $CK --tp 2 --cold --json $OUT/st_tp2_cold.json 2>&1 | tail -1
timeout 150 python3 scripts/convert.py $CK $ORB --tp 2 2>&1 | tail -1
du -sh $CK $ORB
for tp in 1 2; do
  timeout 100 $M $ORB --tp $tp --json $OUT/orbax_tp$tp.json 2>&1 | tail -1
done
python3 - $OUT <<'EOF'
import json, pathlib, sys
g = 2 ** 30
print(f"\n| source | tp | cache | load s | ckpt GiB | RSS before | peak | after | peak - before GiB | max_kv_tokens |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for name in ["st_tp1", "st_tp2", "st_tp2_cold", "orbax_tp1", "orbax_tp2"]:
    f = pathlib.Path(sys.argv[1]) / f"{name}.json"
    if not f.is_file():
        print(f"| {name} | failed or timed out |"); continue
    r = json.loads(f.read_text())
    print(f"| {name.split('_')[0]} | {r['tp']} | {'cold' if r['cold'] else 'warm'} | {r['load_s']:.1f} | "
          f"{r['checkpoint_bytes'] / g:.2f} | {r['rss_before'] / g:.2f} | {r['rss_peak'] / g:.2f} | "
          f"{r['rss_after'] / g:.2f} | {r['peak_growth'] / g:.2f} | {r['max_kv_tokens']} |")
EOF
