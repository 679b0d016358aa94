"""Leading-order perturbation theory in gamma0 around the lazy solution (THEORY section 9).

The other approximations of the literature are options of the full solvers: the static NTK is
`Lazy` (its kernels do not depend on gamma0), gradient independence is
`LinearClosure(responses=False)` or `MonteCarlo(responses="none")`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ..activations import Linear, gauss_hermite_pairs
from ..dynamics import (
    equal_time,
    error_signal,
    euler_predictions,
    ntk_from_kernels,
    prediction_fields,
    split_classes,
    with_classes,
)
from ..single_site import fields, memory, two_layer_fields
from ..solve import AbstractSolver
from . import _sampling
from ._sampling import factor
from .lazy import lazy_kernels
from .linear import LinearClosure

__all__ = ["Perturbative"]


def _with_gamma0(problem, g):
    return eqx.tree_at(lambda p: p.gamma0, problem, g)


# Probabilists' Gauss-Hermite rule with 3 nodes: exact for E[p(r)], r ~ N(0, 1), p of degree <= 5.
_R_NODES = np.array([-np.sqrt(3.0), 0.0, np.sqrt(3.0)])
_R_WEIGHTS = np.array([1 / 6, 2 / 3, 1 / 6])


def _taylor2(F, gamma0):
    """`(F(0), F'(0), F''(0) / 2)`: the Taylor coefficients of `F` at gamma0 = 0 (dtype of `gamma0`),
    by nested forward mode."""
    zero, one = jnp.zeros_like(gamma0), jnp.ones_like(gamma0)
    (f0, f1), (_, f2) = jax.jvp(lambda g: jax.jvp(F, (g,), (one,)), (zero,), (one,))
    return f0, f1, jax.tree.map(lambda x: 0.5 * x, f2)


def _half_second_derivative(F, gamma0):
    """`(1/2) d^2 F / dgamma0^2` at gamma0 = 0."""
    return _taylor2(F, gamma0)[2]


def _derivative(fn):
    """The derivative of an elementwise function, elementwise (forward mode)."""
    return lambda x: jax.jvp(fn, (x,), (jnp.ones_like(x),))[1]


class _Lazy(eqx.Module):
    """What the O(gamma0^2) theory of a deep nonlinear network needs from the lazy limit, per layer
    l = 0..L-1 (layer l + 1 of THEORY), on the discrete grid of `MonteCarlo`:

    * `Su`, `Sr (L, Pa, Pa)`: the static source covariances, `Phi~^{l-1} = sigma_w^2 Phi^{l-1} + sigma_b^2`
      (Kx for layer 1) and `sigma_w^2 G^{l+1}` (all ones for the last layer, whose r is the read-out of
      one neuron); with C outputs r's covariance is `Sr (x) I_C` (THEORY 12);
    * Gaussian moments under `u ~ N(0, Su)`, `(L, Pa, Pa)`, entry `(mu, nu)` = `<a(u_mu) b(u_nu)>`:
      `M1 = <phi' phi'>`, `M2 = <phi'' phi''>`, `Q = <phi'' phi>`, `R3 = <phi''' phi'>`;
    * `C (L, T, Pa, T, Pa C)`, `D (L, T, Pa C, T, Pa)`: the memory kernels of the single site (`h = u + gamma0 C g`,
      `z = r + gamma0 D phi(h)`) at gamma0 -> 0: lazy Delta and kernels, and the limits of the
      responses `Abar`, `Bbar` (`_lazy_responses`).
    """

    Su: jax.Array
    Sr: jax.Array
    M1: jax.Array
    M2: jax.Array
    Q: jax.Array
    R3: jax.Array
    C: jax.Array
    D: jax.Array


def _lazy_limit(problem):
    """The `_Lazy` quantities of a smooth nonlinear problem (quadrature and closed forms, no sampling)."""
    act, Kx = problem.activation, problem.data.Kx
    Phi0, G0, K0 = lazy_kernels(problem)
    T, Pa, C_out = problem.n_steps + 1, Kx.shape[0], problem.C
    net = problem.net
    Su = net.preactivation_kernel(jnp.concatenate([Kx[None], Phi0[:-1]]))
    Sr = net.sw2 * jnp.concatenate([G0[1:], jnp.ones_like(Kx)[None]])
    d2 = _derivative(act.dfn)
    pairs = ((act.dfn, act.dfn), (d2, d2), (d2, act.fn), (_derivative(d2), act.dfn))
    M1, M2, Q, R3 = gauss_hermite_pairs(pairs, Su, getattr(act, "degree", 128))
    Delta0 = error_signal(problem, jnp.broadcast_to(with_classes(K0, C_out), (T, Pa * C_out, Pa * C_out)))
    c = problem.dt * problem.eta0 / problem.P
    # The Delta terms of C and D, c [s < t] S(mu, nu) Delta_{nu c}(s), per layer: the class is C's
    # column's (the source g_{nu c}) and D's row's (the field z_{mu c}; r's covariance is S (x) I_C).
    C_full = lambda S: jnp.broadcast_to(jnp.einsum("mn,snc->msnc", S, Delta0), (T, Pa, T, Pa, C_out))
    D_full = lambda S: jnp.broadcast_to(jnp.einsum("mn,snc->mcsn", S, Delta0), (T, Pa, C_out, T, Pa))
    C_delta = jax.vmap(lambda S: memory(0.0, C_full(S).reshape(T, Pa, T, Pa * C_out), c))(Su)
    D_delta = jax.vmap(lambda S: memory(0.0, D_full(S).reshape(T, Pa * C_out, T, Pa), c))(Sr)
    C, D = _lazy_responses(C_delta, D_delta, M1, M2, Q, R3, Sr, net.sw2)
    return _Lazy(Su, Sr, M1, M2, Q, R3, C, D)


def _lazy_responses(C_delta, D_delta, M1, M2, Q, R3, Sr, sw2):
    """The memory kernels `C^l = sw2 Abar^{l-1} + C_delta^l (L, T, Pa, T, Pa C)`, `D^l = sw2 Bbar^l + D_delta^l
    (L, T, Pa C, T, Pa)` with the gamma0 -> 0 limits of the responses (moments `(L, Pa, Pa)`, broadcast
    over times and classes; r's covariance is `Sr (x) I_C`):

    * `Abar^l(t, s) = gamma0^{-1} <d phi(h(t)) / d r(s)> -> M1 * C^l(t, s)`: at first order
      `h(t) = u + gamma0 sum_{s < t} C(t, s) phi'(u) r(s)`. Forward over layers.
    * `Bbar^{l-1}(t, s) = gamma0^{-1} <d g^l(t) / d u^l(s)> -> M2 Sr * C^l(t, s) + M1 * D^l(t, s)
      + [s = t, mu = nu] (sum_{s', nu} C^l(t, s') R3 Sr + D^l(t, s') Q)_mu`, from `g = phi'(h) z` with
      `h` and `z = r + gamma0 sum_{s <= t} D(t, s) phi(h(s))` at first order (the diagonal term is
      `<phi''(h(t)) z(t)>`, the equal-time response of `MonteCarlo`'s docstring). Backward over layers.
      With classes the first term is `M2 Sr * C^l_{mu, nu c}(t, s)` on the row `(mu, c)`: the class of
      g_{mu c} must be that of the r it pairs with.

    Only these limits enter the kernels at O(gamma0^2): the responses multiply gamma0 in the fields,
    and their O(gamma0) parts vanish (the DMFT is invariant under gamma0 -> -gamma0, r -> -r).
    """
    L, T, Pa = C_delta.shape[:3]
    nc = C_delta.shape[-1] // Pa
    as_C = lambda X: X.reshape(T, Pa, T, Pa, nc)  # (t, mu, s, nu, c)
    as_D = lambda X: X.reshape(T, Pa, nc, T, Pa)  # (t, mu, c, s, nu)
    on_C = lambda X: X[:, None, :, None]  # (Pa, Pa) broadcast over as_C
    on_D = lambda X: X[:, None, None, :]  # (Pa, Pa) broadcast over as_D
    C = [C_delta[0]]
    for l in range(1, L):
        C.append(sw2 * (on_C(M1[l - 1]) * as_C(C[l - 1])).reshape(C_delta.shape[1:]) + C_delta[l])
    D = [D_delta[L - 1]]
    eye = jnp.einsum("ts,mn->tmsn", jnp.eye(T, dtype=C_delta.dtype), jnp.eye(Pa, dtype=C_delta.dtype))
    for m in range(L - 1, 0, -1):
        Cm, Dm = as_C(C[m]), as_D(D[0])
        diag = jnp.einsum("tmsnc,mn->tmc", Cm, R3[m] * Sr[m]) + jnp.einsum("tmcsn,mn->tmc", Dm, Q[m])
        B = on_D(M2[m] * Sr[m]) * jnp.moveaxis(Cm, -1, 2) + on_D(M1[m]) * Dm + diag[..., None, None] * eye[:, :, None]
        D.insert(0, sw2 * B.reshape(D_delta.shape[1:]) + D_delta[m - 1])
    return jnp.stack(C), jnp.stack(D)


def _field_term(problem, lazy, key, l, solver):
    """The O(gamma0^2) kernels of layer l (0-based) at fixed (lazy) sources and memory kernels:
    `(1/2) d^2/dgamma0^2 <phi phi^T>, <g g^T>` through the causal single-site pass, sample means over
    `u ~ N(0, Su)`, `r ~ N(0, Sr)` (both constant in time at gamma0 = 0).

    Returns the two-time means over all samples, `(T Pa, T Pa)` and `(T Pa C, T Pa C)`, and the
    equal-time means per replica, `(R, T, Pa, Pa)` and `(R, T, Pa C, Pa C)`.
    """
    act, gamma0, C = problem.activation, problem.gamma0, problem.C
    T, Pa = lazy.C.shape[1:3]
    last = l == problem.depth - 1
    (M_u, V_u), (M_r, V_r) = factor(lazy.Su[l]), factor(with_classes(lazy.Sr[l], C))
    axes = (V_u[:, ::-1], None if last else V_r[:, ::-1])
    static = lambda x: jnp.broadcast_to(x[:, None, :], (x.shape[0], T, x.shape[1]))

    def one_chunk(key, i):
        e_u, e_r = solver._normals(key, i, Pa, C if last else Pa * C, axes, M_u.dtype)
        if last:  # the read-out weights of a neuron, the same for every point
            r = problem.net.sigma_w * jnp.broadcast_to(e_r[:, None, :], (e_r.shape[0], Pa, C)).reshape(-1, Pa * C)
        else:
            r = e_r @ M_r.T
        u, r = static(e_u @ M_u.T), static(r)
        x0, x1, x2 = _taylor2(lambda g: fields(act, g, u, r, lazy.C[l], lazy.D[l]), gamma0)
        second = lambda a0, a1, a2: a1.T @ a1 + a0.T @ a2 + a2.T @ a0  # gamma0^2 coefficient of a^T a
        return [second(a0, a1, a2) for a0, a1, a2 in zip(x0, x1, x2)]

    sums = solver._replica_sums(key, one_chunk)  # (R, T Pa, T Pa), (R, T Pa C, T Pa C)
    grid = lambda x: x.reshape(-1, T, x.shape[-1] // T, T, x.shape[-1] // T)
    eq = [equal_time(grid(x)) / solver._per_replica for x in sums]
    return [x.sum(0) / solver.n_samples for x in sums], eq


def _source_shift(dS, F, M, two_time):
    """Price's theorem: the first-order change of `<a(u) a(u)^T>` over the (time, point) grid, at the
    lazy static u, when the covariance of the source u changes by `dS`:
    `(1/2) dS(i, i) <a'' a>_(i, j) + (1/2) dS(j, j) <a'' a>_(j, i) + dS(i, j) <a' a'>_(i, j)`,
    with `F = <a'' a>`, `M = <a' a'>` `(Pa, Pa)`. `dS (T, Pa, T, Pa)` (two_time) or `(..., T, Pa, Pa)`.
    """
    if two_time:
        d = jnp.diagonal(equal_time(dS), axis1=-2, axis2=-1)  # (T, Pa)
        return 0.5 * (d[:, :, None, None] * F[:, None, :] + d[None, None] * F.T[:, None, :]) + dS * M[:, None, :]
    d = jnp.diagonal(dS, axis1=-2, axis2=-1)
    return 0.5 * (d[..., :, None] * F + d[..., None, :] * F.T) + dS * M


def _propagate(lazy, sw2, Phi_f, G_f, two_time, C=1):
    """Total O(gamma0^2) kernels from the per-layer field terms (lists over layers): the sources of
    layer l + 1 have covariance `Phi^l` and those of layer l - 1 `G^l`, which change at O(gamma0^2)
    too; to first order that adds `_source_shift` terms (forward for Phi, backward for G). Cross
    terms are O(gamma0^4). Two-time `Phi (T, Pa, T, Pa)`, `G (T, Pa C, T, Pa C)` or equal-time
    `(..., T, Pa, Pa)`, `(..., T, Pa C, Pa C)` kernels (an equal-time kernel needs only equal-time
    kernels of its neighbours)."""
    L = len(Phi_f)
    grid = (lambda X: X[:, None, :]) if two_time else (lambda X: X)

    def classes(X, E):
        """A kernel without class index as one with: `X (x) E` for `E (C, C)` (I_C or all ones)."""
        if two_time:
            T, Pa = G_f[0].shape[0], Phi_f[0].shape[1]
            X = jnp.broadcast_to(X, (T, Pa, T, Pa))
            Y = X[:, :, None, :, :, None] * E[:, None, None, :]
        else:
            Y = X[..., :, None, :, None] * E[:, None, :]
        return Y.reshape(*Y.shape[: -6 if two_time else -4], *G_f[0].shape[-(4 if two_time else 2) :])

    eye, ones = jnp.eye(C, dtype=G_f[0].dtype), jnp.ones((C, C), G_f[0].dtype)
    Phi = [Phi_f[0]]
    for l in range(1, L):
        Phi.append(Phi_f[l] + _source_shift(sw2 * Phi[l - 1], lazy.Q[l], lazy.M1[l], two_time))
    G = [None] * L
    for l in range(L - 1, -1, -1):
        G[l] = G_f[l]
        if l > 0:  # r's covariance Sr (x) I_C times the shift of <phi' phi'>
            shift = grid(lazy.Sr[l]) * _source_shift(sw2 * Phi[l - 1], lazy.R3[l], lazy.M2[l], two_time)
            G[l] = G[l] + classes(shift, eye)
        if l < L - 1:
            G[l] = G[l] + sw2 * classes(grid(lazy.M1[l]), ones) * G[l + 1]
    return Phi, G


class Perturbative(AbstractSolver, _sampling.Replicated):
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
      lazy kernels `x0` are exact. `Solution.stderr` holds standard errors over `n_replicas`
      of `f`, `loss`, `ntk` (and test fields). Kernels: equal-time only (`Phi = None`).
    * **Smooth nonlinear networks of depth >= 2.** Two kinds of O(gamma0^2) terms, both about the
      lazy state, where every source is Gaussian and constant in time:
      - the *field term* of each layer: the same nested forward mode, through `MonteCarlo`'s causal
        single-site pass, with sources `u ~ N(0, Phi0^{l-1})`, `r ~ N(0, G0^{l+1})` and the memory
        kernels frozen at gamma0 -> 0, which needs the lazy limits of the responses
        (`Abar = gamma0^{-1} <d phi / d r>` is 0/0 at gamma0 = 0) in closed form (`_lazy_responses`);
      - the *source shift*: the sources' covariances `Phi^{l-1}`, `G^{l+1}` themselves move at
        O(gamma0^2), which to first order changes a layer's kernels by Price's theorem
        (`_source_shift`; Gaussian moments of phi and its first three derivatives by quadrature),
        forward over layers for Phi and backward for G (`_propagate`).
      Monte Carlo over `u, r` (`n_samples`, pass `key`); `Solution.Phi`, `Solution.G` are two-time.

    Several outputs (THEORY 12): the backward sources carry a class index, `r ~ N(0, Sr (x) I_C)`, and
    the lazy responses and source shifts are class-diagonal or class-blind as derived in
    `_lazy_responses`, `_propagate`; the two-layer path then samples r with u.

    Not implemented: ReLU (no second derivative: compare `dmft.MonteCarlo` at small gamma0 with
    `dmft.Lazy` instead).
    """

    linear_iters: int = eqx.field(static=True, default=64)
    n_samples: int = eqx.field(static=True, default=16384)
    n_replicas: int = eqx.field(static=True, default=8)
    sampling: str = eqx.field(static=True, default="sobol")
    chunk_size: int = eqx.field(static=True, default=2048)

    def _replica_sums(self, key, one_chunk):
        """Sums over every replica's samples of `one_chunk(replica_key, i)` (a list of arrays), stacked
        over the replicas."""

        def replica(k):
            total = lambda acc, i: (jax.tree.map(jnp.add, acc, one_chunk(k, i)), None)
            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(one_chunk, k, 0))
            return jax.lax.scan(total, zeros, jnp.arange(self._per_replica // self._chunk))[0]

        return jax.lax.map(replica, jax.vmap(lambda r: jr.fold_in(key, r))(jnp.arange(self.n_replicas)))

    def samples(self, problem):
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
        S, R = self.n_samples, self.n_replicas
        if R < 2 or S % R or self._per_replica % self._chunk:
            raise ValueError(
                f"n_replicas must be >= 2 and divide n_samples, and chunk_size the samples per replica; got "
                f"n_samples={S}, n_replicas={R}, chunk_size={self.chunk_size}"
            )
        if self.sampling not in _sampling.SAMPLINGS:
            raise ValueError(f"sampling must be one of {_sampling.SAMPLINGS}, got {self.sampling!r}")
        if self.sampling == "sobol" and self._per_replica & (self._per_replica - 1):
            raise ValueError(f'sampling="sobol" needs n_samples / n_replicas a power of 2, got {S} / {R}')

    def init(self, problem, key):
        if isinstance(problem.activation, Linear):
            return self._linear(problem, key)
        return self._two_layer(problem, key) if problem.depth == 1 else self._deep(problem, key)

    def postprocess(self, problem, state, key):
        x0, x2 = state[:2]
        g2 = problem.gamma0**2
        if isinstance(problem.activation, Linear):
            state = jax.tree.map(lambda a, b: a + g2 * b, x0, x2)
            return LinearClosure(predictions="euler").postprocess(problem, state, key)
        # Nonlinear: x0 = (Phi0, G0) (L, 1, Pa, Pa), x2 = equal-time (Phi2, G2) per replica
        # (R, L, T, Pa, Pa); deep networks add the two-time kernels.
        (Phi0, G0), (Phi2, G2) = x0, x2
        fields_of = lambda P2, G2_: self._fields(problem, Phi0 + g2 * P2, G0 + g2 * G2_)
        fields, Phi_eq, G_eq = fields_of(Phi2.mean(0), G2.mean(0))
        per_replica = jax.vmap(lambda P2, G2_: fields_of(P2, G2_)[0])(Phi2, G2)
        stderr = _sampling.stderr({k: v for k, v in per_replica.items() if k != "ts"})
        two_time = {}
        if problem.depth > 1:
            (Phi0_tt, G0_tt), (Phi2_tt, G2_tt) = state[2]
            two_time = dict(Phi=Phi0_tt + g2 * Phi2_tt, G=split_classes(problem, G0_tt + g2 * G2_tt, (-3, -1)))
        return dict(**fields, Phi_eq=Phi_eq, G_eq=split_classes(problem, G_eq, (-2, -1)), stderr=stderr, **two_time)

    @staticmethod
    def _fields(problem, Phi_eq, G_eq):
        """Prediction fields from equal-time kernels `Phi_eq (L, T, Pa, Pa)`, `G_eq (L, T, Pa C, Pa C)`
        (Euler predictions)."""
        K = ntk_from_kernels(problem.net, problem.data.Kx, Phi_eq, G_eq, problem.C)
        f = euler_predictions(problem, K)
        return prediction_fields(problem, K, f), Phi_eq, G_eq

    def _two_layer(self, problem, key):
        """`x0 = (Phi0 (1, 1, Pa, Pa), G0 (1, 1, Pa C, Pa C))` (exact lazy kernels) and `x2 = (Phi2, G2)` per
        replica, `(R, 1, T, ., .)` (their mean is the estimate). One output: the read-out r by 3-node
        Gauss-Hermite; C > 1 outputs: r ~ N(0, sw2 I_C) sampled with u."""
        Phi0, G0, K0 = lazy_kernels(problem)
        Kx, T, C = problem.data.Kx, problem.n_steps + 1, problem.C
        Delta0 = error_signal(problem, jnp.broadcast_to(with_classes(K0, C), (T, *(C * n for n in K0.shape))))
        c = problem.dt * problem.eta0 / problem.P
        net = problem.net
        Su = net.preactivation_kernel(Kx)
        M_u, V_u = factor(Su)
        nodes = C == 1
        r = net.sigma_w * jnp.tile(jnp.asarray(_R_NODES, Kx.dtype), self._chunk)[:, None]
        w = jnp.tile(jnp.asarray(_R_WEIGHTS, Kx.dtype), self._chunk) if nodes else jnp.ones(1, Kx.dtype)
        weighted = lambda phi, g, z: ((w[:, None] * phi).T @ phi, (w[:, None] * g).T @ g)

        def one_chunk(k, i):
            e_u, e_r = self._normals(k, i, Kx.shape[0], 0 if nodes else C, (V_u[:, ::-1], None), Kx.dtype)
            u = e_u @ M_u.T
            if nodes:  # each u with the 3 nodes of r
                u, r_ = jnp.repeat(u, 3, axis=0), r
            else:
                r_ = net.sigma_w * e_r
            F = lambda g: two_layer_fields(problem.activation, g, c, Su, net.sw2, u, r_, Delta0, weighted)
            return _half_second_derivative(F, problem.gamma0)

        Phi2, G2 = (x[:, None] / self._per_replica for x in self._replica_sums(key, one_chunk))
        return (Phi0[:, None], with_classes(G0, C)[:, None]), (Phi2, G2)

    def _deep(self, problem, key):
        """Depth >= 2: the field term of every layer (`_field_term`, sampled) plus the shift of its
        sources (`_propagate`), two-time over all samples and equal-time per replica."""
        Phi0, G0 = lazy_kernels(problem)[:2]
        G0 = with_classes(G0, problem.C)
        lazy = _lazy_limit(problem)
        L, T, C = problem.depth, problem.n_steps + 1, problem.C
        sums, eqs = zip(*(_field_term(problem, lazy, jr.fold_in(key, l), l, self) for l in range(L)))
        two_time = lambda x: x.reshape(T, x.shape[-1] // T, T, x.shape[-1] // T)
        sw2 = problem.net.sw2
        Phi_tt, G_tt = _propagate(lazy, sw2, [two_time(s[0]) for s in sums], [two_time(s[1]) for s in sums], True, C)
        Phi_eq, G_eq = _propagate(lazy, sw2, [e[0] for e in eqs], [e[1] for e in eqs], False, C)
        tile = lambda X: jnp.broadcast_to(X[:, None, :, None, :], (L, T, X.shape[-1], T, X.shape[-1]))
        x0, x2 = (Phi0[:, None], G0[:, None]), (jnp.stack(Phi_eq, 1), jnp.stack(G_eq, 1))
        return x0, x2, ((tile(Phi0), tile(G0)), (jnp.stack(Phi_tt), jnp.stack(G_tt)))

    def _linear(self, problem, key):
        base = LinearClosure(predictions="euler")
        p0 = _with_gamma0(problem, jnp.zeros_like(problem.gamma0))
        x0 = base.init(p0, key)  # the exact lazy fixed point (LinearClosure's causal pass)
        T = lambda x, g: base.step(_with_gamma0(problem, g), x, key)
        half_second = _half_second_derivative(lambda g: T(x0, g), problem.gamma0)
        tangent = lambda v: jax.jvp(lambda x: T(x, jnp.zeros_like(problem.gamma0)), (x0,), (v,))[1]

        def body(_, x2):
            return jax.tree.map(jnp.add, half_second, tangent(x2))

        x2 = jax.lax.fori_loop(0, self.linear_iters, body, half_second)
        return x0, x2
