"""`dmft.estimate`: the memory and floating-point work of a solve, known before it runs, and the memory
budget solvers size themselves by.

A budget (`MonteCarlo(memory=...)`) is a number of bytes, a string such as `"8GB"` or `"512MiB"`, or a
fraction in (0, 1] of one device's memory (an accelerator's `bytes_limit`, or the host's physical
memory for the CPU); None means half a device.
"""

from __future__ import annotations

import os
import re

import equinox as eqx
import jax

from .problem import Problem

__all__ = ["Estimate", "estimate", "budget_bytes", "xla_bytes"]

_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def device_memory() -> int:
    """Bytes of memory of one device of the default backend (the host's physical memory for a CPU).
    This process's own device: another process's is not addressable (`jax.distributed`)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def budget_bytes(memory) -> int:
    """The bytes a budget `memory` allows (see the module docstring); ValueError for a malformed one."""
    if memory is None:
        return device_memory() // 2
    if isinstance(memory, str):
        match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", memory)
        unit = match and match.group(2).upper()
        if not match or unit not in _UNITS:
            raise ValueError(f'memory must look like "8GB", "512MiB" or "2e9", got {memory!r}')
        return int(float(match.group(1)) * _UNITS[unit])
    if isinstance(memory, bool) or not isinstance(memory, (int, float)) or not memory > 0:
        raise ValueError(f"memory must be bytes, a fraction in (0, 1] or a string like '8GB', got {memory!r}")
    return int(memory * device_memory()) if memory <= 1 else int(memory)


class Estimate(eqx.Module):
    """What a solve needs, from a model of the compiled solve (calibrated against XLA's own memory
    analysis, see `benchmarks/scale.py`).

    - `memory`: peak bytes on one device (XLA's temporaries plus the outputs).
    - `budget`: the bytes the solver may use (its `memory` option); `fits` when `memory <= budget`.
    - `flops`: leading floating-point operation counts by part: per iteration of each stage for
      `MonteCarlo` (`{"pooled": ..., "replicas": ...}`), per sweep and for materialising the
      two-time kernels for `LinearClosure` (`{"sweep": ..., "materialise": ...}`).
    - `sizes`: what they grow with (`T Pa`, depth, samples, chunk, replicas per device, ...).
    """

    memory: int = eqx.field(static=True)
    budget: int = eqx.field(static=True)
    flops: dict = eqx.field(static=True)
    sizes: dict = eqx.field(static=True)

    @property
    def fits(self) -> bool:
        return self.memory <= self.budget

    def __str__(self):
        sizes = ", ".join(f"{k} = {v}" for k, v in self.sizes.items())
        flops = ", ".join(f"{v:.2g} {k}" for k, v in self.flops.items())
        budget = f"{self.memory / 1e9:.3g} GB of a {self.budget / 1e9:.3g} GB budget"
        return f"{budget}; flops: {flops} ({sizes})"


def estimate(problem: Problem, solver) -> Estimate:
    """The memory and work of `dmft.solve(problem, solver)`, without running it (see `Estimate`).

    Raises ValueError for a solver that does not apply to `problem`, or that has no cost model."""
    if not isinstance(problem, Problem):
        raise ValueError(f"problem must be a dmft.Problem, got {type(problem).__name__}")
    solver.validate(problem)
    if not hasattr(solver, "estimate"):
        raise ValueError(
            f"{type(solver).__name__} has no cost model; dmft.estimate supports MonteCarlo and LinearClosure"
        )
    return solver.estimate(problem)


def xla_bytes(problem: Problem, solver, key=0) -> int:
    """Peak bytes of the compiled `dmft.solve(problem, solver)` on one device by XLA's own buffer
    assignment (arguments, outputs and temporaries): what `estimate` models. Compiles, runs nothing."""
    from ._keys import as_key
    from .solve import _lower

    m = _lower(problem, solver.sized(problem), as_key(key)).compile().compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
