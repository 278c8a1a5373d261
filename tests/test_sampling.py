"""The sampling surface against transformers: penalties, min_tokens, logprobs, prompt logprobs,
n samples, seeds across tp, and continuous batching through the slot engine."""
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

import jaxtp
from jaxtp import engine
from jaxtp.engine.sampling import Penalties, SamplerArrays, apply_penalties

PROMPTS = [[5, 6, 7, 5, 6], list(range(10, 31)), [42, 42, 9]]


@pytest.fixture(scope="module")
def llama(checkpoint):
    path, ref = checkpoint("llama")
    return jaxtp.load(path, tp=2, dtype="float32"), ref


def _hf_greedy(ref, prompt, n, **kw):
    ids = torch.tensor([prompt])
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                       pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def test_repetition_penalty_matches_transformers_on_fixed_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 32)).astype(np.float32) * 3
    prompt, generated = [[1, 5, 5, 9], [3, 4]], [[9, 11], [30, 3, 3]]
    in_prompt, counts = np.zeros((2, 32), bool), np.zeros((2, 32), np.int32)
    for i in range(2):
        in_prompt[i, prompt[i]] = True
        np.add.at(counts[i], generated[i], 1)
    s = SamplerArrays.build([jaxtp.SamplingParams(repetition_penalty=1.7)] * 2, [0, 0])
    got = np.asarray(apply_penalties(logits, s, Penalties(in_prompt, counts)))
    proc = RepetitionPenaltyLogitsProcessor(1.7)
    for i in range(2):
        want = proc(torch.tensor([prompt[i] + generated[i]]), torch.tensor(logits[i:i + 1]))[0].numpy()
        np.testing.assert_allclose(got[i], want, rtol=1e-6)


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = np.random.default_rng(1).normal(size=(1, 16)).astype(np.float32)
    counts = np.zeros((1, 16), np.int32)
    counts[0, [3, 3, 3, 7]] = [3, 3, 3, 1]
    counts[0, 3] = 3
    s = SamplerArrays.build([jaxtp.SamplingParams(presence_penalty=0.5, frequency_penalty=-0.25)], [0])
    got = np.asarray(apply_penalties(logits, s, Penalties(np.zeros((1, 16), bool), counts)))
    want = logits - (-0.25) * counts - 0.5 * (counts > 0)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("penalty", [1.5, 0.7])
def test_repetition_penalty_generation_matches_transformers(llama, penalty):
    model, ref = llama
    params = jaxtp.SamplingParams(max_tokens=12, temperature=0, repetition_penalty=penalty, ignore_eos=True)
    outs = jaxtp.generate(model, PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == _hf_greedy(ref, prompt, 12, repetition_penalty=penalty)
    plain = jaxtp.generate(model, PROMPTS, jaxtp.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in plain] != [o.token_ids for o in outs]


def test_min_tokens_bans_stop_tokens_like_transformers(llama):
    model, ref = llama
    prompt = PROMPTS[1]
    free = _hf_greedy(ref, prompt, 10)
    stop = free[2]  # greedy would stop at the 3rd token
    got = jaxtp.generate(model, [prompt], jaxtp.SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop]))[0]
    assert got.token_ids == free[:3] and got.finish_reason == "stop" and got.stop_reason == stop
    got = jaxtp.generate(model, [prompt], jaxtp.SamplingParams(max_tokens=10, temperature=0, min_tokens=6,
                                                               stop_token_ids=[stop]))[0]
    want = _hf_greedy(ref, prompt, 10, min_new_tokens=6, eos_token_id=[2, stop])
    if stop in want:
        want = want[: want.index(stop) + 1]
    assert got.token_ids == want and stop not in got.token_ids[:6]


