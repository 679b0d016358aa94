"""Theory vs experiment: the DMFT, the lazy limit and finite networks of growing width in one call."""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from . import networks
from ._keys import as_key
from .activations import Linear
from .fluctuations import Fluctuations, deep_lazy, deep_propagator
from .fluctuations import fluctuations as fluctuations_of
from .solution import Solution
from .solve import solve
from .solvers import Lazy

__all__ = ["Comparison", "compare", "why_no_fluctuations", "MAX_FLUCTUATION_SIZE"]

MAX_FLUCTUATION_SIZE = 1024
MAX_LAZY_FLUCTUATION_POINTS = 64  # points of a deep network's lazy-limit recursion, whose cost grows like Pa^4
MAX_LINEAR_FLUCTUATION_SIZE = 36  # (time, point) pairs of a deep linear network's propagator
MAX_SAMPLED_FLUCTUATION_COST = 2 * 12**5  # `_sampled_cost` of a depth-2 smooth network at T Pa = 12


class Comparison(eqx.Module):
    """A DMFT solution against the lazy limit and finite networks.

    - `dmft`, `lazy`: `Solution`s; `widths` (static tuple); `runs`: one `networks.Run` per width, each
      with a leading seed axis.
    - `loss_error (W, n+1)`: seed-mean network loss minus DMFT loss, per width and time;
      `loss_se (W, n+1)`: its standard error over seeds.
    - `f_error (W, n+1)`, `ntk_error (W, n+1)`: max over points (entries) of |seed-mean - DMFT|.
    - `max_loss_error (W,)`: max over time of |loss_error| as a fraction of the initial loss.
    - `exponent`: least-squares slope of log max_loss_error against log width (-1/2 to -1 expected).
    - `fluctuations`: the leading-order seed-to-seed covariances (`dmft.fluctuations`) around the DMFT,
      or None (see `compare`); `fluctuations_note`: why they are None where they were asked for (static).
    """

    dmft: Solution
    lazy: Solution
    widths: tuple = eqx.field(static=True)
    runs: tuple
    loss_error: jax.Array
    loss_se: jax.Array
    f_error: jax.Array
    ntk_error: jax.Array
    max_loss_error: jax.Array
    exponent: jax.Array
    fluctuations: Fluctuations | None = None
    fluctuations_note: str | None = eqx.field(static=True, default=None)

    def seed_sd(self, width: int) -> jax.Array:
        """The predicted standard deviation across seeds of the loss `(n+1,)` at `width`."""
        if self.fluctuations is None:
            why = self.fluctuations_note or "compare(..., fluctuations=False)"
            raise ValueError(f"this comparison has no fluctuations: {why}")
        return self.fluctuations.sd("loss", width)


def why_no_fluctuations(problem) -> str | None:
    """Why `compare` does not compute `dmft.fluctuations` for `problem` (see `compare`), or None where it
    does."""
    T, Pa, L = problem.n_steps + 1, problem.data.Kx.shape[0], problem.depth
    if L == 1:
        size = T * problem.P * problem.C
        if size <= MAX_FLUCTUATION_SIZE:
            return None
        return f"{size} (time, point, class) triples, above the {MAX_FLUCTUATION_SIZE} of two-layer networks"
    if deep_lazy(problem):
        if Pa <= MAX_LAZY_FLUCTUATION_POINTS:
            return None
        return f"{Pa} points, above the {MAX_LAZY_FLUCTUATION_POINTS} of deep networks in the lazy limit"
    if float(problem.gamma0) == 0:
        return "no lazy-limit fluctuations for a deep network with this activation or several outputs"
    if not deep_propagator(problem):
        return "no propagator for a deep network with this activation, several outputs, sigma_w != 1 or sigma_b != 0"
    if isinstance(problem.activation, Linear):
        if T * Pa <= MAX_LINEAR_FLUCTUATION_SIZE:
            return None
        return f"{T * Pa} (time, point) pairs, above the {MAX_LINEAR_FLUCTUATION_SIZE} of deep linear networks"
    if _sampled_cost(problem) <= MAX_SAMPLED_FLUCTUATION_COST:
        return None
    return (
        f"{T * Pa} (time, point) pairs at depth {L}: the sampled propagator of deep nonlinear networks costs "
        "~ (T Pa)^5 per layer, and compare computes it up to its cost at 12 pairs and depth 2 (tanh; relu 9)"
    )


def _sampled_cost(problem):
    """The sampled propagator's cost (`_sampled_propagator`) in units of its per-sample work `(T Pa)^5` in
    one outer layer: a middle layer's per-sample tensors are about three times an outer one's, and relu
    is smoothed at three widths."""
    n, L = (problem.n_steps + 1) * problem.data.Kx.shape[0], problem.depth
    return n**5 * (2 + 3 * (L - 2)) * (1 if problem.activation.smooth else 3)


