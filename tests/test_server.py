"""The OpenAI-compatible server, started for real on loopback and driven by the official
`openai` client: continuous batching under 64 concurrent requests, streaming, errors, and a
streaming client that disconnects."""
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import openai
import pytest

import jaxtp
from helpers import free_port, script

SERVER = script("benchmarks/server_process.py")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "checkpoints" / "tiny-arith"
NAME = "tiny"


def _serve(model, *flags):
    """Start scripts/serve.py on a free loopback port; yields its URL, stops it afterwards."""
    port = free_port()  # serve.py MODEL, as `vllm serve MODEL`
    proc = SERVER.start(model, port, "--served-model-name", NAME, *flags, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """The default checkpoint with room for 1024 tokens, so a request can run long."""
    model = tmp_path_factory.mktemp("long") / "tiny-arith"
    shutil.copytree(DEFAULT, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 1024}))
    return model


@pytest.fixture(scope="module")
def server(long_model):
    """16 slots at tp 2: 64 concurrent requests must share them."""
    yield from _serve(long_model, "--tp", "2", "--max-num-seqs", "16", "--decode-chunk", "2")


@pytest.fixture(scope="module")
def offline():
    return jaxtp.load(DEFAULT, tp=2, dtype="float32")


def _client(url):
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def _metric(url, name) -> float:
    for line in httpx2.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


def test_models(server):
    models = openai.OpenAI(base_url=server + "/v1", api_key="none").models.list()
    assert [m.id for m in models.data] == [NAME]


def test_64_concurrent_requests_match_offline_generate(server, offline):
    prompts = [f"{a}+{b}=" for a, b in zip(range(3, 1000, 31), range(900, 0, -29))][:64]
    params = jaxtp.SamplingParams(max_tokens=8, temperature=0)
    want = [o.text for o in jaxtp.generate(offline, prompts, params)]

    async def go():
        async with _client(server) as client:  # closed inside the loop that used it
            comps = [client.completions.create(model=NAME, prompt=p, max_tokens=8, temperature=0) for p in prompts[:32]]
            chats = [client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": p}],
                                                    max_tokens=8, temperature=0) for p in prompts[32:]]
            return await asyncio.gather(*comps, *chats)

    outs = asyncio.run(go())
    got = [o.choices[0].text for o in outs[:32]] + [o.choices[0].message.content for o in outs[32:]]
    assert got == want
    assert all(o.choices[0].finish_reason == "stop" for o in outs)
    assert outs[0].usage.prompt_tokens == len(offline.tokenizer(prompts[0])["input_ids"])


def test_streaming_completion_and_chat(server, offline):
    want = jaxtp.generate(offline, ["408+199="], jaxtp.SamplingParams(max_tokens=8, temperature=0))[0].text

    async def go():
        async with _client(server) as client:  # closed inside the loop that used it
            text, finish = "", None
            async for chunk in await client.completions.create(model=NAME, prompt="408+199=", max_tokens=8,
                                                               temperature=0, stream=True):
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            chat, usage = "", None
            async for chunk in await client.chat.completions.create(
                    model=NAME, messages=[{"role": "user", "content": "408+199="}], max_tokens=8, temperature=0,
                    stream=True, stream_options={"include_usage": True}):
                if chunk.choices:
                    chat += chunk.choices[0].delta.content or ""
                usage = chunk.usage or usage
            return text, finish, chat, usage

    text, finish, chat, usage = asyncio.run(go())
    assert (text, finish, chat) == (want, "stop", want)
    assert usage.completion_tokens == len(want) + 1  # digits and </s>


def test_sampling_extras_logprobs_and_n(server):
    async def go():
        async with _client(server) as client:  # closed inside the loop that used it
            out = await client.completions.create(model=NAME, prompt="17+25=", max_tokens=8, temperature=0, logprobs=2,
                                                  stop=["2"], extra_body={"top_k": 5})
            many = await client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "5+5="}],
                                                        n=3, temperature=1.0, seed=1, max_tokens=4,
                                                        logprobs=True, top_logprobs=2)
            return out, many

    out, many = asyncio.run(go())
    c = out.choices[0]
    assert (c.text, c.finish_reason) == ("4", "stop")
    assert c.logprobs.tokens[:2] == ["4", "2"] and len(c.logprobs.top_logprobs[0]) == 2
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert all(len(t.top_logprobs) == 2 for ch in many.choices for t in ch.logprobs.content)