def test_logprobs_match_transformers(llama):
    model, ref = llama
    params = jaxtp.SamplingParams(max_tokens=6, temperature=0, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    for prompt, out in zip(PROMPTS, jaxtp.generate(model, PROMPTS, params)):
        seq = prompt + out.token_ids
        with torch.no_grad():
            lsm = torch.log_softmax(ref(torch.tensor([seq])).logits[0].double(), -1).numpy()
        for j, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            row = lsm[len(prompt) - 1 + j]
            assert entry[tok].rank == 1 and abs(entry[tok].logprob - row[tok]) < 1e-4
            top = np.argsort(-row)[:3]
            assert set(entry) == set(top.tolist())
            for r, t in enumerate(top):
                assert entry[t].rank == r + 1 and abs(entry[t].logprob - row[t]) < 1e-4
        assert abs(out.cumulative_logprob - sum(lsm[len(prompt) - 1 + j, t]
                                                for j, t in enumerate(out.token_ids))) < 1e-3
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for j, entry in enumerate(out.prompt_logprobs[1:]):
            tok, row = prompt[j + 1], lsm[j]
            assert abs(entry[tok].logprob - row[tok]) < 1e-4
            assert entry[tok].rank == 1 + int(np.sum(row > row[tok]))
            assert set(np.argsort(-row)[:2].tolist()) <= set(entry)


def test_sampled_logprobs_rank_and_no_logprobs_by_default(llama):
    model, _ = llama
    out = jaxtp.generate(model, PROMPTS[:1], jaxtp.SamplingParams(max_tokens=5, temperature=1.5, seed=3,
                                                                  logprobs=0, ignore_eos=True))[0]
    assert [list(e) for e in out.logprobs] == [[t] for t in out.token_ids]
    assert all(e[t].logprob <= 0 and e[t].rank >= 1 for e, t in zip(out.logprobs, out.token_ids))
    plain = jaxtp.generate(model, PROMPTS[:1], jaxtp.SamplingParams(max_tokens=5))[0]
    assert plain.logprobs is None and plain.cumulative_logprob is None and plain.prompt_logprobs is None


def test_n_samples_differ_and_are_reproducible(llama, checkpoint):
    model, _ = llama
    params = jaxtp.SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=11, ignore_eos=True)
    outs = jaxtp.generate(model, PROMPTS[:2], params)
    assert [o.index for o in outs] == [0, 1, 2, 0, 1, 2]
    assert len({tuple(o.token_ids) for o in outs[:3]}) == 3
    again = jaxtp.generate(model, PROMPTS[:2], params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in again]
    # Sample 0 of an n=3 request is the same stream as an n=1 request with the same seed.
    single = jaxtp.generate(model, PROMPTS[:1], jaxtp.SamplingParams(max_tokens=10, seed=11, ignore_eos=True))
    assert single[0].token_ids == outs[0].token_ids
    llm = jaxtp.LLM(model=str(checkpoint("llama")[0]), tensor_parallel_size=2, dtype="float32")
    out = llm.generate([PROMPTS[0]], params)[0]
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in outs[:3]]


def test_seeded_penalized_sampling_is_independent_of_tp(checkpoint):
    path, _ = checkpoint("qwen2")
    params = jaxtp.SamplingParams(n=2, max_tokens=12, temperature=0.9, top_p=0.95, seed=5, presence_penalty=0.5,
                                  frequency_penalty=0.3, repetition_penalty=1.2, ignore_eos=True)
    runs = [[o.token_ids for o in jaxtp.generate(jaxtp.load(path, tp=tp, dtype="float32"), PROMPTS, params)]
            for tp in (1, 2, 4)]
    assert runs[0] == runs[1] == runs[2]


def test_continuous_batching_equals_one_at_a_time(llama):
    """Two slots, five sequences of different lengths: finished sequences free their slot for
    waiting ones between decode chunks, and every result equals running it alone."""
    model, _ = llama
    prompts = PROMPTS + [[7] * 40, [8, 9]]
    params = [jaxtp.SamplingParams(max_tokens=5 + 7 * i, temperature=0 if i % 2 else 0.8, seed=i,
                                   ignore_eos=True) for i in range(len(prompts))]
    seqs = [engine.Sequence(p, q, q.seed) for p, q in zip(prompts, params)]
    eng = engine.Engine(model, max_num_seqs=2, max_model_len=128, chunk=4)
    for s in seqs:
        eng.add(s)
    busy = []
    while eng.has_unfinished:
        eng.step()
        busy.append(sum(s is not None for s in eng.running))
    assert max(busy) == 2
    for s, p, q in zip(seqs, prompts, params):
        assert s.tokens == jaxtp.generate(model, [p], q)[0].token_ids and s.finish_reason == "length"


def test_any_64_bit_seed_draws_its_own_stream(llama):
    """Seeds are 64-bit: -1 and 2**64 - 1 are the same seed, the high half changes the draw."""
    def draw(seed):
        p = jaxtp.SamplingParams(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)
        return jaxtp.generate(llama[0], [[3, 4, 5]], p)[0].token_ids
    assert draw(-1) == draw(2 ** 64 - 1)
    assert draw(2 ** 40) != draw(0) and draw(2 ** 40 + 1) != draw(2 ** 40)
    assert draw(7) == draw(7)
