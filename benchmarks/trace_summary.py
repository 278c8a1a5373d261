"""Per-GPU kernel summary of a jax.profiler trace: busy vs idle time per decode step and the
kernels that take it, each XLA fusion described by its ops and shapes when the compiled HLO text
is given. Usage: python trace_summary.py TRACE_DIR [STEPS [HLO_TEXT_FILE]]."""
import collections
import re
import sys
from pathlib import Path

from jax._src.lib import _profile_data


def describe(hlo: str, name: str) -> str:
    """'bf16[1,4096] <- dot,convert (bf16[1,2048], bf16[2048,4096])' for a kernel named after its
    HLO fusion (the profiler writes fusion.12 as fusion_12)."""
    hlo_name = re.sub(r"_(\d+)$", r".\1", name)
    m = re.search(rf"^\s*(?:ROOT )?%?{re.escape(hlo_name)} = (\S+) fusion\((.*?)\), kind=\w+, calls=%?([\w.-]+)",
                  hlo, re.M)
    if not m:
        return ""
    shape, _, comp = m.groups()
    body = re.search(rf"^%?{re.escape(comp)} [^\n]*\{{\n(.*?)^\}}", hlo, re.M | re.S)
    ops = re.findall(r"= \S+ ([a-z-]+)\(", body.group(1)) if body else []
    kinds = [o for o in dict.fromkeys(ops) if o not in ("parameter", "constant", "bitcast", "broadcast")]
    args = re.findall(r"= (\w+\[[\d,]*\])\S* parameter\(", body.group(1)) if body else []
    return f"{shape} <- {','.join(kinds[:6])} ({', '.join(args[:4])})"


def host_summary(data, steps: int, top: int = 12):
    """What the host threads did per step (thunks, CUDA graph launches, kernel launches): tells
    whether the step ran as CUDA graphs (command buffers) or kernel by kernel."""
    by = collections.defaultdict(lambda: [0, 0.0])
    for plane in data.planes:
        if plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            for e in line.events:
                by[e.name[:70]][0] += 1
                by[e.name[:70]][1] += e.end_ns - e.start_ns
    print("== host: top events by count per step")
    for name, (n, t) in sorted(by.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"   {n / steps:8.1f}x/step {t / 1e3 / steps:9.1f} us/step  {name}")


def summarize(trace_dir, steps: int = 1, top: int = 25, hlo: str = ""):
    files = sorted(Path(trace_dir).rglob("*.xplane.pb"))
    if not files:
        print(f"no xplane.pb under {trace_dir}")
        return
    data = _profile_data.ProfileData.from_file(str(files[-1]))
    host_summary(data, steps)
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        lines = [x for x in plane.lines if "Stream" in x.name] or list(plane.lines)
        events = [(e.start_ns, e.end_ns, e.name, line.name) for line in lines for e in line.events]
        if not events:
            continue
        events.sort()
        busy, gaps, end = 0.0, [], events[0][0]
        for s, e, *_ in events:  # union of intervals over all streams
            if s > end:
                gaps.append(s - end)
            busy += max(0.0, e - max(s, end))
            end = max(end, e)
        span = end - events[0][0]
        by = collections.defaultdict(lambda: [0, 0.0])
        for s, e, name, _ in events:
            by[name][0] += 1
            by[name][1] += e - s
        print(f"== {plane.name}: {len(events)} events, {len(events) / steps:.0f}/step, span "
              f"{span / 1e6 / steps:.3f} ms/step, busy {busy / 1e6 / steps:.3f}, idle "
              f"{(span - busy) / 1e6 / steps:.3f} in {len(gaps) / steps:.0f} gaps/step; streams "
              f"{sorted({x[3] for x in events})}")
        for stream in sorted({x[3] for x in events}):  # which kernels leave the main stream
            on = collections.Counter()
            for s, e, name, line in events:
                if line == stream:
                    on[name[:40]] += e - s
            n = sum(1 for x in events if x[3] == stream)
            print(f"   stream {stream}: {n / steps:.0f} kernels/step, {sum(on.values()) / 1e3 / steps:.1f} us/step; "
                  f"top: {', '.join(f'{k} {v / 1e3 / steps:.0f}' for k, v in on.most_common(4))}")
        for name, (n, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:top]:
            print(f"   {t / 1e3 / steps:9.1f} us/step {n / steps:6.1f}x {t / n / 1e3:8.2f} us  {name[:90]}"
                  f"  {describe(hlo, name)}")


if __name__ == "__main__":
    summarize(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1, 25,
              Path(sys.argv[3]).read_text() if len(sys.argv) > 3 else "")
