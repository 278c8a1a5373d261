"""The server under faults, in process (the FastAPI app over AsyncLLM through httpx2's ASGI
transport): a failing engine step, a full queue, requests admitted whole, bounds at the edge."""
import asyncio
import dataclasses
import json
import threading

import httpx2
import numpy as np
import pytest

import jaxtp
from helpers import ROOT
from jaxtp.entrypoints.openai_api import build_app
from jaxtp.entrypoints.serving import AsyncLLM

NAME = "tiny"


@pytest.fixture(scope="module")
def model():
    return jaxtp.load(ROOT / "checkpoints" / "tiny-arith", tp=1, dtype="float32")


def serve(model, test, app_args=None, **llm_args):
    """Run test(client, llm) against a fresh app on `model`; returns what it returns."""
    llm = AsyncLLM(model, **{"max_num_seqs": 4, "chunk": 2, **llm_args})

    async def go():
        transport = httpx2.ASGITransport(app=build_app(llm, NAME, **(app_args or {})))
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
    assert refused.status_code == 503 and "in flight (max_queue=2) and this asks for 3 more" in refused.json()["error"]["message"]
    assert left == (0, False)  # none of its prompts were queued
    assert taken.status_code == 200 and len(taken.json()["choices"]) == 2


def test_a_chat_stream_with_a_full_queue_is_a_503_before_any_event(model):
    async def test(client, llm):
        busy = llm.submit([("1+1=", [1, 5, 14, 5, 15], jaxtp.SamplingParams(max_tokens=50, ignore_eos=True))])[0]
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


def test_logprobs_past_the_vocabulary_are_capped_and_always_finite(model):
    async def test(client, llm):
        body = {"model": NAME, "prompt": "17+25=", "max_tokens": 4, "temperature": 0, "logprobs": 20}
        plain = await client.post("/v1/completions", json=body)
        streamed = await client.post("/v1/completions", json={**body, "stream": True})
        chat = await client.post("/v1/chat/completions", json={
            "model": NAME, "messages": [{"role": "user", "content": "1+1="}], "max_tokens": 3,
            "logprobs": True, "top_logprobs": 20, "stream": True})
        return plain, streamed, chat

    plain, streamed, chat = serve(model, test)
    vocab = model.config.vocab_size  # 16: fewer than the 20 asked for
    lp = plain.json()["choices"][0]["logprobs"]  # a parse of standard JSON: no -Infinity in it
    assert all(len(top) == vocab for top in lp["top_logprobs"])
    for body in (streamed.text, chat.text):
        assert "Infinity" not in body and "NaN" not in body
        for e in events(body)[:-1]:
            json.loads(e)
    tops = [t for e in events(chat.text)[1:-1] for c in json.loads(e)["choices"]
            for t in (c["logprobs"] or {}).get("content", [])]
    assert tops and all(len(t["top_logprobs"]) == vocab for t in tops)


def test_streamed_text_offsets_run_on_across_chunks(model):
    async def test(client, llm):
        body = {"model": NAME, "prompt": "408+199=", "max_tokens": 6, "temperature": 0, "logprobs": 1,
                "echo": True}
        plain = await client.post("/v1/completions", json=body)
        streamed = await client.post("/v1/completions", json={**body, "stream": True})
        return plain, streamed

    plain, streamed = serve(model, test, chunk=1)
    want = plain.json()["choices"][0]["logprobs"]["text_offset"]
    got = [o for e in events(streamed.text)[:-1] for o in json.loads(e)["choices"][0]["logprobs"]["text_offset"]]
    assert len(events(streamed.text)) > 3  # several chunks
    assert got == want and want[0] == 0 and want == sorted(want)  # the echoed prompt's tokens first


