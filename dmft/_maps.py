"""Room for compiled code in a long-running process.

XLA's CPU backend maps the code and data sections of every kernel it compiles into the process (three
memory mappings per kernel), and JAX's in-memory caches keep every compiled executable alive. Linux
caps the mappings of a process (`vm.max_map_count`, 65530 by default), and a compilation that hits the
cap aborts the whole process from inside LLVM ("Unable to allocate section memory"). A depth-2
`MonteCarlo` solve adds about 1400 mappings, so a sweep over shapes (grids, data sizes, depths) in one
Python process would die after about 45 solves. `make_room`, called before the library compiles
anything, clears JAX's caches (releasing their executables' mappings; everything is recompiled on its
next call, or loaded from the persistent compilation cache) when the process is within `_MARGIN` of
the cap, and warns that it did.
"""

from __future__ import annotations

import gc
import warnings

import jax

__all__ = ["make_room"]

# Of the cap: room for any one of the library's compilations (the largest measured, a depth-3 solve,
# adds ~2300 mappings: 4% of the default cap).
_MARGIN = 0.25


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # not Linux, or /proc not mounted: nothing to guard
        return None


def _limit():
    """`vm.max_map_count`, or None where it cannot be read."""
    text = _read("/proc/sys/vm/max_map_count")
    return None if text is None else int(text)


def _mappings():
    """The number of memory mappings of this process, or None where it cannot be read."""
    text = _read("/proc/self/maps")
    return None if text is None else text.count(b"\n")


def make_room(*inputs):
    """Clear JAX's in-memory compilation caches, with a warning, when this process holds more than
    `1 - _MARGIN` of the mappings Linux allows it; otherwise (or off Linux) do nothing. Nothing either
    when any leaf of the caller's `inputs` is traced: an enclosing jit or vmap is using the caches."""
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(inputs)):
        return
    limit, used = _limit(), _mappings()
    if limit is None or used is None or used < (1 - _MARGIN) * limit:
        return
    jax.clear_caches()
    gc.collect()
    warnings.warn(
        f"this process holds {used} memory mappings of the {limit} Linux allows it (vm.max_map_count), "
        "most of them the code of compiled XLA kernels; a compilation past the limit would abort the "
        "process, so dmft cleared JAX's compilation caches (compiled functions recompile on their next "
        f"call; now {_mappings()} mappings). To keep them, raise the limit (sysctl -w "
        "vm.max_map_count=262144) or run sweeps over many shapes in several processes.",
        stacklevel=3,
    )
