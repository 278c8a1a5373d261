"""Beyond one host: JAX's multi-controller runtime, and moving host data to and from global arrays.

Every process runs the same program on the same inputs; the mesh spans all processes' devices
and XLA inserts the cross-process collectives (NCCL on GPU, gloo on CPU). Two rules follow, and
`put` / `fetch` are the one place that keeps them:

* a host array becomes a *global* jax.Array: each process hands over only the slices its own
  devices hold (`make_array_from_callback`), never a device_put to devices it cannot address;
* a device array is read back only through addressable data: sharded results are first
  replicated by one collective, then each process reads its local copy.
"""
from __future__ import annotations

import functools
import os
import random

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

# Our names first, then the ones jax.distributed / launchers already use.
ENV = {"coordinator": ("JAXTP_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS"),
       "num_processes": ("JAXTP_NUM_PROCESSES", "JAX_NUM_PROCESSES", "NUM_PROCESSES"),
       "process_id": ("JAXTP_PROCESS_ID", "JAX_PROCESS_ID", "PROCESS_ID")}


def _env(field: str):
    return next((os.environ[k] for k in ENV[field] if os.environ.get(k)), None)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join a multi-process run. Arguments default to JAXTP_COORDINATOR / JAXTP_NUM_PROCESSES /
    JAXTP_PROCESS_ID (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID). Returns
    False, doing nothing, when no coordinator is given (a single-process run).

    Must run before anything touches a jax backend. On CPU it selects gloo collectives. Python's
    `random` is then seeded identically everywhere, so unseeded requests draw the same seeds in
    every process (the processes must agree on every input).
    """
    coordinator = coordinator or _env("coordinator")
    num_processes = int(num_processes if num_processes is not None else _env("num_processes") or 0)
    process_id = process_id if process_id is not None else _env("process_id")
    if not coordinator:
        if num_processes > 1:
            raise ValueError(f"num_processes={num_processes} needs a coordinator address "
                             "(host:port of process 0; --coordinator or JAXTP_COORDINATOR)")
        return False
    if num_processes < 1 or process_id is None or not 0 <= int(process_id) < num_processes:
        raise ValueError(f"a multi-process run needs num_processes >= 1 and 0 <= process_id < "
                         f"num_processes, got num_processes={num_processes}, process_id={process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects the CPU backend
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=int(process_id))
    from jax.experimental import multihost_utils
    seed = multihost_utils.broadcast_one_to_all(np.int64(random.getrandbits(62)))
    random.seed(int(seed))
    return True


def put(tree, sharding):
    """Host arrays (identical in every process) -> global jax.Arrays with `sharding`."""
    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    return jax.tree.map(one, tree)


@functools.partial(jax.jit, static_argnums=1)
def _replicate(tree, sharding):
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def fetch(tree):
    """Device arrays -> numpy, in every process. One replicating collective when some array is
    sharded over devices of other processes; a plain device_get otherwise."""
    leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
    remote = [x for x in leaves if not x.is_fully_addressable]
    if not remote:
        return jax.device_get(tree)
    if not all(x.is_fully_replicated for x in remote):
        tree = _replicate(tree, NamedSharding(remote[0].sharding.mesh, P()))
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x,
                        tree)
