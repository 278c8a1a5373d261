"""The server under faults, in process (the FastAPI app over AsyncLLM through httpx2's ASGI
transport): a failing engine step, a full queue, requests admitted whole, bounds at the edge."""
import asyncio
import json

import httpx2
import pytest

import jaxtp
from helpers import ROOT
from jaxtp.entrypoints.openai_api import build_app
from jaxtp.entrypoints.serving import AsyncLLM

NAME = "tiny"


@pytest.fixture(scope="module")
def model():
    return jaxtp.load(ROOT / "checkpoints" / "tiny-arith", tp=1, dtype="float32")


def serve(model, test, **llm_args):
    """Run test(client, llm) against a fresh app on `model`; returns what it returns."""
    llm = AsyncLLM(model, **{"max_num_seqs": 4, "chunk": 2, **llm_args})

    async def go():
        transport = httpx2.ASGITransport(app=build_app(llm, NAME))
        async with httpx2.AsyncClient(transport=transport, base_url="http://jaxtp", timeout=120) as client:
            return await test(client, llm)
    try:
        return asyncio.run(go())
    finally:
        llm.close()


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def events(body: str) -> list:
    return [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]


def test_an_engine_failure_fails_its_requests_in_an_error_event_and_serving_goes_on(model):
    want = jaxtp.generate(model, ["17+25="], jaxtp.SamplingParams(max_tokens=8, temperature=0))[0].text

    async def test(client, llm):
        def broken():
            raise RuntimeError("device fell over")
        llm.engine.step = broken  # this engine only: the one rebuilt after the failure works
        chat = await client.post("/v1/chat/completions", json={
            "model": NAME, "messages": [{"role": "user", "content": "1+1="}], "stream": True})
        after = await client.post("/v1/completions", json={"model": NAME, "prompt": "17+25=", "max_tokens": 8,
                                                           "temperature": 0})
        return chat, after, (await client.get("/metrics")).text

    chat, after, metrics = serve(model, test)
    assert chat.status_code == 200  # the role chunk went out before the engine ran
    sent = events(chat.text)
    assert sent[-1] == "[DONE]"
    err = json.loads(sent[-2])["error"]
    assert err["type"] == "internal_server_error" and "device fell over" in err["message"]
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == want
    assert metric(metrics, "jaxtp:engine_failures_total") == 1
    assert metric(metrics, 'jaxtp:request_errors_total{status="500"}') == 1


def test_a_request_is_admitted_whole_or_not_at_all(model):
    async def test(client, llm):
        refused = await client.post("/v1/completions", json={"model": NAME, "prompt": ["1+1=", "2+2=", "3+3="],
                                                             "max_tokens": 30, "ignore_eos": True})
        left = (llm._in_flight, llm.engine.has_unfinished)
        taken = await client.post("/v1/completions", json={"model": NAME, "prompt": ["1+1=", "2+2="],
                                                           "max_tokens": 4})
        return refused, left, taken

    refused, left, taken = serve(model, test, max_queue=2)
    assert refused.status_code == 503 and "this asks for 3 more (max_queue=2)" in refused.json()["error"]["message"]
    assert left == (0, False)  # none of its prompts were queued
    assert taken.status_code == 200 and len(taken.json()["choices"]) == 2


def test_a_chat_stream_with_a_full_queue_is_a_503_before_any_event(model):
    async def test(client, llm):
        busy = llm.submit([("1+1=", [1, 5, 14, 5, 15], jaxtp.SamplingParams(max_tokens=100, ignore_eos=True))])[0]
        await anext(busy)  # admitted and running
        r = await client.post("/v1/chat/completions", json={
            "model": NAME, "messages": [{"role": "user", "content": "1+1="}], "stream": True})
        await busy.aclose()
        return r, (await client.get("/metrics")).text

    r, metrics = serve(model, test, max_queue=1)
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    assert metric(metrics, 'jaxtp:request_errors_total{status="503"}') == 1


@pytest.mark.parametrize("field,value", [("n", 129), ("seed", 2 ** 64), ("stop_token_ids", [2 ** 40]),
                                         ("stop_token_ids", [16])])
def test_fields_past_their_limits_are_a_400_naming_the_field(model, field, value):
    async def test(client, llm):
        return await client.post("/v1/completions", json={"model": NAME, "prompt": "1+1=", field: value})

    r = serve(model, test)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_any_64_bit_seed_and_a_huge_top_k_are_served(model):
    async def test(client, llm):
        body = {"model": NAME, "prompt": "17+25=", "max_tokens": 6, "temperature": 1.0}
        return [await client.post("/v1/completions", json={**body, **extra}) for extra in
                ({"seed": -1}, {"seed": 2 ** 64 - 1}, {"seed": 2 ** 63}, {"seed": 3, "top_k": 2 ** 40},
                 {"seed": 3})]

    rs = serve(model, test)
    assert [r.status_code for r in rs] == [200] * 5
    text = [r.json()["choices"][0]["text"] for r in rs]
    assert text[0] == text[1]  # -1 and 2**64 - 1 are the same 64-bit seed
    assert text[3] == text[4]  # a top_k past the vocabulary is no top-k


def test_twenty_streams_finish_right_beside_bad_requests(model):
    prompts = [f"{a}+{b}=" for a, b in zip(range(3, 400, 19), range(300, 0, -13))][:20]
    want = [o.text for o in jaxtp.generate(model, prompts, jaxtp.SamplingParams(max_tokens=8, temperature=0))]

    async def stream(client, prompt):
        text = ""
        async with client.stream("POST", "/v1/completions", json={
                "model": NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def test(client, llm):
        bad = [client.post("/v1/completions", json={"model": NAME, "prompt": "1+1=", **extra})
               for extra in ({"stop_token_ids": [2 ** 40]}, {"seed": 2 ** 64}, {"top_k": 2 ** 70})]
        return await asyncio.gather(*(stream(client, p) for p in prompts), *bad)

    *got, b1, b2, b3 = serve(model, test, max_num_seqs=8)
    assert got == want
    assert [b.status_code for b in (b1, b2)] == [400, 400]
    assert b3.status_code == 200  # a top_k past the vocabulary (and int64) is simply no top-k
