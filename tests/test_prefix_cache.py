"""Automatic prefix caching: a prompt prefix seen before is computed once and its KV pages are
shared; outputs are what the same requests give without it."""
import random

import numpy as np
import pytest

import jaxtp
from jaxtp import engine
from jaxtp.engine import block_manager
from jaxtp.engine.block_manager import BlockManager
from helpers import drive

SYSTEM = list(range(3, 53))  # 50 shared tokens: three full 16-token pages


def requests(params, suffixes):
    return [engine.Sequence(SYSTEM + s, params, seed=i) for i, s in enumerate(suffixes)]


def run(model, params, suffixes, caching: bool, waves: int = 2, **kw):
    """The requests in `waves` groups (each added once the last finished, so later ones can hit
    the pages of earlier ones) -> (tokens per request, engine)."""
    eng = engine.Engine(model, max_num_seqs=4, max_model_len=128, chunk=4, page_size=16,
                        enable_prefix_caching=caching, **kw)
    seqs = requests(params, suffixes)
    per = -(-len(seqs) // waves)
    out = []
    for i in range(0, len(seqs), per):
        out += drive(eng, seqs[i:i + per])
    return out, eng


SUFFIXES = [[70, 71, 72], [70, 71, 90, 91], [100] * 20, [70, 71, 72], list(range(200, 230)), [5]]


@pytest.mark.parametrize("tp,dp", [(1, 1), (2, 1), (4, 1), (2, 2)])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_outputs_with_and_without_prefix_caching_are_identical(checkpoint, tp, dp, temperature):
    """Requests share a system prompt, some share more and diverge, one repeats another: with
    caching the later ones reuse the earlier pages (the hits are counted; with dp, each replica
    its own) and every output is the one computed without it."""
    model = jaxtp.load(checkpoint("llama")[0], tp=tp, dp=dp, dtype="float32")
    params = jaxtp.SamplingParams(max_tokens=10, temperature=temperature, ignore_eos=True)
    with_cache, on = run(model, params, SUFFIXES, True)
    without, off = run(model, params, SUFFIXES, False)
    assert with_cache == without
    assert off.prefix_hits == 0 and on.prefix_queries == off.prefix_queries
    assert on.prefix_hits >= 3 * 48  # the second wave finds at least the system prompt's pages


def test_preempted_sequences_with_shared_pages_give_the_same_outputs(checkpoint):
    """A pool too small for all: preempted sequences drop their references to shared pages and
    are recomputed, partly from the cache; the outputs equal an unconstrained run's without it."""
    model = jaxtp.load(checkpoint("llama")[0], dtype="float32")
    params = jaxtp.SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    small, eng = run(model, params, SUFFIXES, True, waves=1, max_kv_tokens=12 * 16)
    assert eng.preemptions > 0 and eng.prefix_hits > 0
    assert small == run(model, params, SUFFIXES, False, waves=1)[0]
    assert eng.kv_usage == 0 and eng.num_running == 0


def test_prompt_logprobs_are_computed_whole_when_the_prefix_is_cached(checkpoint):
    model = jaxtp.load(checkpoint("llama")[0], dtype="float32")
    eng = engine.Engine(model, max_num_seqs=2, max_model_len=128, page_size=16)
    plain = jaxtp.SamplingParams(max_tokens=2, temperature=0.0)
    asks = jaxtp.SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1)
    drive(eng, requests(plain, [[7, 8]]))
    cached = requests(asks, [[7, 8]])
    drive(eng, cached)
    fresh = requests(asks, [[7, 8]])
    drive(engine.Engine(model, max_num_seqs=2, max_model_len=128, page_size=16, enable_prefix_caching=False), fresh)
    assert len(cached[0].prompt_logprobs) == len(SYSTEM) + 1 and cached[0].cached == 0  # one per token after the first
    np.testing.assert_allclose([e[0] for e in cached[0].prompt_logprobs],
                               [e[0] for e in fresh[0].prompt_logprobs], rtol=1e-5, atol=1e-6)
    assert cached[0].tokens == fresh[0].tokens