def compare(
    problem,
    solver,
    widths=(256, 1024, 4096),
    seeds: int = 4,
    *,
    key=0,
    center: bool = True,
    method: str = "gd",
    mesh=None,
    fluctuations: bool = True,
    progress: bool = True,
) -> Comparison:
    """Solve `problem` with `solver` and train `seeds` networks at each width (`networks.ensemble`:
    vmapped over seeds, the seeds spread over the devices of `mesh`, see there).

    `solver`: a solver (solved here, with a key drawn from `key`), or a `Solution` of `problem` at
    hand, compared as it is.

    `method="gd"` (default) trains by gradient descent with step `eta0 dt`: the discrete DMFT with
    `predictions="readout"` (the default of `MonteCarlo` and `LinearClosure`) is its exact
    infinite-width limit, and it is far cheaper than adaptive gradient flow for ReLU networks;
    `method="flow"` uses diffrax.
    At `problem.gamma0 = 0` the networks are lazy (`networks.train`: the limit gamma0 -> 0 at each width,
    with its empirical NTK at initialisation).
    `fluctuations=True` also computes the 1/N seed-to-seed covariances of `dmft.fluctuations` (the
    +-1 sigma band of each width in the figures) where they are defined and affordable: two-layer
    networks whose train grid has at most `MAX_FLUCTUATION_SIZE` (time, point, class) triples (the
    cost grows with its square); deep networks in the lazy limit on at most
    `MAX_LAZY_FLUCTUATION_POINTS` points (smooth activations and relu, scalar targets; the cost grows
    like Pa^4); deep linear networks with feature learning on at most `MAX_LINEAR_FLUCTUATION_SIZE`
    (time, point) pairs (the propagator's cost grows with about its third power); other deep networks
    with feature learning, whose sampled propagator costs ~ (T Pa)^5 per layer, on at most 12 (time,
    point) pairs at depth 2 with a smooth activation, 9 at depth 3 or for relu at depth 2, 8 for relu
    at depth 3 (`_sampled_cost`). Where they fail (a sampled propagator's map that does not converge,
    say), a warning says why and `Comparison.fluctuations` is None; where they are not computed,
    `Comparison.fluctuations_note` says why.
    `progress=True` shows tqdm bars on stderr: the DMFT iterations (residual live), then the widths.
    """
    widths = tuple(int(w) for w in widths)
    if not widths or min(widths) < 1:
        raise ValueError(f"widths must be a non-empty list of positive integers, got {widths!r}")
    if seeds < 2:
        raise ValueError(f"seeds must be >= 2 (standard errors need a spread), got {seeds}")
    key = as_key(key)
    k_solve, k_nets = jr.split(key)
    if isinstance(solver, Solution):
        sol = solver
        if sol.f.shape[:2] != (problem.n_steps + 1, problem.P):
            raise ValueError(
                f"the Solution's predictions have shape {sol.f.shape}, not ({problem.n_steps + 1}, {problem.P}, ...) "
                "of this problem's time grid and train points: pass the Solution solved for this problem"
            )
    else:
        sol = solve(problem, solver, key=k_solve, progress=progress)
    lazy = solve(problem, Lazy(discrete=method == "gd"))
    iterator = widths
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(widths, desc="finite widths", unit="width")
    train = lambda N, keys: networks.ensemble(problem, N, keys, mesh=mesh, center=center, method=method)
    runs = tuple(train(N, jr.split(jr.fold_in(k_nets, N), seeds)) for N in iterator)
    loss_error = jnp.stack([r.loss.mean(0) - sol.loss for r in runs])
    loss_se = jnp.stack([r.loss.std(0, ddof=1) / np.sqrt(seeds) for r in runs])
    worst = lambda X: jnp.max(jnp.abs(X).reshape(X.shape[0], -1), axis=1)  # over points (and classes)
    f_error = jnp.stack([worst(r.f.mean(0) - sol.f) for r in runs])
    ntk_error = jnp.stack([worst(r.ntk.mean(0) - sol.ntk) for r in runs])
    max_loss_error = jnp.max(jnp.abs(loss_error), axis=1) / sol.loss[0]
    if len(widths) > 1:
        exponent = jnp.polyfit(jnp.log(jnp.asarray(widths, float)), jnp.log(max_loss_error), 1)[0]
    else:
        exponent = jnp.array(jnp.nan)
    fl, note = None, why_no_fluctuations(problem) if fluctuations else None
    if fluctuations and note is None:
        try:
            fl = fluctuations_of(problem, sol, key=jr.fold_in(k_solve, 1))
        except ValueError as error:  # an extra of the comparison: the networks' results stand without it
            note = f"dmft.fluctuations failed: {error}"
            warnings.warn(f"compare drew no fluctuation bands: {error}", stacklevel=2)
    errors = (loss_error, loss_se, f_error, ntk_error, max_loss_error, exponent)
    return Comparison(sol, lazy, widths, runs, *errors, fl, note)
