"""MonteCarlo speed: time per iteration and iterations to converge, and how cost grows.

Reference: the authors' notebook takes 27 s per iteration (tanh, depth 3, P = 10, 20 time steps,
1000 samples) and 113 s per iteration at 40 time steps on a 2-core machine. Targets: <= 1 s per
iteration at 40 steps, and a converged depth-3 solve at 100 steps with 4096 samples in under 60 s.

Run: python benchmarks/monte_carlo.py
"""

import time

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)
import equinox as eqx  # noqa: E402
import jax.random as jr  # noqa: E402

import dmft  # noqa: E402


def problem(P=10, n_steps=40, depth=3, act="tanh"):
    data = dmft.datasets.sphere(P, 25, 0, target="noise")
    return dmft.Problem(data, dmft.MLP(depth, act), gamma0=1.0, t_max=0.1 * n_steps, n_steps=n_steps)


def per_iteration(p, S, **kwargs):
    solver = dmft.MonteCarlo(n_samples=S, chunk_size=S if S <= 2048 else 1024, **kwargs)
    solver.validate(p)
    key = jr.key(0)
    state = solver.init(p, key)
    step = eqx.filter_jit(lambda s: solver.step(p, s, key))
    jax.block_until_ready(step(state))
    start = time.perf_counter()
    for _ in range(3):
        state = step(state)
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / 3


def full_solve(p, S, **kwargs):
    solver = dmft.MonteCarlo(n_samples=S, chunk_size=1024, **kwargs)
    start = time.perf_counter()
    sol = dmft.solve(p, solver, key=0, throw=False)
    sol.loss.block_until_ready()
    return sol, time.perf_counter() - start


def key_spread(p, S, keys=6, **kwargs):
    """Standard deviation over independent keys of the final loss and of the final NTK (mean over
    entries): the full Monte Carlo error, feedback through the self-consistency included."""
    solver = dmft.MonteCarlo(n_samples=S, chunk_size=min(S, 1024), **kwargs)
    sols = [dmft.solve(p, solver, key=k, throw=False) for k in range(keys)]  # relu may stall above rtol
    loss = np.array([float(s.loss[-1]) for s in sols])
    ntk = np.array([np.asarray(s.ntk[-1]) for s in sols])
    return loss.std(ddof=1), ntk.std(0, ddof=1).mean()


if __name__ == "__main__":
    base = per_iteration(problem(n_steps=20), 1000)
    t40 = per_iteration(problem(n_steps=40), 1000)
    print(f"tanh L=3 P=10 S=1000: {base:.3f} s/iter at 20 steps (ref 27 s: {27 / base:.0f}x), "
          f"{t40:.3f} s/iter at 40 steps (ref 113 s: {113 / t40:.0f}x, target >= 100x)")
    for label, p, S in (
        ("n x2 (80 steps)", problem(n_steps=80), 1000),
        ("P x2 (P = 20)", problem(P=20), 1000),
        ("S x2 (2000)", problem(), 2000),
        ("L x2 -> depth 6", problem(depth=6), 1000),
    ):
        t = per_iteration(p, S)
        print(f"{label:>18}: {t:.3f} s/iter, ratio to 40-step baseline {t / t40:.2f}")
    sol, seconds = full_solve(problem(n_steps=100), 4096)
    print(f"converged depth-3 solve, 100 steps, S = 4096: {seconds:.1f} s including compilation, "
          f"{int(sol.iterations)} iterations, result: {sol.result}")
    # Responses by the forward-mode Jacobian along n_directions source eigenvectors (validation route).
    for k in (16, 64):
        t = per_iteration(problem(), 1000, responses="jacobian", n_directions=k)
        print(f"Jacobian responses, {k:>2} directions: {t:.3f} s/iter at 40 steps, S = 1000 ({t / t40:.1f}x Stein)")
    # Variance reduction: cost per iteration at the same S, then the spread over 6 keys.
    costs = {s: per_iteration(problem(), 1024, sampling=s) for s in ("plain", "antithetic", "sobol")}
    print("s/iter at 40 steps, S = 1024: " + ", ".join(f"{s} {t:.3f}" for s, t in costs.items()))
    for act in ("tanh", "relu"):
        p = problem(depth=2, n_steps=30, act=act)
        spread = {s: key_spread(p, 4096, sampling=s) for s in ("plain", "antithetic", "sobol")}
        plain = spread["plain"]
        print(f"{act} L=2, 30 steps, S=4096, sd over 6 keys of final loss / NTK: " + ", ".join(
            f"{s} {v[0]:.5f} / {v[1]:.5f} ({plain[0] / v[0]:.1f}x / {plain[1] / v[1]:.1f}x)" for s, v in spread.items()))
