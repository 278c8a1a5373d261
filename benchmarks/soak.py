"""Soak the server: many mixed requests on loopback, bounded in count and time, then checks.

    python benchmarks/soak.py [--requests 2000] [--concurrency 32] [--tp 1]

It starts scripts/serve.py on the default checkpoint and sends plain, streamed, chat and echo
requests, with ~10% bad inputs (each must get a 4xx) and ~10% streams the client drops after a
few events. It checks: no 5xx at all; every good greedy request's text equal to offline
`jaxtp.generate`; running = waiting = 0 at the end; the server's RSS after the warm-up (the
first tenth) flat within 10%. Prints the figures; exits 1 if a check fails.
"""
import argparse
import asyncio
import collections
import json
import random
import subprocess
import time
from pathlib import Path

import httpx2

import server_process

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "checkpoints" / "tiny-arith"
NAME = "soak"
BAD = [  # (body, endpoint): each must be refused with a 4xx
    ({"model": NAME, "prompt": "1+1=", "seed": 2 ** 64}, "completions"),
    ({"model": NAME, "prompt": "1+1=", "stop_token_ids": [2 ** 40]}, "completions"),
    ({"model": NAME, "prompt": "1+\ud800="}, "completions"),
    ({"model": "nope", "prompt": "1+1="}, "completions"),
    ({"model": NAME, "prompt": "1+1=", "temperature": -1}, "completions"),
    ({"model": NAME, "prompt": "1+1=", "max_tokens": 10 ** 6}, "completions"),
    ({"model": NAME, "prompt": "1+1=", "n": 1000}, "completions"),
    ({"model": NAME, "messages": [{"role": "user", "content": "1+1="}], "tools": [{"type": "function"}]}, "chat"),
    ({"model": NAME, "messages": [{"role": "user", "content": "1+1="}], "max_tokens": "5"}, "chat"),
    ({"model": NAME, "messages": "1+1="}, "chat"),
]


def rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def plan(n: int, seed: int) -> list[tuple[str, object]]:
    """(kind, payload) for each request: plain / stream / chat / echo (a greedy sum), bad, drop."""
    rng, kinds = random.Random(seed), ["plain"] * 3 + ["stream"] * 2 + ["chat"] * 2 + ["echo", "bad", "drop"]
    out = []
    for _ in range(n):
        kind = rng.choice(kinds)
        out.append((kind, rng.choice(BAD) if kind == "bad" else f"{rng.randrange(500)}+{rng.randrange(500)}="))
    return out


async def send(http, kind: str, payload) -> tuple[int, str | None]:
    """(status, text of a good greedy request or None)."""
    if kind == "bad":
        body, endpoint = payload
        r = await http.post(f"/v1/{'chat/' if endpoint == 'chat' else ''}completions",
                            content=json.dumps(body).encode("utf-8", "surrogatepass"),
                            headers={"content-type": "application/json"})
        return r.status_code, None
    if kind in ("stream", "drop"):
        body = {"model": NAME, "prompt": payload, "max_tokens": 40 if kind == "drop" else 8, "temperature": 0,
                "stream": True, "ignore_eos": kind == "drop"}
        text, events = "", 0
        async with http.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        return 500, None
                    text += event["choices"][0]["text"]
                    events += 1
                    if kind == "drop" and events == 2:
                        return r.status_code, None  # the client goes away mid-stream
        return r.status_code, text
    if kind == "chat":
        r = await http.post("/v1/chat/completions", json={"model": NAME, "max_tokens": 8, "temperature": 0,
                                                          "messages": [{"role": "user", "content": payload}]})
        return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
    body = {"model": NAME, "prompt": payload, "max_tokens": 8, "temperature": 0}
    if kind == "echo":
        body.update(echo=True, logprobs=1)
    r = await http.post("/v1/completions", json=body)
    text = r.json()["choices"][0]["text"] if r.status_code == 200 else None
    return r.status_code, text[len(payload):] if kind == "echo" and text is not None else text


