"""How the model's collectives and attention run on the mesh: the all-reduce of row-parallel
sums (allreduce.py), the attention dispatch (attention.py) and the hand-written kernels behind
them (kernels/). `OpsConfig` is the static choice the jitted programs are traced with."""
from __future__ import annotations

import dataclasses

from jax.sharding import Mesh

from jaxtp.ops import allreduce, attention
from jaxtp.ops.kernels import decode_attention


@dataclasses.dataclass(frozen=True)
class OpsConfig:
    """The mesh, how row-parallel partial sums are added (allreduce.MODES, resolved), whether
    decode steps run the Pallas kernel (attention.MODES, resolved) and that kernel's tiling.
    Hashable: jit keys on it."""
    mesh: Mesh
    all_reduce: str = "xla"
    kernels: str = "xla"
    decode: decode_attention.Config = decode_attention.Config()

    @property
    def dp(self) -> int:
        return self.mesh.shape["dp"]

    @classmethod
    def resolve(cls, mesh: Mesh, all_reduce: str = "auto", kernels: str = "auto",
                decode: decode_attention.Config = decode_attention.Config()) -> "OpsConfig":
        """The modes a model on `mesh` runs with ("auto" picks what applies here)."""
        return cls(mesh, allreduce.resolve(all_reduce, mesh), attention.resolve(kernels, mesh), decode)
