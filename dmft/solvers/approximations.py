"""Approximation schemes of the literature as solvers (THEORY section 9).

* `StaticNTK`: the kernels frozen at t = 0. They do not depend on gamma0, so at any gamma0 this is
  the lazy solution: `StaticNTK` is `Lazy`, under the name the literature uses.
* Gradient independence: `LinearClosure(responses=False)`, `MonteCarlo(responses="none")`.
* `Perturbative`: leading-order perturbation theory in gamma0 around the lazy solution (linear
  networks of any depth; smooth nonlinear two-layer networks).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ..activations import Linear
from ..dynamics import error_signal, euler_predictions, ntk_from_kernels, prediction_fields
from ..solve import AbstractSolver
from .lazy import Lazy, lazy_kernels
from .linear import LinearClosure
from .monte_carlo import _factor

__all__ = ["StaticNTK", "Perturbative"]

StaticNTK = Lazy


def _with_gamma0(problem, g):
    return eqx.tree_at(lambda p: p.gamma0, problem, g)


# Probabilists' Gauss-Hermite rule with 3 nodes: exact for E[p(r)], r ~ N(0, 1), p of degree <= 5.
_R_NODES = np.array([-np.sqrt(3.0), 0.0, np.sqrt(3.0)])
_R_WEIGHTS = np.array([1 / 6, 2 / 3, 1 / 6])


def _two_layer_kernels(act, gamma0, c, Kx, u, r, w, Delta):
    """Weighted sums `sum_s w_s phi(h_s(t)) phi(h_s(t))^T` and the same for g, each `(T, Pa, Pa)`.

    The discrete two-layer single site (THEORY 4 and 7; left-point rule, as `MonteCarlo`'s fast path):
    `h(t) = u + gamma0 c sum_{s<t} Kx (Delta(s) g(s))`, `z(t) = r + gamma0 c sum_{s<t} Delta(s) . phi(h(s))`,
    `g = phi'(h) z`, with `c = eta0 dt / P`. `u (S, Pa)`, `r (S,)`, `w (S,)`, `Delta (T, Pa)` fixed.
    """

    def step(carry, Delta_t):
        h_mem, z = carry
        h = u + h_mem
        phi, g = act.fn(h), act.dfn(h) * z[:, None]
        h_mem = h_mem + gamma0 * c * (Delta_t * g) @ Kx
        z = z + gamma0 * c * phi @ Delta_t
        return (h_mem, z), ((w[:, None] * phi).T @ phi, (w[:, None] * g).T @ g)

    return jax.lax.scan(step, (jnp.zeros_like(u), r), Delta)[1]


def _half_second_derivative(F, gamma0):
    """`(1/2) d^2 F / dgamma0^2` at gamma0 = 0 (dtype of `gamma0`), by nested forward mode."""
    zero, one = jnp.zeros_like(gamma0), jnp.ones_like(gamma0)
    first = lambda g: jax.jvp(F, (g,), (one,))[1]
    return jax.tree.map(lambda x: 0.5 * x, jax.jvp(first, (zero,), (one,))[1])


class Perturbative(AbstractSolver):
    """O(gamma0^2) perturbation theory around the lazy solution, exact for the discrete scheme.

    Kernels are even in gamma0 (no odd orders), `x = x0 + gamma0^2 x2 + O(gamma0^4)` with `x0` the lazy
    kernels; `x0 + gamma0^2 x2` then gives the NTK and, resummed, the predictions (Euler, as the full
    solvers), so the error against the full DMFT is O(gamma0^4).

    * **Linear networks, any depth.** Write the closure's fixed point as `x(gamma0) = T(x, gamma0)`;
      `x2 = (1/2) d^2T/dgamma0^2 + dT/dx . x2` at `(x0, 0)`: a linear equation solved by iterating it
      (`linear_iters` times; the map's derivative at gamma0 = 0 only shifts information between
      layers and towards later times, so the iteration terminates). Both derivatives are forward-mode
      through `LinearClosure`'s own map. Deterministic.
    * **Smooth nonlinear two-layer networks** (tanh, erf, custom smooth; PAPER_NOTES 9.3).
      `dDelta/dgamma0 = 0` at gamma0 = 0 and the kernels do not depend on Delta at gamma0 = 0, so
      `x2 = (1/2) d^2/dgamma0^2 <kernels of the discrete single site>` with `Delta` frozen at the lazy
      discrete `Delta0`: nested forward mode through the single-site time scan (this generates the
      first- and second-order fields h1, z1, h2, z2 of the notes, in discrete time). The Gaussian
      average over `r ~ N(0, 1)` is exact (3-node Gauss-Hermite: the integrand is a polynomial of
      degree <= 4 in r), over `u ~ N(0, Kx)` Monte Carlo with `n_samples` draws (pass `key`); the
      lazy kernels `x0` are exact. `Solution.stderr` holds batch-means standard errors (`n_batches`)
      of `f`, `loss`, `ntk` (and test fields). Kernels: equal-time only (`Phi = None`).

    Not implemented: ReLU (no second derivative: compare `dmft.MonteCarlo` at small gamma0 with
    `dmft.Lazy` instead) and nonlinear depth >= 2.
    """

    linear_iters: int = eqx.field(static=True, default=64)  # iterations of the linear x2 equation
    n_samples: int = eqx.field(static=True, default=16384)  # u ~ N(0, Kx) draws (nonlinear, depth 1)
    chunk_size: int = eqx.field(static=True, default=2048)
    n_batches: int = eqx.field(static=True, default=8)  # batch means for Solution.stderr

    @property
    def _chunk(self):
        return max(min(self.chunk_size, self.n_samples // self.n_batches), 1)

    @property
    def max_iters(self):
        return 0

    @property
    def damping(self):
        return 1.0

    @property
    def rtol(self):
        return 0.0

    def needs_key(self, problem):
        return not isinstance(problem.activation, Linear)

    def validate(self, problem):
        act = problem.activation
        if isinstance(act, Linear):
            return
        if not act.smooth:
            raise ValueError(
                f"Perturbative needs the second and third derivatives of the activation; {act.name} has "
                "none (piecewise linear). Use a smooth activation (tanh, erf), or compare dmft.MonteCarlo "
                "at small gamma0 with dmft.Lazy"
            )
        if problem.depth > 1:
            raise ValueError(
                "Perturbative is implemented for linear networks of any depth and nonlinear networks of "
                f"depth 1, got depth {problem.depth} with {act.name}; use dmft.MonteCarlo at small gamma0"
            )
        if self.n_batches < 2 or self.n_samples % (self.n_batches * self._chunk):
            raise ValueError(
                f"n_samples ({self.n_samples}) must be a multiple of n_batches ({self.n_batches} >= 2) "
                f"times the chunk size ({self._chunk} = min(chunk_size, n_samples // n_batches))"
            )

    def init(self, problem, key):
        if isinstance(problem.activation, Linear):
            return self._linear(problem, key)
        return self._two_layer(problem, key)

    def postprocess(self, problem, state, key):
        x0, x2 = state
        g2 = problem.gamma0**2
        if isinstance(problem.activation, Linear):
            return LinearClosure().postprocess(problem, jax.tree.map(lambda a, b: a + g2 * b, x0, x2), key)
        (Phi0, G0), (Phi2, G2) = x0, x2  # (1, Pa, Pa) and (n_batches, T, Pa, Pa)
        fields_of = lambda P2, G2_: self._fields(problem, Phi0 + g2 * P2[None], G0 + g2 * G2_[None])
        fields, Phi_eq, G_eq = fields_of(Phi2.mean(0), G2.mean(0))
        per_batch = jax.vmap(lambda P2, G2_: fields_of(P2, G2_)[0])(Phi2, G2)
        stderr = {
            k: jnp.std(v, axis=0, ddof=1) / np.sqrt(self.n_batches)
            for k, v in per_batch.items()
            if k != "ts"
        }
        return dict(**fields, Phi_eq=Phi_eq, G_eq=G_eq, stderr=stderr)

    @staticmethod
    def _fields(problem, Phi_eq, G_eq):
        """Prediction fields from equal-time kernels `(1, T, Pa, Pa)` (Euler predictions)."""
        K = ntk_from_kernels(problem.data.Kx, Phi_eq, G_eq)
        f = euler_predictions(K, problem.data.y, problem.dt, problem.eta0)
        return prediction_fields(problem, K, f), Phi_eq, G_eq

    def _two_layer(self, problem, key):
        """`x0 = (Phi0, G0) (1, Pa, Pa)` (exact lazy kernels) and `x2 = (Phi2, G2)` per sample batch,
        `(n_batches, T, Pa, Pa)` (their mean is the estimate)."""
        Phi0, G0, K0 = lazy_kernels(problem)
        Kx, T = problem.data.Kx, problem.n_steps + 1
        Delta0 = error_signal(problem, jnp.broadcast_to(K0, (T, *K0.shape)))
        c = problem.dt * problem.eta0 / problem.P
        chunk = self._chunk
        root = _factor(Kx)[0]  # root @ root.T = Kx
        r = jnp.repeat(jnp.asarray(_R_NODES, Kx.dtype)[None], chunk, 0).ravel()
        w = jnp.repeat(jnp.asarray(_R_WEIGHTS, Kx.dtype)[None], chunk, 0).ravel() / chunk

        def one_chunk(_, i):
            u = jnp.repeat(jr.normal(jr.fold_in(key, i), (chunk, Kx.shape[0]), Kx.dtype) @ root.T, 3, axis=0)
            F = lambda g: _two_layer_kernels(problem.activation, g, c, Kx, u, r, w, Delta0)
            return None, _half_second_derivative(F, problem.gamma0)

        _, (Phi2, G2) = jax.lax.scan(one_chunk, None, jnp.arange(self.n_samples // chunk))
        per_batch = lambda x: x.reshape(self.n_batches, -1, *x.shape[1:]).mean(1)
        return (Phi0, G0), (per_batch(Phi2), per_batch(G2))

    def _linear(self, problem, key):
        base = LinearClosure()
        p0 = _with_gamma0(problem, jnp.zeros_like(problem.gamma0))
        x0 = base.init(p0, key)  # the exact lazy fixed point (LinearClosure's causal pass)
        T = lambda x, g: base.step(_with_gamma0(problem, g), x, key)
        half_second = _half_second_derivative(lambda g: T(x0, g), problem.gamma0)
        tangent = lambda v: jax.jvp(lambda x: T(x, jnp.zeros_like(problem.gamma0)), (x0,), (v,))[1]

        def body(_, x2):
            return jax.tree.map(jnp.add, half_second, tangent(x2))

        x2 = jax.lax.fori_loop(0, self.linear_iters, body, half_second)
        return x0, x2

