"""One process of a multi-process CPU run (launched by test_distributed.py): join the run, load the
checkpoint over the global mesh, generate greedily and print the token ids as one JSON line.

    python tests/mp_worker.py MODEL PROMPTS_JSON --devices 2 --tp 2 --dp 1 --pp 1 --max-tokens 8 \\
        --coordinator 127.0.0.1:PORT --num-processes 2 --process-id 0
"""
import argparse
import json
import os
import sys

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("prompts", help="JSON list of token-id lists")
p.add_argument("--devices", type=int, default=2, help="simulated CPU devices in this process")
p.add_argument("--tp", type=int, default=1)
p.add_argument("--dp", type=int, default=1)
p.add_argument("--pp", type=int, default=1)
p.add_argument("--max-tokens", type=int, default=8)
p.add_argument("--coordinator")
p.add_argument("--num-processes", type=int)
p.add_argument("--process-id", type=int)
args = p.parse_args()

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

from jaxtp import distributed  # noqa: E402

distributed.initialize(args.coordinator, args.num_processes, args.process_id)

import jax  # noqa: E402
import jaxtp  # noqa: E402
from jaxtp import loading  # noqa: E402

read_layers = set()  # which HF decoder layers this process read from disk
_param_slice = loading.param_slice


def tracked_slice(name, *args):  # called per device slice with the per-layer (HF-numbered) name
    if ".layers." in name:
        read_layers.add(int(name.split(".")[2]))
    return _param_slice(name, *args)


loading.param_slice = tracked_slice

model = jaxtp.load(args.model, tp=args.tp, dp=args.dp, pp=args.pp, dtype="float32")
params = jaxtp.SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
outs = jaxtp.generate(model, json.loads(args.prompts), params)
print("TOKENS " + json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                              "layers_read": sorted(read_layers), "tokens": [o.token_ids for o in outs]}),
      flush=True)
jax.distributed.shutdown()
sys.exit(0)
