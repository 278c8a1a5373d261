"""dp x tp and pipeline layouts in one process (8 simulated CPU devices) against transformers,
and the errors for layouts that cannot work."""
import numpy as np
import pytest
import torch

import jaxtp
from helpers import make_checkpoint
from jaxtp import distributed, engine, sharding
from helpers import hf_greedy

PROMPTS = [[5, 6, 7], list(range(10, 31)), [42], list(range(50, 59)), [9, 8, 7, 6, 5]]
GREEDY = jaxtp.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 4-layer Llama (llama3 rope scaling, GQA): stages of 2 or 1 layers."""
    path = tmp_path_factory.mktemp("llama_4layers")
    return path, make_checkpoint("llama", path, num_hidden_layers=4)


@pytest.fixture(scope="module")
def want(deep):
    return [hf_greedy(deep[1], p, GREEDY.max_tokens) for p in PROMPTS]


@pytest.mark.parametrize("tp,dp,pp", [(2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 4), (2, 2, 2)])
def test_layouts_match_transformers(deep, want, tp, dp, pp):
    path, ref = deep
    model = jaxtp.load(path, tp=tp, dp=dp, pp=pp, dtype="float32")
    assert (model.tp, model.dp, model.pp) == (tp, dp, pp)
    # 5 prompts over dp replicas: the slots (8) are split on dp, the padded prefill group too.
    assert [o.token_ids for o in jaxtp.generate(model, PROMPTS, GREEDY)] == want
    ids = [list(range(3, 27)), list(range(40, 64))]
    with torch.no_grad():
        ref_logits = ref(torch.tensor(ids)).logits.numpy()
    assert np.abs(model.logits(ids) - ref_logits).max() / np.abs(ref_logits).max() <= 1e-4


def test_llm_data_and_pipeline_parallel(deep, want):
    llm = jaxtp.LLM(model=str(deep[0]), tensor_parallel_size=2, data_parallel_size=2,
                    pipeline_parallel_size=2, dtype="float32")
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == want


def test_pipeline_stages_hold_only_their_layers(deep):
    model = jaxtp.load(deep[0], tp=2, pp=2, dtype="float32")
    w = model.params["model"]["layers"][0]["mlp"]["down_proj"]["weight"].get_value()
    assert w.shape == (2, 128, 64)                                  # [stage, in, out]
    assert {s.data.shape for s in w.addressable_shards} == {(1, 64, 64)}
    eng = engine.Engine(model, max_num_seqs=4, max_model_len=64)
    assert len(eng.runner.cache.k) == 2 and eng.runner.cache.k[0].shape[0] == 2   # 2 layers per stage
    assert {s.data.shape[0] for s in eng.runner.cache.k[0].addressable_shards} == {1}


def test_seeded_sampling_is_independent_of_layout(deep):
    params = jaxtp.SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    models = [jaxtp.load(deep[0], tp=tp, dp=dp, pp=pp, dtype="float32") for tp, dp, pp in [(1, 1, 1), (2, 2, 2)]]
    runs = [jaxtp.generate(m, PROMPTS[:3], params) for m in models]
    assert [o.token_ids for o in runs[0]] == [o.token_ids for o in runs[1]]


def test_bad_layouts_are_clear_errors(deep, monkeypatch):
    path = deep[0]
    with pytest.raises(ValueError, match=r"needs 16 devices, but only 8"):
        jaxtp.load(path, tp=4, dp=2, pp=2)
    with pytest.raises(ValueError, match=r"hidden layers \(4\) must be divisible by pipeline parallel size \(3\)"):
        jaxtp.load(path, pp=3)
    with pytest.raises(ValueError, match="must be >= 1"):
        jaxtp.load(path, dp=0)
    model = jaxtp.load(path, tp=2, dp=2, dtype="float32")
    with pytest.raises(ValueError, match="max_num_seqs=3 must be a multiple of data_parallel_size=2"):
        engine.Engine(model, max_num_seqs=3, max_model_len=64)
    monkeypatch.setattr(sharding.jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="multi-process mesh must use all 8 devices"):
        sharding.make_mesh(tp=2, dp=2)


def test_distributed_initialize_arguments(monkeypatch):
    for var in (v for names in distributed.ENV.values() for v in names):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() is False                   # no coordinator: single process
    with pytest.raises(ValueError, match="needs a coordinator"):
        distributed.initialize(num_processes=2)
    with pytest.raises(ValueError, match="0 <= process_id < num_processes"):
        distributed.initialize("127.0.0.1:1", num_processes=2, process_id=2)
    monkeypatch.setenv("JAXTP_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAXTP_PROCESS_ID", "5")
    with pytest.raises(ValueError, match="process_id=5"):
        distributed.initialize("127.0.0.1:1")