@pytest.mark.parametrize("body,param,code", [
    ({"model": "nope", "prompt": "1+1="}, "model", "model_not_found"),
    ({"model": NAME, "prompt": "1+1=", "temperature": -1}, "temperature", None),
    ({"model": NAME, "prompt": "1+1=", "max_tokens": 5000}, "max_tokens", "context_length_exceeded"),
    ({"model": NAME, "prompt": [99]}, "prompt", None),
    ({"model": NAME}, "prompt", None),
])
def test_bad_requests_are_400_with_openai_error_body(server, body, param, code):
    r = httpx2.post(server + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == code
    assert err["message"]


def test_malformed_json_and_the_official_client_errors(server):
    r = httpx2.post(server + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError, match="top_p must be in"):
        asyncio.run(_client(server).chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "1+1="}], top_p=2.0))


def test_disconnecting_stream_frees_its_slot_and_spares_the_others(server, offline):
    prompts = ["1+2=", "30+40=", "500+600=", "7+8="]
    want = [o.text for o in jaxtp.generate(offline, prompts, jaxtp.SamplingParams(max_tokens=8, temperature=0))]
    aborted_before = _metric(server, 'jaxtp:request_success_total{finish_reason="abort"}')
    tokens_before = _metric(server, "jaxtp:generation_tokens_total")

    async def go():
        async with _client(server) as client:  # closed inside the loop that used it

            async def quitter():
                async with httpx2.AsyncClient(timeout=60) as http:
                    async with http.stream("POST", server + "/v1/completions",
                                           json={"model": NAME, "prompt": "1+1=", "max_tokens": 1000, "temperature": 0,
                                                 "ignore_eos": True, "stream": True}) as r:
                        seen = 0
                        async for line in r.aiter_lines():
                            seen += line.startswith("data:")
                            if seen == 3:
                                return  # closes the connection mid-stream

            others = [client.completions.create(model=NAME, prompt=p, max_tokens=8, temperature=0) for p in prompts]
            res = await asyncio.gather(quitter(), *others)
            return [o.choices[0].text for o in res[1:]]

    assert asyncio.run(go()) == want
    for _ in range(100):
        if _metric(server, 'jaxtp:request_success_total{finish_reason="abort"}') == aborted_before + 1:
            break
        time.sleep(0.1)
    assert _metric(server, 'jaxtp:request_success_total{finish_reason="abort"}') == aborted_before + 1
    assert _metric(server, "jaxtp:num_requests_running") == 0
    assert _metric(server, "jaxtp:generation_tokens_total") - tokens_before < 900  # stopped early


def test_load_script_reports_throughput(server):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_test.py"), "--url", server, "--requests", "32",
                          "--concurrency", "16", "--max-tokens", "6", "--stream", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    s = json.loads(run.stdout)
    assert s["requests"] == 32 and s["requests_per_s"] > 0 and s["output_tokens_per_s"] > 0


def _load(server, *flags) -> dict:
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_test.py"), "--url", server, "--json",
                          *flags], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_load_tool_counts_errors_reports_percentiles_and_reads_sharegpt(server, tmp_path):
    s = _load(server, "--requests", "12", "--concurrency", "4", "--warmup", "3", "--output-len", "5", "--stream")
    assert s["requests"] == s["completed"] == 12 and s["errors"] == {}
    for key in ("latency_p50_s", "latency_p99_s", "ttft_p90_s", "itl_p50_s", "itl_p99_s"):
        assert s[key] > 0
    bad = _load(server, "--requests", "6", "--concurrency", "3", "--output-len", "5000")  # past the context
    assert bad["completed"] == 0 and bad["errors"] == {"400": 6}
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"{a}+{a}="},
                                                       {"from": "gpt", "value": "x " * a}]} for a in (2, 3, 4)]))
    s = _load(server, "--requests", "6", "--concurrency", "3", "--dataset", str(sharegpt))
    assert s["completed"] == 6 and s["output_tokens_per_s"] > 0
    rnd = _load(server, "--requests", "4", "--dataset", "random", "--input-len", "20", "--range-ratio", "0.5")
    assert rnd["completed"] == 4


