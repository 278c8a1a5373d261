"""List the XLA GPU flags this jaxlib's CUDA plugin knows (flags differ between releases)."""
import glob
import os
import re
import sys

import jax_plugins

pattern = re.compile(rb"xla_gpu_[a-z0-9_]+")
keys = sys.argv[1:] or ["one_shot", "command_buffer", "latency_hiding", "all_reduce", "collective",
                        "pipelined", "nccl"]
found = set()
for d in jax_plugins.__path__:
    for so in glob.glob(os.path.join(d, "**", "*.so"), recursive=True):
        found |= {m.decode() for m in pattern.findall(open(so, "rb").read())}
for f in sorted(found):
    if any(k in f for k in keys):
        print(f)
