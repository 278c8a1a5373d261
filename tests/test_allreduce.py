"""The row-parallel all-reduce modes (jaxtp/ops/allreduce.py). The custom NVLink kernel needs CUDA
GPUs (benchmarks/all_reduce_check.py checks it there); here the shard_map path it runs under is
checked against transformers with lax.psum in its place, and the mode choice and its errors."""
import ctypes
import shutil

import numpy as np
import pytest
import torch

import jaxtp
from jaxtp.ops import allreduce, kernels
from jaxtp.sharding import make_mesh
from helpers import GREEDY, hf_greedy


@pytest.mark.parametrize("family,tp,quantization", [("llama", 2, None), ("qwen2", 4, None),
                                                    ("mistral", 8, None), ("llama", 2, "int8")])
def test_shard_map_path_matches_transformers(checkpoint, family, tp, quantization):
    path, ref = checkpoint(family)
    model = jaxtp.load(path, tp=tp, dtype="float32", all_reduce="shard_map", quantization=quantization)
    assert model.ops.all_reduce == "shard_map"
    ids = np.random.default_rng(tp).integers(3, 200, size=(2, 24)).tolist()
    got = model.logits(ids)
    if quantization is None:
        with torch.no_grad():
            want = ref(torch.tensor(ids)).logits.numpy()
        assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4
        prompts = [ids[0][:5], ids[1][:17]]
        for prompt, out in zip(prompts, jaxtp.generate(model, prompts, GREEDY)):
            assert out.token_ids == hf_greedy(ref, prompt)
    else:  # int8: the scale goes through shard_map too; same model as XLA's all-reduce gives
        xla = jaxtp.load(path, tp=tp, dtype="float32", all_reduce="xla", quantization=quantization)
        np.testing.assert_allclose(got, xla.logits(ids), rtol=1e-5, atol=1e-5)


def test_mode_choice_on_cpu():
    assert allreduce.resolve("auto", make_mesh(tp=2)) == "xla"      # no CUDA here: XLA's
    assert allreduce.resolve("shard_map", make_mesh(tp=1)) == "xla"  # nothing to reduce
    assert allreduce.resolve("shard_map", make_mesh(tp=4)) == "shard_map"
    assert allreduce.resolve("auto", make_mesh(tp=2, dp=2)) == "xla"


def test_mode_errors(checkpoint):
    path, _ = checkpoint("llama")
    with pytest.raises(ValueError, match=r"all_reduce must be one of 'auto', 'xla', 'custom', "
                                         r"'shard_map', got 'nccl'"):
        jaxtp.load(path, tp=2, all_reduce="nccl")
    with pytest.raises(ValueError, match=r"all_reduce='custom' cannot run here: it needs CUDA GPUs, "
                                         r"the mesh is on cpu"):
        jaxtp.load(path, tp=2, all_reduce="custom")
    with pytest.raises(ValueError, match=r"all_reduce='shard_map' cannot run here: it needs "
                                         r"pipeline_parallel_size = data_parallel_size = 1 \(got pp=1, dp=2\)"):
        jaxtp.load(path, tp=2, dp=2, all_reduce="shard_map")
    assert jaxtp.LLM(path, tensor_parallel_size=2, disable_custom_all_reduce=True).model.ops.all_reduce == "xla"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_kernel_builds_and_refuses_to_start_without_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXTP_CACHE", str(tmp_path))
    lib = kernels.build("all_reduce", "90")
    assert list((tmp_path / "kernels").glob("all_reduce-sm90-*.so"))
    lib.jaxtp_ar_error.restype = ctypes.c_char_p
    ordinals = (ctypes.c_int * 2)(0, 1)
    assert lib.jaxtp_ar_init(ordinals, 2, ctypes.c_int64(1 << 20)) == 1  # no CUDA device here
    assert b"failed" in lib.jaxtp_ar_error()


def test_missing_compiler_is_a_build_error(monkeypatch):
    monkeypatch.setenv("NVCC", "/nonexistent/nvcc")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    with pytest.raises(kernels.BuildError, match="nvcc .* was not found"):
        kernels.nvcc()
