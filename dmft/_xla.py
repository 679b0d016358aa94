"""How the library's programs are compiled: `jit` is `equinox.filter_jit` with XLA options for the CPU.

On a CPU, `jit` compiles at LLVM optimisation level 2 with XLA's older (non-fusion) loop emitters, where
the solves compile faster than at XLA's defaults and run as fast (`benchmarks/RESULTS.md`, "Compile
options for the CPU"; programs measured otherwise keep `equinox.filter_jit`). Options that the user's
`XLA_FLAGS` sets are left to it, and a jaxlib that does not know them compiles with its defaults. Other
backends get XLA's defaults.
"""

from __future__ import annotations

import functools
import os

import equinox as eqx
import jax
import jax.numpy as jnp

__all__ = ["cpu_options", "jit"]

_CPU = {"xla_backend_optimization_level": 2, "xla_cpu_use_fusion_emitters": False}


def options(flags: str) -> dict:
    """The options of `_CPU` that the flags `flags` (an `XLA_FLAGS` string) leave unset, or `{}` if this
    jaxlib does not know them."""
    chosen = {k: v for k, v in _CPU.items() if f"--{k}" not in flags}
    if not chosen:
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=chosen).lower(1.0).compile()
    except jax.errors.JaxRuntimeError:  # "No such compile option": an XLA without them
        return {}
    return chosen


@functools.cache
def cpu_options() -> dict:
    """`options` of this process's `XLA_FLAGS` (read once, as XLA reads them)."""
    return options(os.environ.get("XLA_FLAGS", ""))


def jit(fn):
    """`equinox.filter_jit(fn)`, compiled with `cpu_options()` where JAX's default backend is the CPU and
    the call is not inside another jit (whose compile then decides). Like a filter_jit function it has
    `.lower(...)`."""

    @functools.cache
    def compiled(cpu):
        return eqx.filter_jit(fn, compiler_options=cpu_options()) if cpu else eqx.filter_jit(fn)

    def pick():
        # JAX takes compiler options only for a top-level compile, not for a jit traced inside another
        # jit; there a new array is a tracer of the outer trace (under vmap or grad alone it is not).
        top = not isinstance(jnp.zeros(()), jax.core.Tracer)
        return compiled(top and jax.default_backend() == "cpu" and bool(cpu_options()))

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return pick()(*args, **kwargs)

    call.lower = lambda *args, **kwargs: pick().lower(*args, **kwargs)
    return call
