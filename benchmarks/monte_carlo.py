"""MonteCarlo speed: time per iteration and iterations to converge, and how cost grows.

Reference: the authors' notebook takes 27 s per iteration (tanh, depth 3, P = 10, 20 time steps,
1000 samples) and 113 s per iteration at 40 time steps on a 2-core machine. Targets: <= 1 s per
iteration at 40 steps, a converged depth-3 solve at 100 steps with 4096 samples in under 60 s,
and a >= 4x smaller standard error of the loss and NTK than plain sampling at equal cost.

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


def key_spread(p, S, keys=16, **kwargs):
    """Standard deviation over independent keys of the final loss and of the final NTK (mean over
    entries), the full Monte Carlo error with its feedback through the self-consistency, and the
    seconds per (compiled) solve. 16 keys: with 6 the plain-sampling sd moved by 2x between key sets."""
    solver = dmft.MonteCarlo(n_samples=S, chunk_size=min(S, 1024), **kwargs)
    dmft.solve(p, solver, key=keys, throw=False).loss.block_until_ready()  # compile
    start = time.perf_counter()
    sols = [dmft.solve(p, solver, key=k, throw=False) for k in range(keys)]  # relu may stall above rtol
    loss = np.array([float(s.loss[-1]) for s in sols])
    seconds = (time.perf_counter() - start) / keys
    ntk = np.array([np.asarray(s.ntk[-1]) for s in sols])
    return loss.std(ddof=1), ntk.std(0, ddof=1).mean(), seconds


if __name__ == "__main__":
    base = per_iteration(problem(n_steps=20), 1000)
    t40 = per_iteration(problem(n_steps=40), 1000)
    print(
        f"tanh L=3 P=10 S=1000: {base:.3f} s/iter at 20 steps (ref 27 s: {27 / base:.0f}x), "
        f"{t40:.3f} s/iter at 40 steps (ref 113 s: {113 / t40:.0f}x, target >= 100x)"
    )
    for label, p, S in (
        ("n x2 (80 steps)", problem(n_steps=80), 1000),
        ("P x2 (P = 20)", problem(P=20), 1000),
        ("S x2 (2000)", problem(), 2000),
        ("L x2 -> depth 6", problem(depth=6), 1000),
    ):
        t = per_iteration(p, S)
        print(f"{label:>18}: {t:.3f} s/iter, ratio to 40-step baseline {t / t40:.2f}")
    for kw in ({}, dict(undamped_above=0.1)):
        sol, seconds = full_solve(problem(n_steps=100), 4096, **kw)
        print(
            f"converged depth-3 solve, 100 steps, S = 4096, {kw or 'defaults'}: {seconds:.1f} s including "
            f"compilation, {int(sol.iterations)} iterations, result: {sol.result}, final loss {float(sol.loss[-1]):.5f}"
        )
    # XLA's own memory analysis of the compiled solve: scratch (temp) and output buffers.
    p100, solver = problem(n_steps=100), dmft.MonteCarlo(n_samples=4096, chunk_size=1024)
    memory = eqx.filter_jit(lambda p: dmft.solve(p, solver, key=0)).lower(p100).compile().compiled.memory_analysis()
    print(
        f"memory of that solve (T Pa = {101 * 10}): temp {memory.temp_size_in_bytes / 1e6:.0f} MB, "
        f"output {memory.output_size_in_bytes / 1e6:.0f} MB (state per iteration: 4 L (T Pa)^2 doubles "
        f"= {4 * 3 * 1010**2 * 8 / 1e6:.0f} MB)"
    )
    # Responses by the forward-mode Jacobian along n_directions source eigenvectors (validation route).
    for k in (16, 64):
        t = per_iteration(problem(), 1000, responses="jacobian", n_directions=k)
        print(f"Jacobian responses, {k:>2} directions: {t:.3f} s/iter at 40 steps, S = 1000 ({t / t40:.1f}x Stein)")
    # Variance reduction: spread over 16 keys per solve and its cost. At equal cost (the same time
    # spent averaging independent solves) the standard error improves on plain sampling by
    # (sd_plain / sd) * sqrt(seconds_plain / seconds).
    configs = {
        "plain": {},
        "antithetic": dict(sampling="antithetic"),
        "sobol": dict(sampling="sobol"),
        "plain+cv": dict(control_variates=True),
        "sobol+cv": dict(sampling="sobol", control_variates=True),
    }
    for act, depth in (("tanh", 2), ("relu", 2), ("tanh", 3)):
        p = problem(depth=depth, n_steps=30, act=act)
        rtol = 3e-2 if act == "relu" else 1e-2  # relu's residual stalls at ~1.4% (S = 4096)
        spread = {name: key_spread(p, 4096, rtol=rtol, **kw) for name, kw in configs.items()}
        sl, sn, sec = spread["plain"]
        print(
            f"{act} L={depth}, 30 steps, S=4096, rtol {rtol}: sd over 16 keys of the final loss / NTK, s/solve, "
            "and the standard-error gain at equal cost:"
        )
        for name, (l, n, t) in spread.items():
            gain = np.sqrt(sec / t)
            print(f"  {name:>10}: {l:.5f} / {n:.5f}, {t:.2f} s -> {sl / l * gain:.1f}x / {sn / n * gain:.1f}x")