@pytest.mark.parametrize("where", ["prompt", "chat"])
def test_a_lone_surrogate_is_a_400(model, where):
    async def test(client, llm):
        if where == "prompt":
            return await client.post("/v1/completions", content=b'{"model": "tiny", "prompt": "1+\\ud800="}',
                                     headers={"content-type": "application/json"})
        return await client.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": '
                                 b'[{"role": "user", "content": "\\ud800"}]}', headers={"content-type": "application/json"})

    r = serve(model, test)
    assert r.status_code == 400, r.text
    assert "lone surrogate" in r.json()["error"]["message"]


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"n": True}, "n"), ({"stream": "yes"}, "stream"), ({"max_tokens": "5"}, "max_tokens"),
])
def test_unsupported_fields_and_loose_types_are_a_400(model, extra, param):
    async def test(client, llm):
        return await client.post("/v1/chat/completions", json={
            "model": NAME, "messages": [{"role": "user", "content": "1+1="}], **extra})

    r = serve(model, test)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_model_card_tokenize_detokenize_version_and_head_health(model):
    async def test(client, llm):
        return [await client.get(f"/v1/models/{NAME}"), await client.get("/v1/models/other"),
                await client.post("/tokenize", json={"model": NAME, "prompt": "17+25="}),
                await client.post("/detokenize", json={"tokens": [5, 11, 14, 6, 9, 15]}),
                await client.post("/tokenize", json={"messages": [{"role": "user", "content": "2+3="}]}),
                await client.get("/version"), await client.head("/health")]

    card, missing, tok, detok, chat, version, head = serve(model, test)
    assert card.status_code == 200 and card.json()["id"] == NAME
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    want = model.tokenizer("17+25=")["input_ids"]
    assert tok.json()["tokens"] == want and tok.json()["count"] == len(want)
    assert detok.json()["prompt"] == model.tokenizer.decode([5, 11, 14, 6, 9, 15])
    assert chat.json()["tokens"] == jaxtp.chat_prompt(model, [{"role": "user", "content": "2+3="}])
    assert version.json()["version"] == jaxtp.__version__ and head.status_code == 200


def test_an_api_key_guards_v1_and_leaves_health_and_metrics_open(model):
    async def test(client, llm):
        body = {"model": NAME, "prompt": "1+1=", "max_tokens": 2}
        return [await client.post("/v1/completions", json=body),
                await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}),
                await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}),
                await client.get("/v1/models"), await client.get("/health"), await client.get("/metrics")]

    none, wrong, right, models, health, metrics = serve(model, test, app_args={"api_key": "s3cret"})
    assert none.status_code == wrong.status_code == models.status_code == 401
    assert none.json()["error"]["code"] == "invalid_api_key"
    assert right.status_code == health.status_code == metrics.status_code == 200


def test_a_chat_template_given_to_the_server_is_used(model):
    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"

    async def test(client, llm):
        return await client.post("/tokenize", json={"messages": [{"role": "user", "content": "2+3="}]})

    r = serve(model, test, app_args={"chat_template": template})
    assert r.json()["tokens"] == model.tokenizer("<<2+3=>>", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("kwargs,message", [
    ({"max_num_seqs": 0}, "max_num_seqs must be an integer >= 1, got 0"),
    ({"chunk": -1}, "chunk must be an integer >= 1, got -1"),
    ({"max_model_len": 5000}, r"max_model_len must be an integer in \[1, 64\]"),
])
def test_async_llm_checks_its_limits(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        AsyncLLM(model, **kwargs)


class _BlockingTokenizer:
    """The model's tokenizer, held inside its first call until released (or 5 s pass)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.entered, self.release = tokenizer, threading.Event(), threading.Event()
        self.timed_out = False

    def __call__(self, *a, **k):
        self.entered.set()
        self.timed_out = not self.release.wait(5)
        return self.tokenizer(*a, **k)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_tokenizing_does_not_block_the_event_loop(model):
    blocking = _BlockingTokenizer(model.tokenizer)
    slow = dataclasses.replace(model, tokenizer=blocking)

    async def test(client, llm):
        pending = asyncio.create_task(client.post("/v1/completions", json={"model": NAME, "prompt": "1+1=",
                                                                           "max_tokens": 2}))
        while not blocking.entered.is_set():
            await asyncio.sleep(0.01)
        health = await client.get("/health")  # answered while the prompt is still being tokenized
        blocking.release.set()
        return health, await pending

    health, done = serve(slow, test)
    assert health.status_code == 200 and not blocking.timed_out
    assert done.status_code == 200


def test_a_body_over_the_limit_is_a_413_and_prompts_per_request_are_bounded(model):
    async def test(client, llm):
        big = json.dumps({"model": NAME, "prompt": "1+1=" * 500}).encode()

        async def chunked():  # no Content-Length: counted as it streams in
            for i in range(0, len(big), 256):
                yield big[i:i + 256]
        return [await client.post("/v1/completions", content=big, headers={"content-type": "application/json"}),
                await client.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"}),
                await client.post("/v1/completions", json={"model": NAME, "prompt": ["1+1="] * 4}),
                await client.post("/v1/completions", json={"model": NAME, "prompt": ["1+1="] * 3, "max_tokens": 2}),
                (await client.get("/metrics")).text]

    sized, streamed, many, three, metrics = serve(model, test, app_args={"max_body_bytes": 1000, "max_prompts": 3})
    for r in (sized, streamed):
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert many.status_code == 400 and "at most 3 per request" in many.json()["error"]["message"]
    assert three.status_code == 200
    assert metric(metrics, 'jaxtp:request_errors_total{status="413"}') == 2


def test_metrics_count_latencies_and_kv_usage(model):
    async def test(client, llm):
        await client.post("/v1/completions", json={"model": NAME, "prompt": "17+25=", "max_tokens": 6,
                                                   "ignore_eos": True, "stream": True})
        return (await client.get("/metrics")).text

    text = serve(model, test, chunk=1)
    assert metric(text, "jaxtp:time_to_first_token_seconds_count") == 1
    assert metric(text, "jaxtp:inter_token_latency_seconds_count") == 5  # 6 tokens: 5 gaps
    assert metric(text, "jaxtp:e2e_request_latency_seconds_count") == 1
    assert metric(text, "jaxtp:generation_tokens_total") == 6
    assert "jaxtp:kv_cache_usage_perc" in text and "jaxtp:num_requests_running" in text


MC = [("17+25=", ["42", "43", "52"], 0), ("408+199=", ["607", "606", "617"], 0), ("3+999=", ["1002", "1012"], 0),
      ("250+250=", ["400", "500", "550"], 1), ("61+38=", ["99", "98"], 0)]


def _hf_loglikelihoods(model) -> list[list[float]]:
    """Each choice's summed log-probability given its question, from transformers."""
    import torch
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(ROOT / "checkpoints" / "tiny-arith", torch_dtype=torch.float32)
    out = []
    for question, choices, _ in MC:
        ctx = model.tokenizer(question)["input_ids"]
        row = []
        for c in choices:
            ids = model.tokenizer(question + c)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), -1)
            row.append(sum(lp[j - 1, ids[j]].item() for j in range(len(ctx), len(ids))))
        out.append(row)
    return out


