"""Nonlinear networks: the alternating Monte Carlo solution of the DMFT (THEORY sections 3-5, 7, 10).

Each application of the map, for every layer l in turn (Gauss-Seidel: this sweep's Phi^{l-1},
Abar^{l-1}, damped with the stage's base damping, and the previous iterate's G^{l+1}, Bbar^l):

1. sources `u ~ N(0, Phi^{l-1})`, `r ~ N(0, G^{l+1})` over the whole (time, point) grid from standard
   normals that are the same every iteration (common random numbers: the map is deterministic);
   layer 1: `u ~ N(0, Kx)` constant in time; layer L: `r` one scalar per sample (`_sampling`);
2. the fields of every sample in one causal pass (`dmft.single_site.fields`);
3. the kernels `Phi^l = <phi phi^T>`, `G^l = <g g^T>` (with control variates: minus the moments of
   the lazy fields, plus their exact means) and the responses `Abar^l`, `Bbar^{l-1}` (`_responses`).

**Two stages.** The samples are split into `n_replicas` independent replicas (independent shifts of
the Sobol net, or independent keys).

1. Pooled: the map with all S samples (half of them in its first iterations, `_PooledStage`; the
   square roots and Stein regressions computed once per layer), iterated from the lazy kernels to
   its noise floor (by continuation in time where the map grows too fast from there). Its fixed
   point is the reported answer: the feedback of the sampling noise through the nonlinear
   self-consistency biases a solve with S samples by O(T Pa / S), the least the samples allow.
2. Replicas: every replica, started at the pooled fixed point, iterates the map with its own S / R
   samples (its square roots to first order around the eigensystems of the centre's source
   covariances, `_sampling.factor_near`: a replica stays within its sampling noise of the centre,
   and the error of the expansion is second order in that noise; a replica whose root would overshoot
   its covariance by more than `_ROOT_TOL` of it, as with few samples per replica, takes the exact
   root) until the replicas' spread, the standard deviation over them of every kernel entry, changes
   per iteration by at most its own statistical uncertainty, 1 / sqrt(2 (R - 1)) (`MonteCarlo.tolerance`;
   relu, whose per-replica maps jitter: until their deviations stop growing).
   The spread of the replicas' answers over sqrt(R) is the error bar: it contains the feedback of
   the noise (each replica's noise propagated through the self-consistency) and is blind to their
   common O(T Pa R / S) bias, which the pooled answer does not have. For a smooth activation the
   replicas run in float32 whatever the problem's precision: the error bar needs a few digits, and
   float32 halves the stage's time and memory on a CPU. relu's replicas do not settle and stop on a
   jittering iterate, which rounding changes; they keep the problem's precision.

**The equal-time response (a correction to THEORY 4, which masks D to s < t).** In the network,
`z^l(t) = W^l(t)^T g^{l+1}(t) / sqrt(N)` and `g^{l+1}(t)` depends on `W^l(0)` through
`u^{l+1}(t) = W^l(0) phi(h^l(t)) / sqrt(N)` at the same time t, so integrating out `W^l(0)` gives
`r^l(t) + gamma0 sum_{s <= t} Bbar^l(t, s) phi(h^l(s))`, with `Bbar^l(t, t) =
gamma0^{-1} <phi''(h(t)) z(t) + phi'(h(t)) dz(t)/du(t)>` (layer l + 1). It vanishes for linear
networks and is O(1), not O(dt), for nonlinear ones. Abar stays strictly causal.

Cost per iteration: O(L S T^2 Pa^2) for the fields and kernels plus O(L (T Pa)^3) (pooled stage) or
O(L R (T Pa)^3) (replica stage) for the square roots and the Stein regressions (S samples in R
replicas, T = n + 1 times, Pa points); memory per device O(L (R / d + 1) (T Pa)^2 + chunk T Pa) on d devices.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from .. import _mesh, costs
from ..dynamics import (
    equal_time,
    error_signal,
    euler_predictions,
    ntk_from_kernels,
    prediction_fields,
    readout_correction,
    split_classes,
    with_classes,
)
from ..single_site import fields, layer_memory, two_layer_fields
from ..solve import AbstractIterativeSolver, _relative_change, damped
from . import _responses, _sampling
from .lazy import lazy_kernels

__all__ = ["MonteCarlo"]

PREDICTIONS = ("euler", "readout")
_WARMUP_ABOVE = 0.3  # the pooled stage's warm-up (half the replicas' samples) while the relative change is above
_WARMUP_MAX = 8  # and for at most this many iterations
_GROWTH_MAX = 8.0  # the pooled map's largest step, relative to the iterate, per layer (`_PooledStage`)
_WINDOW_RTOL = 0.05  # the pooled stage's time window doubles once the relative change is at most this
_RIDGE, _RIDGE_SAMPLES = 1e-3, 512  # the default Stein ridge at this many samples per replica (`rcond`)
_ROOT_TOL = 1e-2  # largest overshoot (bound) of a replica's first-order root, relative to its covariance


class _State(eqx.Module):
    """Order parameters: `Phi (L, T, Pa, T, Pa)`, `G (L, T, Pa C, T, Pa C)`, `A (L-1, T, Pa, T, Pa C)`, `B
    (L-1, T, Pa C, T, Pa)` (Abar^l, Bbar^l for l = 1..L-1; C outputs, `single_site`), with a leading
    replica axis R in `_Replicas.reps`. Depth 1 (THEORY 7) tracks equal times only: `Phi (1, T, Pa, Pa)`,
    `G (1, T, Pa C, Pa C)`, `A`, `B` empty. `eps (T, Pa, C)`: the correction of each Euler step of the
    predictions (`dynamics.readout_correction`; zero for `predictions="euler"`)."""

    Phi: jax.Array
    G: jax.Array
    A: jax.Array
    B: jax.Array
    eps: jax.Array


class _Pooled(eqx.Module):
    """The pooled stage's state: the order parameters `q` (a `_State` without the replica axis), the
    relative standard errors `floor (2,)` of its Phi, G over the replicas' samples (without feedback),
    whether q is a warm-up iterate `warm ()` (bool: made from the samples of the first half of the
    replicas), the warm-up steps left `warm_left ()` (int) and the time window `window ()` (int: the
    last time step iterated; `_PooledStage`)."""

    q: _State
    floor: jax.Array
    warm: jax.Array
    warm_left: jax.Array
    window: jax.Array


class _Replicas(eqx.Module):
    """The replica stage's state: every replica's order parameters `reps` (a `_State`, leading axis R),
    `center`, the pooled fixed point they started from (the reported answer), the eigensystems
    `roots` of the centre's source covariances (`MonteCarlo._roots`), and whether the activation is
    smooth (`MonteCarlo.monitor`)."""

    reps: _State
    center: _State
    roots: list
    smooth: bool = eqx.field(static=True)


class _PooledStage(AbstractIterativeSolver):
    """The first stage of `MonteCarlo`: the map with all replicas' samples pooled, iterated to its noise
    floor (the spread of the replicas' kernels at the current iterate, which leaves out the feedback
    and so stops a little late rather than early).

    Warm-up: while the kernels change by more than `_WARMUP_ABOVE` per iteration (at most
    `_WARMUP_MAX` iterations), the map takes the samples of the first half of the replicas only, at
    about half the cost. So far from the fixed point, the noise of half the samples does not slow the
    iteration; switching later does not pay, since the full map then needs as many iterations to
    remove the half map's noise from its iterate.

    Continuation in time: far from the fixed point, a strongly feature-learning deep map can return
    kernels tens of times its input, whose NTK the Euler rule of the next map cannot step stably (the
    predictions overflow); the fixed point's own steps are far smaller. A map that would move a layer's
    Phi or G by more than `_GROWTH_MAX` times its norm (Frobenius, over the times `0..w`) for some
    w shrinks the time window to the longest such prefix: the iteration continues on the time steps
    `0..window` only, training stopped after the window (the error signal zero after its last step),
    every kernel held at its value at the window's last step beyond it and the responses and read-out
    corrections zero there. The map is causal, so the window's fixed point is, up to sampling noise,
    that of the whole grid restricted to it; once the change is at most `_WINDOW_RTOL` (or the noise
    floor) the window doubles, and the stage cannot end before it covers the grid. On a window of one
    step the step itself is bounded at `_GROWTH_MAX` times the iterate. A map that never grows that
    much (the window starts at the whole grid) is iterated exactly as without the window."""

    mc: MonteCarlo

    max_iters = property(lambda self: self.mc.max_iters)
    damping = property(lambda self: self.mc.damping)
    rtol = property(lambda self: self.mc.rtol)

    def step(self, problem, state, key):
        mc, mesh = self.mc, self.mc._devices()
        warm, n = state.warm_left > 0, problem.n_steps
        active = jnp.arange(mc.n_replicas) < jnp.where(warm, mc.n_replicas // 2, mc.n_replicas)
        x, beta = state.q, mc._beta(problem)
        y, floor = mc._map(problem, x, mc._keys(key), mc._axes(problem), mesh, beta, active=active, window=state.window)
        # The longest prefix of the window on which no layer moves by more than _GROWTH_MAX times itself
        # (at least one step: the kernels at t = 0 are fixed), and the step there bounded.
        growth = _prefix_growth(y, x)
        within = jnp.sum(jnp.cumprod(growth <= _GROWTH_MAX)) - 1
        window = jnp.clip(within, 1, state.window).astype(state.window.dtype)
        q = damped(x, _windowed(y, window), jnp.minimum(1.0, _GROWTH_MAX / growth[window]))
        change = jnp.max(_relative_change((q.Phi, q.G), (x.Phi, x.G)))
        grow = (window == state.window) & (change <= jnp.maximum(_WINDOW_RTOL, jnp.max(floor)))
        window = jnp.where(grow, jnp.minimum(2 * window, n), window)
        left = jnp.where(warm & (change > _WARMUP_ABOVE), state.warm_left - 1, 0)
        return _Pooled(q if mesh is None else _mesh.time_blocks(q, mesh), floor, warm, left, window)

    def monitor(self, state):
        return state.q.Phi, state.q.G

    def secant_view(self, state):
        # The read-out's correction of the predictions: small, and it carries the oscillating mode
        # of deep maps on long grids (zero with predictions="euler": no adaptation).
        return state.q.eps

    def tolerance(self, state):
        # A quarter of the noise floor: the iteration error left then adds at most a few per cent to
        # the error bar. A map that stalls (relu) stops at the floor itself. Neither a warm-up iterate
        # nor one on a part of the time grid ends the stage.
        tol, stall_tol = (self.rtol, self.rtol) if self.rtol is not None else (0.25 * state.floor, state.floor)
        going = state.warm | (state.window < state.q.eps.shape[0] - 1)
        return jnp.where(going, -1.0, tol), jnp.where(going, -1.0, stall_tol)

    def damping_at(self, problem, change, ratio, beta):
        base = self.mc._beta(problem)
        if self.mc.undamped_above is not None:
            return jnp.where(change > self.mc.undamped_above, 1.0, base)
        return _secant(base, ratio, beta) if self.mc._adaptive(problem) else base


class MonteCarlo(AbstractIterativeSolver, _sampling.Replicated):
    """Alternating Monte Carlo DMFT for any depth and activation (relu via its a.e. derivative).

    **Arguments:**

    - `n_samples`: single-site samples S per layer and iteration, over all replicas (error ~ S^-1/2,
      like a network of width S; quasi-random sources do better; the feedback bias is O(T Pa / S)
      for T times and Pa points). None (default): 4096, and 16384 for an activation that is not
      smooth (relu) at depth >= 3, whose error bar at 4096 samples is larger than the half percent of
      the initial loss that the defaults are held to against networks (`benchmarks/RESULTS.md`).
    - `n_replicas`: R independent replicas of S / R samples each (see the module docstring).
      `Solution.stderr` is their spread over sqrt(R), `sd / sqrt(R)`, the standard error of the
      answer; with R - 1 degrees of freedom, +-2.36 stderr is a 95% interval at R = 8. The first
      iterations, while the kernels still change by more than 0.3 per iteration, take the samples of
      R / 2 replicas only (a warm-up at half the cost; the answer is the full map's fixed point).
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
      relative to the mean eigenvalue of the source covariance. It biases the responses, and a smaller
      one amplifies the sampling noise of a replica's S / R samples until the replica stage no longer
      settles. None (default): `1e-3 sqrt(512 R / S)`, which scales with that noise (1e-3 at the
      default 512 samples per replica), so that the bias falls like the standard error as S grows
      instead of staying fixed; a number holds it fixed.
    - `predictions`: `"readout"` (default) takes the predictions from the read-out of the single site,
      `f(t) = gamma0^{-1} <z^L(t) phi(h^L(t))>` (centred), the infinite-width limit of gradient descent
      with step `eta0 dt` on the grid (`networks.train(method="gd")`, `dmft.compare`'s default); it
      is iterated as a correction `eps` of each Euler step (`dynamics.readout_correction`), so the map
      keeps the Euler rule's contraction. `"euler"` steps them by the NTK, `f(t+1) = f(t) + (eta0 dt /
      P) K(t) Delta(t)` (THEORY 4), the rule of `LinearClosure`, `Lazy(discrete=True)` and
      `Perturbative`; it misses gradient descent by O(gamma0^2 dt^2) per step. Both are gradient flow
      to O(dt).
    - `rtol`: None (default) stops the pooled stage when the relative change of the kernels Phi, G per
      iteration is at most a quarter of their Monte Carlo standard error without feedback (the
      spread of the replicas' kernels at the current iterate), so that the iteration adds little to
      the error bar, or at most that standard error once the change has stopped falling (relu's
      map is only piecewise continuous: it stalls); a number stops it at that relative change.
      `Solution.noise_floor` is the relative standard error of the kernels from the replicas.
    - `damping` (beta), `max_iters`: the damped iteration of `dmft.solve` (per stage; a number
      applies to both stages, fixed). None (default): for a smooth activation, adaptive: each stage
      starts undamped (beta = 1) and each update divides the previous beta by `1 - ratio`, within
      [0.1, 1], with `ratio` the secant ratio of the last two changes of the read-out's correction
      `eps` (`dmft.solve`). That cancels the dominant mode: an oscillating one (deep networks on long
      grids) lowers beta, a slow monotone one raises it (with `predictions="euler"` there is no
      `eps`, and beta stays where it starts). For relu fixed at 0.5
      in both stages: its Monte Carlo map is piecewise constant, undamped iterates jitter instead of
      settling, and a ratio of jittering changes says nothing. `undamped_above`: undamped pooled steps
      while the relative change is above this, then the fixed `damping` (or the default's start).
      Whatever the damping, where the pooled map would move a layer's Phi or G by more than 8 times its
      norm, the pooled stage continues in time: it iterates a prefix of the grid, then widens it.
    - `chunk_size`: samples of a replica processed at once (memory O(chunk T Pa)); must divide
      S / R. The result does not depend on it. None (default): up to 1024, halved until the solve
      fits the memory budget.
    - `memory`: the budget of one device (bytes, `"8GB"`, or a fraction of the device; None: half a
      device; `dmft.costs`). `dmft.solve` refuses, before allocating anything, a solve whose
      `dmft.estimate` exceeds it, saying what it needs.
    - `mesh`: the devices the replicas are spread over, each device its R / d replicas (pooled stage:
      their sample sums, added across devices into blocks of rows, so that each device keeps one
      time block of the pooled kernels and responses; replica stage: their maps). The square roots
      and Stein regressions of the pooled stage gather one layer's matrices at a time: they have no
      time-blocked form (eigh). None (default): the largest number d of `jax.devices()` (all processes
      after `jax.distributed.initialize`) that divides R; an int d: the first d devices; or a
      `jax.sharding.Mesh` (all axes flattened) whose size divides R. A key gives the same result on any
      number of devices, up to the order of the sums over replicas (float reassociation).

    Depth 1 uses the equal-time fast path of THEORY 7 (`Solution.Phi = None`).
    """

    n_samples: int | None = eqx.field(static=True, default=None)
    n_replicas: int = eqx.field(static=True, default=8)
    sampling: str = eqx.field(static=True, default="sobol")
    control_variates: bool | None = eqx.field(static=True, default=None)
    responses: str = eqx.field(static=True, default="stein")
    predictions: str = eqx.field(static=True, default="readout")
    rcond: float | None = None
    rtol: float | None = None
    damping: float | None = None
    max_iters: int = eqx.field(static=True, default=100)
    undamped_above: float | None = None
    chunk_size: int | None = eqx.field(static=True, default=None)
    memory: float | str | None = eqx.field(static=True, default=None)
    n_directions: int | None = eqx.field(static=True, default=None)
    mesh: int | jax.sharding.Mesh | None = eqx.field(static=True, default=None)

    def _control(self, problem):
        """The control pair of the activation, or None when control variates are off."""
        return None if self.control_variates is False else problem.activation.control()

    def samples(self, problem):
        return True

    def _filled(self, problem):
        """This solver with `n_samples` chosen for `problem` where it is None (see `n_samples`)."""
        if self.n_samples is not None:
            return self
        kinked_and_deep = not problem.activation.smooth and problem.depth >= 3
        return dataclasses.replace(self, n_samples=16384 if kinked_and_deep else 4096)

    @property
    def _ridge(self):
        """`rcond`, or where it is None its default for the samples per replica."""
        return _RIDGE * math.sqrt(_RIDGE_SAMPLES / self._per_replica) if self.rcond is None else self.rcond

    def validate(self, problem):
        if self.n_samples is None:
            return self._filled(problem).validate(problem)
        S, R = self.n_samples, self.n_replicas
        if R < 2 or S % R or S // R < 2:
            raise ValueError(
                f"n_replicas must be >= 2 (error bars need a spread) and divide n_samples into replicas of "
                f">= 2 samples; got n_samples={S}, n_replicas={R}"
            )
        costs.budget_bytes(self.memory)
        if self._per_replica % self._chunk:
            raise ValueError(f"chunk_size {self.chunk_size} must divide the samples per replica ({self._per_replica})")
        if self.sampling not in _sampling.SAMPLINGS:
            raise ValueError(f"sampling must be one of {_sampling.SAMPLINGS}, got {self.sampling!r}")
        if self.responses not in _responses.RESPONSES:
            raise ValueError(f"responses must be one of {_responses.RESPONSES}, got {self.responses!r}")
        if self.predictions not in PREDICTIONS:
            raise ValueError(f"predictions must be one of {PREDICTIONS}, got {self.predictions!r}")
        n = (problem.n_steps + 1) * problem.data.Kx.shape[0]
        if self.sampling == "sobol":
            if self._per_replica & (self._per_replica - 1):
                raise ValueError(
                    f'sampling="sobol" needs n_samples / n_replicas a power of 2 (a whole Sobol net per '
                    f"replica), got {S} / {R} = {self._per_replica}"
                )
            # Coordinates per sample: u over (time, point) pairs, r over (time, point, class) triples; depth
            # 1 draws u over the points only and r over the classes (THEORY 7).
            C = problem.C
            dim = problem.data.Kx.shape[0] + C if problem.depth == 1 else n * (1 + C)
            if dim > _sampling.SOBOL_MAX_DIM:
                raise ValueError(
                    f'sampling="sobol" needs {dim} coordinates per sample here, more than scipy\'s Sobol '
                    f'limit of {_sampling.SOBOL_MAX_DIM}: use sampling="plain", fewer steps or fewer points'
                )
        if self.sampling == "antithetic" and self._chunk % 2:
            raise ValueError(f'sampling="antithetic" needs an even chunk_size (pairs), got {self._chunk}')
        if self.control_variates and problem.activation.control() is None:
            raise ValueError(
                f"control_variates=True needs an activation with a closed-form control pair (linear, relu, "
                f"erf, tanh), got {problem.activation.name!r}: pass control_variates=None or False"
            )
        if self.rcond is not None and not self.rcond > 0:
            raise ValueError(f"rcond must be None (scaled with the samples per replica) or > 0, got {self.rcond}")
        if self.rtol is not None and not self.rtol >= 0:
            raise ValueError(f"rtol must be None (stop at the noise floor) or >= 0, got {self.rtol}")
        if self.undamped_above is not None and not self.undamped_above > 0:
            raise ValueError(f"undamped_above must be None or > 0, got {self.undamped_above}")
        if self.damping is not None and not 0 < self.damping <= 1:
            raise ValueError(f"damping must be None (automatic) or in (0, 1], got {self.damping}")
        if self.max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {self.max_iters}")
        self._devices()
        if self.n_directions is not None and not 1 <= self.n_directions <= n:
            raise ValueError(
                f"n_directions must be None or in [1, (n_steps + 1) * points = {n}], got {self.n_directions}"
            )

    # -- memory and work -------------------------------------------------------------------------------
    def estimate(self, problem):
        """`dmft.Estimate` of a solve: a model of XLA's buffers (temporaries and outputs) fitted to
        its memory analysis of compiled solves (within 15% at depth >= 2 and 25% at depth 1 on one
        device, 20% at depth >= 2 on meshes of 2-8 devices, on the configurations of
        `benchmarks/RESULTS.md`), and the leading flop counts per iteration (fields and moments
        ~12 S (T Pa)^2 per layer; square roots and Stein regressions ~23 (T Pa)^3 per layer, once
        pooled, R times in the replica stage)."""
        if self.n_samples is None:
            return self._filled(problem).estimate(problem)
        L, T, Pa = problem.depth, problem.n_steps + 1, problem.data.Kx.shape[0]
        R, S, chunk = self.n_replicas, self.n_samples, self._chunk
        mesh = self._devices()
        local = R if mesh is None else R // mesh.size  # replicas per device
        # C outputs: G (and r's covariance) grows C^2-fold, the responses C-fold, Phi not; the model
        # scales each group of kernels by its members' average growth.
        C = problem.C
        # Elements held per replica (in the replica stage's precision) and once (the problem's). relu's
        # replica stage also holds the replicas' deviations that it monitors (`monitor`).
        smooth = problem.activation.smooth
        if L == 1:  # equal-time kernels (T, Pa, Pa): Phi and G
            m = T * Pa * Pa * (1 + C * C) / 2
            replicas, once = (2.9 if smooth else 4.6) * local * m, 6.3 * m + 1.1 * chunk * T * Pa * (1 + C) / 2
            flops = {"pooled": 8.0 * S * m, "replicas": 8.0 * S * m}
        else:  # (L, T Pa, T Pa) kernels and responses: 4 L - 2 of them per replica
            n, k = T * Pa, 4 * L - 2
            grow = (L + L * C * C + 2 * (L - 1) * C) / k  # Phi, G, A, B per layer
            replicas = (2.1 if smooth else 2.7) * local * k * grow * n * n
            # On a mesh the pooled kernels are kept in time blocks, but each device's partial sums and
            # the matrices gathered for the factorisations are whole.
            pooled = (1.2 * k * grow + 6.0 * (1 + C * C)) if mesh is None else 2.1 * k * grow
            # The replicas' reference eigensystems (`_roots`), made in the problem's precision.
            roots = 2.0 * (L - 1) * (1 + C * C)
            once = (pooled + roots) * n * n + 2.75 * chunk * n * (1 + C) / 2
            samples, factors = 12.0 * S * n * n, 23.0 * n**3
            flops = {"pooled": L * (samples + factors), "replicas": L * (samples + R * factors)}
        sizes = {"T Pa": T * Pa, "depth": L, "samples": S, "chunk": chunk, "replicas per device": local}
        item = problem.data.Kx.dtype.itemsize
        memory = replicas * _replica_dtype(problem).itemsize + once * item
        return costs.Estimate(int(memory), costs.budget_bytes(self.memory), flops, sizes)

    def sized(self, problem):
        solver = self._filled(problem)
        if self.chunk_size is None:  # about halve the chunk until it fits; it must divide a replica's samples
            pairs = 2 if self.sampling == "antithetic" else 1
            while not solver.estimate(problem).fits and solver._chunk > 2 * pairs:
                divisors = [c for c in range(pairs, solver._chunk // 2 + 1, pairs) if solver._per_replica % c == 0]
                solver = dataclasses.replace(solver, chunk_size=divisors[-1])
        estimate = solver.estimate(problem)
        if not estimate.fits:
            sizes = ", ".join(f"{k} = {v}" for k, v in estimate.sizes.items())
            raise ValueError(
                f"this solve needs {estimate.memory / 1e9:.3g} GB on one device, more than its memory budget "
                f"of {estimate.budget / 1e9:.3g} GB ({sizes}): raise memory=, spread the replicas over more "
                "devices (mesh=), or use fewer replicas, steps or points"
            )
        return solver

    # -- the iteration protocol: a pooled stage, then the replicas ------------------------------------
    def init(self, problem, key):
        Phi, G, _ = lazy_kernels(problem)
        L, T, Pa, C = problem.depth, problem.n_steps + 1, Phi.shape[-1], problem.C
        G = with_classes(G, C)
        floor, eps = jnp.zeros((2,), Phi.dtype), jnp.zeros((T, Pa, C), Phi.dtype)
        pooled = lambda q: _Pooled(
            q, floor, jnp.array(True), jnp.array(_WARMUP_MAX, jnp.int32), jnp.array(problem.n_steps, jnp.int32)
        )
        if L == 1:
            tile = lambda X: jnp.broadcast_to(X[:, None], (1, T, *X.shape[1:]))
            empty = jnp.zeros((0, T, Pa, Pa), Phi.dtype)
            return pooled(_State(tile(Phi), tile(G), empty, empty, eps))
        tile = lambda X: jnp.broadcast_to(X[:, None, :, None, :], (L, T, X.shape[1], T, X.shape[2]))
        A, B = jnp.zeros((L - 1, T, Pa, T, Pa * C), Phi.dtype), jnp.zeros((L - 1, T, Pa * C, T, Pa), Phi.dtype)
        return pooled(_State(tile(Phi), tile(G), A, B, eps))

    def stages(self):
        return (_PooledStage(self), self)

    def enter(self, problem, state):
        q = _replica_precision(problem, state.q)
        reps = jax.tree.map(lambda x: jnp.broadcast_to(x, (self.n_replicas, *x.shape)), q)
        roots = _replica_precision(problem, self._roots(problem, state.q))
        return _Replicas(reps, state.q, roots, problem.activation.smooth)

    def step(self, problem, state, key):
        # One replica after the other (lax.map, not vmap): batched LAPACK kernels (eigh, cholesky,
        # triangular solves) split their batch over XLA's CPU thread pool and wait for it, and two of
        # them running side by side deadlocked the pool (jaxlib 0.10.2, 2 cores).
        # On the Sobol axes of the problem's own precision: eigenvectors of (near-)degenerate
        # eigenvalues differ between precisions, and then so would the samples.
        beta = self._beta(problem)
        axes, problem = _replica_precision(problem, (self._axes(problem), problem))
        one = lambda sk: self._map(problem, sk[0], sk[1][None], axes, None, beta, state.roots)[0]
        run = lambda reps, keys: jax.lax.map(one, (reps, keys))
        mesh = self._devices()
        run = run if mesh is None else _mesh.shard(run, mesh)
        return _Replicas(run(state.reps, self._keys(key)), state.center, state.roots, state.smooth)

    def damping_at(self, problem, change, ratio, beta):
        base = self._beta(problem)
        return _secant(base, ratio, beta) if self._adaptive(problem) else base

    def _beta(self, problem):
        """The damping beta with which each stage starts (see `damping`)."""
        if self.damping is not None:
            return self.damping
        return 1.0 if problem.activation.smooth else 0.5

    def _adaptive(self, problem):
        """Whether the damping adapts to the iteration (`_secant`): by default, for a smooth activation."""
        return self.damping is None and problem.activation.smooth

    def _devices(self):
        """The mesh the replicas are spread over (`mesh`), or None for one device."""
        return _mesh.resolve(self.mesh, self.n_replicas, "n_replicas")

    def _keys(self, key):
        """The replicas' keys `(R,)`: replica r draws the same samples in both stages."""
        return jax.vmap(lambda r: jr.fold_in(key, r))(jnp.arange(self.n_replicas))

    def monitor(self, state):
        # The replicas converge when their spread, the error bar, has (not their mean: it drifts to the
        # replicas' common bias, which is not reported). Smooth maps: the standard deviation over the
        # replicas of every entry; the deviations themselves keep rotating among the replicas at late
        # times, which depend on the whole history, long after it has settled. relu: the deviations,
        # whose change stops falling as soon as they have stopped growing, so that the stall rule
        # ends the stage then (the jittering replicas keep the standard deviation falling slowly).
        mesh = self._devices()
        if state.smooth:
            return _sampling.replica_std(state.reps.Phi, mesh), _sampling.replica_std(state.reps.G, mesh)
        spread = lambda X: X - _sampling.replica_mean(X, mesh)
        return spread(state.reps.Phi), spread(state.reps.G)

    def secant_view(self, state):
        return state.reps.eps - _sampling.replica_mean(state.reps.eps)

    def noise_floor(self, state):
        """Relative Monte Carlo standard errors `(2,)` of the replica-mean Phi and G (Frobenius norms)."""
        spread, mean, mesh = _sampling.replica_std, _sampling.replica_mean, self._devices()
        rel = lambda X: jnp.linalg.norm(spread(X, mesh)) / jnp.sqrt(self.n_replicas) / jnp.linalg.norm(mean(X, mesh))
        return jnp.stack([rel(state.reps.Phi), rel(state.reps.G)])

    def tolerance(self, state):
        # The spread to its own statistical uncertainty per iteration (`_spread_rtol`, 27% at R = 8):
        # from an undamped start, the spread of what is reported (loss, predictions) is then within
        # ~8% of its converged value, though the change of the spread of every kernel entry, which keeps
        # rotating among the replicas at late times, falls slowly (`benchmarks/RESULTS.md`). Or, for
        # a map that stalls (relu: the replicas jitter by about their own deviation), once the
        # deviations have stopped growing: the jitter is independent between replicas and enters the
        # spread.
        return _spread_rtol(self.n_replicas), 1.0

    def postprocess(self, problem, state, key):
        fields_, kernels = self._fields(problem, state.center)
        rp = _replica_precision(problem, problem)
        per_replica = jax.vmap(lambda s: self._fields(rp, s)[0])(state.reps)
        stderr = _sampling.stderr({k: v for k, v in per_replica.items() if k != "ts"})
        dtype = state.center.Phi.dtype
        stderr, floor = jax.tree.map(lambda x: x.astype(dtype), (stderr, jnp.max(self.noise_floor(state))))
        return dict(**fields_, **kernels, stderr=stderr, noise_floor=floor)

    def _fields(self, problem, s):
        """Prediction fields and kernels of one set of order parameters (a replica's or the answer)."""
        depth1 = problem.depth == 1
        Phi_eq, G_eq = (s.Phi, s.G) if depth1 else (equal_time(s.Phi), equal_time(s.G))
        K = ntk_from_kernels(problem.net, problem.data.Kx, Phi_eq, G_eq, problem.C)
        f = euler_predictions(problem, K, s.eps)
        split = lambda X, *axes: split_classes(problem, X, axes)
        two_time = {} if depth1 else dict(Phi=s.Phi, G=split(s.G, -3, -1), A=split(s.A, -1), B=split(s.B, -3))
        return prediction_fields(problem, K, f), dict(Phi_eq=Phi_eq, G_eq=split(G_eq, -2, -1), **two_time)

    # -- the map, for one replica or pooled ----------------------------------------------------------
    def _axes(self, problem):
        """`[(axes of u, axes of r)]` of every THEORY layer l + 1 for quasi-random sources
        (`_sampling.sobol_axes`, from Kx and the lazy kernels; None for the scalar r of the last
        layer); a None per layer unless sobol."""
        if self.sampling != "sobol":
            return [None] * problem.depth
        Phi0, G0 = lazy_kernels(problem)[:2]
        L, T = problem.depth, 1 if problem.depth == 1 else problem.n_steps + 1
        out = []
        for l in range(L):
            Su = problem.net.preactivation_kernel(problem.data.Kx if l == 0 else Phi0[l - 1])
            axes_r = None if l == L - 1 else _sampling.sobol_axes(G0[l + 1], T, problem.C)
            out.append((_sampling.sobol_axes(Su, 1 if l == 0 else T), axes_r))
        return out

    def _roots(self, problem, q):
        """Per THEORY layer l + 1, the eigensystems `(V, lam)` of the source covariances `(Su, Sr)` of
        the order parameters q (None for layer 1's u, whose covariance is fixed, and layer L's scalar r;
        `[]` at depth 1): the replicas, which stay near q, take their square roots to first order around
        these (`_sampling.factor_near`) instead of eigendecomposing R matrices per layer and iteration."""
        L = problem.depth
        if L == 1:
            return []
        n, nC = q.Phi.shape[1] * q.Phi.shape[2], q.G.shape[1] * q.G.shape[2]
        eig = lambda S, m: jnp.linalg.eigh(S.reshape(m, m))[::-1]
        Su = lambda l: eig(problem.net.preactivation_kernel(q.Phi[l - 1]), n)
        Sr = lambda l: eig(problem.net.sw2 * q.G[l + 1], nC)
        return [(None if l == 0 else Su(l), None if l == L - 1 else Sr(l)) for l in range(L)]

    def _map(self, problem, state, keys, axes, mesh, beta, roots=None, active=None, window=None):
        """One application of the map to `state` (no replica axis) with the samples of the replicas
        `keys (K,)` pooled (or of those that are `active (K,)`, bool), on the Sobol `axes` (`_axes`),
        spread over the devices of `mesh` (None: one device), in a sweep that mixes each new layer
        with the old by damping `beta`: `(new state, floor (2,))`, floor the relative standard errors
        of the new Phi and G from the spread of the replicas' kernels (0 for one replica). `roots`: the
        replica stage's `_roots`, or None to eigendecompose every source covariance. `window`: the error
        signal is zero after this time step (`_PooledStage`), or None: never."""
        if problem.depth == 1:
            return self._two_layer(problem, state, keys, axes, mesh, active, window)
        return self._deep(problem, state, keys, axes, mesh, beta, roots, active, window)

    def _deep(self, problem, state, keys, axes, mesh, beta, roots, active, window):
        L, Kx, C_out = problem.depth, problem.data.Kx, problem.C
        T, Pa = state.Phi.shape[1:3]
        n, nC = T * Pa, T * Pa * C_out
        c = problem.dt * problem.eta0 / problem.P
        K = ntk_from_kernels(problem.net, Kx, equal_time(state.Phi), equal_time(state.G), C_out)
        Delta = _stopped(error_signal(problem, K, state.eps), window)
        ctrl = self._control(problem)
        root = lambda S, ref: (
            _sampling.factor(S) if ref is None else _sampling.factor_near(S, ref, self._ridge, _ROOT_TOL)
        )
        Phi_new, G_new, A_new, B_new = [], [], [], []
        means, variances = [], []
        for l in range(L):  # layer l + 1 of THEORY
            first, last = l == 0, l == L - 1
            if first:
                Phi_prev, A_prev = jnp.broadcast_to(Kx[:, None, :], (T, Pa, T, Pa)), 0.0
            else:  # this sweep's layer below, mixed as `solve` will mix it
                Phi_prev = damped(state.Phi[l - 1], Phi_new[-1], beta)
                A_prev = damped(state.A[l - 1], A_new[-1], beta)
            G_next = None if last else state.G[l + 1]
            B = 0.0 if last else state.B[l]
            Su, Sr, C, D = layer_memory(problem.net, Phi_prev, A_prev, G_next, B, Delta, c)
            # The covariances the sources really have, M^2 (round-off eigenvalues zeroed, or the square of
            # the first-order root near the replicas' centre); u of layer 1 is constant in time, r of
            # layer L one scalar.
            refs = (None, None) if roots is None else roots[l]
            M_u, V_u = root(Su[0, :, 0, :] if first else Su.reshape(n, n), refs[0])
            sw = problem.net.sigma_w
            M_r, V_r = (sw, None) if last else root(Sr.reshape(nC, nC), refs[1])
            Su, Sr = M_u @ M_u, sw**2 if last else M_r @ M_r
            layer_keys = jax.vmap(jr.fold_in, in_axes=(0, None))(keys, l)
            m, var = self._moments(problem, layer_keys, (M_u, M_r), axes[l], C, D, first, last, mesh, active)
            if ctrl is not None:  # the exact means of the control variates subtracted in `_moments`
                E_psi, E_chi = ctrl.kernels(Su)
                if first:  # u of layer 1 is constant in time
                    E_psi, E_chi = jnp.tile(E_psi, (T, T)), jnp.tile(E_chi, (T, T))
                # <chi(u_mu) r_mu c chi(u_nu) r_nu c'> = E_chi_{mu nu} Sr_{mu c, nu c'}; r^L: Sr = sw2 I_C.
                E_g = with_classes(E_chi, C_out) if last else jnp.repeat(jnp.repeat(E_chi, C_out, 0), C_out, 1)
                m["Phi"], m["G"] = m["Phi"] + E_psi, m["G"] + E_g * Sr
            means.append(m)
            variances.append(var)
            if self.responses == "jacobian":
                factors, eigvecs = (M_u, M_r), (V_u, V_r)
                m |= self._jacobians(problem, layer_keys, factors, eigvecs, axes[l], C, D, first, last, active)
            Phi_new.append(m["Phi"].reshape(T, Pa, T, Pa))
            G_new.append(m["G"].reshape(T, Pa * C_out, T, Pa * C_out))
            if not last:
                A_new.append(self._response(problem, m, "A", Sr, T, (n, nC)))
            if not first:
                B_new.append(self._response(problem, m, "B", Su, T, (nC, n)))
        Phi_new, G_new = jnp.stack(Phi_new), jnp.stack(G_new)
        eps = state.eps
        if self.predictions == "readout":  # f(t) = <r phi(h^L(t))> / gamma0 + c sum_{s<t} Phi~^L(t, s) Delta(s)
            Phi_L = problem.net.preactivation_kernel(Phi_new[-1])
            f = _over_gamma0(problem, m["F"].reshape(T, Pa, C_out)) + c * jnp.einsum(
                "tisj,tsjc->tic", Phi_L, jnp.tril(jnp.ones((T, T), Kx.dtype), -1)[:, :, None, None] * Delta[None]
            )
            K_new = ntk_from_kernels(problem.net, Kx, equal_time(Phi_new), equal_time(G_new), C_out)
            eps = self._correction(problem, f, K_new, Delta)
        new = _State(Phi_new, G_new, jnp.stack(A_new), jnp.stack(B_new), eps)
        return new, _floor(means, variances, _count(keys, active))

    @staticmethod
    def _correction(problem, f, K, Delta):
        """`readout_correction`, zero at gamma0 = 0 (where gradient descent is the Euler rule)."""
        return jnp.where(problem.gamma0 > 0, readout_correction(problem, f, K, Delta), 0.0)

    def _response(self, problem, m, name, K, T, shape):
        """Abar (name "A", `shape (T Pa, T Pa C)`) or Bbar ("B", `(T Pa C, T Pa)`) from the moments m, as
        `(T, ., T, .)`; K: covariance of the differentiated source."""
        out = (T, shape[0] // T, T, shape[1] // T)
        if self.responses == "none":
            return jnp.zeros(out, K.dtype)
        lag = 1 if name == "A" else 0  # Abar strictly causal, Bbar with its equal-time block
        if self.responses == "jacobian":
            R = m[name + "_jac"] * _responses.time_mask(T, shape, lag, K.dtype)
        else:
            R = _responses.causal_stein(m[name], K, self._ridge, T, lag)
        return _over_gamma0(problem, R).reshape(out)

    @staticmethod
    def _lazy_readout(ctrl, u, r, psi0, drift, Su, sw2):
        """The control variate of the depth-1 read-out moment `<z phi(h)> - <r phi(u)>` `(T, Pa, C)`:
        its first order in gamma0 with `(psi, chi)` for `(phi, phi')`, divided by gamma0,
        `sw2 drift^T psi psi^T + r chi(u) Su (chi(u) r drift^T)` summed over samples `u (S, Pa)`, `r (S, C)`,
        from `psi0 = psi(u)^T psi(u)` and `drift(t) = c sum_{s<t} Delta(s) (T, Pa, C)`."""
        chi = ctrl.dfn(u)
        read = sw2 * jnp.einsum("ij,tjc->tic", psi0, drift)  # the read-out weights' drift
        a = jnp.einsum("sj,sd,tjd,jk->tsk", chi, r, drift, Su)  # the features' drift, per sample
        return read + jnp.einsum("sk,tsk,sc->tkc", chi, a, r)

    def _sources(self, key, i, factors, axes, T, Pa, C, first, last, dtype):
        du, dr = (Pa if first else T * Pa), (C if last else T * Pa * C)
        e_u, e_r = self._normals(key, i, du, dr, axes, dtype)
        return _sampling.sources(e_u, e_r, *factors, T, Pa, first, last)

    def _moments(self, problem, keys, factors, axes, C, D, first, last, mesh, active):
        """Sample means over the replicas `keys (K,)` of one layer, over (T Pa): `<phi phi^T>`, `<g g^T>` and
        the Stein moments `<phi r^T>`, `<g u^T>` (lower time blocks only), control variates subtracted;
        and the variances over the replicas of the Phi and G moments, entry by entry (`_over_replicas`)."""
        act, gamma0, C_out = problem.activation, problem.gamma0, problem.C
        T, Pa = C.shape[:2]
        chunk, n, nC = self._chunk, T * Pa, T * Pa * C_out
        ctrl = self._control(problem)
        need_A = not last and self.responses == "stein"
        need_B = not first and self.responses == "stein"
        need_F = last and self.predictions == "readout"
        factors, axes = _sampling.fold_axes(factors, axes, keys.shape[0] * self._per_replica)

        def one_chunk(acc, key_i):
            u, r = self._sources(*key_i, factors, axes, T, Pa, C_out, first, last, C.dtype)
            phis, gs = fields(act, gamma0, u, r, C, D)
            phi0 = g0 = None
            if ctrl is not None:  # the lazy fields of the same sources
                phi0 = ctrl.fn(u).reshape(chunk, n)
                g0 = (ctrl.dfn(u)[..., None] * r.reshape(chunk, T, Pa, C_out)).reshape(chunk, nC)
            out = {"Phi": _sampling.gram(phis, phi0), "G": _sampling.gram(gs, g0)}
            # The controls' Stein moments <psi(u) r^T>, <chi(u) r u^T> vanish exactly (u, r independent).
            if need_A:
                out["A"] = _responses.lower_products(_minus(phis, phi0), r.reshape(chunk, nC), T)
            if need_B:
                out["B"] = _responses.lower_products(_minus(gs, g0), u.reshape(chunk, n), T)
            if need_F:  # <r (phi(h) - phi(u))>: phi(u) is independent of the read-out r, its moment is 0
                r_L = r.reshape(chunk, T, Pa, C_out)[:, 0, 0]
                out["F"] = (phis - act.fn(u).reshape(chunk, n)).T @ r_L
            return jax.tree.map(jnp.add, acc, out), None

        shapes = {"Phi": (n, n), "G": (nC, nC), "A": (n, nC), "B": (nC, n), "F": (n, C_out)}
        names = ["Phi", "G"] + ["A"] * need_A + ["B"] * need_B + ["F"] * need_F
        zeros = {k: jnp.zeros(shapes[k], C.dtype) for k in names}
        return _over_replicas(keys, zeros, one_chunk, self._per_replica, chunk, mesh, active)

    def _jacobians(self, problem, keys, factors, eigvecs, axes, C, D, first, last, active):
        """`<d phi(h)/d r>` and `<d g/d u>` by forward mode (`_responses.jacobian_moments`) over the
        samples of the replicas `keys (K,)` of this layer."""
        T, Pa = C.shape[:2]
        chunks = jnp.arange(self._per_replica // self._chunk)

        def mean_over_samples(fn):
            total = lambda key, i: fn(*self._sources(key, i, factors, axes, T, Pa, problem.C, first, last, C.dtype))
            per_key = lambda key: jax.lax.map(lambda i: total(key, i), chunks).sum(0)
            per_replica = jax.lax.map(per_key, keys)
            if active is not None:  # (computed for every replica: a validation mode)
                per_replica = jnp.where(active.reshape(-1, *[1] * (per_replica.ndim - 1)), per_replica, 0)
            return per_replica.sum(0) / (_count(keys, active) * self._per_replica)

        field_fn = lambda u, r: fields(problem.activation, problem.gamma0, u, r, C, D)
        return _responses.jacobian_moments(mean_over_samples, field_fn, eigvecs, self.n_directions, first, last)

    def _two_layer(self, problem, state, keys, axes, mesh, active, window):
        """THEORY 7: u ~ N(0, Kx) constant, r (one per class) constant, equal-time kernels only (O(S Pa^2 C^2)
        memory)."""
        Kx, act, gamma0, C = problem.data.Kx, problem.activation, problem.gamma0, problem.C
        T, Pa = state.Phi.shape[1:3]
        c = problem.dt * problem.eta0 / problem.P
        net = problem.net
        Delta = _stopped(error_signal(problem, ntk_from_kernels(net, Kx, state.Phi, state.G, C), state.eps), window)
        Su = net.preactivation_kernel(Kx)
        M_u = _sampling.factor(Su)[0]
        ctrl = self._control(problem)
        readout = self.predictions == "readout"
        # sum_{s<t} Delta(s) (T, Pa, C), times c: the read-out's lazy drift per unit of <phi phi^T>.
        drift = c * (jnp.cumsum(Delta, 0) - Delta)

        def one_chunk(acc, key_i):
            e_u, e_r = self._normals(*key_i, Pa, C, axes[0], Kx.dtype)
            u, r = e_u @ M_u.T, net.sigma_w * e_r
            # The read-out's moment <z phi(h)> - <r phi(u)> (the second term has mean 0, a control variate).
            rphi0 = act.fn(u).T @ r
            moments = lambda phi, g, z: (phi.T @ phi, g.T @ g) + ((phi.T @ z - rphi0,) if readout else ())
            Phi, G, *F = two_layer_fields(act, gamma0, c, Su, net.sw2, u, r, Delta, moments)
            if ctrl is not None:  # control variates (see `_moments`): the lazy fields, constant in time
                g0 = (ctrl.dfn(u)[:, :, None] * r[:, None, :]).reshape(r.shape[0], Pa * C)
                psi0 = _sampling.gram(ctrl.fn(u))
                Phi, G = Phi - psi0, G - _sampling.gram(g0)
                if readout:
                    F = [F[0] - gamma0 * self._lazy_readout(ctrl, u, r, psi0, drift, Su, net.sw2)]
            return jax.tree.map(jnp.add, acc, {"Phi": Phi, "G": G} | ({"F": F[0]} if readout else {})), None

        zeros = {"Phi": jnp.zeros((T, Pa, Pa), Kx.dtype), "G": jnp.zeros((T, Pa * C, Pa * C), Kx.dtype)}
        zeros |= {"F": jnp.zeros((T, Pa, C), Kx.dtype)} if readout else {}
        m, var = _over_replicas(keys, zeros, one_chunk, self._per_replica, self._chunk, mesh, active)
        if ctrl is not None:
            E_psi, E_chi = ctrl.kernels(M_u @ M_u)
            m |= {"Phi": m["Phi"] + E_psi, "G": m["G"] + with_classes(E_chi, C) * net.sw2}
            if readout:  # the control's exact mean: the control pair's lazy NTK applied to the drift
                m["F"] = m["F"] + gamma0 * net.sw2 * jnp.einsum("ij,tjc->tic", E_psi + Su * E_chi, drift)
        eps = state.eps
        if readout:  # f(t) = <z phi(h)> / gamma0 plus the read-out bias's drift
            f = _over_gamma0(problem, m["F"]) + net.sigma_b**2 * drift.sum(1, keepdims=True)
            K_new = ntk_from_kernels(net, Kx, m["Phi"][None], m["G"][None], C)
            eps = self._correction(problem, f, K_new, Delta)
        new = _State(m["Phi"][None], m["G"][None], state.A, state.B, eps)
        return new, _floor([m], [var], _count(keys, active))


def _over_replicas(keys, zeros, one_chunk, per_replica, chunk, mesh, active=None):
    """Sample means `{name: (...)}` over every chunk of the replicas `keys (K,)`, or of those that are
    `active (K,)` (bool), accumulated by `one_chunk(acc, (key, i)) -> (acc, None)` from `zeros`, and the
    variances across those replicas of the replica means of "Phi" and "G", entry by entry (zero for one
    replica). The replicas are spread over the devices of `mesh` (None: one device), each summing its own."""

    def add(carry, key):
        total, squares = carry
        acc, _ = jax.lax.scan(lambda a, i: one_chunk(a, (key, i)), zeros, jnp.arange(per_replica // chunk))
        m = {k: v / per_replica for k, v in acc.items()}
        squares = {k: squares[k] + m[k] ** 2 for k in squares}
        return jax.tree.map(jnp.add, total, m), squares

    def one_replica(carry, key_on):
        key, on = key_on
        if on is None:
            return add(carry, key), None
        return jax.lax.cond(on, add, lambda carry, key: carry, carry, key), None

    def sums(keys, *active):
        squares = {k: zeros[k] for k in ("Phi", "G")}
        on = active[0] if active else None
        return jax.lax.scan(one_replica, (zeros, squares), (keys, on))[0]

    args = (keys,) if active is None else (keys, active)
    total, squares = sums(*args) if mesh is None else _mesh.shard(sums, mesh, reduce=True)(*args)
    K = _count(keys, active)
    mean = {k: v / K for k, v in total.items()}
    var = {k: (squares[k] - K * mean[k] ** 2) / jnp.maximum(K - 1, 1) for k in squares}
    return mean, var


def _windowed(q, window):
    """The order parameters q on the time steps `0..window` (`_PooledStage`): kernels beyond it held at
    their value at `window` (in both times), responses and read-out corrections zero beyond it; q
    itself when the window covers the grid."""

    def hold(q):
        T = q.eps.shape[0]
        t = jnp.arange(T)
        idx, inside = jnp.minimum(t, window), t <= window
        held = lambda X: X[:, idx] if X.ndim == 4 else X[:, idx][:, :, :, idx]  # depth 1: equal times
        both = (inside[:, None] & inside[None, :])[None, :, None, :, None]
        A, B = (q.A, q.B) if q.A.ndim == 4 else (jnp.where(both, q.A, 0.0), jnp.where(both, q.B, 0.0))
        return _State(held(q.Phi), held(q.G), A, B, jnp.where(inside[:, None, None], q.eps, 0.0))

    return jax.lax.cond(window < q.eps.shape[0] - 1, hold, lambda q: q, q)


def _stopped(Delta, window):
    """The error signal `Delta (T, Pa, C)` zero after the time step `window` (None: unchanged)."""
    return Delta if window is None else jnp.where((jnp.arange(Delta.shape[0]) <= window)[:, None, None], Delta, 0.0)


def _prefix_growth(new, old):
    """`(T,)`: for every time step w, the largest relative step `|new - old| / |old|` over the layers of
    Phi and G, Frobenius norms over the times `0..w`."""

    def squares(X):  # (L, T): each layer's squared norm over the times 0..w
        if X.ndim == 4:  # equal times (depth 1)
            return jnp.cumsum((X**2).sum((2, 3)), 1)
        return jnp.diagonal(jnp.cumsum(jnp.cumsum((X**2).sum((2, 4)), 1), 2), axis1=1, axis2=2)

    rel = lambda a, b: jnp.sqrt(squares(a - b) / jnp.maximum(squares(b), jnp.finfo(b.dtype).tiny)).max(0)
    return jnp.maximum(rel(new.Phi, old.Phi), rel(new.G, old.G))


def _spread_rtol(R):
    """The relative standard error of a standard deviation over R Gaussian replicas, 1 / sqrt(2 (R - 1)):
    the replica stage's tolerance on the change of their spread."""
    return 1 / (2 * (R - 1)) ** 0.5


def _count(keys, active):
    """The number of replicas whose samples a map uses: those of `keys (K,)`, or the `active (K,)` ones."""
    return keys.shape[0] if active is None else jnp.sum(active)


def _secant(base, ratio, beta):
    """Adaptive damping: the previous update's `beta` (`base` before the first) divided by `1 - ratio`,
    the damping that cancels the dominant mode of the last two changes (their secant `ratio`, `solve`),
    within [0.1, 1]. An oscillating mode (ratio < 0) lowers it, a slow monotone one raises it."""
    beta = jnp.where(jnp.isnan(beta), base, beta)
    return jnp.clip(beta / (1 - jnp.clip(ratio, -0.9, 0.9)), 0.1, 1.0)


def _replica_dtype(problem):
    """The precision of the replica stage: float32 for a smooth activation, the problem's own for a
    non-smooth one (see `MonteCarlo`)."""
    return jnp.dtype(jnp.float32 if problem.activation.smooth else problem.data.Kx.dtype)


def _replica_precision(problem, tree):
    """`tree` with its floating-point arrays in the precision of the replica stage."""
    dtype = _replica_dtype(problem)
    return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)


def _floor(means, variances, K):
    """Relative standard errors `(2,)` of Phi and G pooled over K replicas, Frobenius norms over the
    layers of `means` and `variances` (lists of the `_over_replicas` outputs, exact means added)."""
    rel = lambda k: jnp.sqrt(sum(v[k].sum() for v in variances) / K / sum((m[k] ** 2).sum() for m in means))
    return jnp.stack([rel("Phi"), rel("G")])


def _over_gamma0(problem, X):
    """`X / gamma0`, 0 at gamma0 = 0 (responses and read-out moments multiply gamma0 where they enter)."""
    gamma0 = problem.gamma0
    return jnp.where(gamma0 > 0, X / jnp.where(gamma0 > 0, gamma0, 1.0), 0.0)


def _minus(X, X0):
    return X if X0 is None else X - X0
