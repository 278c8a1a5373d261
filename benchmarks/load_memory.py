"""How long `jaxtp.load` takes and how much host memory it peaks at, on a random checkpoint.

    python benchmarks/load_memory.py write /tmp/ck --shape llama2-7b --dtype bfloat16   # HF-style shards
    python benchmarks/load_memory.py measure /tmp/ck --tp 2 [--cold] [--json out.json]

`write` streams random Llama-shaped tensors to sharded .safetensors files (+ index, config.json),
never holding more than one tensor. `measure` loads a checkpoint (HF or a scripts/convert.py
orbax dir) in this fresh process and reports wall time and resident memory: before, peak
(the kernel's high-water mark VmHWM, exact, reset before loading) and after. On CPU the loaded weights themselves live in
host memory, so `transient` = peak - after is the loader's own overhead; on GPU, after ~ before.
--cold drops the files from the page cache first (posix_fadvise), so reads hit the disk.
"""
import argparse
import json
import os
import resource
import time
from pathlib import Path

from benchmark import SHAPES, config

SHARD_BYTES = 5 << 30  # HF's default max_shard_size


def llama_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, inter, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (q, d)),
                (p + "self_attn.k_proj.weight", (kv, d)), (p + "self_attn.v_proj.weight", (kv, d)),
                (p + "self_attn.o_proj.weight", (d, q)), (p + "post_attention_layernorm.weight", (d,)),
                (p + "mlp.gate_proj.weight", (inter, d)), (p + "mlp.up_proj.weight", (inter, d)),
                (p + "mlp.down_proj.weight", (d, inter))]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def write(path: Path, cfg: dict, dtype: str, shard_bytes: int = SHARD_BYTES, seed: int = 0) -> int:
    """Random N(0, 0.02) weights (norms too: loading does not care), streamed from a 64 MB pool
    at a random offset per tensor, so 13 GB take seconds. Returns the bytes written."""
    import numpy as np
    from jaxtp import safetensors_io as st
    from jaxtp.entrypoints.api import DTYPES
    np_dtype = np.dtype(DTYPES[dtype])
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal((64 << 20) // np_dtype.itemsize, np.float32) * 0.02).astype(np_dtype)
    pool = pool.view(np.uint8)

    def fill(nbytes: int, start: int):
        def f(file):
            pos, left = start, nbytes
            while left:
                n = min(left, len(pool) - pos)
                file.write(pool[pos: pos + n].data)
                left, pos = left - n, 0
        return f

    shards, size = [[]], 0
    for name, shape in llama_tensors(cfg):
        nbytes = int(np.prod(shape)) * np_dtype.itemsize
        if size and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        start = int(rng.integers(0, len(pool) // np_dtype.itemsize)) * np_dtype.itemsize
        shards[-1].append((name, shape, np_dtype, fill(nbytes, start)))
        size += nbytes
    path.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        st.write(path / file, tensors)
        weight_map.update({t[0]: file for t in tensors})
        total += (path / file).stat().st_size
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (path / "config.json").write_text(json.dumps({**cfg, "torch_dtype": dtype}, indent=1))
    return total


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss(reset: bool = False) -> int:
    """The kernel's exact high-water mark of resident memory (VmHWM); `reset` restarts it from
    the current RSS where the kernel allows. getrusage's ru_maxrss is not used: it carries the
    parent's peak across fork + exec."""
    if reset:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def drop_page_cache(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def measure(path: Path, tp: int, dtype: str, cold: bool) -> dict:
    import jax
    import jaxtp
    jax.devices()  # backend start-up is not loading
    if cold:
        drop_page_cache(path)
    before = rss()
    peak_rss(reset=True)
    t0 = time.perf_counter()
    model = jaxtp.load(path, tp=tp, dtype=dtype)
    jax.block_until_ready(jax.tree.leaves(model.params))
    seconds = time.perf_counter() - t0
    peak = peak_rss()
    after = rss()
    files = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return dict(path=str(path), tp=tp, dtype=dtype, backend=jax.default_backend(), cold=cold,
                load_s=round(seconds, 2), checkpoint_bytes=files, rss_before=before, rss_peak=peak,
                rss_after=after, peak_growth=peak - before, transient=peak - after,
                max_kv_tokens=getattr(model, "max_kv_tokens", None))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write a random Llama-shaped HF checkpoint")
    w.add_argument("path", type=Path)
    w.add_argument("--shape", default="llama2-7b", help=f"{'|'.join(SHAPES)} or a config.json path")
    w.add_argument("--layers", type=int, help="override num_hidden_layers")
    w.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    w.add_argument("--shard-mb", type=int, default=SHARD_BYTES >> 20)
    m = sub.add_parser("measure", help="time jaxtp.load and record its peak host memory")
    m.add_argument("path", type=Path)
    m.add_argument("--tp", type=int, default=1)
    m.add_argument("--dtype", default="auto")
    m.add_argument("--cold", action="store_true", help="evict the files from the page cache first")
    m.add_argument("--cpu-devices", type=int, default=8, help="simulated devices on a CPU-only host")
    m.add_argument("--json", type=Path, help="also write the result here")
    a = p.parse_args(argv)
    if a.cmd == "write":
        cfg = config(a.shape)
        if a.layers:
            cfg["num_hidden_layers"] = a.layers
        t0 = time.perf_counter()
        n = write(a.path, cfg, a.dtype, a.shard_mb << 20)
        print(f"wrote {n / 2**30:.2f} GiB to {a.path} in {time.perf_counter() - t0:.1f} s")
        return
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={a.cpu_devices}").strip()
    r = measure(a.path, a.tp, a.dtype, a.cold)
    print(json.dumps(r))
    if a.json:
        a.json.write_text(json.dumps(r))
    g = 2 ** 30
    print(f"load {r['path']} tp={a.tp} ({r['backend']}): {r['load_s']:.2f} s, checkpoint "
          f"{r['checkpoint_bytes'] / g:.2f} GiB, RSS before {r['rss_before'] / g:.2f} / peak "
          f"{r['rss_peak'] / g:.2f} / after {r['rss_after'] / g:.2f} GiB, transient {r['transient'] / g:.2f} GiB")


if __name__ == "__main__":
    main()