def test_echoed_prompt_logprobs_score_choices_as_transformers_does(model):
    """lm-evaluation-harness' local-completions loglikelihood: token-id prompts, echo, logprobs,
    one generated token, the continuation's token_logprobs summed."""
    async def test(client, llm):
        rows = []
        for question, choices, _ in MC:
            ctxlen = len(model.tokenizer(question)["input_ids"])
            prompts = [model.tokenizer(question + c)["input_ids"] for c in choices]
            r = await client.post("/v1/completions", json={"model": NAME, "prompt": prompts, "max_tokens": 1,
                                                           "logprobs": 1, "echo": True, "temperature": 0})
            lps = [c["logprobs"] for c in r.json()["choices"]]
            assert all(lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(p) + 1
                       for lp, p in zip(lps, prompts))
            assert r.json()["choices"][0]["text"].startswith(model.tokenizer.decode(prompts[0]))
            rows.append([sum(lp["token_logprobs"][ctxlen:-1]) for lp in lps])
        return rows

    got, want = serve(model, test), _hf_loglikelihoods(model)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    accuracy = [np.mean([np.argmax(row) == gold for row, (_, _, gold) in zip(rows, MC)]) for rows in (got, want)]
    assert accuracy[0] == accuracy[1]


def test_preempted_requests_finish_whole_and_are_counted(model):
    """A pool of 3 pages of 16 tokens for 3 requests that grow to 3 pages each: some are preempted
    and recomputed; each still gets offline generate's tokens, and /metrics counts it."""
    prompts = ["17+25=", "408+199=", "3+999="]

    async def test(client, llm):
        async def one(p):
            r = await client.post("/v1/completions", json={"model": NAME, "prompt": p, "max_tokens": 36,
                                                           "ignore_eos": True, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]
        texts = await asyncio.gather(*map(one, prompts))
        return texts, (await client.get("/metrics")).text

    texts, text = serve(model, test, page_size=16, max_kv_tokens=48)
    params = jaxtp.SamplingParams(max_tokens=36, ignore_eos=True, temperature=0)
    assert texts == [o.text for o in jaxtp.generate(model, prompts, params)]
    assert metric(text, "jaxtp:num_preemptions_total") > 0
    assert metric(text, "jaxtp:num_requests_running") == 0


def test_a_repeated_prompt_hits_the_prefix_cache_and_metrics_count_it(model):
    prompt = "12+34=46\n" * 4 + "17+25="  # 42 tokens: two full 16-token pages

    async def test(client, llm):
        texts = []
        for _ in range(2):
            r = await client.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 6,
                                                           "temperature": 0})
            texts.append(r.json()["choices"][0]["text"])
        return texts, (await client.get("/metrics")).text

    texts, text = serve(model, test, page_size=16)
    assert texts[0] == texts[1] == jaxtp.generate(model, [prompt], jaxtp.SamplingParams(max_tokens=6,
                                                                                        temperature=0))[0].text
    queries, hits = metric(text, "jaxtp:prefix_cache_queries_total"), metric(text, "jaxtp:prefix_cache_hits_total")
    assert hits >= 32 and queries >= 2 * hits