async def soak(url: str, todo, concurrency: int, pid: int, deadline: float) -> dict:
    sem, statuses, texts, samples = asyncio.Semaphore(concurrency), collections.Counter(), [], {}
    warm = len(todo) // 10

    async def one(i, kind, payload):
        async with sem:
            if time.monotonic() > deadline:
                statuses["skipped (deadline)"] += 1
                return
            try:
                status, text = await send(http, kind, payload)
            except httpx2.HTTPError as e:
                status, text = type(e).__name__, None
            statuses[status] += 1
            if text is not None:
                texts.append((kind, payload, text))
            if i == warm:
                samples["after_warmup"] = rss(pid)

    async with httpx2.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.gather(*(one(i, k, p) for i, (k, p) in enumerate(todo)))
        for _ in range(100):  # dropped streams settle: their aborts reach the engine
            m = (await http.get("/metrics")).text
            if metric(m, "jaxtp:num_requests_running") == metric(m, "jaxtp:num_requests_waiting") == 0:
                break
            await asyncio.sleep(0.1)
    samples["end"] = rss(pid)
    return {"statuses": statuses, "texts": texts, "rss": samples, "metrics": m}


def expected(texts, tp: int) -> dict:
    """Offline greedy text of every prompt the good requests used (chat through its template)."""
    import jaxtp
    model = jaxtp.load(MODEL, tp=tp, dtype="auto")
    params = jaxtp.SamplingParams(max_tokens=8, temperature=0)
    sums = sorted({p for kind, p, _ in texts if kind != "chat"})
    chats = sorted({p for kind, p, _ in texts if kind == "chat"})
    want = {("sum", p): o.text for p, o in zip(sums, jaxtp.generate(model, sums, params))} if sums else {}
    ids = [jaxtp.chat_prompt(model, [{"role": "user", "content": p}]) for p in chats]
    want.update({("chat", p): o.text for p, o in zip(chats, jaxtp.generate(model, ids, params))} if ids else {})
    return want


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--port", type=int, default=8124)
    p.add_argument("--seconds", type=float, default=600, help="stop sending after this long")
    args = p.parse_args(argv)
    proc = server_process.start(MODEL, args.port, "--tp", str(args.tp), "--served-model-name", NAME,
                                "--max-num-seqs", "16", "--decode-chunk", "4", "--disable-access-log",
                                "--log-level", "warning", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    try:
        start = time.monotonic()
        got = asyncio.run(soak(url, plan(args.requests, 0), args.concurrency, proc.pid, start + args.seconds))
        elapsed = time.monotonic() - start
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    report(args, got, expected(got["texts"], args.tp), elapsed)


def report(args, got: dict, want: dict, elapsed: float) -> None:
    statuses = got["statuses"]
    fivexx = sum(n for s, n in statuses.items() if not isinstance(s, int) or s >= 500)
    wrong = sum(t != want[("chat" if k == "chat" else "sum", p)] for k, p, t in got["texts"])
    m, r = got["metrics"], got["rss"]
    growth = r["end"] / r["after_warmup"] - 1
    checks = {"no 5xx or connection errors": fivexx == 0,
              "good greedy requests equal offline generate": wrong == 0,
              "running = waiting = 0 at the end": metric(m, "jaxtp:num_requests_running") == 0
              and metric(m, "jaxtp:num_requests_waiting") == 0,
              "RSS after warm-up flat within 10%": abs(growth) <= 0.10}
    print(f"{sum(statuses.values())} requests in {elapsed:.1f} s ({sum(statuses.values()) / elapsed:.1f}/s), "
          f"concurrency {args.concurrency}, tp {args.tp}")
    print("statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items(), key=str)))
    print(f"good greedy texts checked: {len(got['texts'])}, wrong: {wrong}")
    print(f"server RSS after warm-up {r['after_warmup'] / 2 ** 20:.0f} MiB, at the end {r['end'] / 2 ** 20:.0f} "
          f"MiB ({growth:+.1%})")
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    raise SystemExit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
