"""Loading safetensors: peak host memory stays near one tensor, sharded checkpoints load, and
every defect in a weights file is named with its tensor and file."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxtp
from helpers import llama_copy, llama_edited, script

ROOT = Path(__file__).resolve().parents[1]
IDS = [[5, 17, 33, 4, 90, 12]]
# ~240 MB of float32: 4 layers of d 1024, I 2816, and an 8000-token vocab (largest tensor 31 MB).
SHAPE = {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
         "vocab_size": 8000, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4}


def load_memory_script():
    return script("benchmarks/load_memory.py")


def test_peak_host_memory_stays_near_one_tensor(tmp_path):
    """On CPU the loaded weights live in host memory too, so the loader's own overhead is the
    peak minus what stays after loading. Reading whole tensors per device, or keeping a
    file-wide mmap open, makes it about the checkpoint size; it must stay near the largest
    tensor."""
    size = load_memory_script().write(tmp_path / "ck", SHAPE, "float32", shard_bytes=100 << 20)
    assert len(list((tmp_path / "ck").glob("*.safetensors"))) == 3 and size > 200 << 20
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_memory.py"), "measure", str(tmp_path / "ck"),
                    "--tp", "4", "--json", str(out)], check=True, env=env, capture_output=True, timeout=120)
    r = json.loads(out.read_text())
    assert r["rss_after"] - r["rss_before"] > 0.8 * size  # the weights really are in (CPU) memory
    assert r["transient"] < 0.25 * size, r


def test_sharded_checkpoint_loads_like_one_file(checkpoint, tmp_path):
    path, _ = checkpoint("qwen2")
    tensors = load_file(path / "model.safetensors")
    names = sorted(tensors)
    dst = tmp_path / "m"
    dst.mkdir()
    shutil.copy(path / "config.json", dst)
    halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, dst / file)
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, part in halves.items() for n in part}}))
    got = jaxtp.load(dst, tp=4, dtype="float32").logits(IDS)
    np.testing.assert_array_equal(got, jaxtp.load(path, tp=4, dtype="float32").logits(IDS))


def test_bad_header_json(checkpoint, tmp_path):
    dst, file = llama_copy(checkpoint, tmp_path)
    file.write_bytes((20).to_bytes(8, "little") + b'{"model.embed": [1,' + b"\0" * 100)
    with pytest.raises(ValueError, match=r"cannot read safetensors file .*model.safetensors: "):
        jaxtp.load(dst)


def test_header_longer_than_file(checkpoint, tmp_path):
    dst, file = llama_copy(checkpoint, tmp_path)
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model.safetensors: header length \d+ exceeds the file size 100"):
        jaxtp.load(dst)


def test_truncated_data_names_tensor(checkpoint, tmp_path):
    dst, file = llama_copy(checkpoint, tmp_path)
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"safetensors file .*model.safetensors is truncated: tensor "
                                         r"'[\w.]+' ends at byte \d+ but the file has \d+ bytes"):
        jaxtp.load(dst)


def test_wrong_dtype_names_tensor(checkpoint, tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight"
    dst = llama_edited(checkpoint, tmp_path, lambda t: {**t, name: t[name].astype(np.int32)})
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.self_attn.o_proj.weight' in .*model."
                                         r"safetensors has dtype I32; jaxtp loads floating point weights"):
        jaxtp.load(dst)


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    extra = {"model.layers.0.mlp.extra_proj.weight": np.zeros((4, 4), np.float32)}
    dst = llama_edited(checkpoint, tmp_path, lambda t: {**t, **extra})
    with pytest.raises(ValueError, match=r"has tensor\(s\) LlamaForCausalLM with this config.json does not "
                                         r"use: 'model.layers.0.mlp.extra_proj.weight' \(in model.safetensors\)"):
        jaxtp.load(dst)


def test_index_naming_a_missing_file(checkpoint, tmp_path):
    dst, file = llama_copy(checkpoint, tmp_path)
    names = load_file(file)
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {**{n: "model.safetensors" for n in names}, "lm_head.weight": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"index.json lists gone.safetensors, which .* does not have"):
        jaxtp.load(dst)
