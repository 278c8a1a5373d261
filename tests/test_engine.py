"""Batching, compilation, sampling and seeds."""
import dataclasses

import jax
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

import jaxtp
from jaxtp import engine
from jaxtp.engine import runner
from jaxtp.engine.sampling import SamplerArrays, filter_logits, sample

PROMPTS = [[5, 6, 7], list(range(10, 31)), [42], list(range(50, 59))]


@pytest.fixture(scope="module")
def llama_tp2(checkpoint):
    return jaxtp.load(checkpoint("llama")[0], tp=2, dtype="float32")


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_ragged_batch_equals_one_at_a_time(llama_tp2, temperature):
    params = [jaxtp.SamplingParams(max_tokens=12 + 3 * i, temperature=temperature, seed=i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    together = jaxtp.generate(llama_tp2, PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, together):
        alone = jaxtp.generate(llama_tp2, [prompt], p)[0]
        assert out.token_ids == alone.token_ids
        assert len(out.token_ids) == p.max_tokens and out.finish_reason == "length"


def test_no_recompilation_per_token(llama_tp2):
    params = jaxtp.SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    jaxtp.generate(llama_tp2, [[1, 2, 3]], params)  # warm: compiles prefill + decode once
    before = dict(engine.TRACES)
    out = jaxtp.generate(llama_tp2, [[9, 8, 7, 6]], params)  # same buckets, 40 more tokens
    assert len(out[0].token_ids) == 40
    assert dict(engine.TRACES) == before


def test_a_chunk_is_queued_ahead_and_none_past_max_tokens(llama_tp2, monkeypatch):
    """step() queues the next decode chunk before reading the one ahead of it, and stops queueing
    once the queued work holds every running sequence's last token: 1 (prefill) + 4 + 4 tokens
    are two chunks of 4, not three."""
    calls = []
    real = runner.decode
    monkeypatch.setattr(runner, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    params = jaxtp.SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    eng = engine.Engine(llama_tp2, max_num_seqs=2, max_model_len=64, chunk=4)
    seq = engine.Sequence([5, 6, 7], params, 0)
    eng.add(seq)
    seen = []
    while eng.has_unfinished:
        eng.step()
        seen.append((len(calls), len(seq.tokens)))
    assert seen == [(1, 1), (2, 5), (2, 9)]
    assert seq.tokens == jaxtp.generate(llama_tp2, [[5, 6, 7]], params)[0].token_ids


def test_a_sequence_the_queued_work_completes_takes_no_decode_row(llama_tp2):
    """Once the queued chunks hold a sequence's last token, the next chunk runs without it
    (its row would only run done), while the others keep decoding."""
    short = engine.Sequence([5, 6, 7], jaxtp.SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), 0)
    long = engine.Sequence([42], jaxtp.SamplingParams(max_tokens=17, temperature=0.0, ignore_eos=True), 0)
    eng = engine.Engine(llama_tp2, max_num_seqs=2, max_model_len=64, chunk=4)
    rows, decode = [], eng.runner.decode
    eng.runner.decode = lambda columns, steps: rows.append([s for s in columns if s is not None]) or \
        decode(columns, steps)
    eng.add(short)
    eng.add(long)
    while eng.has_unfinished:
        eng.step()
    assert rows[0] == [short, long] and all(r == [long] for r in rows[1:]) and len(rows) == 4
    for seq in (short, long):
        assert seq.tokens == jaxtp.generate(llama_tp2, [seq.prompt], seq.params)[0].token_ids


def test_finish_drops_the_queued_chunks_tokens_and_frees_the_slot(llama_tp2):
    """A sequence ended from the host while a chunk with its row is queued gets no more tokens,
    even though the chunk is read after its slot went to the next sequence."""
    params = jaxtp.SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    eng = engine.Engine(llama_tp2, max_num_seqs=1, max_model_len=64, chunk=4)
    first, second = engine.Sequence([5, 6, 7], params, 0), engine.Sequence([42], params, 0)
    eng.add(first)
    eng.add(second)
    eng.step()
    eng.step()
    assert len(first.tokens) == 5 and eng._ahead is not None  # the next chunk is queued
    eng.abort(first)
    while eng.has_unfinished:
        eng.step()
    assert len(first.tokens) == 5 and first.finish_reason == "abort"
    assert second.tokens == jaxtp.generate(llama_tp2, [[42]], params)[0].token_ids


def test_step_args_are_made_once_and_match_by_value(llama_tp2):
    """The jitted steps' static model half is hashed once (engine.ModelDef); an equal one made
    again hits the same compiled program, and new params are picked up."""
    model_def, weights = llama_tp2.step_args
    assert llama_tp2.step_args[0] is model_def
    ids = [[4, 5, 6, 7]]
    want = llama_tp2.logits(ids)
    before = dict(engine.TRACES)
    same = dataclasses.replace(llama_tp2)  # same graphdef and params, its own step_args
    assert same.step_args[0] is not model_def and same.step_args[0] == model_def
    assert hash(same.step_args[0]) == hash(model_def)
    np.testing.assert_array_equal(same.logits(ids), want)
    assert dict(engine.TRACES) == before  # the compiled program was reused
    doubled = dataclasses.replace(llama_tp2, params=jax.tree.map(lambda x: x * 2, llama_tp2.params))
    assert doubled.step_args[0] == model_def and doubled.step_args[1][0] is not weights[0]
    assert not np.allclose(doubled.logits(ids), want)


def test_seeded_sampling_is_reproducible_and_independent_of_tp(checkpoint):
    path, _ = checkpoint("qwen2")
    params = jaxtp.SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, top_k=50, seed=1234,
                                  ignore_eos=True)
    runs = [jaxtp.generate(jaxtp.load(path, tp=tp, dtype="float32"), [[3, 4, 5, 6]], params)[0].token_ids
            for tp in (1, 2, 4)]
    assert runs[0] == runs[1] == runs[2]
    other = jaxtp.generate(jaxtp.load(path, tp=1, dtype="float32"), [[3, 4, 5, 6]],
                           jaxtp.SamplingParams(max_tokens=16, temperature=0.8, seed=99,
                                                ignore_eos=True))[0].token_ids
    assert other != runs[0]


def test_top_k_one_is_greedy(llama_tp2):
    greedy = jaxtp.generate(llama_tp2, PROMPTS[:2], jaxtp.SamplingParams(max_tokens=10, temperature=0,
                                                                         ignore_eos=True))
    topk1 = jaxtp.generate(llama_tp2, PROMPTS[:2], jaxtp.SamplingParams(max_tokens=10, temperature=1.3,
                                                                        top_k=1, ignore_eos=True))
    assert [o.token_ids for o in greedy] == [o.token_ids for o in topk1]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (0.7, 0, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (0.5, 20, 0.9, 0.0), (1.0, 0, 1.0, 0.1)])
