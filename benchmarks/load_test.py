"""Load an OpenAI-compatible server and report throughput and latency percentiles, as `vllm bench
serve` does: `python benchmarks/load_test.py --url http://127.0.0.1:8000 --requests 256 --concurrency 64`.

Requests come from --dataset: "sums" (the default checkpoint's prompts), "random" (token-id
prompts and output lengths drawn around --input-len / --output-len, --range-ratio wide), or a
local ShareGPT-format JSON file (the first human turn is the prompt; the first reply's length in
words x 1.3 the output budget, unless --output-len is given). Outputs run to their budget
(ignore_eos). The first --warmup requests are left out of the figures. Every failure is counted
by kind (HTTP status or exception) and the run goes on.
"""
import argparse
import asyncio
import collections
import json
import random
import time

import httpx2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="served model name (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second (default: "
                   "as fast as --concurrency allows)")
    p.add_argument("--warmup", type=int, default=0, help="requests sent first and left out of the figures")
    p.add_argument("--dataset", default="sums", help="sums | random | PATH to a ShareGPT-format JSON")
    p.add_argument("--input-len", type=int, default=128, help="random: prompt tokens")
    p.add_argument("--output-len", "--max-tokens", type=int, default=None,
                   help="output tokens (default: 16, or ShareGPT's)")
    p.add_argument("--range-ratio", type=float, default=0.0, help="random: lengths drawn in len * [1-r, 1+r]")
    p.add_argument("--vocab-size", type=int, default=16, help="random: prompt ids are drawn below this")
    p.add_argument("--stream", action="store_true", help="stream: time to first token and inter-token latency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p.parse_args(argv)


def requests(args) -> list[tuple[object, int]]:
    """(prompt, output tokens) for warm-up + measured requests."""
    rng, n = random.Random(args.seed), args.requests + args.warmup
    out_len = args.output_len or 16
    spread = lambda x: max(1, round(x * rng.uniform(1 - args.range_ratio, 1 + args.range_ratio)))  # noqa: E731
    if args.dataset == "sums":
        return [(f"{rng.randrange(1000)}+{rng.randrange(1000)}=", spread(out_len)) for _ in range(n)]
    if args.dataset == "random":
        return [([rng.randrange(3, args.vocab_size) for _ in range(spread(args.input_len))], spread(out_len))
                for _ in range(n)]
    pairs = []
    for conv in json.loads(open(args.dataset, encoding="utf-8").read()):
        turns = conv.get("conversations", [])
        if len(turns) >= 2 and turns[0]["value"].strip():
            pairs.append((turns[0]["value"], args.output_len or max(1, round(len(turns[1]["value"].split()) * 1.3))))
    rng.shuffle(pairs)
    return [pairs[i % len(pairs)] for i in range(n)]


class Record:
    def __init__(self):
        self.latency, self.ttft, self.itl, self.tokens, self.error = None, None, [], 0, None


async def one(http, url, model, prompt, max_tokens, stream) -> Record:
    rec, start = Record(), time.perf_counter()
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
    try:
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                rec.error = str(r.status_code)
                return rec
            if not stream:
                rec.tokens = json.loads(await r.aread())["usage"]["completion_tokens"]
            last = start
            async for line in (r.aiter_lines() if stream else _nothing()):
                if not line.startswith("data: {"):
                    continue
                event, now = json.loads(line[6:]), time.perf_counter()
                if "error" in event:
                    rec.error = f"stream {event['error'].get('type')}"
                elif event.get("usage"):
                    rec.tokens = event["usage"]["completion_tokens"]
                elif event["choices"] and event["choices"][0]["text"]:
                    if rec.ttft is None:
                        rec.ttft = now - start
                    else:
                        rec.itl.append(now - last)
                    last = now
    except httpx2.HTTPError as e:
        rec.error = type(e).__name__
    rec.latency = time.perf_counter() - start
    return rec


async def _nothing():
    return
    yield


def percentiles(xs, name: str) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)
    return {f"{name}_p{q}_s": round(xs[min(len(xs) - 1, int(q / 100 * len(xs)))], 4) for q in (50, 90, 99)}


async def run(args) -> dict:
    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx2.AsyncClient(timeout=600, headers=headers,
                                  limits=httpx2.Limits(max_connections=args.concurrency)) as http:
        model = args.model or (await http.get(url + "/v1/models")).json()["data"][0]["id"]
        todo, sem, rng = requests(args), asyncio.Semaphore(args.concurrency), random.Random(args.seed + 1)

        async def limited(prompt, n):
            async with sem:
                return await one(http, url, model, prompt, n, args.stream)

        await asyncio.gather(*(limited(p, n) for p, n in todo[:args.warmup]))
        start, tasks = time.perf_counter(), []
        for p, n in todo[args.warmup:]:
            tasks.append(asyncio.create_task(limited(p, n)))
            if args.request_rate:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        records = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return summarize(args, records, elapsed)


def summarize(args, records: list[Record], elapsed: float) -> dict:
    ok = [r for r in records if r.error is None]
    out = sum(r.tokens for r in ok)
    summary = {"requests": len(records), "completed": len(ok),
               "errors": dict(collections.Counter(r.error for r in records if r.error)),
               "concurrency": args.concurrency, "seconds": round(elapsed, 3),
               "requests_per_s": round(len(ok) / elapsed, 2), "output_tokens_per_s": round(out / elapsed, 1)}
    summary.update(percentiles([r.latency for r in ok], "latency"))
    summary.update(percentiles([r.ttft for r in ok if r.ttft is not None], "ttft"))
    summary.update(percentiles([x for r in ok for x in r.itl], "itl"))
    return summary


def main(argv=None):
    args = parse_args(argv)
    s = asyncio.run(run(args))
    if args.json:
        print(json.dumps(s))
    else:
        print("\n".join(f"{k:>22}: {v}" for k, v in s.items()))


if __name__ == "__main__":
    main()
