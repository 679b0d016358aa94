"""MonteCarlo at its defaults: speed, memory, and whether its error bars hold.

Prints
* first, the converged depth-3 solve at 100 steps and S = 4096 in the fresh process (target: <= 40 s on
  2 cores, compilation included): iterations, final loss with its standard error, and XLA's memory
  analysis of it;
* seconds per iteration of the pooled stage (and of the replica stage) for depth-3 tanh, P = 10,
  S = 1024, at 20 and 40 steps, against the authors' notebook (27 s and 113 s per iteration at 1000
  samples on a 2-core machine), and how the cost grows with the number of steps, points, samples
  and layers;
* for tanh and relu at depth 2 (30 steps, S = 4096): the spread of the final loss and NTK over 16
  keys next to the mean reported standard error, at the default sampling and with plain sampling.

Run: python benchmarks/monte_carlo.py [--quick]   (--quick: 4 keys instead of 16)
"""

import sys
import time

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402

import dmft  # noqa: E402


def problem(P=10, n_steps=40, depth=3, act="tanh"):
    data = dmft.datasets.sphere(P, 25, 0, target="noise")
    return dmft.Problem(data, dmft.MLP(depth, act), gamma0=1.0, t_max=0.1 * n_steps, n_steps=n_steps)


def per_iteration(p, S, **kwargs):
    """Seconds per compiled iteration (mean of 3) of the pooled stage (its full map, not the warm-up
    on half the samples) and of the replica stage."""
    solver = dmft.MonteCarlo(n_samples=S, **kwargs)
    solver.validate(p)
    key = jr.key(0)
    state = solver.init(p, key)
    seconds = []
    for stage in solver.stages():
        state = stage.enter(p, state)
        if hasattr(state, "warm_left"):
            state = eqx.tree_at(lambda s: s.warm_left, state, jnp.zeros_like(state.warm_left))
        step = eqx.filter_jit(lambda s, stage=stage: stage.step(p, s, key))
        jax.block_until_ready(step(state))
        start = time.perf_counter()
        for _ in range(3):
            state = step(state)
        jax.block_until_ready(state)
        seconds.append((time.perf_counter() - start) / 3)
    return seconds


def _replica_stage(sol):
    """Iterations of the replica stage: its first residual is 1 (the spread grows from zero)."""
    res = np.asarray(sol.residuals)[: int(sol.iterations)]
    return int(sol.iterations) - int(np.flatnonzero(np.isclose(res, 1.0))[-1])


def full_solve(p, solver):
    start = time.perf_counter()
    sol = dmft.solve(p, solver, key=0, throw=False)
    sol.loss.block_until_ready()
    return sol, time.perf_counter() - start


def key_spread(p, keys, **kwargs):
    """Spread over keys (sd) of the final loss and the final NTK (mean over entries), the mean
    reported standard error of each, the seconds per compiled solve and the iterations (median)."""
    solver = dmft.MonteCarlo(n_samples=4096, **kwargs)
    dmft.solve(p, solver, key=keys).loss.block_until_ready()  # compile
    start = time.perf_counter()
    sols = [dmft.solve(p, solver, key=k) for k in range(keys)]
    seconds = (time.perf_counter() - start) / keys
    loss = np.array([float(s.loss[-1]) for s in sols])
    ntk = np.array([np.asarray(s.ntk[-1]) for s in sols])
    se_loss = np.mean([float(s.stderr["loss"][-1]) for s in sols])
    se_ntk = np.mean([np.asarray(s.stderr["ntk"][-1]).mean() for s in sols])
    its = int(np.median([int(s.iterations) for s in sols]))
    return loss.std(ddof=1), se_loss, ntk.std(0, ddof=1).mean(), se_ntk, seconds, its


if __name__ == "__main__":
    keys = 4 if "--quick" in sys.argv else 16
    # First, as a user's first solve in a fresh process: after the per-iteration runs below (other
    # programs compiled and held) the same solve takes longer (benchmarks/RESULTS.md).
    p100, solver = problem(n_steps=100), dmft.MonteCarlo(n_samples=4096)
    sol, seconds = full_solve(p100, solver)
    print(
        f"converged depth-3 tanh, 100 steps, S = 4096, defaults: {seconds:.1f} s including compilation, "
        f"{int(sol.iterations)} iterations ({_replica_stage(sol)} in the replica stage), {sol.result}, "
        f"final loss {float(sol.loss[-1]):.5f} "
        f"+- {float(sol.stderr['loss'][-1]):.5f}, noise floor {float(sol.noise_floor):.2e}"
    )
    memory = eqx.filter_jit(lambda p: dmft.solve(p, solver, key=0)).lower(p100).compile().compiled.memory_analysis()
    print(
        f"memory of that solve (T Pa = {101 * 10}): temp {memory.temp_size_in_bytes / 1e6:.0f} MB, "
        f"output {memory.output_size_in_bytes / 1e6:.0f} MB"
    )

    (base, base_r), (t40, t40_r) = per_iteration(problem(n_steps=20), 1024), per_iteration(problem(n_steps=40), 1024)
    print(
        f"tanh L=3 P=10 S=1024, pooled stage: {base:.3f} s/iter at 20 steps (notebook 27 s: {27 / base:.0f}x), "
        f"{t40:.3f} s/iter at 40 steps (notebook 113 s: {113 / t40:.0f}x); replica stage {base_r:.3f} / {t40_r:.3f}"
    )
    for label, p, S in (
        ("n x2 (80 steps)", problem(n_steps=80), 1024),
        ("P x2 (P = 20)", problem(P=20), 1024),
        ("S x2 (2048)", problem(), 2048),
        ("L x2 -> depth 6", problem(depth=6), 1024),
    ):
        t, t_r = per_iteration(p, S)
        print(f"{label:>18}: {t:.3f} s/iter, ratio to the 40-step baseline {t / t40:.2f} (replica stage {t_r:.3f})")

    for act in ("tanh", "relu"):
        p = problem(depth=2, n_steps=30, act=act)
        for name, kw in (("default", {}), ("plain", dict(sampling="plain", control_variates=False))):
            sl, el, sn, en, sec, its = key_spread(p, keys, **kw)
            print(
                f"{act} L=2, 30 steps, S=4096, {name:>7}: over {keys} keys sd / mean SE of the final loss "
                f"{sl:.2e} / {el:.2e} (ratio {sl / el:.2f}), NTK {sn:.2e} / {en:.2e} (ratio {sn / en:.2f}); "
                f"{sec:.1f} s/solve, {its} iterations"
            )
