"""Load an OpenAI-compatible server with concurrent clients and report requests/s and tokens/s:
`python benchmarks/load_test.py --url http://127.0.0.1:8000 --requests 256 --concurrency 64`.

Prompts default to the default checkpoint's sums; --prompt-file gives one prompt per line.
"""
import argparse
import asyncio
import json
import random
import statistics
import time

import openai


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="served model name (default: the server's first)")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt-file")
    p.add_argument("--stream", action="store_true", help="stream, and report time to first token")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p.parse_args(argv)


async def main_async(args) -> dict:
    async with openai.AsyncOpenAI(base_url=args.url.rstrip("/") + "/v1", api_key="none",
                                  max_retries=0) as client:
        return await run_load(client, args)


async def run_load(client, args) -> dict:
    model = args.model or (await client.models.list()).data[0].id
    if args.prompt_file:
        prompts = [line.rstrip("\n") for line in open(args.prompt_file, encoding="utf-8") if line.strip()]
    else:
        rng = random.Random(0)
        prompts = [f"{rng.randrange(1000)}+{rng.randrange(1000)}=" for _ in range(args.requests)]
    sem = asyncio.Semaphore(args.concurrency)
    latencies, ttfts, tokens = [], [], [0]

    async def one(prompt):
        async with sem:
            start = time.perf_counter()
            if args.stream:
                first = None
                async for chunk in await client.completions.create(
                        model=model, prompt=prompt, max_tokens=args.max_tokens, temperature=0, stream=True,
                        stream_options={"include_usage": True}):
                    if first is None and chunk.choices and chunk.choices[0].text:
                        first = time.perf_counter() - start
                    if chunk.usage:
                        tokens[0] += chunk.usage.completion_tokens
                ttfts.append(first or 0.0)
            else:
                out = await client.completions.create(model=model, prompt=prompt, max_tokens=args.max_tokens,
                                                      temperature=0)
                tokens[0] += out.usage.completion_tokens
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(one(prompts[i % len(prompts)]) for i in range(args.requests)))
    elapsed = time.perf_counter() - start
    summary = {"requests": args.requests, "concurrency": args.concurrency, "seconds": round(elapsed, 3),
               "requests_per_s": round(args.requests / elapsed, 2),
               "output_tokens_per_s": round(tokens[0] / elapsed, 1),
               "median_latency_s": round(statistics.median(latencies), 4)}
    if ttfts:
        summary["median_ttft_s"] = round(statistics.median(ttfts), 4)
    return summary


def main(argv=None):
    args = parse_args(argv)
    s = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(s))
    else:
        print(" ".join(f"{k}={v}" for k, v in s.items()))


if __name__ == "__main__":
    main()
