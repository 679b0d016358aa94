"""Device meshes: how `MonteCarlo` (replicas) and `networks.ensemble` (seeds) spread independent work
over devices, through `jax.shard_map` (every device its share of the items, sums reduced by
`psum_scatter` into blocks of rows: time blocks of the time-major kernels).

With several processes (`jax.distributed.initialize`), `jax.devices()` lists the devices of all of
them, so the default mesh spans every host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = ["resolve", "shard", "time_blocks"]


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
    axis). True: fn's outputs are partial sums, added across devices; a matrix (2-d output) is
    reduce-scattered, so that each device holds only its block of rows of the total (zero-padded to a
    multiple of the device count inside, cut back to its length in the result, which is sharded over
    the mesh by rows), anything else is the same everywhere (`psum`)."""
    axes, d = mesh.axis_names, mesh.size
    spec = PartitionSpec(axes)

    def total(x):
        if x.ndim != 2:
            return jax.lax.psum(x, axes)
        padded = jnp.pad(x, ((0, -x.shape[0] % d), (0, 0)))
        return jax.lax.psum_scatter(padded, axes, scatter_dimension=0, tiled=True)

    def local(*args):
        out = fn(*args)
        return jax.tree.map(total, out) if reduce else out

    def run(*args):
        out_specs, shapes = spec, None
        if reduce:
            shapes = jax.eval_shape(fn, *[jax.ShapeDtypeStruct((x.shape[0] // d, *x.shape[1:]), x.dtype) for x in args])
            out_specs = jax.tree.map(lambda x: spec if x.ndim == 2 else PartitionSpec(), shapes)
        out = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * len(args), out_specs=out_specs, check_vma=False)(*args)
        return out if shapes is None else jax.tree.map(lambda x, s: x[: s.shape[0]], out, shapes)

    return run


def time_blocks(tree, mesh):
    """`tree` with every two-time array `(L, T, ., T, .)` (5-d) split over the devices of `mesh` in blocks
    of its first time axis (rows), and the rest left as it is."""
    rows = NamedSharding(mesh, PartitionSpec(None, mesh.axis_names))
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rows) if x.ndim == 5 else x, tree)
