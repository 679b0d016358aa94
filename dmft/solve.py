"""`dmft.solve`: the one entry point, and the solver protocol it drives (THEORY section 10).

Two kinds of solver, both `equinox.Module`s:

* `AbstractSolver`, a closed form (`Lazy`, `Perturbative`): `validate(problem)` raises `ValueError`
  when the solver does not apply, `samples(problem)` says whether it draws random numbers (then
  `solve` needs an explicit `key`), `init(problem, key)` computes the order parameters and
  `postprocess(problem, state, key)` turns them into the fields of a `Solution`; `sized(problem)`
  fixes what the solver leaves open (chunk sizes) within its memory budget, before anything runs.
* `AbstractIterativeSolver`, a self-consistent iteration (`LinearClosure`, `MonteCarlo`): adds
  `step(problem, state, key)`, one application of the map `T`, and the fields `max_iters`,
  `damping` (beta) and `rtol`. `solve` owns the damped iteration
  `state <- (1 - beta) state + beta T(state)` and stops when the relative Frobenius change
  `|T(x) - x| / |T(x)|` of every leaf of `monitor(state)` is at most the tolerance of
  `tolerance(T(x))` (default `rtol`; a sampling solver derives it from its own Monte Carlo error,
  leaf by leaf), or at most its stall tolerance once the change has stopped falling (not halved in
  5 iterations). `damping_at(problem, change, ratio, beta)` may adapt beta to the problem, the largest
  change and the secant ratio of the last two raw changes of `secant_view(state)` (an estimate of the
  damped iteration's dominant eigenvalue).
  A solver may iterate in `stages()`: each stage is an iterative solver of its own, entered with
  `stage.enter(problem, state)` from the state the previous stage converged to; the Solution counts
  the iterations of all stages and converges only when every stage did.

Progress (`progress=True`): ordered `jax.debug.callback`s from inside the compiled loop drive one tqdm
bar on the host (opened before the loop, advanced by every iteration with its residual, closed after
it), so the report is live, works under `jit` and `vmap` and leaves the result unchanged.
"""

import equinox as eqx
import jax
import jax.numpy as jnp

from . import _xla
from ._keys import as_key
from ._maps import make_room
from .problem import Problem
from .solution import RESULTS, Solution

__all__ = ["AbstractSolver", "AbstractIterativeSolver", "solve", "damped"]


class AbstractSolver(eqx.Module):
    """A DMFT solver in closed form: `init` computes the order parameters, `postprocess` the fields."""

    def validate(self, problem: Problem) -> None:
        """Raise `ValueError` (saying what to change) when this solver cannot solve `problem`."""

    def samples(self, problem: Problem) -> bool:
        """Whether solving `problem` draws random numbers (then `solve` requires an explicit `key`)."""
        return False

    def sized(self, problem: Problem) -> "AbstractSolver":
        """This solver with the sizes it leaves open (chunks) chosen for `problem` within its memory
        budget; raise `ValueError` when the solve cannot fit (default: unchanged)."""
        return self

    def init(self, problem: Problem, key):
        raise NotImplementedError

    def postprocess(self, problem: Problem, state, key) -> dict:
        raise NotImplementedError


class AbstractIterativeSolver(AbstractSolver):
    """A DMFT solver by damped self-consistent iteration (see the module docstring)."""

    max_iters: eqx.AbstractVar[int]
    damping: eqx.AbstractVar[float]
    rtol: eqx.AbstractVar[float | None]

    def step(self, problem: Problem, state, key):
        raise NotImplementedError

    def monitor(self, state):
        """The part of the state whose relative change decides convergence (default: all of it)."""
        return state

    def secant_view(self, state):
        """A small part of the state whose last two changes give `damping_at` its secant ratio (default:
        none, ratio 0). Small, because the loop keeps its previous change."""
        return ()

    def tolerance(self, state):
        """`(tol, stall_tol)`: the iteration has converged when the relative change of every monitored
        leaf is at most `tol`, or at most `stall_tol` once the change has stopped falling (a map that is
        only piecewise continuous, such as a Monte Carlo map of relu networks, cannot go lower).
        Scalars or one per leaf of `monitor`; default `(rtol, rtol)`."""
        return self.rtol, self.rtol

    def damping_at(self, problem: Problem, change, ratio, beta):
        """The damping beta of the update that follows an iteration with relative change `change`.

        `ratio = <r_k, r_{k-1}> / |r_{k-1}|^2` for the raw changes `r = T(x) - x` of `secant_view` in
        this and the previous iteration (0 in the first): the factor by which the dominant mode of the
        damped iteration shrank, negative when it oscillates. `beta`: the previous update's damping (NaN
        before the first). Default: `damping`."""
        return self.damping

    def stages(self):
        """The iterations run one after the other (default: this solver's own)."""
        return (self,)

    def enter(self, problem: Problem, state):
        """The state this stage starts from, given the state the previous stage ended in (or `init`'s)."""
        return state


