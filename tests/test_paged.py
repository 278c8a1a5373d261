"""The paged KV cache and chunked prefill: sequences spanning many pages, prompts longer than a
prefill chunk, preemption by recompute when the pool is short, the pool's limits."""
import logging

import jax
import numpy as np
import pytest

import jaxtp
from jaxtp import engine
from jaxtp.engine.block_manager import SCRATCH_PAGE, BlockManager
from jaxtp.ops import paged
from helpers import drive, hf_greedy

PROMPTS = [list(range(3, 40)), [5, 6, 7], list(range(100, 161)), [42, 43]]
GREEDY_IGNORE = dict(temperature=0.0, ignore_eos=True)


def seqs(params, prompts=PROMPTS):
    return [engine.Sequence(list(p), params, seed=i) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("tp,dp,pp", [(1, 1, 1), (2, 1, 1), (4, 1, 1), (8, 1, 1), (2, 2, 1), (2, 1, 2)])
def test_small_pages_and_chunks_match_transformers(checkpoint, tp, dp, pp):
    """16-token pages and 32-token prefill chunks: every sequence spans several pages and the
    long prompts are prefilled over several steps, interleaved with the others' decoding."""
    path, ref = checkpoint("llama")
    model = jaxtp.load(path, tp=tp, dp=dp, pp=pp, dtype="float32")
    eng = engine.Engine(model, max_num_seqs=2, max_model_len=128, chunk=4, max_num_batched_tokens=32,
                        page_size=16)
    prompts = PROMPTS[2:]  # 61 tokens (two chunks, four pages), 2 tokens
    got = drive(eng, seqs(jaxtp.SamplingParams(max_tokens=12, **GREEDY_IGNORE), prompts))
    for prompt, tokens in zip(prompts, got):
        assert tokens == hf_greedy(ref, prompt, 12)


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(checkpoint):
    path, ref = checkpoint("llama")
    model = jaxtp.load(path, dtype="float32")
    eng = engine.Engine(model, max_num_seqs=2, max_model_len=256, chunk=2, max_num_batched_tokens=32,
                        page_size=16)
    params = jaxtp.SamplingParams(max_tokens=12, **GREEDY_IGNORE)
    short, long = engine.Sequence([5, 6, 7], params, 0), engine.Sequence(list(range(1, 181)), params, 0)
    eng.add(short)
    eng.step()
    eng.add(long)
    progress = []
    while long.prefilling or long.status is engine.Status.WAITING:
        eng.step()
        progress.append((long.computed, len(short.tokens)))
    assert len(progress) >= 180 // 32 and progress[0][0] < progress[-1][0]
    assert progress[-1][1] > progress[0][1]  # the short one kept decoding meanwhile
    drive(eng, [])
    assert long.tokens == hf_greedy(ref, list(range(1, 181)), 12)
    assert short.tokens == hf_greedy(ref, [5, 6, 7], 12)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_preemption_gives_the_outputs_of_an_unconstrained_run(checkpoint, temperature):
    """A pool of 10 pages of 16 tokens for four sequences that grow to 4-6 pages each: the
    newest are preempted and recomputed, and every output is what a large pool gives."""
    model = jaxtp.load(checkpoint("llama")[0], dtype="float32")
    params = jaxtp.SamplingParams(max_tokens=40, temperature=temperature, ignore_eos=True,
                                  repetition_penalty=1.3, frequency_penalty=0.5)
    small = engine.Engine(model, max_num_seqs=4, max_model_len=128, chunk=4, page_size=16, max_kv_tokens=160)
    large = engine.Engine(model, max_num_seqs=4, max_model_len=128, chunk=4, page_size=16)
    constrained = drive(small, seqs(params))
    assert small.preemptions > 0
    assert constrained == drive(large, seqs(params))
    assert large.preemptions == 0
    assert small.kv_usage == 0 and small.num_running == 0 and not small.waiting


def test_chunked_prompt_logprobs_equal_whole_ones(checkpoint):
    model = jaxtp.load(checkpoint("llama")[0], dtype="float32")
    params = jaxtp.SamplingParams(max_tokens=3, prompt_logprobs=2, logprobs=1, **GREEDY_IGNORE)
    runs = []
    for budget in (16, 1024):
        eng = engine.Engine(model, max_num_seqs=2, max_model_len=128, max_num_batched_tokens=budget, page_size=16)
        s = seqs(params, PROMPTS[:2])
        drive(eng, s)
        runs.append([(x.prompt_logprobs, x.tokens) for x in s])
    for (lp_a, tok_a), (lp_b, tok_b) in zip(*runs):
        assert tok_a == tok_b and len(lp_a) == len(lp_b)
        for a, b in zip(lp_a, lp_b):
            np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
            assert a[2] == b[2]


@pytest.mark.parametrize("dp", [1, 2])
def test_a_chunk_cut_into_many_prefill_rows_gives_the_same_outputs(checkpoint, monkeypatch, dp):
    """Prefill rows of 16 tokens and a 64-token budget cut each chunk into up to four rows that
    write and read the same sequence's pages in one call; tokens (sampled, with penalties that
    count every row's tokens), prompt log-probs and finishes equal one-row chunks'."""
    model = jaxtp.load(checkpoint("llama")[0], dtype="float32", dp=dp)
    params = jaxtp.SamplingParams(max_tokens=10, temperature=0.8, ignore_eos=True, prompt_logprobs=1,
                                  repetition_penalty=1.5, presence_penalty=0.7)
    runs = []
    for row, budget in ((128, 1024), (16, 64)):
        monkeypatch.setattr(engine.scheduler, "PREFILL_ROW", row)
        eng = engine.Engine(model, max_num_seqs=4, max_model_len=128, max_num_batched_tokens=budget, page_size=16)
        s = seqs(params)
        runs.append((drive(eng, s), [x.prompt_logprobs for x in s]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert [x[2] for x in a] == [x[2] for x in b]
        np.testing.assert_allclose([x[0] for x in a[1:]], [x[0] for x in b[1:]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dp", [1, 2])
def test_prefill_projections_run_on_packed_tokens(checkpoint, monkeypatch, dp):
    """20 prompts of 17 tokens in one call of 16-token rows: attention runs on their 40 rows
    (each pads its second), the projections on the 340 tokens packed into 512 (dp 2: 170 per
    replica into 256), where padded rows would carry 48 x 16; the greedy tokens are
    transformers'."""
    path, ref = checkpoint("llama")
    model = jaxtp.load(path, dtype="float32", dp=dp)
    shapes, real = [], engine.runner.prefill
    monkeypatch.setattr(engine.runner, "prefill", lambda *a, **k: shapes.append(
        (a[5].packed.shape[0], a[5].tokens.shape)) or real(*a, **k))
    monkeypatch.setattr(engine.scheduler, "PREFILL_ROW", 16)
    eng = engine.Engine(model, max_num_seqs=32, max_model_len=64, chunk=4, max_num_batched_tokens=1024,
                        page_size=16)
    prompts = [list(range(3 + i, 20 + i)) for i in range(20)]
    assert drive(eng, seqs(jaxtp.SamplingParams(max_tokens=3, **GREEDY_IGNORE), prompts)) == [
        hf_greedy(ref, p, 3) for p in prompts]
    assert shapes == [(512, (64, 16)) if dp == 1 else (2 * 256, (2 * 32, 16))]


@pytest.mark.parametrize("dp,positions_last", [(1, False), (2, False), (2, True)])
def test_whole_page_writes_equal_token_writes(dp, positions_last):
    """paged.write_pages (page-aligned rows of whole pages: the engine's prefill rows) leaves the
    pages as token-by-token writes do, rows running past their table going to scratch; and
    gather reads back what was written, in either layout."""
    rng = np.random.default_rng(0)
    pages = jax.numpy.asarray(rng.normal(size=(dp * 9, 2, 3, 4) if positions_last else (dp * 9, 2, 4, 3)),
                              jax.numpy.float32)
    new = jax.numpy.asarray(rng.normal(size=(dp * 3, 8, 2, 3)), jax.numpy.float32)
    table = np.array([[1, 2, 3], [4, 5, 0], [6, 7, 8]] * dp, np.int32)  # row 1: its last entry unused
    start = np.array([0, 4, 4] * dp, np.int32)  # row 2's second page is past its table
    pos = start[:, None] + np.arange(8)[None, :]
    want = paged.write(pages, new, table, pos, dp, positions_last)
    got = paged.write_pages(pages, new, table, start, dp, positions_last)
    keep = np.arange(dp * 9) % 9 != SCRATCH_PAGE  # what lands on scratch is never read
    np.testing.assert_array_equal(np.asarray(got)[keep], np.asarray(want)[keep])
    assert not np.array_equal(np.asarray(got)[keep], np.asarray(pages)[keep])
    history = np.asarray(paged.gather(got, table, dp, positions_last))  # [B, KVH, 12, D]
    np.testing.assert_array_equal(history[0, :, :8], np.asarray(new)[0].swapaxes(0, 1))


def test_chunks_cut_by_the_budget_start_on_page_boundaries(checkpoint, monkeypatch):
    """Two 16-token rows a call (a 40-token budget): after a 3-token prompt 29 tokens are left,
    and the long prompt's chunk is cut to 16, at a page boundary (its rows write whole pages),
    then 32 a call; the tokens are transformers'."""
    path, ref = checkpoint("llama")
    model = jaxtp.load(path, dtype="float32")
    starts, real = [], engine.runner.ModelRunner.prefill
    monkeypatch.setattr(engine.runner.ModelRunner, "prefill",
                        lambda self, chunks: starts.extend(c.start for c in chunks) or real(self, chunks))
    monkeypatch.setattr(engine.scheduler, "PREFILL_ROW", 16)
    eng = engine.Engine(model, max_num_seqs=2, max_model_len=128, chunk=4, max_num_batched_tokens=40,
                        page_size=16)
    prompts = [[5, 6, 7], list(range(3, 80))]
    assert drive(eng, seqs(jaxtp.SamplingParams(max_tokens=6, **GREEDY_IGNORE), prompts)) == [
        hf_greedy(ref, p, 6) for p in prompts]
    assert starts == [0, 0, 16, 48]


@pytest.mark.parametrize("dp", [1, 2])
def test_decode_runs_only_the_live_slots(checkpoint, monkeypatch, dp):
    """Of 64 slots, decode runs a bucket of the occupied ones (row_bucket, per replica), and the
    tokens are transformers' whatever the rows' order."""
    path, ref = checkpoint("llama")
    model = jaxtp.load(path, dtype="float32", dp=dp)
    shapes, real = [], engine.runner.decode
    monkeypatch.setattr(engine.runner, "decode", lambda *a, **k: shapes.append(a[6].shape[0]) or real(*a, **k))
    eng = engine.Engine(model, max_num_seqs=64, max_model_len=128, chunk=4, page_size=16)
    params = jaxtp.SamplingParams(max_tokens=8, **GREEDY_IGNORE)
    prompts = PROMPTS[:dp]
    assert drive(eng, seqs(params, prompts)) == [hf_greedy(ref, p, 8) for p in prompts]
    assert set(shapes) == {dp}
    assert [engine.runner.row_bucket(n, 160) for n in (1, 2, 4, 5, 16, 17, 33, 65, 129, 200)] == \
        [1, 4, 4, 16, 16, 32, 48, 128, 160, 160]


def test_after_warmup_nothing_compiles(checkpoint, caplog, request):
    """warmup() runs every prefill and decode program (prefill_shapes, row_bucket's rows; greedy and sampled,
    prefill with and without prompt log-probs) with idle rows: requests after it, at
    any count and with any sampling options, trace nothing new, and their tokens are unchanged
    by it (idle rows write only to the scratch page)."""
    path, ref = checkpoint("llama")
    model = jaxtp.load(path, dtype="float32")
    eng = engine.Engine(model, max_num_seqs=8, max_model_len=64, chunk=4, max_num_batched_tokens=256, page_size=16)
    done = []
    caplog.set_level(logging.WARNING, logger="jax")
    jax.config.update("jax_log_compiles", True)  # globally: warm-up compiles on threads
    request.addfinalizer(lambda: jax.config.update("jax_log_compiles", False))
    assert eng.warmup(lambda i, n, what: done.append(what)) == len(done) == 4 * 2 + 2 * 3  # 128, 256 tokens / rows 1, 4, 8
    assert len(_step_compiles(caplog)) == len(done)  # compiled on threads, then run: each once
    assert "decode x8 sampled" in done and "prefill 256 tokens sampled prompt log-probs" in done
    before = dict(engine.TRACES)
    caplog.clear()
    options = ({}, dict(logprobs=3), dict(min_tokens=2, stop_token_ids=[9]), dict(presence_penalty=0.5),
               dict(prompt_logprobs=2, repetition_penalty=1.2, logprobs=0))
    for count, temperature, extra in ((1, 0.0, 0), (3, 0.7, 1), (6, 0.0, 2), (8, 0.9, 3), (2, 0.0, 4), (5, 0.5, 0)):
        params = jaxtp.SamplingParams(max_tokens=6, temperature=temperature, ignore_eos=True, **options[extra])
        prompts = [[3 + i, 5, 7 + i] for i in range(count)]
        got = drive(eng, seqs(params, prompts))
        if temperature == 0.0 and not extra:
            assert got == [hf_greedy(ref, p, 6) for p in prompts]
    assert dict(engine.TRACES) == before
    assert not _step_compiles(caplog)


def _step_compiles(caplog) -> list[str]:
    """jax.log_compiles' lines for the engine's prefill / decode programs."""
    return [m for m in (r.getMessage() for r in caplog.records)
            if "Finished XLA compilation of jit(prefill)" in m or "Finished XLA compilation of jit(decode)" in m]


def test_a_sequence_larger_than_the_pool_is_rejected_with_the_numbers(checkpoint):
    model = jaxtp.load(checkpoint("llama")[0], dtype="float32")
    eng = engine.Engine(model, max_num_seqs=2, max_model_len=256, page_size=16, max_kv_tokens=64)
    with pytest.raises(ValueError, match=r"needs 7 KV pages of 16 tokens, but the KV cache holds 4 pages"):
        eng.add(engine.Sequence(list(range(1, 90)), jaxtp.SamplingParams(max_tokens=10), 0))
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 16"):
        engine.Engine(model, max_num_batched_tokens=8)


def test_block_manager_counts_and_never_hands_out_scratch():
    blocks = BlockManager(pages=5, page_size=4, replicas=2)
    held = []
    assert blocks.grow(held, 1, 13) and len(held) == 4 and SCRATCH_PAGE not in held
    assert blocks.free_pages(1) == 0 and blocks.free_pages(0) == 4 and blocks.usage() == 1.0
    assert not blocks.grow(held, 1, 17) and len(held) == 4  # nothing taken on failure
    blocks.release(held, 1)
    assert held == [] and blocks.free_pages(1) == 4 and blocks.usage() == 0.0
    with pytest.raises(ValueError, match="at least 2 pages"):
        BlockManager(pages=1, page_size=4)


LONG_PROMPT = """
import resource, sys
import jaxtp
model = jaxtp.load(sys.argv[1], dtype="float32")
out = jaxtp.generate(model, [[(7 * i) % 190 + 3 for i in range(32768)]],
                     jaxtp.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
print(len(out[0].token_ids), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_a_32k_prompt_runs_in_bounded_memory(tmp_path):
    """Prefilled in 8k chunks against the pages, attention in 512-query blocks: no [T, T]
    scores (whole, they would be 16 GiB here)."""
    import subprocess
    import sys
    from helpers import make_checkpoint
    make_checkpoint("llama", tmp_path, max_position_embeddings=32800, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, hidden_size=32)
    run = subprocess.run([sys.executable, "-c", LONG_PROMPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=600, env={**__import__("os").environ, "XLA_FLAGS": ""})
    assert run.returncode == 0, run.stderr[-2000:]
    tokens, rss_kib = map(int, run.stdout.split()[-2:])
    assert tokens == 4 and rss_kib < 8 * 2 ** 20, rss_kib