def test_load_and_engine_switches(checkpoint):
    path = checkpoint("llama")[0]
    assert jaxtp.load(path, dtype="float32").enable_prefix_caching
    off = jaxtp.load(path, dtype="float32", enable_prefix_caching=False)
    assert not engine.Engine(off, max_num_seqs=2, max_model_len=64).blocks.caching
    assert engine.Engine(off, max_num_seqs=2, max_model_len=64, enable_prefix_caching=True).blocks.caching


@pytest.mark.parametrize("collide", [False, True])
def test_matched_pages_always_hold_the_asked_tokens(monkeypatch, collide):
    """Random prompts over a small alphabet (shared prefixes everywhere) through a small pool
    (constant eviction): every page `match` returns was computed from exactly the prefix asked
    for up to its end, also when hashes collide all the time (the tokens and parent pages decide)."""
    if collide:
        monkeypatch.setattr(block_manager, "page_hash", lambda parent, tokens: sum(tokens) % 3)
    rng, size = random.Random(0), 4
    blocks = BlockManager(pages=24, page_size=size, caching=True)
    written: dict[int, tuple] = {}  # page -> the prefix its "KV" was computed from
    held, hits = [], 0
    for _ in range(1000):
        if held and (rng.random() < 0.5 or blocks.free_pages(0) < 8):
            pages, tokens = held.pop(rng.randrange(len(held)))
            blocks.publish(pages, 0, tokens)
            blocks.release(pages, 0)
            continue
        tokens = [rng.choice([1, 2]) for _ in range(rng.randrange(1, 20))]
        pages = blocks.match(0, tokens)
        hits += len(pages)
        for i, page in enumerate(pages):
            assert written[page] == tuple(tokens[:(i + 1) * size])
        n = len(pages)
        assert blocks.grow(pages, 0, len(tokens))
        for i, page in enumerate(pages[n:], n):
            written[page] = tuple(tokens[:(i + 1) * size])
        held.append((pages, tokens))
    assert hits > (3 if collide else 20)


def test_freed_pages_stay_cached_until_the_pool_needs_them():
    blocks = BlockManager(pages=5, page_size=2, caching=True)
    a = []
    assert blocks.grow(a, 0, 6)  # pages for [1, 2 | 3, 4 | 5, 6]
    kept = list(a)
    blocks.publish(a, 0, [1, 2, 3, 4, 5, 6])
    blocks.release(a, 0)
    assert blocks.free_pages(0) == 4
    assert blocks.match(0, [1, 2, 3, 4, 5, 6, 7]) == kept  # the last token is left to compute
    b = blocks.match(0, [1, 2, 3, 4, 9])
    assert b == kept[:2]
    blocks.release(b, 0)
    blocks.release([p for p in kept], 0)
    c = []
    assert blocks.grow(c, 0, 4)  # the least recently freed go first: the tail pages
    assert kept[0] not in c and blocks.match(0, [1, 2, 3]) == kept[:1]


def test_with_data_parallelism_a_request_goes_to_the_replica_that_knows_its_prefix(checkpoint):
    """Replica 0 computed the system prompt, so it is chosen for the next request though replica 1
    has more free pages; a request without that prefix goes to the emptier replica."""
    model = jaxtp.load(checkpoint("llama")[0], dp=2, dtype="float32")
    eng = engine.Engine(model, max_num_seqs=4, max_model_len=128, chunk=4, page_size=16)
    params = jaxtp.SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    first, again = requests(params, [[7, 8], [9, 10]])
    other = engine.Sequence(list(range(60, 90)), params, 0)
    eng.add(first)
    eng.step()
    eng.add(again)
    eng.add(other)
    eng.step()
    assert (first.replica, again.replica, other.replica) == (0, 0, 1)
    assert again.cached == 48 and other.cached == 0
    drive(eng, [])
