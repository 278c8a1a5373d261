"""Test fixtures: 8 simulated CPU devices, and tiny random checkpoints of each supported family
(helpers.py) saved with transformers (the reference implementation)."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from helpers import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family) -> (path, torch model), built once per session."""
    cache = {}

    def get(family):
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            cache[family] = (path, make_checkpoint(family, path))
        return cache[family]
    return get


@pytest.fixture(autouse=True, scope="module")
def _fresh_programs():
    """Each test module starts without the programs of the ones before: with all of them held,
    the suite's process crashed (segfault) inside XLA's CPU compiler ~260 tests in."""
    yield
    import gc

    import jax
    jax.clear_caches()
    gc.collect()