def _relative_change(new, old):
    """Relative Frobenius change `|new - old| / |new|` of every leaf, `(n_leaves,)`."""
    changes = [
        jnp.linalg.norm((a - b).ravel()) / jnp.maximum(jnp.linalg.norm(a.ravel()), jnp.finfo(a.dtype).tiny)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old))
    ]
    return jnp.stack(changes)


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
    that sweep over layers reuse it so a layer sees its neighbour exactly as `solve` will mix it).
    Each leaf keeps the old iterate's dtype: a float64 beta must not promote float32 replicas.
    Integer and boolean leaves (flags, counters) are not mixed: they take the new iterate's value."""
    mix = lambda a, b: ((1 - beta) * a + beta * b).astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.inexact) else b
    return jax.tree.map(mix, old, new)


def _all_finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


_STALL = 5  # iterations over which a change that has not halved counts as stalled


def _secant_ratio(r, r_prev):
    """`<r, r_prev> / |r_prev|^2` over all leaves (0 when r_prev is zero)."""
    dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(r), jax.tree.leaves(r_prev)))
    norm2 = sum(jnp.vdot(b, b) for b in jax.tree.leaves(r_prev))
    return jnp.where(norm2 > 0, dot / jnp.where(norm2 > 0, norm2, 1.0), 0.0)


def _iterate(problem, solver, state, key, progress):
    """The damped fixed-point loop: `(state, iterations, residuals, converged, diverged)`; `diverged`: it
    stopped because the change went non-finite (the state itself may still be finite, if huge)."""
    n = solver.max_iters
    dtype = problem.data.Kx.dtype

    def cond(carry):
        it, _, _, done, bad, _, _ = carry
        return (it < n) & ~done & ~bad

    def body(carry):
        it, state, residuals, _, _, r_prev, beta = carry
        new = solver.step(problem, state, key)
        changes = _relative_change(solver.monitor(new), solver.monitor(state))
        change = jnp.max(changes)
        tol, stall_tol = solver.tolerance(new)
        earlier = jnp.where(it >= _STALL, residuals[jnp.maximum(it - _STALL, 0)], jnp.inf)
        stalled = change > 0.5 * earlier
        done = jnp.all(changes <= tol) | (stalled & jnp.all(changes <= stall_tol))
        r = jax.tree.map(jnp.subtract, solver.secant_view(new), solver.secant_view(state))
        beta = jnp.asarray(solver.damping_at(problem, change, _secant_ratio(r, r_prev).astype(dtype), beta), dtype)
        mixed = damped(state, new, beta)
        if progress:
            jax.debug.callback(_bar_step, it, change, ordered=True)
        return it + 1, mixed, residuals.at[it].set(change), done, ~jnp.isfinite(change), r, beta

    residuals = jnp.full((n,), jnp.nan, dtype)
    r0 = jax.tree.map(jnp.zeros_like, solver.secant_view(state))
    carry = (jnp.array(0), state, residuals, jnp.array(False), jnp.array(False), r0, jnp.asarray(jnp.nan, dtype))
    if progress:
        jax.debug.callback(lambda: _bar_open(n), ordered=True)
    iterations, state, residuals, converged, diverged, *_ = jax.lax.while_loop(cond, body, carry)
    if progress:
        jax.debug.callback(_bar_close, ordered=True)
    return state, iterations, residuals, converged, diverged


