"""The OpenAI-compatible HTTP API (FastAPI) over `AsyncLLM`: /v1/models, /v1/completions,
/v1/chat/completions (plain JSON or server-sent events), /health and /metrics.

Request fields follow OpenAI's, plus vLLM's sampling extras (top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids, ...). Every client error is a 400 with OpenAI's error
body {"error": {"message", "type", "param", "code"}}; a full queue is a 503.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import math
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from jaxtp.engine.sampling import SamplingParams
from jaxtp.entrypoints.outputs import Delta, Logprob
from jaxtp.entrypoints.prompts import chat_prompt, check_ids, check_params, encode
from jaxtp.entrypoints.serving import AsyncLLM, EngineError, QueueFull, RequestStream


DISCONNECT_POLL_S = 0.25  # how often a request checks that its client is still there


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code


def error_body(e: APIError) -> dict:
    return {"error": {"message": str(e), "type": e.type, "param": e.param, "code": e.code}}


def error_response(http: Request, e: APIError) -> JSONResponse:
    _count(http, e)
    return JSONResponse(error_body(e), status_code=e.status)


def _count(http: Request, e: APIError) -> None:
    http.app.state.llm.metrics.errors.labels(str(e.status)).inc()


class SamplingFields(BaseModel):
    """Fields shared by both endpoints. Types are strict where OpenAI's are (no "5" for 5, no
    true for 1); unknown fields are ignored (as vLLM does), but known ones that would change
    the output and are not supported are rejected (`unsupported`)."""
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    user: str | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    # vLLM extras
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[dict] | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True


def unsupported(r: SamplingFields) -> str | None:
    """The first field set that asks for what jaxtp cannot do yet (so it is not silently ignored)."""
    if r.logit_bias:
        return "logit_bias"
    if r.response_format is not None and r.response_format.get("type") != "text":
        return "response_format"
    if r.tools or r.functions:
        return "tools" if r.tools else "functions"
    if r.tool_choice not in (None, "none") or r.function_call not in (None, "none"):
        return "tool_choice" if r.tool_choice not in (None, "none") else "function_call"
    return None


def _params(model, r: SamplingFields, max_tokens: int, logprobs: int | None,
            prompt_logprobs: int | None = None) -> SamplingParams:
    field = unsupported(r)
    if field is not None:
        raise APIError(f"{field} is not supported (structured outputs and tool calls are not implemented)",
                       param=field)
    fields = dict(n=r.n, max_tokens=max_tokens, seed=r.seed, stop=r.stop, presence_penalty=r.presence_penalty,
                  frequency_penalty=r.frequency_penalty, top_k=r.top_k, min_p=r.min_p,
                  repetition_penalty=r.repetition_penalty, min_tokens=r.min_tokens, ignore_eos=r.ignore_eos,
                  stop_token_ids=r.stop_token_ids, include_stop_str_in_output=r.include_stop_str_in_output,
                  skip_special_tokens=r.skip_special_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    fields["temperature"] = 1.0 if r.temperature is None else r.temperature
    fields["top_p"] = 1.0 if r.top_p is None else r.top_p
    try:
        params = SamplingParams(**fields)
        check_params(model, params)
        return params
    except ValueError as e:
        field = str(e).split(" ")[0].removeprefix("SamplingParams.").rstrip(":")
        raise APIError(str(e).replace("SamplingParams.", ""), param=field) from None


MAX_BODY_BYTES = 8 << 20    # a request body past this is a 413
MAX_PROMPTS = 256           # prompts in one /v1/completions request


def build_app(llm: AsyncLLM, served_model_name: str, api_key: str | None = None,
              chat_template: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
              max_prompts: int = MAX_PROMPTS) -> FastAPI:
    """The app serving `llm` as `served_model_name`; its handlers find both on `app.state`.
    api_key: /v1/* then needs `Authorization: Bearer <api_key>` (/health, /metrics stay open).
    chat_template: a Jinja template in place of the tokenizer's own."""
    app = FastAPI(title="jaxtp OpenAI-compatible server")
    app.state.llm, app.state.name, app.state.created = llm, served_model_name, int(time.time())
    app.state.chat_template, app.state.max_prompts = chat_template, max_prompts
    app.add_middleware(BodyLimit, limit=max_body_bytes, metrics=llm.metrics)
    if api_key is not None:
        app.middleware("http")(functools.partial(_authorize, f"Bearer {api_key}"))
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_api_route("/health", health, methods=["GET", "HEAD"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/version", version, methods=["GET"])
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", model_card, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    return app


# -- errors -----------------------------------------------------------------------------------
async def _api_error(http: Request, e: APIError):
    return error_response(http, e)


async def _validation_error(http: Request, e: RequestValidationError):
    err = e.errors()[0] if e.errors() else {}
    loc = ".".join(str(x) for x in err.get("loc", ())[1:]) or None
    if err.get("type") == "json_invalid":
        return error_response(http, APIError(f"invalid JSON body: {err.get('msg')}", code="invalid_json"))
    return error_response(http, APIError(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")), param=loc))


async def _http_error(http: Request, e: HTTPException):
    return error_response(http, APIError(str(e.detail), status=e.status_code,
                                         type="not_found_error" if e.status_code == 404 else "invalid_request_error"))


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes (by its Content-Length, or as it streams in) is
    answered 413. The body is read here, at most `limit` bytes of it, and handed on whole."""

    def __init__(self, app, limit: int, metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._too_large(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._too_large(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()
        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        self.metrics.errors.labels("413").inc()
        e = APIError(f"the request body is over {self.limit} bytes", status=413, code="request_too_large")
        await JSONResponse(error_body(e), status_code=413)(scope, receive, send)


async def _authorize(expected: str, http: Request, call_next):
    if http.url.path.startswith("/v1/") and not hmac.compare_digest(
            http.headers.get("authorization", "").encode(), expected.encode()):
        return error_response(http, APIError("Incorrect API key provided.", status=401, code="invalid_api_key"))
    return await call_next(http)


def _check_model(http: Request, name: str, status: int = 400) -> None:
    """A 400 (a request body naming another model) or, for /v1/models/{id}, a 404."""
    served = http.app.state.name
    if name != served:
        raise APIError(f"The model `{name}` does not exist. Available: `{served}`.", status=status,
                       type="not_found_error" if status == 404 else "invalid_request_error",
                       param="model", code="model_not_found")


def _messages(messages: list[ChatMessage]) -> list[dict]:
    return [{"role": m.role, "content": _text_content(m.content)} for m in messages]


def _check_length(limit: int, prompt_len: int, max_tokens: int | None) -> int:
    """max_tokens, or all the room the prompt leaves; a 400 if they do not fit `limit`."""
    room = limit - prompt_len
    if room <= 0 or (max_tokens is not None and max_tokens > room):
        raise APIError(f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{prompt_len + (max_tokens or 0)} tokens ({prompt_len} in the prompt, "
                       f"{max_tokens or 0} for the completion). Please reduce the length of the prompt "
                       f"or the completion.", param="max_tokens", code="context_length_exceeded")
    return max_tokens if max_tokens is not None else room


# -- plain endpoints --------------------------------------------------------------------------
async def health():
    return Response(status_code=200)


async def metrics(http: Request):
    return Response(generate_latest(http.app.state.llm.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _card(state) -> dict:
    return {"id": state.name, "object": "model", "created": state.created, "owned_by": "jaxtp",
            "max_model_len": state.llm.max_model_len}


async def models(http: Request):
    return {"object": "list", "data": [_card(http.app.state)]}


async def model_card(model_id: str, http: Request):
    _check_model(http, model_id, status=404)
    return _card(http.app.state)


async def version():
    from jaxtp import __version__
    return {"version": __version__}


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    tokens: list[int]


async def tokenize(body: TokenizeRequest, http: Request):
    if body.model is not None:
        _check_model(http, body.model)
    model = http.app.state.llm.model
    if (body.prompt is None) == (body.messages is None):
        raise APIError("give either prompt or messages", param="prompt")
    try:  # off the event loop, as the generation endpoints tokenize
        if body.prompt is not None:
            ids = await asyncio.to_thread(encode, model, body.prompt)
        else:
            ids = await asyncio.to_thread(chat_prompt, model, _messages(body.messages), body.add_generation_prompt,
                                          http.app.state.chat_template)
    except ValueError as e:
        raise APIError(str(e), param="prompt" if body.prompt is not None else "messages") from None
    return {"count": len(ids), "max_model_len": http.app.state.llm.max_model_len, "tokens": ids}


async def detokenize(body: DetokenizeRequest, http: Request):
    if body.model is not None:
        _check_model(http, body.model)
    model = http.app.state.llm.model
    try:
        ids = check_ids(model, body.tokens)
    except ValueError as e:
        raise APIError(str(e), param="tokens") from None
    if model.tokenizer is None:
        raise APIError("this model has no tokenizer", param="tokens")
    return {"prompt": model.tokenizer.decode(ids)}


# -- generation -------------------------------------------------------------------------------
def _submit(http: Request, items) -> list[RequestStream]:
    """Admit the (prompt, ids, params) items of one HTTP request whole, or answer 503."""
    try:
        return http.app.state.llm.submit(items)
    except QueueFull as e:
        raise APIError(str(e), status=503, type="service_unavailable") from None


async def _run(http: Request, gen: RequestStream) -> AsyncIterator[Delta]:
    """The request's deltas; stops (and aborts the request) if the client disconnects."""
    checked, nxt = time.monotonic(), asyncio.ensure_future(asyncio.sleep(0))
    try:
        while True:
            nxt = asyncio.ensure_future(anext(gen))
            while True:  # a gone client must be noticed whether or not tokens keep coming
                await asyncio.wait([nxt], timeout=DISCONNECT_POLL_S)
                if time.monotonic() - checked >= DISCONNECT_POLL_S or not nxt.done():
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        return
                if nxt.done():
                    break
            try:
                yield nxt.result()
            except StopAsyncIteration:
                return
    except ValueError as e:
        raise APIError(str(e)) from None
    except EngineError as e:
        raise APIError(str(e), status=500, type="internal_server_error") from None
    finally:  # on disconnect or cancellation: closing the generator aborts the request
        nxt.cancel()
        await asyncio.gather(nxt, return_exceptions=True)
        await gen.aclose()


@dataclasses.dataclass
class _Completions:
    """One /v1/completions request, checked: its prompts with their ids and params, the text
    each echoes, and what of each choice went out already."""
    id: str
    body: CompletionRequest
    items: list[tuple[Any, list[int], SamplingParams]]
    echoes: list[str]
    offsets: dict = dataclasses.field(default_factory=dict)  # choice -> its next token's text_offset
    echoed: set = dataclasses.field(default_factory=set)      # choices whose echo went out

    @classmethod
    def make(cls, body: CompletionRequest, items, tokenizer) -> "_Completions":
        def echo(prompt, ids):  # token-id prompts echo their text
            if not body.echo:
                return ""
            return prompt if isinstance(prompt, str) else (tokenizer.decode(ids) if tokenizer else "")
        return cls(f"cmpl-{uuid.uuid4().hex}", body, items, [echo(p, ids) for p, ids, _ in items])

    def text(self, i: int, text: str) -> str:
        """Choice i's text: the echoed prompt goes before its first piece."""
        first = i not in self.echoed
        self.echoed.add(i)
        return (self.echoes[i // self.n] if first else "") + text

    def logprobs(self, i: int, request, token_ids, entries):
        """Choice i's logprobs for these tokens, their text_offset running on from the last
        call's; the first call's start with the echoed prompt's (its first token's is null)."""
        if self.body.logprobs is None:
            return None
        k, head = i // self.n, None
        if i not in self.offsets and self.body.echo:
            head, self.offsets[i] = _prompt_logprobs(request.tokenizer, self.items[k][1], request.prompt_logprobs())
        lp, self.offsets[i] = _legacy_logprobs(token_ids, entries, self.offsets.get(i, len(self.echoes[k])))
        return lp if head is None else {key: head[key] + lp[key] for key in lp}

    @property
    def n(self) -> int:
        return self.items[0][2].n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for _, ids, _ in self.items)


async def completions(body: CompletionRequest, http: Request):
    _check_model(http, body.model)
    if body.suffix:
        raise APIError("suffix is not supported", param="suffix")
    if body.best_of not in (None, body.n):
        raise APIError("best_of must equal n", param="best_of")
    limit = http.app.state.llm.max_model_len
    model = http.app.state.llm.model
    prompts = await asyncio.to_thread(_completion_prompts, model, body.prompt, http.app.state.max_prompts)
    prompt_lp = body.logprobs if body.echo else None  # echo with logprobs: the prompt's too
    items = [(p, ids, _params(model, body, _check_length(limit, len(ids), body.max_tokens), body.logprobs, prompt_lp))
             for p, ids in prompts]
    req = _Completions.make(body, items, model.tokenizer)
    streams = [_run(http, s) for s in _submit(http, items)]
    if body.stream:
        return await _sse(http, _completion_events(req, streams, http.app.state.name))
    outs = await asyncio.gather(*(_collect(s) for s in streams))
    n, choices, completion_tokens = items[0][2].n, [], 0
    for k, request in enumerate(outs):
        for o in request.output().outputs:
            i = k * n + o.index
            text = req.text(i, o.text)  # before logprobs: the echo goes with a choice's first piece
            choices.append({"index": i, "text": text, "logprobs": req.logprobs(i, request, o.token_ids, o.logprobs),
                            "finish_reason": o.finish_reason})
            completion_tokens += len(o.token_ids)
    return {"id": req.id, "object": "text_completion", "created": int(time.time()), "model": http.app.state.name,
            "choices": choices, "usage": _usage(req.prompt_tokens, completion_tokens)}


async def _completion_events(req: _Completions, streams, model: str) -> AsyncIterator[str]:
    completion_tokens = 0
    async for k, d in _merge(streams):
        completion_tokens += len(d.token_ids)
        i = k * req.n + d.index
        text = req.text(i, d.text)
        chunk = {"id": req.id, "object": "text_completion", "created": int(time.time()), "model": model,
                 "choices": [{"index": i, "text": text, "logprobs": req.logprobs(i, d.request, d.token_ids, d.logprobs),
                              "finish_reason": d.finish_reason}]}
        yield f"data: {json.dumps(chunk)}\n\n"
    if (req.body.stream_options or {}).get("include_usage"):
        usage = _usage_chunk(req.id, "text_completion", model, req.prompt_tokens, completion_tokens)
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"


async def chat(body: ChatRequest, http: Request):
    _check_model(http, body.model)
    llm, name = http.app.state.llm, http.app.state.name
    try:
        ids = await asyncio.to_thread(chat_prompt, llm.model, _messages(body.messages), body.add_generation_prompt,
                                      http.app.state.chat_template)
    except ValueError as e:
        raise APIError(str(e), param="messages") from None
    max_tokens = _check_length(llm.max_model_len, len(ids), body.max_completion_tokens or body.max_tokens)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError("top_logprobs requires logprobs=true", param="top_logprobs")
    k = body.top_logprobs or 0
    params = _params(llm.model, body, max_tokens, k if body.logprobs else None)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    stream = _run(http, _submit(http, [(None, ids, params)])[0])
    if body.stream:
        return await _sse(http, _chat_events(rid, name, body, params, len(ids), stream))
    outs = (await _collect(stream)).output().outputs
    choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                "logprobs": _chat_logprobs(o.token_ids, o.logprobs, k) if body.logprobs else None,
                "finish_reason": o.finish_reason} for o in outs]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": name,
            "choices": choices, "usage": _usage(len(ids), sum(len(o.token_ids) for o in outs))}


async def _chat_events(rid: str, name: str, body: ChatRequest, params: SamplingParams, prompt_tokens: int,
                       stream) -> AsyncIterator[str]:
    completion_tokens, k = 0, body.top_logprobs or 0
    for i in range(params.n):
        first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}
        yield f"data: {json.dumps(_chat_chunk(rid, name, first))}\n\n"
    async for _, d in _merge([stream]):
        completion_tokens += len(d.token_ids)
        c = {"index": d.index, "delta": {"content": d.text} if d.text else {},
             "logprobs": _chat_logprobs(d.token_ids, d.logprobs, k) if body.logprobs else None,
             "finish_reason": d.finish_reason}
        yield f"data: {json.dumps(_chat_chunk(rid, name, c))}\n\n"
    if (body.stream_options or {}).get("include_usage"):
        yield f"data: {json.dumps(_usage_chunk(rid, 'chat.completion.chunk', name, prompt_tokens, completion_tokens))}\n\n"
    yield "data: [DONE]\n\n"


# -- helpers ----------------------------------------------------------------------------------
def _completion_prompts(model, prompt, max_prompts: int) -> list[tuple[Any, list[int]]]:
    """OpenAI's prompt forms: a string, a list of strings, token ids, a list of token-id lists.
    Tokenizing is slow for long text: run it off the event loop."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError("prompt is empty", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    if len(prompt) > max_prompts:
        raise APIError(f"prompt holds {len(prompt)} prompts; at most {max_prompts} per request", param="prompt")
    try:
        return [(p, encode(model, p)) for p in prompt]
    except ValueError as e:
        raise APIError(str(e), param="prompt") from None


def _text_content(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = [c.get("text", "") for c in content if c.get("type") == "text"]
    if len(parts) != len(content):
        raise APIError("only text content parts are supported", param="messages")
    return "".join(parts)


async def _merge(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleave several requests' deltas as they arrive, tagged with the request's position."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(k, s):
        try:
            async for d in s:
                await q.put((k, d))
        except BaseException as e:  # noqa: BLE001
            await q.put((k, e))
        finally:
            await q.put((k, None))

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    left = len(tasks)
    try:
        while left:
            k, d = await q.get()
            if d is None:
                left -= 1
            elif isinstance(d, BaseException):
                raise d
            elif d.text or d.token_ids or d.finish_reason:
                yield k, d
    finally:
        for t in tasks:
            t.cancel()


async def _collect(stream: AsyncIterator[Delta]):
    req = None
    async for d in stream:
        req = d.request
    if req is None:
        raise APIError("the client disconnected", status=499)
    return req


async def _sse(http: Request, events: AsyncIterator[str]) -> StreamingResponse:
    """Start the stream only after the first event, so errors before any output are an error
    status; one after it ends the stream with an error event and [DONE]."""
    first = await anext(events)

    async def body():
        yield first
        try:
            async for e in events:
                yield e
        except APIError as e:
            _count(http, e)
            yield f"data: {json.dumps(error_body(e))}\n\n"
            yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _usage_chunk(rid, obj, model, prompt_tokens, completion_tokens) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": _usage(prompt_tokens, completion_tokens)}


def _chat_chunk(rid, model, choice) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [choice]}


def _token_str(t: int, lp: Logprob) -> str:
    """The token's text, decoded once by outputs.Request (the id itself without a tokenizer)."""
    return str(t) if lp.decoded_token is None else lp.decoded_token


def _finite(x: float) -> float:
    """JSON has no -Infinity: a log-probability of zero probability goes out as vLLM's -9999."""
    return x if math.isfinite(x) else -9999.0


def _chat_logprobs(token_ids, entries, k: int) -> dict:
    """OpenAI chat logprobs: per token, its own and the top-k alternatives'."""
    def item(t, lp):
        s = _token_str(t, lp)
        return {"token": s, "logprob": _finite(lp.logprob), "bytes": list(s.encode())}
    return {"content": [{**item(t, e[t]), "top_logprobs": [item(x, lp) for x, lp in
                                                           sorted(e.items(), key=lambda kv: kv[1].rank)
                                                           if lp.rank <= k]}
                        for t, e in zip(token_ids, entries or [])]}


def _prompt_logprobs(tokenizer, ids: list[int], entries) -> tuple[dict, int]:
    """Completions' logprobs of an echoed prompt (entries: [None, {id: Logprob}, ...]) from
    text_offset 0, and the offset after it."""
    first = str(ids[0]) if tokenizer is None else tokenizer.decode([ids[0]])
    rest, offset = _legacy_logprobs(ids[1:], (entries or [None])[1:], len(first))
    return {"tokens": [first] + rest["tokens"], "token_logprobs": [None] + rest["token_logprobs"],
            "top_logprobs": [None] + rest["top_logprobs"], "text_offset": [0] + rest["text_offset"]}, offset


def _legacy_logprobs(token_ids, entries, offset: int = 0) -> tuple[dict, int]:
    """Completions' logprobs for tokens whose text starts at `offset` of the choice's text, and
    the offset after them."""
    tokens, lps, tops, offsets = [], [], [], []
    for t, e in zip(token_ids, entries or []):
        s = _token_str(t, e[t])
        tokens.append(s)
        lps.append(_finite(e[t].logprob))
        tops.append({_token_str(x, lp): _finite(lp.logprob) for x, lp in e.items()})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}, offset


