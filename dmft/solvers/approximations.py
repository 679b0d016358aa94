"""Approximation schemes of the literature as solvers (THEORY section 9).

* `StaticNTK`: the kernels frozen at t = 0. They do not depend on gamma0, so at any gamma0 this is
  the lazy solution: `StaticNTK` is `Lazy`, under the name the literature uses.
* Gradient independence: `LinearClosure(responses=False)`, `MonteCarlo(responses="none")`.
* `Perturbative`: leading-order perturbation theory in gamma0 around the lazy solution.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from ..activations import Linear
from ..solve import AbstractSolver
from .lazy import Lazy
from .linear import LinearClosure

__all__ = ["StaticNTK", "Perturbative"]

StaticNTK = Lazy


def _with_gamma0(problem, g):
    return eqx.tree_at(lambda p: p.gamma0, problem, g)


class Perturbative(AbstractSolver):
    """O(gamma0^2) perturbation theory of deep linear networks, exact for the discrete scheme.

    Write the closure's fixed point as `x(gamma0) = T(x, gamma0)`; x is even in gamma0, so
    `x = x0 + gamma0^2 x2 + O(gamma0^4)` with `x0` the lazy state and
    `x2 = (1/2) d^2T/dgamma0^2 + dT/dx . x2` at `(x0, 0)`: a linear equation solved by iterating it
    (the map's derivative at gamma0 = 0 only shifts information between layers and towards later
    times, so the iteration terminates). Both derivatives are forward-mode (`jax.jvp`) through the
    closure's own map, so the result is the exact O(gamma0^2) term of the discrete DMFT: its error
    against `LinearClosure` is O(gamma0^4). Kernels `x0 + gamma0^2 x2` then give the NTK and,
    resummed, the predictions (Euler, as the full solver). Nonlinear networks: not implemented
    (sampled sources have no derivative at the degenerate lazy covariance).
    """

    linear_iters: int = eqx.field(static=True, default=64)  # iterations of the linear x2 equation

    @property
    def max_iters(self):
        return 0

    @property
    def damping(self):
        return 1.0

    @property
    def rtol(self):
        return 0.0

    def validate(self, problem):
        if not isinstance(problem.activation, Linear):
            raise ValueError(
                "Perturbative is implemented for linear networks only; for nonlinear networks compare "
                "dmft.MonteCarlo at small gamma0 with dmft.Lazy"
            )

    def init(self, problem, key):
        base = LinearClosure()
        p0 = _with_gamma0(problem, jnp.zeros_like(problem.gamma0))
        x0 = base.init(p0, key)
        for _ in range(problem.depth + 2):  # the lazy fixed point (responses are O(1) at gamma0 = 0)
            x0 = base.step(p0, x0, key)
        T = lambda x, g: base.step(_with_gamma0(problem, g), x, key)
        zero = jnp.zeros_like(problem.gamma0)
        one = jnp.ones_like(problem.gamma0)
        first = lambda g: jax.jvp(lambda h: T(x0, h), (g,), (one,))[1]
        half_second = jax.tree.map(lambda v: 0.5 * v, jax.jvp(first, (zero,), (one,))[1])
        tangent = lambda v: jax.jvp(lambda x: T(x, zero), (x0,), (v,))[1]

        def body(_, x2):
            return jax.tree.map(jnp.add, half_second, tangent(x2))

        x2 = jax.lax.fori_loop(0, self.linear_iters, body, half_second)
        return x0, x2

    def postprocess(self, problem, state, key):
        x0, x2 = state
        g2 = problem.gamma0**2
        return LinearClosure().postprocess(problem, jax.tree.map(lambda a, b: a + g2 * b, x0, x2), key)
