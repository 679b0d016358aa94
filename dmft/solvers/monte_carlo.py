"""Nonlinear networks: the alternating Monte Carlo solution of the DMFT (THEORY sections 3-5, 7, 10).

Each iteration, for every layer l in turn (Gauss-Seidel: this sweep's Phi^{l-1}, Abar^{l-1}, damped as
`solve` damps, and the previous iterate's G^{l+1}, Bbar^l):

1. sources `u = L_Phi e_u ~ N(0, Phi^{l-1})` and `r = L_G e_r ~ N(0, G^{l+1})` over the whole
   (time, sample) grid, with `L` the symmetric square root of the covariance (negative eigenvalues
   clipped; layer 1: `u ~ N(0, Kx)` constant in time; layer L: `r` one scalar per sample). The
   standard normals `e` come from the same key every iteration (common random numbers), so the map is
   deterministic and `rtol` is meaningful;
2. the single-site fields in ONE causal pass (lax.scan over time, samples batched and chunked):
   `h = u + gamma0 C g`, `z = r + gamma0 D phi(h)`, `g = phi'(h) z` with the strictly causal
   `C = Abar^{l-1} + dt (eta0/P) [s<t] Phi^{l-1} Delta` and the causal
   `D = Bbar^l + dt (eta0/P) [s<t] G^{l+1} Delta` (Bbar includes s = t, below): at time t, h(t)
   first, then z(t), then g(t);
3. new kernels `Phi^l = <phi phi^T>`, `G^l = <g g^T>` and responses `Abar^l = gamma0^{-1} <d phi(h)/d r>`,
   `Bbar^{l-1} = gamma0^{-1} <d g/d u>` by Gaussian integration by parts (THEORY 5) as a causal
   regression (`_causal_stein`), or by forward-mode differentiation.

**The equal-time response (a correction to THEORY 4, which masks D to s < t).** In the network,
`z^l(t) = W^l(t)^T g^{l+1}(t) / sqrt(N)` and `g^{l+1}(t)` depends on `W^l(0)` through
`u^{l+1}(t) = W^l(0) phi(h^l(t)) / sqrt(N)` at the same time t, so integrating out `W^l(0)` gives
`r^l(t) + gamma0 sum_{s <= t} Bbar^l(t, s) phi(h^l(s))`, with `Bbar^l(t, t) =
gamma0^{-1} <phi''(h(t)) z(t) + phi'(h(t)) dz(t)/du(t)>` (layer l + 1). It vanishes for linear
networks (the closure is unchanged) and is O(1), not O(dt), for nonlinear ones. Measured against
seed-averaged networks (gamma0 = 1, P = 8, 31 steps; tanh depth 3 at N = 8192, the rest at N = 4096):
NTK error in units of the networks' standard error (rms over entries and times) 5.4 -> 1.7 (tanh,
depth 3), 3.8 -> 2.1 (tanh, 2), 5.1 -> 2.9 (relu, 2), 17.7 -> 1.5 (relu, 3) when s = t is kept.
Abar stays strictly causal: h(t) depends on g(s < t) only.

Why iterate, when LinearClosure marches? With time-ordered (Cholesky) source factors this map is
causal too, and its fixed point for given normals can be computed in one pass over time (tried:
depth 3, 101 times, S = 4096 in 27 s). But that estimator is worse: rounding and sampling noise are
amplified through the near-singular Cholesky rows (its spread over keys of the final loss was ~5x the
iterated symmetric-root solution's, its mean 6% off, at depth 3, 41 times), and as a start for this
iteration it saved no iterations at 101 times. The symmetric root stays, also as the source factor
of the iteration: Cholesky sources (15x cheaper to factor) widened the spread over 6 keys of the
final loss 1.5x and of the NTK 1.24x (tanh, depth 3, 61 times, S = 2048).

Cost per iteration: O(L S T^2 Pa^2) for the fields and kernels plus O(L (T Pa)^3) for the square
roots and the Stein regressions (S samples, T = n + 1 times, Pa points); memory O(L (T Pa)^2 + chunk T Pa).
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.scipy.special import ndtri

from ..dynamics import equal_time, error_signal, euler_predictions, ntk_from_kernels, prediction_fields
from ..solve import AbstractStochasticSolver, damped
from .lazy import lazy_kernels

__all__ = ["MonteCarlo"]

_RESPONSES = ("stein", "jacobian", "none")
_SAMPLING = ("plain", "antithetic", "sobol")


class _State(eqx.Module):
    """Phi, G: (L, T, Pa, T, Pa); A, B: (L-1, T, Pa, T, Pa) = Abar^l, Bbar^l for l = 1..L-1.

    In the two-layer fast path (equal-time kernels only) Phi, G are (1, T, Pa, Pa) and A, B empty.
    Phi_eq_batches, G_eq_batches: (n_batches, L, T, Pa, Pa), the equal-time kernels of disjoint sample
    blocks from the last map applications (damped like the rest), for the batch-means standard
    errors: carried here so that `postprocess` need not apply the map once more (a whole iteration,
    and its compilation, saved).
    """

    Phi: jax.Array
    G: jax.Array
    A: jax.Array
    B: jax.Array
    Phi_eq_batches: jax.Array
    G_eq_batches: jax.Array


def _factor(K):
    """`(L, V)`: the symmetric square root `L = K^{1/2}` (negative eigenvalues clipped) and the
    eigenvectors V in increasing eigenvalue order.

    The symmetric root is unique and continuous in K; a factor `V sqrt(lam)` is not (eigenvectors of
    (near-)degenerate eigenvalues rotate and flip sign between iterations), which would make the
    common-random-number map discontinuous and the iteration cycle.
    """
    lam, V = jnp.linalg.eigh(K)
    return (V * jnp.sqrt(jnp.maximum(lam, 0.0))) @ V.T, V


def _segments(T, n=4):
    """Time boundaries `[(t0, t1), ...]` of n near-equal segments of the grid (fewer when T < n)."""
    edges = sorted(set(np.linspace(0, T, min(n, T) + 1).round().astype(int).tolist()))
    return list(zip(edges[:-1], edges[1:]))


def _fields(act, gamma0, u, r, C, D):
    """Causal single-site pass. u, r: (S, T, Pa); C: (T, Pa, T, Pa) strictly causal, D causal (its
    equal-time block, Bbar(t, t), multiplies phi(h(t)), already computed when z(t) is).

    Returns phi(h), g, both (S, T * Pa). The scan runs in `_segments`: within the segment ending at
    t1 the history and the memory kernels are cut to the first t1 times (causality), which saves
    ~3/8 of the products against always using the whole grid.
    """
    S, T, Pa = u.shape
    # gamma0 folded into the (T Pa)^2 memory kernels once (`gamma0 * gs @ C_t.T` scales the whole
    # (S, t Pa) history at every step).
    Cm, Dm = (gamma0 * C).reshape(T, Pa, T * Pa), (gamma0 * D).reshape(T, Pa, T * Pa)

    def step(carry, xs):
        phis, gs = carry
        t, C_t, D_t = xs
        h = u[:, t] + gs @ C_t.T
        phis = jax.lax.dynamic_update_slice(phis, act.fn(h), (0, t * Pa))
        z = r[:, t] + phis @ D_t.T
        gs = jax.lax.dynamic_update_slice(gs, act.dfn(h) * z, (0, t * Pa))
        return (phis, gs), None

    phis = gs = jnp.zeros((S, 0), u.dtype)
    for t0, t1 in _segments(T):
        w = t1 * Pa
        grow = lambda x: jnp.pad(x, ((0, 0), (0, w - x.shape[1])))
        xs = (jnp.arange(t0, t1), Cm[t0:t1, :, :w], Dm[t0:t1, :, :w])
        (phis, gs), _ = jax.lax.scan(step, (grow(phis), grow(gs)), xs)
    return phis, gs


def _sources(e_u, e_r, Lu, Lr, T, Pa, first, last):
    """Sources `(u, r)`, each `(S, T, Pa)`, from standard normals: `u = Lu e_u` (layer 1: e_u
    `(S, Pa)`, u constant in time; else `(S, T Pa)`) and `r = Lr e_r` (layer L: e_r `(S,)`, one
    scalar per sample; else `(S, T Pa)`)."""
    S = e_u.shape[0]
    u = e_u @ Lu.T
    u = jnp.broadcast_to(u[:, None, :], (S, T, Pa)) if first else u.reshape(S, T, Pa)
    r = jnp.broadcast_to(e_r[:, None, None], (S, T, Pa)) if last else (e_r @ Lr.T).reshape(S, T, Pa)
    return u, r


def _gram(X, X0):
    """`X^T X - X0^T X0` for samples X, X0 (S, M) in one product: the symmetric part of
    `(X - X0)^T (X + X0)` (X0 None: `X^T X`)."""
    if X0 is None:
        return X.T @ X
    M = (X - X0).T @ (X + X0)
    return 0.5 * (M + M.T)


def _control_means(ctrl, Su, Sr):
    """Exact means `(E[psi(u) psi(u)^T], E[chi(u) r (chi(u) r)^T])` of the control variates of one
    layer, `psi, chi = ctrl.fn, ctrl.dfn`, for sources u, r independent with covariances Su, Sr
    (both (M, M), or Sr = 1 for the scalar r of the last layer)."""
    E_psi, E_chi = ctrl.kernels(Su)
    return E_psi, E_chi * Sr


def _minus(X, X0):
    return X if X0 is None else X - X0


def _lower_products(X, Y, T, Pa):
    """`X^T Y (T Pa, T Pa)` on the time-block lower staircase of `_segments` only (rows of the segment
    ending at t1 against columns of times < t1), zero above: what the causal Stein responses need
    (their mask keeps s <= t). ~5/8 of the full product's cost. (For the symmetric kernels the same
    staircase plus a transpose was no faster than XLA's full product, so they use that.)"""
    n = T * Pa
    rows = [jnp.pad(X[:, t0 * Pa : t1 * Pa].T @ Y[:, : t1 * Pa], ((0, 0), (0, n - t1 * Pa))) for t0, t1 in _segments(T)]
    return jnp.concatenate(rows)


