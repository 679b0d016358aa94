"""How far one machine goes: memory, compile time and time per iteration as T Pa doubles.

Prints
* depth-2 tanh `MonteCarlo` at its defaults (S = 4096, R = 8), P = 10, T Pa = 250 ... 2000: the
  `dmft.estimate` of the solve (memory, flops per iteration) next to XLA's memory analysis, the compile
  time of each stage's step, the seconds per iteration of each stage and their ratio to the previous
  size (the model says x4-x8 per doubling: S (T Pa)^2 fields, (T Pa)^3 factorisations), and the largest
  T Pa whose estimate fits this machine's memory;
* `LinearClosure` at depth 2, T Pa = 250 ... 8000: the whole converged solve and XLA's memory;
* the first depth-3 solve at 100 steps and S = 4096: seconds to trace and to compile (the rest of the
  time to the first result is the iterations, `benchmarks/monte_carlo.py`);
* with --mesh instead: the memory of one device's share of a solve spread over 1, 2, 4 and 8 (forced
  CPU) devices, `dmft.estimate` next to XLA's memory analysis (depth 2 and 3 tanh, S = 4096, R = 8).

Run: python benchmarks/scale.py [--quick | --mesh]   (--quick: T Pa up to 1000)
"""

import os
import sys
import time

if "--mesh" in sys.argv:  # before JAX starts
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import equinox as eqx
import jax

jax.config.update("jax_enable_x64", True)
import jax.random as jr  # noqa: E402

import dmft  # noqa: E402
from dmft._keys import as_key  # noqa: E402
from dmft.solve import _solve  # noqa: E402


def problem(n_steps, depth=2, act="tanh", P=10):
    data = dmft.datasets.sphere(P, 25, 0, target="noise")
    return dmft.Problem(data, dmft.MLP(depth, act), gamma0=1.0, t_max=0.1 * n_steps, n_steps=n_steps)


def stage_times(p, solver):
    """`[(compile s, seconds per iteration)]` of each stage's compiled step (one timed iteration)."""
    key = jr.key(0)
    state = solver.init(p, key)
    out = []
    for stage in solver.stages():
        state = stage.enter(p, state)
        start = time.perf_counter()
        step = jax.jit(lambda s, stage=stage: stage.step(p, s, key)).lower(state).compile()
        compiled = time.perf_counter() - start
        start = time.perf_counter()
        state = jax.block_until_ready(step(state))
        out.append((compiled, time.perf_counter() - start))
    return out


def largest_fitting(solver, depth=2, P=10):
    """The largest T Pa (in steps of P) whose estimate fits `solver`'s memory budget."""
    n = 1
    while dmft.estimate(problem(2 * n, depth, P=P), solver).fits:
        n *= 2
    lo, hi = n, 2 * n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if dmft.estimate(problem(mid, depth, P=P), solver).fits else (lo, mid)
    return (lo + 1) * P


def monte_carlo(sizes):
    solver = dmft.MonteCarlo(n_samples=4096)
    print("MonteCarlo, depth 2 tanh, S = 4096, R = 8, P = 10, float64")
    columns = ("T Pa", "est GB", "XLA GB", "pooled GF", "compile s", "pooled s", "replica s", "ratio")
    print(" ".join(f"{c:>{w}}" for c, w in zip(columns, (6, 7, 7, 9, 9, 9, 9, 11))))
    previous = None
    for T_Pa in sizes:
        p = problem(T_Pa // 10 - 1)
        est = dmft.estimate(p, solver)
        (c1, t1), (c2, t2) = stage_times(p, solver)
        ratio = "" if previous is None else f"x{t1 / previous[0]:.1f} / x{t2 / previous[1]:.1f}"
        xla = dmft.costs.xla_bytes(p, solver)
        print(
            f"{T_Pa:>6} {est.memory / 1e9:>7.3f} {xla / 1e9:>7.3f} {est.flops['pooled'] / 1e9:>9.0f} "
            f"{c1 + c2:>9.1f} {t1:>9.2f} {t2:>9.2f} {ratio:>11}",
            flush=True,
        )
        previous = (t1, t2)
    memory = dmft.costs.device_memory()
    whole = dmft.MonteCarlo(n_samples=4096, memory=1.0)
    print(f"largest T Pa whose estimate fits this machine ({memory / 1e9:.0f} GB): {largest_fitting(whole)}")


def linear(sizes):
    solver = dmft.LinearClosure()
    print("\nLinearClosure, depth 2, P = 10, float64: the converged solve")
    print(f"{'T Pa':>6} {'XLA GB':>7} {'solve s':>8} {'iterations':>10}")
    for T_Pa in sizes:
        p = problem(T_Pa // 10 - 1, act="linear")
        run = eqx.filter_jit(lambda p: dmft.solve(p, solver))
        jax.block_until_ready(run(p))
        start = time.perf_counter()
        sol = jax.block_until_ready(run(p))
        seconds = time.perf_counter() - start
        print(f"{T_Pa:>6} {dmft.costs.xla_bytes(p, solver) / 1e9:>7.3f} {seconds:>8.3f} {int(sol.iterations):>10}")


def compile_time():
    p = problem(100, depth=3)
    solver = dmft.MonteCarlo(n_samples=4096).sized(p)
    start = time.perf_counter()
    lowered = _solve.lower(p, solver, as_key(0), True, False)
    traced = time.perf_counter() - start
    lowered.compile()
    compiled = time.perf_counter() - start - traced
    print(f"\nfirst depth-3 tanh solve, 100 steps, S = 4096: trace and lower {traced:.1f} s, compile {compiled:.1f} s")


def mesh():
    print("MonteCarlo on a mesh, tanh, S = 4096, R = 8, P = 10, float64: memory of one device (GB)")
    print(f"{'depth':>5} {'T Pa':>6} {'devices':>7} {'est GB':>7} {'XLA GB':>7} {'est / XLA':>9}")
    for depth in (2, 3):
        for T_Pa in (500, 1000):
            for d in (1, 2, 4, 8):
                p, solver = problem(T_Pa // 10 - 1, depth), dmft.MonteCarlo(n_samples=4096, mesh=d)
                est, xla = dmft.estimate(p, solver).memory, dmft.costs.xla_bytes(p, solver)
                print(f"{depth:>5} {T_Pa:>6} {d:>7} {est / 1e9:>7.3f} {xla / 1e9:>7.3f} {est / xla:>9.2f}", flush=True)


if __name__ == "__main__":
    if "--mesh" in sys.argv:
        mesh()
        sys.exit()
    quick = "--quick" in sys.argv
    monte_carlo([250, 500, 1000] if quick else [250, 500, 1000, 2000])
    linear([250, 500, 1000] if quick else [250, 500, 1000, 2000, 4000, 8000])
    compile_time()
