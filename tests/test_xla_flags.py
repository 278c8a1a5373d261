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
    assert os.environ["XLA_FLAGS"].split() == ["--xla_gpu_enable_command_buffer=+COLLECTIVES", mine]
    mine = "--xla_gpu_enable_command_buffer= --xla_gpu_disable_async_collectives="
    monkeypatch.setenv("XLA_FLAGS", mine)
    xla_flags.apply()
    assert os.environ["XLA_FLAGS"] == mine
