"""jaxtp's default XLA flags (jaxtp/xla_flags.py): added to XLA_FLAGS, never over the user's."""
import os

from jaxtp import xla_flags


def test_defaults_are_added_before_the_users_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    xla_flags.apply()
    flags = os.environ["XLA_FLAGS"].split()
    assert flags == [*xla_flags.DEFAULTS, "--xla_force_host_platform_device_count=8"]
    xla_flags.apply()  # idempotent
    assert os.environ["XLA_FLAGS"].split() == flags


def test_a_flag_the_user_set_is_left_alone(monkeypatch):
    mine = "--xla_gpu_disable_async_collectives=REDUCESCATTER"
    monkeypatch.setenv("XLA_FLAGS", mine)
    xla_flags.apply()
    assert os.environ["XLA_FLAGS"].split() == ["--xla_gpu_enable_command_buffer=+COLLECTIVES",
                                               "--xla_gpu_autotune_level=1", mine]
    mine = "--xla_gpu_enable_command_buffer= --xla_gpu_disable_async_collectives= --xla_gpu_autotune_level=4"
    monkeypatch.setenv("XLA_FLAGS", mine)
    xla_flags.apply()
    assert os.environ["XLA_FLAGS"] == mine


def test_compiled_programs_persist_across_runs(tmp_path):
    """A restart finds its programs in the persistent compilation cache ($JAXTP_COMPILATION_CACHE)."""
    import subprocess
    import sys
    code = ("import jaxtp, jax, jax.numpy as jnp; print(jax.config.jax_compilation_cache_dir); "
            "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()")
    env = {**os.environ, "JAXTP_COMPILATION_CACHE": str(tmp_path / "xla"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == str(tmp_path / "xla") and any((tmp_path / "xla").iterdir())
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**env, "JAXTP_COMPILATION_CACHE": ""})
    assert off.stdout.split()[0] == "None"