def _normals(key, n, shape_u, shape_r, antithetic):
    """Standard normals `(e_u (n, *shape_u), e_r (n, *shape_r))` for n samples.

    Antithetic: pairs `(e_u, e_r), (e_u, -e_r)`, consecutive along the sample axis (so contiguous
    batches keep them whole). Within a pair the Stein sums keep only the part of phi that is odd in
    e_r, and of g (odd in r at gamma0 = 0) the part that is even: the large rest - for phi,
    everything driven by u alone - which is pure noise for the responses, cancels exactly, and what
    remains is O(gamma0). (Quartets that also flip u were worse: for odd activations their kernel
    contributions come in identical pairs; benchmarks/monte_carlo.py.)
    """
    ku, kr = jr.split(key)
    if not antithetic:
        return jr.normal(ku, (n, *shape_u)), jr.normal(kr, (n, *shape_r))
    e_u = jnp.repeat(jr.normal(ku, (n // 2, *shape_u)), 2, axis=0)
    e_r = jr.normal(kr, (n // 2, 1, *shape_r)) * jnp.array([1.0, -1.0]).reshape(1, 2, *(1,) * len(shape_r))
    return e_u, e_r.reshape(n, *shape_r)


@functools.lru_cache(maxsize=8)
def _sobol_points(n, d):
    """`(n, d)` uint32: the first n (a power of 2) points of the unscrambled Sobol sequence, as
    integers `x * 2^32` (exact: scipy's coordinates are multiples of 2^-30). Host side, cached."""
    from scipy.stats import qmc

    x = qmc.Sobol(d, scramble=False).random_base2(int(n).bit_length() - 1)
    return np.ldexp(x, 32).astype(np.uint32)


def _sobol_axes(K0, T):
    """Fixed orthonormal axes `(T Pa, T Pa)` for the quasi-random coordinates, in decreasing expected
    variance: time cosine modes (DCT-II) times the eigenvectors of the lazy kernel `K0 (Pa, Pa)`,
    column `(k, j)` weighted `lam_j / (1 + k)^2` (two-time kernels are smooth in time, so their
    variance sits in the slow modes). T = 1: the eigenvectors of K0.

    The axes must not change between iterations: with the current kernels' eigenvectors (which
    rotate and flip between iterations) the map was no longer deterministic and relu depth-2 solves
    stalled above rtol.
    """
    lam, V = jnp.linalg.eigh(K0)
    k = np.arange(T)
    dct = np.sqrt(2.0 / T) * np.cos(np.pi * (k[:, None] + 0.5) * k[None, :] / T)  # column k: mode k
    dct[:, 0] /= np.sqrt(2.0)
    axes = jnp.kron(jnp.asarray(dct, K0.dtype), V)
    weight = jnp.kron(1.0 / (1.0 + k) ** 2, jnp.maximum(lam, 0.0))
    return axes[:, jnp.argsort(-weight)]


def _sobol_normals(key, start, n, n_total, Vu, Vr, shape_u, shape_r, dtype):
    """Standard normals `(e_u (n, *shape_u), e_r (n, *shape_r))`: rows `[start, start + n)` of a
    randomised Sobol point set of `n_total` points, mapped by the inverse normal CDF.

    Randomisation: one random digital shift (XOR) per coordinate, so every point is uniform and the
    estimates unbiased (a random linear matrix scramble on top, as scipy's, was no better: depth-1
    tanh, 16 keys); contiguous power-of-2 blocks stay nets (chunks and batch means keep the
    stratification). The first coordinates of a Sobol sequence are the best stratified, so they go
    to the directions of largest variance: coordinate order u_1, r_1, u_2, r_2, ... along the axes
    `Vu`, `Vr` (`_sobol_axes`; None for the scalar r of the last layer), and `e = V e'` rotates
    them back to the coordinates the symmetric root `L` acts on.
    """
    du, dr = int(np.prod(shape_u)), int(np.prod(shape_r))
    order = sorted([(k, 0) for k in range(du)] + [(k, 1) for k in range(dr)])
    cols_u = np.array([j for j, o in enumerate(order) if o[1] == 0])
    cols_r = np.array([j for j, o in enumerate(order) if o[1] == 1])
    table = jnp.asarray(_sobol_points(n_total, du + dr))
    x = jax.lax.dynamic_slice_in_dim(table, start, n) ^ jr.bits(key, (du + dr,), jnp.uint32)
    bits = 32 if dtype == jnp.float64 else 24  # float32 cannot resolve 2^-32 (ndtri(1) = inf)
    e = ndtri(((x >> (32 - bits)).astype(dtype) + 0.5) * 2.0**-bits)
    e_u, e_r = e[:, cols_u], e[:, cols_r]
    e_u = e_u @ Vu.T if Vu is not None else e_u
    e_r = e_r @ Vr.T if Vr is not None else e_r
    return e_u.reshape(n, *shape_u), e_r.reshape(n, *shape_r)


def _time_mask(T, Pa, lag, dtype):
    """`(T Pa, T Pa)`: 1 where the column time s <= row time t - lag."""
    return jnp.kron(jnp.tril(jnp.ones((T, T), dtype), -lag), jnp.ones((Pa, Pa), dtype))


def _causal_stein(b, K, rcond, T, Pa, lag):
    """The causal response R from the Stein moments `b = <f r^T>` (f a field, r the source of
    covariance K, both over (T Pa)), by regression on the sources that f(t) depends on:
    `R[t, P] = b[t, P] K[P, P]^{-1}` with P = {s <= t - lag} (Stein: `<f(t) r(s)> = sum_{s' in P}
    R(t, s') K(s', s)`, exact when f(t) depends on r(s') for s' in P only). lag = 1 for Abar
    (phi(h(t)) depends on r(s < t)); lag = 0 for Bbar (g(t) also depends on u(t): the equal-time
    response of the module docstring).

    With the time-ordered Cholesky factor `K + eps I = C C^T` (eps = rcond * mean eigenvalue), the
    leading block of C factors every past block, so all rows take two masked triangular solves:
    `R = mask(mask(b) C^{-T}) C^{-1}`. (A ridge inverse of the whole K instead spreads part of the
    response onto s >= t, which the causal mask then deletes: on a depth-2 linear network the loss
    was 3.4e-3 (2%) off the closure at t = 0.5.)
    """
    n = T * Pa
    mask = _time_mask(T, Pa, lag, b.dtype)
    C = jnp.linalg.cholesky(K + rcond * jnp.trace(K) / n * jnp.eye(n, dtype=b.dtype))
    Y = jax.scipy.linalg.solve_triangular(C, (b * mask).T, lower=True).T
    return jax.scipy.linalg.solve_triangular(C.T, (Y * mask).T, lower=False).T


class MonteCarlo(AbstractStochasticSolver):
    """Alternating Monte Carlo DMFT for any depth and activation (relu via its a.e. derivative).

    **Arguments:**

    - `n_samples`: single-site samples S per layer and iteration (error ~ S^-1/2, like one network of
      width S).
    - `damping` (beta), `rtol`, `max_iters`: the damped fixed-point iteration of `dmft.solve`; the
      relative change of the kernels Phi, G decides convergence (see `monitor`). For non-smooth
      activations the change stalls at a Monte Carlo noise floor ~ S^-1/2 (relu, depth 2, 12 points,
      causal Stein responses: ~1.4% at S = 4096, ~1.1% with Sobol sources; 8 points, 31 steps: ~0.45%
      at S = 16384): if rtol is not reached, raise n_samples or rtol (the README example uses 3e-2).
    - `undamped_above`: while the relative change is above this, take undamped steps (beta = 1),
      then `damping`. Far from the fixed point the causal map propagates the new error signal
      fastest undamped; damping is needed near the Monte Carlo noise floor (where undamped steps
      wander). Tanh, depth 3, 101 times, S = 4096 (benchmarks/monte_carlo.py): `0.1` converged to
      rtol 1e-2 in 11 iterations instead of 17 (damping 0.7 throughout: 14). None (default): off.
      If the residual never falls below it, the solve ends at `max_iters`: lower it or turn it off.
      (The layer sweep inside one step keeps mixing neighbours with `damping`.)
    - `chunk_size`: samples processed at once (bounds memory at O(chunk (n+1) Pa)); must divide S.
    - `responses`: `"stein"` (Gaussian integration by parts as a causal regression, THEORY 5,
      default: cheap, valid for any activation), `"jacobian"` (forward-mode derivative of the sample
      mean, ~(n+1) Pa or `n_directions` forward passes per response; for validation. For relu it
      uses the a.e. derivative, which misses the delta(h(t)) z(t) part of the equal-time Bbar(t, t):
      use Stein for relu) or `"none"` (A = B = 0: the gradient independence approximation).
      Stein divides its sample sums by gamma0, so at small gamma0 its responses are noisy: for the
      O(gamma0^2) part of the kernels (tanh, depth 2, gamma0 = 0.1, antithetic, S = 65536) it was
      11-19% off where the Jacobian route matched perturbation theory (tests/test_approximations.py).
    - `n_directions`: with `responses="jacobian"`, differentiate along the top `n_directions`
      eigenvectors of each source covariance only (cost ~ n_directions forward passes instead of
      (n+1) Pa); None: all.
    - `rcond`: ridge of the Stein regression, relative to the mean eigenvalue of the source covariance.
    - `sampling`: `"plain"` (default, independent normals), `"antithetic"`: pairs `(e_u, +-e_r)`
      (see `_normals`), which cancel the leading, pure-noise part of both Stein sums (response noise
      25-31x smaller at gamma0 = 0.05; at gamma0 = 1 no gain: over 16 keys at equal cost 0.9x / 0.8x
      (loss / NTK, tanh, depth 2), 1.2x / 1.1x (depth 3), 1.1x / 1.0x (relu, depth 2; 6 keys had
      suggested 2.4x for the loss): benchmarks/monte_carlo.py). Needs even blocks.
      `"sobol"`: randomised quasi-Monte Carlo (a digitally shifted Sobol net, its leading
      coordinates on the directions of largest source variance; see `_sobol_normals`), unbiased,
      ~1.1-1.35x the cost per iteration of plain (the rotation onto the axes). At gamma0 = 1, S = 4096,
      the spread of the final loss / NTK over keys is smaller by 7x / 3.4x (tanh, depth 1, 8
      points), 14x / 4.1x (tanh, depth 2, 8 points); at equal cost on the benchmark problems (16
      keys) by 4.9x / 3.7x (tanh, depth 2), 11.2x / 3.9x (tanh, depth 3), 3.9x / 3.8x (relu,
      depth 2). Needs n_samples a power of
      2. Its error can fall below the default `rtol`'s stopping error (~2.5e-4 of the loss on a
      depth-1 linear problem): lower `rtol` to benefit (smooth activations converge geometrically).
      The batch-means `stderr` (blocks of one shifted net) is then conservative.
    - `control_variates`: subtract from every sample moment that of the lazy fields of the same
      sources, `psi(u)` and `chi(u) r` (`(psi, chi) = activation.control()`: the activation itself
      where its Gaussian kernels have a closed form, a fitted erf / Gaussian pair for tanh), and add
      back their exact means (closed-form kernels of the source covariances; the controls' Stein
      moments vanish). Unbiased, about the cost of the plain map; what is left is the part of the
      fields that feature learning moved. With `sampling="sobol"` it gives the smallest errors
      measured: the standard error of the final loss / NTK (spread over 16 keys at gamma0 = 1,
      S = 4096, 30 steps, P = 10) against plain sampling at equal cost is 6.9x / 6.0x smaller
      (tanh, depth 2), 14.6x / 7.9x (tanh, depth 3), 4.6x / 4.3x (relu, depth 2); control
      variates alone 2.6x / 2.7x, 3.5x / 2.7x, 2.1x / 2.2x (`benchmarks/monte_carlo.py`).
      Needs an activation with a control pair (not a custom callable).
    - `n_batches`: batches for the batch-means standard errors in `Solution.stderr` (must divide the
      number of chunks).

    Depth 1 uses the fast path of THEORY 7 (equal-time kernels only, `Solution.Phi = None`).
    `Solution.stderr` holds batch-means standard errors of `f`, `loss`, `ntk` (and test fields): the
    spread of the NTK and predictions computed from `n_batches` disjoint sample blocks in the last
    map applications (carried in the state). It measures the sampling noise of the map; the feedback
    of that noise through the self-consistency is not included, and on deep linear test problems the
    spread over independent keys was 1.4-1.6 times larger. For a rigorous error bar, solve with
    several keys.
    """

    n_samples: int = eqx.field(static=True, default=4096)
    damping: float = 0.5
    rtol: float = 1e-2
    max_iters: int = eqx.field(static=True, default=100)
    chunk_size: int = eqx.field(static=True, default=1024)
    responses: str = eqx.field(static=True, default="stein")
    rcond: float = 1e-3
    sampling: str = eqx.field(static=True, default="plain")
    n_batches: int = eqx.field(static=True, default=8)
    n_directions: int | None = eqx.field(static=True, default=None)
    control_variates: bool = eqx.field(static=True, default=False)
    undamped_above: float | None = None

    @property
    def _chunk(self):
        return min(self.chunk_size, self.n_samples)

    @property
    def _slices(self):
        """Batches per chunk: 1 when whole chunks form the batches, else each chunk is cut into
        n_batches slices (see `_to_batches`)."""
        return 1 if (self.n_samples // self._chunk) % self.n_batches == 0 else self.n_batches

    def validate(self, problem):
        if self.n_samples < 2:
            raise ValueError(f"n_samples must be >= 2, got {self.n_samples}")
        if self.n_samples % self._chunk:
            raise ValueError(f"chunk_size {self.chunk_size} must divide n_samples {self.n_samples}")
        n_chunks = self.n_samples // self._chunk
        if n_chunks % self.n_batches and self._chunk % self.n_batches:
            raise ValueError(
                f"n_batches {self.n_batches} must divide the number of chunks ({n_chunks}) or the chunk size"
            )
        if self.responses not in _RESPONSES:
            raise ValueError(f"responses must be one of {_RESPONSES}, got {self.responses!r}")
        if self.sampling not in _SAMPLING:
            raise ValueError(f"sampling must be one of {_SAMPLING}, got {self.sampling!r}")
        block = self._chunk // self._slices
        if self.sampling == "antithetic" and block % 2:
            raise ValueError(
                f"antithetic sampling needs even sample blocks (pairs), got {block}: "
                "make chunk_size (or chunk_size / n_batches) even"
            )
        if self.sampling == "sobol" and self.n_samples & (self.n_samples - 1):
            raise ValueError(f"sobol sampling needs n_samples a power of 2 (a whole Sobol net), got {self.n_samples}")
        if self.control_variates and problem.activation.control() is None:
            raise ValueError(
                f"control_variates=True needs an activation with a closed-form control pair "
                f"(linear, relu, erf, tanh), got {problem.activation.name!r}: pass control_variates=False"
            )
        if self.undamped_above is not None and not self.undamped_above > self.rtol:
            raise ValueError(f"undamped_above must be None or above rtol ({self.rtol}), got {self.undamped_above}")
        if not 0 < self.damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {self.damping}")
        if self.max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {self.max_iters}")
        n = (problem.n_steps + 1) * problem.data.Kx.shape[0]
        if self.n_directions is not None and not 1 <= self.n_directions <= n:
            raise ValueError(
                f"n_directions must be None or in [1, (n_steps + 1) * points = {n}], got {self.n_directions}"
            )

    # ----------------------------------------------------------------------------------------------
    def init(self, problem, key):
        Phi, G, _ = lazy_kernels(problem)
        L, T, Pa = problem.depth, problem.n_steps + 1, Phi.shape[-1]
        batches = lambda X: jnp.broadcast_to(X[None, :, None], (self.n_batches, L, T, Pa, Pa))
        if L == 1:
            tile = lambda X: jnp.broadcast_to(X[:, None], (1, T, Pa, Pa))
            empty = jnp.zeros((0, T, Pa, Pa), Phi.dtype)
            return _State(tile(Phi), tile(G), empty, empty, batches(Phi), batches(G))
        tile = lambda X: jnp.broadcast_to(X[:, None, :, None, :], (L, T, Pa, T, Pa))
        zeros = jnp.zeros((L - 1, T, Pa, T, Pa), Phi.dtype)
        return _State(tile(Phi), tile(G), zeros, zeros, batches(Phi), batches(G))

    def damping_at(self, change):
        if self.undamped_above is None:
            return self.damping
        return jnp.where(change > self.undamped_above, 1.0, self.damping)

    def monitor(self, state):
        # Convergence is judged on the kernels. The responses are auxiliary and, for non-smooth
        # activations (relu: phi' is a step), the common-random-number map is only piecewise
        # continuous, so every order parameter keeps moving at a Monte Carlo noise floor (measured:
        # ~0.1% for Phi, ~0.5% for G, ~5% for A, B at S = 4096, depth 2); rtol must sit above it.
        # The default 1e-2 is at the level of the kernels' own Monte Carlo error, ~S^-1/2.
        return state.Phi, state.G

    def step(self, problem, state, key):
        return (self._two_layer if problem.depth == 1 else self._deep)(problem, state, key)

    def postprocess(self, problem, state, key):
        Kx, y = problem.data.Kx, problem.data.y
        two_layer = problem.depth == 1
        Phi_eq = state.Phi if two_layer else equal_time(state.Phi)
        G_eq = state.G if two_layer else equal_time(state.G)
        K = ntk_from_kernels(Kx, Phi_eq, G_eq)
        f = euler_predictions(K, y, problem.dt, problem.eta0)
        fields = prediction_fields(problem, K, f)
        # Batch means: kernels from disjoint sample blocks, carried in the state by the last steps.
        K_b = jax.vmap(lambda P_, G_: ntk_from_kernels(Kx, P_, G_))(state.Phi_eq_batches, state.G_eq_batches)
        f_b = jax.vmap(lambda K_: euler_predictions(K_, y, problem.dt, problem.eta0))(K_b)
        per_batch = jax.vmap(lambda K_, f_: prediction_fields(problem, K_, f_))(K_b, f_b)
        B = self.n_batches
        stderr = {
            k: jnp.std(v, axis=0, ddof=1) / jnp.sqrt(B) for k, v in per_batch.items() if k != "ts" and v is not None
        }
        return dict(
            **fields,
            Phi_eq=Phi_eq,
            G_eq=G_eq,
            Phi=None if two_layer else state.Phi,
            G=None if two_layer else state.G,
            A=None if two_layer else state.A,
            B=None if two_layer else state.B,
            stderr=stderr,
        )

    # ----------------------------------------------------------------------------------------------
    def _deep(self, problem, state, key):
        L, Kx = problem.depth, problem.data.Kx
        T, Pa = state.Phi.shape[1:3]
        gamma0, act = problem.gamma0, problem.activation
        c = problem.dt * problem.eta0 / problem.P
        Delta = error_signal(problem, ntk_from_kernels(Kx, equal_time(state.Phi), equal_time(state.G)))
        mask = jnp.tril(jnp.ones((T, T), Kx.dtype), -1)[:, None, :, None]
        Dcols = Delta[None, None]  # (1, 1, T, Pa): Delta_nu(s) on the column index
        ones = jnp.ones((T, Pa, T, Pa), Kx.dtype)
        safe_gamma = jnp.where(gamma0 > 0, gamma0, 1.0)
        Phi_new, G_new, A_new, B_new, bP, bG = [], [], [], [], [], []
        Lx = _factor(Kx)[0]
        # Gauss-Seidel over the layers: layer l + 1 sees this sweep's Phi^l, Abar^l, damped as `solve`
        # will damp them. Jacobi (the previous iterate throughout) needs a sweep per layer to carry a
        # change forward. On the benchmark problem (tanh, depth 3, S = 4096, 40 steps; measured with
        # Cholesky source factors) the sweep cut the iterations to rtol 1e-2 from 15 to 12 at damping
        # 0.5 and from 12 to 8 at 0.7.
        for l in range(L):  # layer l + 1 of THEORY
            first, last = l == 0, l == L - 1
            Phi_prev = (
                jnp.broadcast_to(Kx[:, None, :], (T, Pa, T, Pa))
                if first
                else damped(state.Phi[l - 1], Phi_new[-1], self.damping)
            )
            A_prev = 0.0 if first else damped(state.A[l - 1], A_new[-1], self.damping)
            G_next = ones if last else state.G[l + 1]
            B_l = 0.0 if last else state.B[l]
            C = A_prev + c * mask * Phi_prev * Dcols
            D = B_l + c * mask * G_next * Dcols
            Lu, Vu = (Lx, None) if first else _factor(Phi_prev.reshape(T * Pa, T * Pa))
            Lr, Vr = (None, None) if last else _factor(G_next.reshape(T * Pa, T * Pa))
            axes = self._layer_axes(problem, l, T)
            m = self._moments(act, gamma0, jr.fold_in(key, l), (T, Pa), (Lu, Lr), (Vu, Vr), axes, C, D, first, last)
            # The covariances the Stein regressions use: the kernels themselves (sample estimates are
            # positive semi-definite), or with control variates, whose estimates need not be, those
            # the sources really have (Lu Lu^T with negative eigenvalues clipped; layer 1: u constant).
            Su, Sr = Phi_prev, G_next
            if self.control_variates:  # add back the exact means of the controls subtracted in _moments
                Su = jnp.kron(jnp.ones((T, T), Kx.dtype), Lu @ Lu) if first else Lu @ Lu  # (T Pa, T Pa)
                Sr = 1.0 if last else Lr @ Lr
                E_psi, E_chi = _control_means(act.control(), Su, Sr)
                m["Phi"], m["G"] = m["Phi"] + E_psi, m["G"] + E_chi
                m["Phi_eq_batches"] = m["Phi_eq_batches"] + equal_time(E_psi.reshape(T, Pa, T, Pa))
                m["G_eq_batches"] = m["G_eq_batches"] + equal_time(E_chi.reshape(T, Pa, T, Pa))
            Phi_new.append(m["Phi"].reshape(T, Pa, T, Pa))
            G_new.append(m["G"].reshape(T, Pa, T, Pa))
            bP.append(m["Phi_eq_batches"])
            bG.append(m["G_eq_batches"])
            if not last:
                A_new.append(self._response(m, "A", Sr, safe_gamma, gamma0, T, Pa))
            if not first:
                B_new.append(self._response(m, "B", Su, safe_gamma, gamma0, T, Pa))
        return _State(
            jnp.stack(Phi_new), jnp.stack(G_new), jnp.stack(A_new), jnp.stack(B_new), jnp.stack(bP, 1), jnp.stack(bG, 1)
        )

    def _response(self, m, name, K, safe_gamma, gamma0, T, Pa):
        """Abar (name "A") or Bbar ("B") from the moments m; `K (T, Pa, T, Pa)`: the covariance of the
        differentiated source."""
        if self.responses == "none":
            return jnp.zeros((T, Pa, T, Pa), K.dtype)
        lag = 1 if name == "A" else 0  # Abar strictly causal, Bbar with its equal-time block
        if self.responses == "jacobian":
            R = m[name + "_jac"] * _time_mask(T, Pa, lag, K.dtype)
        else:
            R = _causal_stein(m[name], K.reshape(T * Pa, T * Pa), self.rcond, T, Pa, lag)
        return jnp.where(gamma0 > 0, R / safe_gamma, 0.0).reshape(T, Pa, T, Pa)

    def _layer_axes(self, problem, l, T):
        """`(axes of u, axes of r)` of THEORY layer l + 1 for the quasi-random sources (sobol only):
        from Kx (u of layer 1, constant in time) and the lazy kernels; None for the scalar r of the
        last layer."""
        if self.sampling != "sobol":
            return None, None
        Phi0, G0 = lazy_kernels(problem)[:2]
        axes_u = _sobol_axes(problem.data.Kx, 1) if l == 0 else _sobol_axes(Phi0[l - 1], T)
        return axes_u, None if l == problem.depth - 1 else _sobol_axes(G0[l + 1], T)

    def _draw(self, key, i, axes, shape_u, shape_r, dtype):
        """Standard normals `(e_u, e_r)` for chunk i, the same in every iteration (common random
        numbers). `axes`: the quasi-random axes of u and r (sobol only, see `_sobol_normals`)."""
        if self.sampling == "sobol":
            return _sobol_normals(key, i * self._chunk, self._chunk, self.n_samples, *axes, shape_u, shape_r, dtype)
        return _normals(jr.fold_in(key, i), self._chunk, shape_u, shape_r, self.sampling == "antithetic")

    def _moments(self, act, gamma0, key, shape, factors, eigvecs, axes, C, D, first, last):
        """Sample averages for one layer over (T Pa): <phi phi^T>, <g g^T> and the Stein moments
        <phi r^T>, <g u^T> (lower time blocks only, `_lower_products`)."""
        T, Pa = shape
        (Lu, Lr), chunk, n_chunks = factors, self._chunk, self.n_samples // self._chunk
        need_A = not last and self.responses == "stein"
        need_B = not first and self.responses == "stein"

        def sources(i):
            shape_u, shape_r = (Pa,) if first else (T * Pa,), () if last else (T * Pa,)
            e_u, e_r = self._draw(key, i, axes, shape_u, shape_r, C.dtype)
            return _sources(e_u, e_r, Lu, Lr, T, Pa, first, last)

        def one_chunk(acc, i):
            u, r = sources(i)
            phis, gs = _fields(act, gamma0, u, r, C, D)
            phi0 = g0 = None
            if self.control_variates:
                # Control variates: the lazy fields psi(u), chi(u) r of the same sources (the field
                # at gamma0 -> 0, with the control pair of the activation). Their exact means are
                # added back in `_deep`; their sample moments are subtracted here.
                ctrl = act.control()
                phi0, g0 = ctrl.fn(u).reshape(chunk, -1), (ctrl.dfn(u) * r).reshape(chunk, -1)
            out = {"Phi": _gram(phis, phi0), "G": _gram(gs, g0)}
            # The controls' Stein moments <psi(u) r^T>, <chi(u) r u^T> vanish exactly (u, r independent).
            if need_A:
                out["A"] = _lower_products(_minus(phis, phi0), r.reshape(chunk, -1), T, Pa)
            if need_B:
                out["B"] = _lower_products(_minus(gs, g0), u.reshape(chunk, -1), T, Pa)
            acc = jax.tree.map(jnp.add, acc, out)
            eq = lambda x: (lambda xr: jnp.einsum("bstm,bstn->btmn", xr, xr))(x.reshape(nb_in, -1, T, Pa))
            eq_cv = lambda x, x0: eq(x) if x0 is None else eq(x) - eq(x0)
            return acc, (eq_cv(phis, phi0), eq_cv(gs, g0))

        # Batches for the standard errors: whole chunks, or equal slices of each chunk.
        nb_in = self._slices
        n = T * Pa
        acc0 = {"Phi": jnp.zeros((n, n)), "G": jnp.zeros((n, n))}
        if need_A:
            acc0["A"] = jnp.zeros((n, n))
        if need_B:
            acc0["B"] = jnp.zeros((n, n))
        acc0 = jax.tree.map(lambda x: x.astype(C.dtype), acc0)
        acc, (eqP, eqG) = jax.lax.scan(one_chunk, acc0, jnp.arange(n_chunks))
        out = {k: v / self.n_samples for k, v in acc.items()}
        out["Phi_eq_batches"], out["G_eq_batches"] = (self._to_batches(x, nb_in) for x in (eqP, eqG))
        if self.responses == "jacobian":
            out.update(self._jacobians(act, gamma0, key, sources, eigvecs, C, D, first, last, n_chunks))
        return out

    def _to_batches(self, per_chunk, nb_in):
        """(n_chunks, nb_in, T, Pa, Pa) block sums -> (n_batches, T, Pa, Pa) block means."""
        per_block = self.n_samples // self.n_batches
        if nb_in > 1:  # each chunk was split into n_batches slices: batch b = slice b of every chunk
            return per_chunk.sum(0) / per_block
        x = per_chunk[:, 0]  # whole chunks form the batches
        return x.reshape(self.n_batches, -1, *x.shape[1:]).sum(1) / per_block

    def _jacobians(self, act, gamma0, key, sources, eigvecs, C, D, first, last, n_chunks):
        """<d phi(h)/d r> and <d g/d u> by forward-mode differentiation of the sample means, along the
        top `n_directions` eigenvectors V of the source covariance: `R = (R V) V^T`.

        The responses act only on fields in the range of that covariance (Abar^l on g^{l+1}, whose
        covariance G^{l+1} is that of r^l; Bbar^{l-1} on phi(h^{l-1}), covariance Phi^{l-1}), so the
        dropped directions carry at most their eigenvalues' share of the field's variance.
        """
        T, Pa = C.shape[:2]
        k = self.n_directions or T * Pa
        out = {}

        def along(fn, V):  # (R V) V^T, R the Jacobian of fn at 0
            V = V[:, -k:]
            return jax.jacfwd(lambda a: fn(V @ a))(jnp.zeros(k, C.dtype)) @ V.T

        def mean_over_samples(fn):
            def total(i):
                u, r = sources(i)
                return fn(u, r)

            return jax.lax.map(total, jnp.arange(n_chunks)).sum(0) / self.n_samples

        if not last:
            phi_sum = lambda dr: mean_over_samples(
                lambda u, r: _fields(act, gamma0, u, r + dr.reshape(T, Pa), C, D)[0].sum(0)
            )
            out["A_jac"] = along(phi_sum, eigvecs[1])
        if not first:
            g_sum = lambda du: mean_over_samples(
                lambda u, r: _fields(act, gamma0, u + du.reshape(T, Pa), r, C, D)[1].sum(0)
            )
            out["B_jac"] = along(g_sum, eigvecs[0])
        return out

    def _two_layer(self, problem, state, key):
        """THEORY 7 fast path: u ~ N(0, Kx) constant, r scalar, equal-time kernels only (O(S P^2) memory)."""
        Kx, act, gamma0 = problem.data.Kx, problem.activation, problem.gamma0
        T, Pa = state.Phi.shape[1:3]
        c = problem.dt * problem.eta0 / problem.P
        Delta = error_signal(problem, ntk_from_kernels(Kx, state.Phi, state.G))
        Lx, axes = _factor(Kx)[0], self._layer_axes(problem, 0, T)
        n_chunks, nb_in = self.n_samples // self._chunk, self._slices

        blocks = lambda x: jnp.einsum("bsm,bsn->bmn", *(x.reshape(nb_in, -1, Pa),) * 2)
        ctrl = act.control() if self.control_variates else None

        def one_chunk(acc, i):
            e_u, r = self._draw(key, i, axes, (Pa,), (), Kx.dtype)
            u = e_u @ Lx.T

            def step(carry, Delta_t):
                h_mem, z = carry  # h_mem = gamma0 sum_{s<t} c Kx (Delta(s) * g(s)); z(t) = w(t)
                h = u + h_mem
                phi, g = act.fn(h), act.dfn(h) * z[:, None]
                h_mem = h_mem + gamma0 * c * (Delta_t * g) @ Kx
                z = z + gamma0 * c * phi @ Delta_t
                return (h_mem, z), (blocks(phi), blocks(g))

            _, (bP, bG) = jax.lax.scan(step, (jnp.zeros_like(u), r), Delta)  # (T, nb_in, Pa, Pa)
            bP, bG = jnp.swapaxes(bP, 0, 1), jnp.swapaxes(bG, 0, 1)
            if ctrl is not None:  # control variates (see `_moments`): the lazy fields, constant in time
                bP, bG = bP - blocks(ctrl.fn(u))[:, None], bG - blocks(ctrl.dfn(u) * r[:, None])[:, None]
            acc = (acc[0] + bP.sum(0), acc[1] + bG.sum(0))
            return acc, (bP, bG)

        zeros = jnp.zeros((T, Pa, Pa), Kx.dtype)
        (sP, sG), (cP, cG) = jax.lax.scan(one_chunk, (zeros, zeros), jnp.arange(n_chunks))
        Phi, G = sP / self.n_samples, sG / self.n_samples
        bP, bG = (self._to_batches(x, nb_in)[:, None] for x in (cP, cG))
        if ctrl is not None:
            E_psi, E_chi = _control_means(ctrl, Lx @ Lx, 1.0)
            Phi, G, bP, bG = Phi + E_psi, G + E_chi, bP + E_psi, bG + E_chi
        return _State(Phi[None], G[None], state.A, state.B, bP, bG)
