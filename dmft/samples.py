"""Single-site samples of the DMFT fields at a solution's order parameters (THEORY sections 3, 4, 7).

At infinite width every neuron of layer l is an independent draw of the single-site process, so
samples of `h^l_mu(t)` are what a histogram of a wide network's preactivations converges to. Given
the converged order parameters of a `Solution`, one causal pass of the discrete single-site equations

    h^l = u^l + gamma0 C^l g^l,      z^l = r^l + gamma0 D^l phi(h^l),      g^l = phi'(h^l) z^l,
    C^l = Abar^{l-1} + dt (eta0/P) [s<t] Phi^{l-1} Delta,   D^l = Bbar^l + dt (eta0/P) [s<t] G^{l+1} Delta,

with `u^l ~ N(0, Phi^{l-1})`, `r^l ~ N(0, G^{l+1})` and `Delta = -dl/df` (the variances of `dmft.MLP`
enter as in THEORY 11, `single_site.layer_memory`) draws them exactly as
`dmft.MonteCarlo` does inside its iteration (it reuses that solver's causal pass). Depth 1 needs only
`Delta` (`A^0 = B^1 = 0`, `Phi^0 = Kx`, `G^2 = 1`); deeper networks need the two-time kernels and the
responses of the solution.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from ._keys import as_key
from ._maps import make_room
from .problem import Problem
from .single_site import fields, layer_memory
from .solution import Solution
from .solvers._sampling import SAMPLINGS, SOBOL_MAX_DIM, factor, normals, sources

__all__ = ["FieldSamples", "field_samples"]


class FieldSamples(eqx.Module):
    """Single-site samples at one time: `h`, `z`, `g`, each `(L, S, Pa)` (layer l = 1..L, sample,
    point: train then test). `phi(h)` is `problem.activation.fn(h)`; `z^L` is the read-out weight."""

    h: jax.Array
    z: jax.Array
    g: jax.Array


def _check(problem, sol):
    T, P = problem.n_steps + 1, problem.P
    if problem.data.y.ndim > 1:
        raise ValueError("field_samples supports scalar targets y (P,) only, not several outputs")
    if sol.f.shape != (T, P):
        raise ValueError(
            f"sol.f has shape {sol.f.shape} but the problem has (n_steps + 1, P) = {(T, P)}: pass the "
            "Problem the Solution was solved for"
        )
    if problem.depth > 1 and (sol.Phi is None or sol.G is None or sol.A is None or sol.B is None):
        raise ValueError(
            "field_samples at depth >= 2 needs the two-time kernels Phi, G and the responses A, B of the "
            "solution; this one has none (Lazy, Perturbative, ...). Solve with dmft.MonteCarlo or "
            "dmft.LinearClosure"
        )


def _layer_inputs(problem, sol, l):
    """`(Phi^{l}, Abar^{l}, G^{l+2}, Bbar^{l+1})` for THEORY layer l + 1, all broadcast to `(T, Pa, T, Pa)`."""
    L, Kx = problem.depth, problem.data.Kx
    T, Pa = problem.n_steps + 1, Kx.shape[0]
    full = lambda X: jnp.broadcast_to(X, (T, Pa, T, Pa))
    Phi_prev = full(Kx[:, None, :]) if l == 0 else full(sol.Phi[l - 1])
    A_prev = 0.0 if l == 0 else full(sol.A[l - 1])
    G_next = full(jnp.ones((), Kx.dtype)) if l == L - 1 else full(sol.G[l + 1])
    B_l = 0.0 if l == L - 1 else full(sol.B[l])
    return Phi_prev, A_prev, G_next, B_l


def _draw_sources(key, Phi_prev, G_next, n_samples, sampling, first, last):
    """`u ~ N(0, Phi_prev)`, `r ~ N(0, G_next)` (the source covariances), each `(S, T, Pa)`, by
    MonteCarlo's own map from standard normals to sources (layer 1: u constant in time; layer L: r
    one scalar per sample). Quasi-random coordinates go along the eigenvectors of the covariances,
    largest first; S need not be a power of 2 (the first S points of the next net are taken)."""
    T, Pa = Phi_prev.shape[:2]
    M_u, V_u = factor(Phi_prev[0, :, 0, :] if first else Phi_prev.reshape(T * Pa, T * Pa))
    M_r, V_r = (jnp.sqrt(G_next[0, 0, 0, 0]), None) if last else factor(G_next.reshape(T * Pa, T * Pa))
    du, dr = V_u.shape[0], 1 if last else V_r.shape[0]
    if sampling == "sobol" and du + dr > SOBOL_MAX_DIM:
        sampling = "plain"  # beyond scipy's Sobol dimensions
    axes = (V_u[:, ::-1], None if last else V_r[:, ::-1])
    n_net = 1 << (n_samples - 1).bit_length()
    e_u, e_r = normals(sampling, key, 0, n_samples, n_net, du, dr, axes, Phi_prev.dtype)
    return sources(e_u, e_r, M_u, M_r, T, Pa, first, last)


def _layer(problem, sol, l, Delta, key, n_samples, sampling, time):
    """Samples `(h, z, g)` of THEORY layer l + 1 at time index `time`, each `(S, Pa)`."""
    c = problem.dt * problem.eta0 / problem.P
    Su, Sr, C, D = layer_memory(problem.net, *_layer_inputs(problem, sol, l), Delta, c)
    u, r = _draw_sources(key, Su, Sr, n_samples, sampling, l == 0, l == problem.depth - 1)
    _, gs, h, z = fields(problem.activation, problem.gamma0, u, r, C, D, full=True)
    return h[:, time], z[:, time], gs.reshape(u.shape)[:, time]


def field_samples(
    problem: Problem, sol: Solution, *, n_samples: int, key, time: int = -1, sampling: str = "sobol"
) -> FieldSamples:
    """Draw `n_samples` single-site samples of `h^l`, `z^l`, `g^l` for every layer l = 1..L at time
    index `time` (of `sol.ts`), at the order parameters of `sol` (see the module docstring).

    `problem` must be the one `sol` solves. Depth 1: any Solution (only `sol.f` is used, through
    `Delta = -dl/df`). Depth >= 2: `sol` needs `Phi`, `G` `(L, n+1, Pa, n+1, Pa)` and `A`, `B`
    `(L-1, n+1, Pa, n+1, Pa)` (size-1 sample axes broadcast, as `LinearClosure` stores them).
    Returns a `FieldSamples` with `(L, n_samples, Pa)` arrays; the sample covariance of
    `phi(h^l)` converges to `sol.Phi_eq[l-1, time]` as `n_samples` grows. Memory O(S (n+1) Pa).
    `sampling`: `"sobol"` (randomised quasi-Monte Carlo, as `MonteCarlo`), `"plain"` or `"antithetic"`.
    """
    _check(problem, sol)
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    T = problem.n_steps + 1
    if not -T <= time < T:
        raise ValueError(f"time must be an index into sol.ts (-{T} <= time < {T}), got {time}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    make_room(problem, sol, key)
    return _draw(problem, sol, as_key(key), n_samples, sampling, time)


@eqx.filter_jit
def _draw(problem, sol, key, n_samples, sampling, time):
    P, Pa, T = problem.P, problem.data.Kx.shape[0], problem.n_steps + 1
    Delta = jnp.zeros((T, Pa, 1), sol.f.dtype).at[:, :P, 0].set(problem.loss.delta(sol.f, problem.data.y))
    layers = [
        _layer(problem, sol, l, Delta, jr.fold_in(key, l), n_samples, sampling, time) for l in range(problem.depth)
    ]
    h, z, g = (jnp.stack(x) for x in zip(*layers))
    return FieldSamples(h, z, g)
