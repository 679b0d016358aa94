"""`dmft.solve`: the one entry point, and the solver protocol it drives (THEORY section 10).

A solver is an `equinox.Module` with

* `validate(problem)`: raise `ValueError` when the solver does not apply to the problem;
* `init(problem, key) -> state`: the initial order parameters (a pytree of arrays);
* `step(problem, state, key) -> state`: one application of the self-consistent map `T`;
* `postprocess(problem, state, key) -> dict`: the `Solution` fields for a state;
* `max_iters`, `damping` (beta), `rtol`;
* optionally `monitor(state)`: the part of the state whose change decides convergence, and
  `damping_at(change)`: the beta of the next update given the current relative change (default: `damping`).

`solve` owns the damped iteration `state <- (1 - beta) state + beta T(state)`, stopping when the
relative Frobenius change `max_leaf |T(x) - x| / |T(x)|` is at most `rtol`, and the result codes.
A solver with `max_iters = 0` (closed forms such as `Lazy`) goes straight to `postprocess`.

Progress (`progress=True`): ordered `jax.debug.callback`s from inside the compiled loop drive one tqdm
bar on the host (opened before the loop, advanced by every iteration with its residual, closed after
it), so the report is live, works under `jit` and `vmap` (one bar; each member's iteration advances
it) and leaves the computation, hence the result, unchanged.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from .problem import Problem
from .solution import RESULTS, Solution

__all__ = ["AbstractSolver", "AbstractStochasticSolver", "solve"]


class AbstractSolver(eqx.Module):
    """Base class of every DMFT solver (see the module docstring for the protocol)."""

    max_iters: eqx.AbstractVar[int]
    damping: eqx.AbstractVar[float]
    rtol: eqx.AbstractVar[float]

    def validate(self, problem: Problem) -> None:
        """Raise `ValueError` (saying what to change) when this solver cannot solve `problem`."""

    def init(self, problem: Problem, key):
        raise NotImplementedError

    def step(self, problem: Problem, state, key):
        raise NotImplementedError

    def postprocess(self, problem: Problem, state, key) -> dict:
        raise NotImplementedError

    def monitor(self, state):
        """The part of the state whose relative change decides convergence (default: all of it)."""
        return state

    def damping_at(self, change):
        """The damping beta of the update that follows an iteration with relative change `change`."""
        return self.damping

    def needs_key(self, problem: Problem) -> bool:
        """Whether solving `problem` samples, so that `solve` must be given an explicit `key`."""
        return isinstance(self, AbstractStochasticSolver)


class AbstractStochasticSolver(AbstractSolver):
    """Marker: a solver that samples, so `solve` requires an explicit `key`."""


def _relative_change(new, old):
    changes = [
        jnp.linalg.norm((a - b).ravel()) / jnp.maximum(jnp.linalg.norm(a.ravel()), 1e-300)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old))
    ]
    return jnp.max(jnp.stack(changes))


_BAR = None  # the host-side tqdm bar of the solve in progress (progress=True only)


def _bar_open(total):
    global _BAR
    from tqdm.auto import tqdm

    _bar_close()  # a bar left open by an interrupted solve
    _BAR = tqdm(total=total, desc="DMFT iterations", unit="it")


def _bar_step(it, residual):
    if _BAR is None:
        return
    _BAR.update(max(int(it) + 1 - _BAR.n, 0))
    _BAR.set_postfix(residual=f"{float(residual):.2e}")


def _bar_close():
    global _BAR
    if _BAR is not None:
        _BAR.close()
    _BAR = None


def damped(old, new, beta):
    """The damped update `(1 - beta) old + beta new` of `solve`'s iteration, for any pytree (solvers
    that sweep over layers reuse it so a layer sees its neighbour exactly as `solve` will mix it)."""
    return jax.tree.map(lambda a, b: (1 - beta) * a + beta * b, old, new)


def _all_finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@eqx.filter_jit
def _solve(problem, solver, key, throw, progress):
    state = solver.init(problem, key)
    n = solver.max_iters
    residuals = jnp.full((max(n, 1),), jnp.nan)
    if n == 0:
        iterations, converged = jnp.array(0), jnp.array(True)
    else:

        def cond(carry):
            it, _, _, done, bad = carry
            return (it < n) & ~done & ~bad

        def body(carry):
            it, state, residuals, _, _ = carry
            new = solver.step(problem, state, key)
            change = _relative_change(solver.monitor(new), solver.monitor(state))
            mixed = damped(state, new, solver.damping_at(change))
            bad = ~jnp.isfinite(change)
            if progress:
                jax.debug.callback(_bar_step, it, change, ordered=True)
            return it + 1, mixed, residuals.at[it].set(change), change <= solver.rtol, bad

        carry = (jnp.array(0), state, residuals, jnp.array(False), jnp.array(False))
        if progress:
            jax.debug.callback(lambda: _bar_open(n), ordered=True)
        iterations, state, residuals, converged, _ = jax.lax.while_loop(cond, body, carry)
        if progress:
            jax.debug.callback(_bar_close, ordered=True)
    fields = solver.postprocess(problem, state, key)
    finite = _all_finite({k: v for k, v in fields.items() if k != "ts"}) & _all_finite(state)
    result = RESULTS.where(
        ~finite, RESULTS.nonfinite, RESULTS.where(converged, RESULTS.successful, RESULTS.max_iters_reached)
    )
    sol = Solution(**fields, result=result, iterations=iterations, residuals=residuals)
    if throw:
        sol = result.error_if(sol, result != RESULTS.successful)
    return sol


def solve(
    problem: Problem, solver: AbstractSolver, *, key=None, throw: bool = True, progress: bool = False
) -> Solution:
    """Solve the DMFT of `problem` with `solver` and return a `Solution`.

    **Arguments:**

    - `problem`: a `dmft.Problem` (data, network, gamma0, time grid).
    - `solver`: `dmft.Lazy()`, `dmft.LinearClosure()`, `dmft.MonteCarlo(n_samples=...)`, ...
    - `key`: a JAX PRNG key or an int seed; required by sampling solvers, ignored by the others.
    - `throw`: raise when the iteration does not converge or goes non-finite. Under `jax.vmap`
      (e.g. over gamma0) a failure of any member raises; pass `throw=False` and inspect
      `sol.result` instead.
    - `progress`: show a tqdm bar on stderr with the iteration number and the current residual
      (relative change), live from inside the compiled loop. Silent by default; the result is the
      same either way. Solvers without iterations (`Lazy`) show nothing.

    Runs under `equinox.filter_jit`: `gamma0` and `eta0` are traced (a sweep does not recompile),
    shapes (`depth`, `n_steps`, data sizes, sample counts) are static.
    """
    if not isinstance(problem, Problem):
        raise ValueError(f"problem must be a dmft.Problem, got {type(problem).__name__}")
    if not isinstance(solver, AbstractSolver):
        raise ValueError(
            f"solver must be a dmft solver (dmft.Lazy(), dmft.LinearClosure(), dmft.MonteCarlo(...)), "
            f"got {type(solver).__name__}"
        )
    solver.validate(problem)
    if key is None:
        if solver.needs_key(problem):
            raise ValueError(f"{type(solver).__name__} samples here: pass key=<int or jax.random.key>")
        key = jr.key(0)
    elif isinstance(key, int):
        key = jr.key(key)
    sol = _solve(problem, solver, key, throw, progress)
    if progress:
        jax.effects_barrier()  # the bar is closed (and flushed) before solve returns
    return sol