@_xla.jit
def _solve(problem, solver, key, throw, progress, traced=True):
    """`traced`: the problem or key is traced (under jit or vmap), and gamma0, which then escapes the
    Problem's own check, is checked inside the compiled solve; `throw`: raise on failure from inside.
    A runtime check is a host callback, which JAX's persistent compilation cache does not store, so
    `solve` makes both checks on the host when nothing is traced."""
    if traced:
        gamma0 = eqx.error_if(problem.gamma0, problem.gamma0 < 0, "gamma0 must be >= 0 (0 is the lazy limit)")
        problem = eqx.tree_at(lambda p: p.gamma0, problem, gamma0)
    state = solver.init(problem, key)
    extra = {}
    converged, diverged = jnp.array(True), jnp.array(False)
    if isinstance(solver, AbstractIterativeSolver):
        iterations, residuals = jnp.array(0), jnp.zeros((0,), problem.data.Kx.dtype)
        for stage in solver.stages():
            state = stage.enter(problem, state)
            state, its, res, conv, div = _iterate(problem, stage, state, key, progress)
            # The residuals of all stages in order, NaN-padded at the end.
            residuals = jnp.concatenate([residuals, jnp.full_like(res, jnp.nan)])
            residuals = jax.lax.dynamic_update_slice(residuals, res, (iterations,))
            iterations, converged, diverged = iterations + its, converged & conv, diverged | div
        extra = dict(iterations=iterations, residuals=residuals)
    fields = solver.postprocess(problem, state, key)
    finite = _all_finite({k: v for k, v in fields.items() if k != "ts"}) & _all_finite(state) & ~diverged
    result = RESULTS.where(
        ~finite, RESULTS.nonfinite, RESULTS.where(converged, RESULTS.successful, RESULTS.max_iters_reached)
    )
    sol = Solution(**fields, **extra, result=result)
    if throw:
        sol = result.error_if(sol, result != RESULTS.successful)
    return sol


def _lower(problem, solver, key):
    """`_solve` lowered as `solve` compiles it when nothing is traced (its checks on the host), for XLA's
    analyses of the compiled solve (`costs.xla_bytes`, the compile benchmark)."""
    return _solve.lower(problem, solver, key, False, False, False)


def solve(
    problem: Problem, solver: AbstractSolver, *, key=None, throw: bool = True, progress: bool = False
) -> Solution:
    """Solve the DMFT of `problem` with `solver` and return a `Solution`.

    **Arguments:**

    - `problem`: a `dmft.Problem` (data, network, gamma0, time grid).
    - `solver`: `dmft.Lazy()`, `dmft.LinearClosure()`, `dmft.MonteCarlo(...)`, `dmft.Perturbative()`.
    - `key`: an integer seed or a JAX PRNG key; required by solvers that sample (`MonteCarlo`,
      `Perturbative` of a nonlinear network), ignored by the others.
    - `throw`: raise when the iteration does not converge or goes non-finite. Under `jax.vmap`
      (e.g. over gamma0) a failure of any member raises; pass `throw=False` and inspect
      `sol.result` instead.
    - `progress`: show a tqdm bar on stderr with the iteration number and the current residual
      (relative change), live from inside the compiled loop. Silent by default; the result is the
      same either way. Closed-form solvers show nothing.

    Runs under `equinox.filter_jit` (called outside another jit on a CPU, with the compile options of
    `dmft._xla` that `XLA_FLAGS` does not set): `gamma0` and `eta0` are traced (a sweep does not recompile),
    shapes (`depth`, `n_steps`, data sizes, sample counts) are static. Matrices are multiplied at
    `jax.default_matmul_precision("highest")` (full float32 on a GPU too). Called outside jit and vmap,
    it checks gamma0 and the result on the host, so JAX's persistent compilation cache
    (`JAX_COMPILATION_CACHE_DIR`) can keep the compiled solve for later processes (not with
    `progress=True`: the bar is a host callback).
    """
    if not isinstance(problem, Problem):
        raise ValueError(f"problem must be a dmft.Problem, got {type(problem).__name__}")
    if not isinstance(solver, AbstractSolver):
        raise ValueError(
            "solver must be a dmft solver (dmft.Lazy(), dmft.LinearClosure(), dmft.MonteCarlo(...), "
            f"dmft.Perturbative()), got {type(solver).__name__}"
        )
    solver.validate(problem)
    solver = solver.sized(problem)
    if key is None:
        if solver.samples(problem):
            raise ValueError(f"{type(solver).__name__} samples random numbers here: pass key=<int or jax.random.key>")
        key = 0
    # Full float32 products on a GPU too, whose default for float32 is TF32 (10-bit mantissa): the
    # square roots and Stein regressions of a Monte Carlo solve at large T Pa are ill-conditioned enough
    # for TF32 to corrupt its responses (`benchmarks/RESULTS.md`).
    key = as_key(key)
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((problem, key)))
    if not traced and not problem.gamma0 >= 0:
        raise ValueError(f"gamma0 must be >= 0 (0 is the lazy limit), got {problem.gamma0}")
    make_room(problem, key)
    with jax.default_matmul_precision("highest"):
        sol = _solve(problem, solver, key, throw and traced, progress, traced)
    if throw and not traced and sol.result != RESULTS.successful:  # equinox's error, raised here
        sol.result.error_if(sol, True)
    if progress:
        jax.effects_barrier()  # the bar is closed (and flushed) before solve returns
    return sol