def test_filters_match_transformers_warpers(temperature, top_k, top_p, min_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 64)).astype(np.float32) * 3
    want = torch.tensor(logits)
    for warper in [TemperatureLogitsWarper(temperature),
                   TopKLogitsWarper(top_k) if top_k else None,
                   TopPLogitsWarper(top_p) if top_p < 1 else None,
                   MinPLogitsWarper(min_p) if min_p else None]:
        if warper is not None:
            want = warper(None, want)
    s = SamplerArrays.build([jaxtp.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                                  min_p=min_p)] * 3, [0] * 3)
    got = np.asarray(filter_logits(logits, s, 64))
    want = want.numpy()
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_sampled_frequencies_follow_the_filtered_distribution(top_p):
    """20k seeded draws from fixed logits match the (top-p filtered) softmax(logits / T)."""
    n, v, temperature = 20000, 16, 1.5
    logits = np.random.default_rng(1).normal(size=v).astype(np.float32) * 2
    params = jaxtp.SamplingParams(temperature=temperature, top_p=top_p)
    s = SamplerArrays.build([params] * n, list(range(n)))
    draws = np.asarray(sample(np.tile(logits, (n, 1)), s, np.zeros(n, np.int32), v, plain=False))
    want = torch.softmax(TopPLogitsWarper(top_p)(None, torch.tensor(logits[None] / temperature)), -1)[0]
    freq = np.bincount(draws, minlength=v) / n
    assert freq[want.numpy() == 0].sum() == 0
    assert 0.5 * np.abs(freq - want.numpy()).sum() < 0.02  # total variation; noise is ~0.01
