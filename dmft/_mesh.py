"""Device meshes: how `MonteCarlo` (replicas) and `networks.ensemble` (seeds) spread independent work
over devices, through `jax.shard_map` (every device its share of the items, sums reduced by `psum`).

With several processes (`jax.distributed.initialize`), `jax.devices()` lists the devices of all of
them, so the default mesh spans every host.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, PartitionSpec

__all__ = ["resolve", "shard"]


def resolve(mesh, n, what):
    """The mesh over which `n` independent items are spread, or None when that is one device.

    `mesh`: None (the largest number of `jax.devices()` that divides n), an int d (the first d
    devices; must divide n) or a `jax.sharding.Mesh` (its devices, all axes flattened; its size must
    divide n). `what` names n in the error message.
    """
    if mesh is None:
        count = len(jax.devices())
        mesh = max(d for d in range(1, count + 1) if n % d == 0)
    if isinstance(mesh, (int, np.integer)) and not isinstance(mesh, bool):
        devices = jax.devices()
        if not 1 <= mesh <= len(devices):
            raise ValueError(f"mesh = {mesh} devices, but there are {len(devices)} (jax.devices())")
        mesh = Mesh(np.array(devices[:mesh]), ("devices",))
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be None, a number of devices or a jax.sharding.Mesh, got {mesh!r}")
    if n % mesh.size:
        raise ValueError(f"{what} ({n}) must be a multiple of the number of devices in the mesh ({mesh.size})")
    if mesh.size == 1:
        return None
    # Auto axes: the items are split inside the solve, from arrays jit has not sharded.
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def shard(fn, mesh, reduce=False):
    """`fn` over the leading axis of every argument, split across the devices of `mesh` (each device
    calls fn on its contiguous block). `reduce=False`: the outputs are the blocks in order (leading
    axis); True: fn's outputs are partial sums, added across devices (`psum`), the same everywhere."""
    axes = mesh.axis_names
    spec = PartitionSpec(axes)

    def local(*args):
        out = fn(*args)
        return jax.lax.psum(out, axes) if reduce else out

    out_specs = PartitionSpec() if reduce else spec
    return lambda *args: jax.shard_map(
        local, mesh=mesh, in_specs=(spec,) * len(args), out_specs=out_specs, check_vma=False
    )(*args)
