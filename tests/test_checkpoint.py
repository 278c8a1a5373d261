"""Orbax checkpoints (scripts/convert.py): saved at one tp, restored at any other with the same
logits as transformers and as the safetensors load; a broken directory gets a clear error."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import jaxtp
from helpers import script
from jaxtp import checkpoint

ROOT = Path(__file__).resolve().parents[1]
IDS = [[5, 17, 33, 4, 90, 12, 7, 150], [3, 8, 199, 42, 61, 2, 11, 77]]


def convert(src, out, tp, dtype="float32"):
    script("scripts/convert.py").main([str(src), str(out), "--tp", str(tp), "--dtype", dtype])
    return out


@pytest.fixture(scope="module")
def converted(checkpoint, tmp_path_factory):
    """family -> (orbax dir saved at tp=2, HF dir, torch model)."""
    cache = {}

    def get(family):
        if family not in cache:
            path, ref = checkpoint(family)
            cache[family] = (convert(path, tmp_path_factory.mktemp(family) / "orbax", 2), path, ref)
        return cache[family]
    return get


def hf_logits(ref):
    with torch.no_grad():
        return ref(torch.tensor(IDS)).logits.numpy()


@pytest.mark.parametrize("family,tp", [("llama", 1), ("llama", 4), ("llama", 8), ("qwen2", 8),
                                       ("qwen3", 4), ("llama_tied", 1)])
def test_restore_at_any_tp_matches_transformers(converted, family, tp):
    """Saved at tp=2; restored at tp=1 (fewer devices) and at tp > num_kv_heads (KV heads
    repeated at restore), tied and untied embeddings, qkv bias, q/k norm."""
    orbax, path, ref = converted(family)
    model = jaxtp.load(orbax, tp=tp, dtype="auto")
    assert model.dtype == jaxtp.entrypoints.api.DTYPES["float32"] and model.tp == tp
    got, want = model.logits(IDS), hf_logits(ref)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4
    direct = jaxtp.load(path, tp=tp, dtype="float32").logits(IDS)
    np.testing.assert_allclose(got, direct, rtol=0, atol=1e-5)


def test_restore_casts_dtype(converted):
    orbax, path, _ = converted("llama")
    got = jaxtp.load(orbax, tp=2, dtype="bfloat16")
    want = jaxtp.load(path, tp=2, dtype="bfloat16")
    assert got.params["model"]["layers"][0]["mlp"]["gate_up_proj"]["weight"][...].dtype == want.dtype
    np.testing.assert_array_equal(got.logits(IDS), want.logits(IDS))


def test_directory_carries_what_load_needs(converted):
    orbax, path, _ = converted("llama")
    for f in ("config.json", "generation_config.json", checkpoint.MARKER):
        assert (orbax / f).is_file()
    marker = json.loads((orbax / checkpoint.MARKER).read_text())
    assert marker["format"] == checkpoint.FORMAT and marker["dtype"] == "float32"
    assert marker["arrays"]["model.embed_tokens.weight"] == [200, 64]           # unpadded vocab
    assert marker["arrays"]["model.layers.0.self_attn.k_proj.weight"] == [64, 16]  # 2 KV heads, unrepeated
    assert not list(orbax.glob("*.safetensors"))


def test_default_model_with_tokenizer_round_trips(tmp_path):
    orbax = convert(ROOT / "checkpoints" / "tiny-arith", tmp_path / "orbax", 1)
    assert (orbax / "tokenizer.json").is_file()
    model = jaxtp.load(orbax, tp=2, dtype="float32")
    out = jaxtp.generate(model, ["17+305="], jaxtp.SamplingParams(max_tokens=8, temperature=0.0))
    assert out[0].text == "322" and out[0].finish_reason == "stop"


def broken(converted, tmp_path):
    dst = tmp_path / "orbax"
    shutil.copytree(converted("llama")[0], dst)
    return dst


def edit_marker(path, fn):
    marker = json.loads((path / checkpoint.MARKER).read_text())
    fn(marker)
    (path / checkpoint.MARKER).write_text(json.dumps(marker))


def test_bad_marker(converted, tmp_path):
    dst = broken(converted, tmp_path)
    (dst / checkpoint.MARKER).write_text("{not json")
    with pytest.raises(ValueError, match=r"jaxtp_orbax.json is not a valid jaxtp orbax marker"):
        jaxtp.load(dst)


def test_missing_state_dir(converted, tmp_path):
    dst = broken(converted, tmp_path)
    shutil.rmtree(dst / "state")
    with pytest.raises(ValueError, match=r"has no state/ directory"):
        jaxtp.load(dst)


def test_missing_array_is_named(converted, tmp_path):
    dst = broken(converted, tmp_path)
    edit_marker(dst, lambda m: m["arrays"].pop("model.layers.1.self_attn.v_proj.weight"))
    with pytest.raises(KeyError, match=r"has no array 'model.layers.1.self_attn.v_proj.weight'"):
        jaxtp.load(dst)


def test_extra_array_is_named(converted, tmp_path):
    dst = broken(converted, tmp_path)
    edit_marker(dst, lambda m: m["arrays"].update({"model.layers.9.mlp.extra": [3]}))
    with pytest.raises(ValueError, match=r"array\(s\) this config.json does not use: 'model.layers.9"):
        jaxtp.load(dst)


def test_shape_mismatch_is_named(converted, tmp_path):
    dst = broken(converted, tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 256}))
    with pytest.raises(ValueError, match=r"array 'model.layers.0.mlp.down_proj.weight' in orbax "
                                         r"checkpoint .* has shape \(128, 64\), but config.json implies "
                                         r"\(256, 64\)"):
        jaxtp.load(dst)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's event loop
def test_corrupt_data_files(converted, tmp_path):
    dst = broken(converted, tmp_path)
    for f in (dst / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    with pytest.raises(ValueError, match=r"cannot restore orbax checkpoint .*orbax \(array '.*'\): "):
        jaxtp.load(dst)
