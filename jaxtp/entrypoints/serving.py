"""`AsyncLLM`: the engine behind the server. One background thread owns the `Engine` (and so
the devices); coroutines submit requests and receive their deltas through asyncio queues.

Between decode chunks the thread takes new requests into free slots and drops aborted
ones (a client that went away), so one slow or vanished client never holds up the others.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from typing import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jaxtp.engine import Engine
from jaxtp.engine.kv_cache import PAGE_SIZE
from jaxtp.engine.scheduler import MAX_BATCHED_TOKENS
from jaxtp.engine.sampling import SamplingParams
from jaxtp.entrypoints.outputs import Delta, Request

log = logging.getLogger("jaxtp.serving")


class QueueFull(RuntimeError):
    """More requests in flight than the server accepts (HTTP 503)."""


class EngineError(RuntimeError):
    """The engine failed while running this request (HTTP 500); the server keeps serving."""


class Metrics:
    """Prometheus metrics, named like vLLM's (prefix jaxtp:)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.running = Gauge("jaxtp:num_requests_running", "Sequences holding a slot and KV pages",
                             registry=registry)
        self.waiting = Gauge("jaxtp:num_requests_waiting", "Sequences waiting for a slot or pages",
                             registry=registry)
        self.preemptions = Counter("jaxtp:num_preemptions", "Sequences preempted (their pages freed, to "
                                   "be recomputed)", registry=registry)
        self.prefix_queries = Counter("jaxtp:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=registry)
        self.prefix_hits = Counter("jaxtp:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                   registry=registry)
        self.requests = Counter("jaxtp:request_success", "Finished requests", ["finish_reason"],
                                registry=registry)
        self.prompt_tokens = Counter("jaxtp:prompt_tokens", "Prompt tokens processed", registry=registry)
        self.generation_tokens = Counter("jaxtp:generation_tokens", "Tokens generated", registry=registry)
        self.ttft = Histogram("jaxtp:time_to_first_token_seconds", "Time to first token", registry=registry)
        self.itl = Histogram("jaxtp:inter_token_latency_seconds", "Time between a sequence's output tokens",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56),
                             registry=registry)
        self.kv_usage = Gauge("jaxtp:kv_cache_usage_perc", "Share of the KV cache's pages in use (1 = full)",
                              registry=registry)
        self.e2e = Histogram("jaxtp:e2e_request_latency_seconds", "Request latency", registry=registry)
        self.errors = Counter("jaxtp:request_errors", "Requests answered with an error, by HTTP status",
                              ["status"], registry=registry)
        self.engine_failures = Counter("jaxtp:engine_failures", "Engine steps that failed (their requests "
                                       "got a 500, the engine was rebuilt)", registry=registry)


class RequestStream:
    """The deltas of one admitted request, until each of its params.n samples has finished.
    Closing it early (the client went away) aborts the request and frees its slots; closing
    twice, or after the end, does nothing."""

    def __init__(self, llm: "AsyncLLM", req: Request):
        self.llm, self.req, self.left, self.closed = llm, req, req.params.n, False
        self.deltas: asyncio.Queue = asyncio.Queue()

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta:
        if not self.left:
            await self.aclose()
            raise StopAsyncIteration
        d = await self.deltas.get()
        if isinstance(d, BaseException):
            await self.aclose()
            raise d
        self.left -= d.finish_reason is not None
        return d

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.llm._in_flight -= 1
            if self.left:
                self.llm._inbox.put(("abort", self.req, None))


class AsyncLLM:
    """Continuous batching for concurrent requests over `max_num_seqs` cache slots.

    max_queue bounds the requests in flight (running + waiting); beyond it `generate` raises
    QueueFull. chunk: tokens per decode dispatch (smaller: finer streaming and faster admission
    of new requests; larger: less host overhead). max_num_batched_tokens, page_size and
    max_kv_tokens (a smaller KV pool than memory allows) go to the Engine. warmup: a callable
    progress(done, total, what) to compile the engine's programs before serving (Engine.warmup),
    so no request waits on a compile; None compiles them on first use.
    """

    def __init__(self, model, max_num_seqs: int = 64, max_model_len: int | None = None,
                 max_queue: int = 512, chunk: int = 8, registry: CollectorRegistry | None = None,
                 max_num_batched_tokens: int = MAX_BATCHED_TOKENS, page_size: int = PAGE_SIZE,
                 max_kv_tokens: int | None = None, warmup=None):
        for name, value in (("max_num_seqs", max_num_seqs), ("max_queue", max_queue), ("chunk", chunk),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if max_model_len is not None and not (isinstance(max_model_len, int)
                                              and 1 <= max_model_len <= model.max_model_len):
            raise ValueError(f"max_model_len must be an integer in [1, {model.max_model_len}] (the model's "
                             f"max_position_embeddings), got {max_model_len!r}")
        self.model, self.max_queue = model, max_queue
        self.max_model_len = max_model_len or model.max_model_len
        dp = model.mesh.shape["dp"]
        self._engine_args = (model, -(-max_num_seqs // dp) * dp, self.max_model_len, chunk, max_num_batched_tokens,
                             page_size, max_kv_tokens)
        self.engine = Engine(*self._engine_args)
        if warmup is not None:
            self.engine.warmup(warmup)
        self._seen = (0, 0, 0)  # the engine's preemptions and prefix-cache tokens counted so far
        self.metrics = Metrics(registry or CollectorRegistry())
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[int, tuple[Request, object, float]] = {}  # id(seq) -> (request, sink, start)
        self._last_token: dict[int, float] = {}  # id(seq) -> when its last tokens came
        self._in_flight = 0
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="jaxtp-engine", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet ended."""
        return self._in_flight

    def close(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def submit(self, items: list[tuple[object, list[int], SamplingParams]]) -> list[RequestStream]:
        """Admit (prompt, prompt ids, params) requests all together or none (QueueFull); call
        from the event loop. Each stream must be read to its end or closed."""
        if self._in_flight + len(items) > self.max_queue:
            raise QueueFull(f"the server has {self._in_flight} requests in flight (max_queue={self.max_queue}) "
                            f"and this asks for {len(items)} more; retry later")
        loop, streams = asyncio.get_running_loop(), []
        for prompt, ids, params in items:
            stream = RequestStream(self, Request(str(next(self._ids)), prompt, ids, params, self.model.tokenizer))

            def sink(d, deltas=stream.deltas):  # from the engine thread; the loop may be gone by then
                try:
                    loop.call_soon_threadsafe(deltas.put_nowait, d)
                except RuntimeError:
                    pass
            self._in_flight += 1
            self._inbox.put(("add", stream.req, sink))
            streams.append(stream)
        return streams

    async def generate(self, prompt, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Deltas of one request (submit's stream, closed however the caller stops)."""
        stream = self.submit([(prompt, prompt_ids, params)])[0]
        try:
            async for d in stream:
                yield d
        finally:
            await stream.aclose()

    # -- the engine thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.engine.has_unfinished)
            if not self.engine.has_unfinished:
                continue
            try:
                changed = self.engine.step()
            except Exception as e:  # noqa: BLE001  fail the batch, keep serving
                log.exception("engine step failed; failing %d requests", len(self._active))
                self.metrics.engine_failures.inc()
                for sink in {id(r): s for r, s, _ in self._active.values()}.values():  # once per request
                    sink(EngineError(f"generation failed: {type(e).__name__}: {e}"))
                self._active.clear()
                self._last_token.clear()
                self.engine, self._seen = Engine(*self._engine_args), (0, 0, 0)  # the donated cache may be gone
                continue
            now = time.perf_counter()
            out = [self._deliver(seq, now) for seq in changed]
            self._gauges()  # before the deltas go out: a client with its answer sees the gauges after it
            for sink, delta in out:
                sink(delta)

    def _deliver(self, seq, now: float):
        """seq's new tokens as a delta for its request's stream, with their metrics; returns
        (sink, delta) for the caller to send."""
        req, sink, start = self._active[id(seq)]
        delta = req.update(seq)
        if delta.stop_str is not None:
            self.engine.stop(seq, delta.stop_str, delta.num_tokens)
        if delta.token_ids:
            last = self._last_token.get(id(seq))
            if last is None:
                self.metrics.ttft.observe(now - start)
            else:  # a chunk's tokens arrive together: each gets its share of the wait
                for _ in delta.token_ids:
                    self.metrics.itl.observe((now - last) / len(delta.token_ids))
            self._last_token[id(seq)] = now
        self.metrics.generation_tokens.inc(len(delta.token_ids))
        if delta.finish_reason is not None:
            self._done(seq, delta.finish_reason, now)
        return sink, delta

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._handle(*item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        self._gauges()

    def _handle(self, op: str, req: Request, sink) -> None:
        if op == "add":
            try:
                for seq in req.seqs:
                    self.engine.add(seq)
            except ValueError as e:  # the request alone fails: its samples already queued go too
                for seq in req.seqs:
                    self.engine.abort(seq)
                sink(e)
                return
            self.metrics.prompt_tokens.inc(len(req.prompt_ids))
            start = time.perf_counter()
            for seq in req.seqs:
                self._active[id(seq)] = (req, sink, start)
        else:  # abort
            for seq in req.seqs:
                if id(seq) in self._active:
                    self.engine.abort(seq)
                    self._done(seq, "abort", time.perf_counter())

    def _done(self, seq, reason: str, now: float) -> None:
        _, _, start = self._active.pop(id(seq))
        self._last_token.pop(id(seq), None)
        self.metrics.requests.labels(reason).inc()
        self.metrics.e2e.observe(now - start)

    def _gauges(self) -> None:
        self.metrics.running.set(self.engine.num_running)
        seen = (self.engine.preemptions, self.engine.prefix_queries, self.engine.prefix_hits)
        for counter, now, before in zip((self.metrics.preemptions, self.metrics.prefix_queries,
                                         self.metrics.prefix_hits), seen, self._seen):
            counter.inc(now - before)
        self._seen = seen
        self.metrics.waiting.set(len(self.engine.waiting))
        self.metrics.kv_usage.set(self.engine.kv_usage)
