"""Nonlinear networks: the alternating Monte Carlo solution of the DMFT (THEORY sections 3-5, 7, 10).

Each application of the map, for every layer l in turn (Gauss-Seidel: this sweep's Phi^{l-1},
Abar^{l-1}, damped as `solve` damps them, and the previous iterate's G^{l+1}, Bbar^l):

1. sources `u ~ N(0, Phi^{l-1})`, `r ~ N(0, G^{l+1})` over the whole (time, point) grid from standard
   normals that are the same every iteration (common random numbers: the map is deterministic);
   layer 1: `u ~ N(0, Kx)` constant in time; layer L: `r` one scalar per sample (`_sampling`);
2. the fields of every sample in one causal pass (`dmft.single_site.fields`);
3. the kernels `Phi^l = <phi phi^T>`, `G^l = <g g^T>` (with control variates: minus the moments of
   the lazy fields, plus their exact means) and the responses `Abar^l`, `Bbar^{l-1}` (`_responses`).

**Replicas.** The samples are split into `n_replicas` independent replicas (independent shifts of the
Sobol net, or independent keys), each a complete self-consistent solve of its own, iterated side by
side. The reported order parameters are the replica means; their spread gives error bars that include
the feedback of the sampling noise through the self-consistency, and the noise floor at which the
iteration stops.

**The equal-time response (a correction to THEORY 4, which masks D to s < t).** In the network,
`z^l(t) = W^l(t)^T g^{l+1}(t) / sqrt(N)` and `g^{l+1}(t)` depends on `W^l(0)` through
`u^{l+1}(t) = W^l(0) phi(h^l(t)) / sqrt(N)` at the same time t, so integrating out `W^l(0)` gives
`r^l(t) + gamma0 sum_{s <= t} Bbar^l(t, s) phi(h^l(s))`, with `Bbar^l(t, t) =
gamma0^{-1} <phi''(h(t)) z(t) + phi'(h(t)) dz(t)/du(t)>` (layer l + 1). It vanishes for linear
networks and is O(1), not O(dt), for nonlinear ones. Abar stays strictly causal.

Cost per iteration: O(L S T^2 Pa^2) for the fields and kernels plus O(L R (T Pa)^3) for the square
roots and the Stein regressions (S samples in R replicas, T = n + 1 times, Pa points); memory
O(L R (T Pa)^2 + R chunk T Pa).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from ..dynamics import equal_time, error_signal, euler_predictions, ntk_from_kernels, prediction_fields
from ..single_site import fields, memory, two_layer_fields
from ..solve import AbstractIterativeSolver, damped
from . import _responses, _sampling
from .lazy import lazy_kernels

__all__ = ["MonteCarlo"]


class _State(eqx.Module):
    """Order parameters of every replica (leading axis R): `Phi`, `G (R, L, T, Pa, T, Pa)` and `A`, `B
    (R, L-1, T, Pa, T, Pa)` (Abar^l, Bbar^l for l = 1..L-1). Depth 1 (THEORY 7) tracks equal times only:
    `Phi`, `G (R, 1, T, Pa, Pa)`, `A`, `B` empty."""

    Phi: jax.Array
    G: jax.Array
    A: jax.Array
    B: jax.Array


class MonteCarlo(AbstractIterativeSolver, _sampling.Replicated):
    """Alternating Monte Carlo DMFT for any depth and activation (relu via its a.e. derivative).

    **Arguments:**

    - `n_samples`: single-site samples S per layer and iteration, over all replicas (error ~ S^-1/2,
      like a network of width S; quasi-random sources do better). Each replica solves with S / R
      samples, and the feedback of its sampling noise through the nonlinear self-consistency biases
      it by O(T Pa R / S) (T times, Pa points), a bias the error bar does not contain: on long grids
      with relu, raise `n_samples` (`benchmarks/RESULTS.md` has the measured sizes).
    - `n_replicas`: R independent replicas (see the module docstring), each with S / R samples.
      `Solution.stderr` is the standard error of the replica mean, `sd / sqrt(R)`, scaled by
      `t_{R-1}(0.977) / 2` so that +-2 stderr is a 95% interval despite the few replicas.
    - `sampling`: `"sobol"` (default: randomised quasi-Monte Carlo, S / R a power of 2), `"plain"`
      or `"antithetic"` (pairs `(e_u, +-e_r)`, which cancel the leading noise of the Stein sums at
      small gamma0).
    - `control_variates`: subtract from every sample moment that of the lazy fields `psi(u)`,
      `chi(u) r` of the same sources and add back its exact mean (`(psi, chi) =
      activation.control()`). None (default): on when the activation has a control pair (linear,
      relu, erf, tanh), off for a custom callable.
    - `responses`: `"stein"` (default: Gaussian integration by parts as a causal regression, any
      activation), `"jacobian"` (forward mode along the top `n_directions` source eigenvectors;
      validation; for relu it misses the delta(h) part of the equal-time Bbar(t, t)) or `"none"`
      (A = B = 0: the gradient independence approximation). `rcond`: ridge of the Stein regression,
      relative to the mean eigenvalue of the source covariance.
    - `rtol`: None (default) stops when the relative change of the replica-mean kernels Phi, G per
      iteration is at most a quarter of their Monte Carlo standard error (`Solution.noise_floor`), so
      that the iteration adds little to the error bar, or at most the standard error itself once the
      change has stopped falling (relu's map is only piecewise continuous: it stalls); a number stops
      at that relative change.
    - `damping` (beta), `max_iters`: the damped iteration of `dmft.solve`. `undamped_above`: undamped
      steps (beta = 1) while the relative change is above this, then `damping`.
    - `chunk_size`: samples of a replica processed at once (memory O(R chunk T Pa)); must divide
      S / R. The result does not depend on it.

    Depth 1 uses the equal-time fast path of THEORY 7 (`Solution.Phi = None`).
    """

    n_samples: int = eqx.field(static=True, default=4096)
    n_replicas: int = eqx.field(static=True, default=8)
    sampling: str = eqx.field(static=True, default="sobol")
    control_variates: bool | None = eqx.field(static=True, default=None)
    responses: str = eqx.field(static=True, default="stein")
    rcond: float = 1e-2
    rtol: float | None = None
    damping: float = 0.5
    max_iters: int = eqx.field(static=True, default=100)
    undamped_above: float | None = None
    chunk_size: int = eqx.field(static=True, default=1024)
    n_directions: int | None = eqx.field(static=True, default=None)

    def _control(self, problem):
        """The control pair of the activation, or None when control variates are off."""
        return None if self.control_variates is False else problem.activation.control()

    def samples(self, problem):
        return True

    def validate(self, problem):
        S, R = self.n_samples, self.n_replicas
        if R < 2 or S % R or S // R < 2:
            raise ValueError(
                f"n_replicas must be >= 2 (error bars need a spread) and divide n_samples into replicas of "
                f">= 2 samples; got n_samples={S}, n_replicas={R}"
            )
        if self._per_replica % self._chunk:
            raise ValueError(f"chunk_size {self.chunk_size} must divide the samples per replica ({self._per_replica})")
        if self.sampling not in _sampling.SAMPLINGS:
            raise ValueError(f"sampling must be one of {_sampling.SAMPLINGS}, got {self.sampling!r}")
        if self.responses not in _responses.RESPONSES:
            raise ValueError(f"responses must be one of {_responses.RESPONSES}, got {self.responses!r}")
        n = (problem.n_steps + 1) * problem.data.Kx.shape[0]
        if self.sampling == "sobol":
            if self._per_replica & (self._per_replica - 1):
                raise ValueError(
                    f'sampling="sobol" needs n_samples / n_replicas a power of 2 (a whole Sobol net per '
                    f"replica), got {S} / {R} = {self._per_replica}"
                )
            if 2 * n > _sampling.SOBOL_MAX_DIM:
                raise ValueError(
                    f'sampling="sobol" supports (n_steps + 1) * points <= {_sampling.SOBOL_MAX_DIM // 2} '
                    f'(scipy\'s Sobol dimensions), got {n}: use sampling="plain"'
                )
        if self.sampling == "antithetic" and self._chunk % 2:
            raise ValueError(f'sampling="antithetic" needs an even chunk_size (pairs), got {self._chunk}')
        if self.control_variates and problem.activation.control() is None:
            raise ValueError(
                f"control_variates=True needs an activation with a closed-form control pair (linear, relu, "
                f"erf, tanh), got {problem.activation.name!r}: pass control_variates=None or False"
            )
        if self.rtol is not None and not self.rtol >= 0:
            raise ValueError(f"rtol must be None (stop at the noise floor) or >= 0, got {self.rtol}")
        if self.undamped_above is not None and not self.undamped_above > 0:
            raise ValueError(f"undamped_above must be None or > 0, got {self.undamped_above}")
        if not 0 < self.damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {self.damping}")
        if self.max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {self.max_iters}")
        if self.n_directions is not None and not 1 <= self.n_directions <= n:
            raise ValueError(
                f"n_directions must be None or in [1, (n_steps + 1) * points = {n}], got {self.n_directions}"
            )

    # -- the iteration protocol ----------------------------------------------------------------------
    def init(self, problem, key):
        Phi, G, _ = lazy_kernels(problem)
        R, L, T, Pa = self.n_replicas, problem.depth, problem.n_steps + 1, Phi.shape[-1]
        if L == 1:
            tile = lambda X: jnp.broadcast_to(X[None, :, None], (R, 1, T, Pa, Pa))
            empty = jnp.zeros((R, 0, T, Pa, Pa), Phi.dtype)
            return _State(tile(Phi), tile(G), empty, empty)
        tile = lambda X: jnp.broadcast_to(X[None, :, None, :, None, :], (R, L, T, Pa, T, Pa))
        zeros = jnp.zeros((R, L - 1, T, Pa, T, Pa), Phi.dtype)
        return _State(tile(Phi), tile(G), zeros, zeros)

    def step(self, problem, state, key):
        keys = jax.vmap(lambda r: jr.fold_in(key, r))(jnp.arange(self.n_replicas))
        one = self._two_layer if problem.depth == 1 else self._deep
        axes = [self._layer_axes(problem, l) for l in range(problem.depth)]
        # One replica after the other (lax.map, not vmap): batched LAPACK kernels (eigh, cholesky,
        # triangular solves) split their batch over XLA's CPU thread pool and wait for it, and two of
        # them running side by side deadlocked the pool (jaxlib 0.10.2, 2 cores).
        return jax.lax.map(lambda sk: one(problem, *sk, axes), (state, keys))

    def monitor(self, state):
        # Convergence is judged on the replica-mean kernels; the responses are auxiliary.
        return state.Phi.mean(0), state.G.mean(0)

    def noise_floor(self, state):
        """Relative Monte Carlo standard errors `(2,)` of the replica-mean Phi and G (Frobenius norms)."""
        R = self.n_replicas
        rel = lambda X: jnp.linalg.norm(X.std(0, ddof=1)) / jnp.sqrt(R) / jnp.linalg.norm(X.mean(0))
        return jnp.stack([rel(state.Phi), rel(state.G)])

    def tolerance(self, state):
        if self.rtol is not None:
            return self.rtol, self.rtol
        # A quarter of the noise floor: the iteration error left then adds at most a few per cent to
        # the error bar. A map that stalls (relu) stops at the floor itself: its jitter is independent
        # between replicas, so their spread includes it.
        floor = self.noise_floor(state)
        return 0.25 * floor, floor

    def damping_at(self, change):
        if self.undamped_above is None:
            return self.damping
        return jnp.where(change > self.undamped_above, 1.0, self.damping)

    def postprocess(self, problem, state, key):
        mean = jax.tree.map(lambda x: x.mean(0), state)
        fields_, kernels = self._fields(problem, mean)
        per_replica = jax.vmap(lambda s: self._fields(problem, s)[0])(state)
        stderr = _sampling.stderr({k: v for k, v in per_replica.items() if k != "ts"})
        floor = jnp.max(self.noise_floor(state))
        return dict(**fields_, **kernels, stderr=stderr, noise_floor=floor)

    def _fields(self, problem, s):
        """Prediction fields and kernels of one replica's (or the mean) order parameters."""
        depth1 = problem.depth == 1
        Phi_eq, G_eq = (s.Phi, s.G) if depth1 else (equal_time(s.Phi), equal_time(s.G))
        K = ntk_from_kernels(problem.data.Kx, Phi_eq, G_eq)
        f = euler_predictions(K, problem.data.y, problem.dt, problem.eta0)
        two_time = {} if depth1 else dict(Phi=s.Phi, G=s.G, A=s.A, B=s.B)
        return prediction_fields(problem, K, f), dict(Phi_eq=Phi_eq, G_eq=G_eq, **two_time)

    # -- one replica's map ---------------------------------------------------------------------------
    def _layer_axes(self, problem, l):
        """`(axes of u, axes of r)` of THEORY layer l + 1 for quasi-random sources (`_sampling.sobol_axes`,
        from Kx and the lazy kernels; None for the scalar r of the last layer); None unless sobol."""
        if self.sampling != "sobol":
            return None
        Phi0, G0 = lazy_kernels(problem)[:2]
        T = 1 if problem.depth == 1 else problem.n_steps + 1
        axes_u = _sampling.sobol_axes(problem.data.Kx, 1) if l == 0 else _sampling.sobol_axes(Phi0[l - 1], T)
        return axes_u, None if l == problem.depth - 1 else _sampling.sobol_axes(G0[l + 1], T)

    def _deep(self, problem, state, key, axes):
        L, Kx = problem.depth, problem.data.Kx
        T, Pa = state.Phi.shape[1:3]
        c = problem.dt * problem.eta0 / problem.P
        Delta = error_signal(problem, ntk_from_kernels(Kx, equal_time(state.Phi), equal_time(state.G)))
        cols = Delta[None, None]
        ctrl = self._control(problem)
        Phi_new, G_new, A_new, B_new = [], [], [], []
        for l in range(L):  # layer l + 1 of THEORY
            first, last = l == 0, l == L - 1
            if first:
                Phi_prev, A_prev = jnp.broadcast_to(Kx[:, None, :], (T, Pa, T, Pa)), 0.0
            else:  # this sweep's layer below, mixed as `solve` will mix it
                Phi_prev = damped(state.Phi[l - 1], Phi_new[-1], self.damping)
                A_prev = damped(state.A[l - 1], A_new[-1], self.damping)
            G_next = jnp.ones((T, Pa, T, Pa), Kx.dtype) if last else state.G[l + 1]
            C = memory(A_prev, Phi_prev * cols, c)
            D = memory(0.0 if last else state.B[l], G_next * cols, c)
            # The covariances the sources really have (negative eigenvalues clipped); u of layer 1 is
            # constant in time, r of layer L one scalar.
            M_u, V_u = _sampling.factor(Kx if first else Phi_prev.reshape(T * Pa, T * Pa))
            M_r, V_r = (None, None) if last else _sampling.factor(G_next.reshape(T * Pa, T * Pa))
            Su, Sr = M_u @ M_u, 1.0 if last else M_r @ M_r  # covariances the sources really have
            m = self._moments(problem, jr.fold_in(key, l), (M_u, M_r), axes[l], C, D, first, last)
            if ctrl is not None:  # the exact means of the control variates subtracted in `_moments`
                E_psi, E_chi = ctrl.kernels(Su)
                if first:  # u of layer 1 is constant in time
                    E_psi, E_chi = jnp.tile(E_psi, (T, T)), jnp.tile(E_chi, (T, T))
                m["Phi"], m["G"] = m["Phi"] + E_psi, m["G"] + E_chi * Sr
            if self.responses == "jacobian":
                m |= self._jacobians(problem, key, l, (M_u, M_r), (V_u, V_r), axes[l], C, D, first, last)
            Phi_new.append(m["Phi"].reshape(T, Pa, T, Pa))
            G_new.append(m["G"].reshape(T, Pa, T, Pa))
            if not last:
                A_new.append(self._response(problem, m, "A", Sr, T, Pa))
            if not first:
                B_new.append(self._response(problem, m, "B", Su, T, Pa))
        return _State(jnp.stack(Phi_new), jnp.stack(G_new), jnp.stack(A_new), jnp.stack(B_new))

    def _response(self, problem, m, name, K, T, Pa):
        """Abar (name "A") or Bbar ("B") from the moments m; K: covariance of the differentiated source."""
        if self.responses == "none":
            return jnp.zeros((T, Pa, T, Pa), K.dtype)
        lag = 1 if name == "A" else 0  # Abar strictly causal, Bbar with its equal-time block
        if self.responses == "jacobian":
            R = m[name + "_jac"] * _responses.time_mask(T, Pa, lag, K.dtype)
        else:
            R = _responses.causal_stein(m[name], K, self.rcond, T, Pa, lag)
        gamma0 = problem.gamma0  # >= 0; at 0 the responses are irrelevant (they multiply gamma0)
        return jnp.where(gamma0 > 0, R / jnp.where(gamma0 > 0, gamma0, 1.0), 0.0).reshape(T, Pa, T, Pa)

    def _sources(self, key, i, factors, axes, T, Pa, first, last, dtype):
        du, dr = (Pa if first else T * Pa), (1 if last else T * Pa)
        e_u, e_r = self._normals(key, i, du, dr, axes, dtype)
        return _sampling.sources(e_u, e_r, *factors, T, Pa, first, last)

    def _moments(self, problem, key, factors, axes, C, D, first, last):
        """Sample means over one replica of one layer, over (T Pa): `<phi phi^T>`, `<g g^T>` and the Stein
        moments `<phi r^T>`, `<g u^T>` (lower time blocks only), control variates subtracted."""
        act, gamma0 = problem.activation, problem.gamma0
        T, Pa = C.shape[:2]
        chunk, n = self._chunk, T * Pa
        ctrl = self._control(problem)
        need_A = not last and self.responses == "stein"
        need_B = not first and self.responses == "stein"

        def one_chunk(acc, i):
            u, r = self._sources(key, i, factors, axes, T, Pa, first, last, C.dtype)
            phis, gs = fields(act, gamma0, u, r, C, D)
            phi0 = g0 = None
            if ctrl is not None:  # the lazy fields of the same sources
                phi0, g0 = ctrl.fn(u).reshape(chunk, n), (ctrl.dfn(u) * r).reshape(chunk, n)
            out = {"Phi": _sampling.gram(phis, phi0), "G": _sampling.gram(gs, g0)}
            # The controls' Stein moments <psi(u) r^T>, <chi(u) r u^T> vanish exactly (u, r independent).
            if need_A:
                out["A"] = _responses.lower_products(_minus(phis, phi0), r.reshape(chunk, n), T, Pa)
            if need_B:
                out["B"] = _responses.lower_products(_minus(gs, g0), u.reshape(chunk, n), T, Pa)
            return jax.tree.map(jnp.add, acc, out), None

        names = ["Phi", "G"] + ["A"] * need_A + ["B"] * need_B
        acc0 = {k: jnp.zeros((n, n), C.dtype) for k in names}
        acc, _ = jax.lax.scan(one_chunk, acc0, jnp.arange(self._per_replica // chunk))
        return {k: v / self._per_replica for k, v in acc.items()}

    def _jacobians(self, problem, key, l, factors, eigvecs, axes, C, D, first, last):
        """`<d phi(h)/d r>` and `<d g/d u>` by forward mode (`_responses.jacobian_moments`)."""
        T, Pa = C.shape[:2]
        key = jr.fold_in(key, l)

        def mean_over_samples(fn):
            total = lambda i: fn(*self._sources(key, i, factors, axes, T, Pa, first, last, C.dtype))
            return jax.lax.map(total, jnp.arange(self._per_replica // self._chunk)).sum(0) / self._per_replica

        field_fn = lambda u, r: fields(problem.activation, problem.gamma0, u, r, C, D)
        k = self.n_directions or T * Pa
        return _responses.jacobian_moments(mean_over_samples, field_fn, eigvecs, k, T, Pa, first, last)

    def _two_layer(self, problem, state, key, axes):
        """THEORY 7: u ~ N(0, Kx) constant, r scalar, equal-time kernels only (O(S Pa^2) memory)."""
        Kx, act, gamma0 = problem.data.Kx, problem.activation, problem.gamma0
        T, Pa = state.Phi.shape[1:3]
        c = problem.dt * problem.eta0 / problem.P
        Delta = error_signal(problem, ntk_from_kernels(Kx, state.Phi, state.G))
        M_u = _sampling.factor(Kx)[0]
        ctrl = self._control(problem)

        def one_chunk(acc, i):
            e_u, e_r = self._normals(key, i, Pa, 1, axes[0], Kx.dtype)
            u, r = e_u @ M_u.T, e_r[:, 0]
            gram = lambda phi, g: (phi.T @ phi, g.T @ g)
            Phi, G = two_layer_fields(act, gamma0, c, Kx, u, r, Delta, gram)
            if ctrl is not None:  # control variates (see `_moments`): the lazy fields, constant in time
                Phi, G = Phi - _sampling.gram(ctrl.fn(u)), G - _sampling.gram(ctrl.dfn(u) * r[:, None])
            return (acc[0] + Phi, acc[1] + G), None

        zeros = jnp.zeros((T, Pa, Pa), Kx.dtype)
        (Phi, G), _ = jax.lax.scan(one_chunk, (zeros, zeros), jnp.arange(self._per_replica // self._chunk))
        Phi, G = Phi / self._per_replica, G / self._per_replica
        if ctrl is not None:
            E_psi, E_chi = ctrl.kernels(M_u @ M_u)
            Phi, G = Phi + E_psi, G + E_chi
        return _State(Phi[None], G[None], state.A, state.B)


def _minus(X, X0):
    return X if X0 is None else X - X0