def test_full_queue_refuses_new_requests(offline):
    from jaxtp.entrypoints.serving import AsyncLLM, QueueFull

    llm = AsyncLLM(offline, max_num_seqs=2, max_queue=1, chunk=2)
    long = jaxtp.SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def go():
        first = llm.generate("1+1=", [1, 5, 14, 5, 15], long)
        got = await anext(first)  # admitted and running
        with pytest.raises(QueueFull, match=r"1 requests in flight \(max_queue=1\)"):
            await anext(llm.generate("2+2=", [1, 6, 14, 6, 15], long))
        await first.aclose()  # frees the place
        return got, [d async for d in llm.generate("2+2=", [1, 6, 14, 6, 15], long)]

    try:
        first, second = asyncio.run(go())
        assert first.token_ids and second[-1].finish_reason == "length"
    finally:
        llm.close()


def test_full_queue_is_a_503_with_an_openai_error_body(long_model):
    for url in _serve(long_model, "--max-num-seqs", "1", "--max-queue", "1", "--decode-chunk", "2", "--no-warmup"):
        with httpx2.stream("POST", url + "/v1/completions", timeout=60,
                           json={"model": NAME, "prompt": "1+1=", "max_tokens": 900, "temperature": 0,
                                 "ignore_eos": True, "stream": True}) as busy:
            lines = busy.iter_lines()  # held open: the one request in flight keeps running
            next(lines)
            r = httpx2.post(url + "/v1/completions", json={"model": NAME, "prompt": "2+2="})
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "service_unavailable" and "max_queue=1" in r.json()["error"]["message"]


def _serve_fails(*flags) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "serve.py"), str(DEFAULT), *flags],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "XLA_FLAGS": ""})


@pytest.mark.parametrize("flags,message", [
    (["--decode-chunk", "0"], "--decode-chunk: must be an integer >= 1, got 0"),
    (["--decode-chunk", "-1"], "--decode-chunk: must be an integer >= 1, got -1"),
    (["--max-model-len", "-5"], "--max-model-len: must be an integer >= 1, got -5"),
    (["--max-num-seqs", "0"], "--max-num-seqs: must be an integer >= 1, got 0"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization: must be in (0, 1], got 1.5"),
    (["--max-model-len", "5000"], "max_model_len must be an integer in [1, 64]"),
])
def test_bad_server_flags_are_named_before_serving(flags, message):
    run = _serve_fails(*flags)
    assert run.returncode != 0 and message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_a_port_in_use_is_found_before_the_model_loads():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        run = _serve_fails("--port", str(port))
    assert run.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in run.stderr
    assert "serving" not in run.stdout


def test_help_shows_the_vllm_flags_and_their_defaults():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve.py"), "--help"], capture_output=True,
                         text=True, timeout=60)
    for flag in ("--gpu-memory-utilization", "--data-parallel-size", "--pipeline-parallel-size", "--dtype",
                 "--quantization", "--chat-template", "--api-key", "--log-level", "--disable-access-log",
                 "--max-num-batched-tokens"):
        assert flag in run.stdout
    assert "(default: 256)" in run.stdout and "(default: 0.9)" in run.stdout and "(default: 8192)" in run.stdout


def test_sigterm_drains_within_its_timeout_and_exits_0(long_model):
    port = free_port()
    proc = SERVER.start(long_model, port, "--served-model-name", NAME, "--shutdown-timeout", "2", "--decode-chunk", "1",
                        "--no-warmup",
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx2.stream("POST", url + "/v1/completions", timeout=60, json={
                "model": NAME, "prompt": "1+1=", "max_tokens": 1000, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(6):  # a long stream is running (a few events in, not just its first)
                next(lines)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        out = proc.stdout.read()
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert time.monotonic() - start < 15
    assert "shutting down on SIGTERM: 1 requests in flight, waiting up to 2.0 s" in out and "shut down" in out
