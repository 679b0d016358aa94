"""How far one machine goes: memory, compile time and time per iteration as T Pa doubles.

Parts (`monte_carlo`, `linear` and `compile` by default; name some to run only those):
* `monte_carlo`: depth-2 tanh `MonteCarlo` at its defaults (S = 4096, R = 8), P = 10, T Pa doubling
  from 250 (CPU) or 1250 (GPU) to 2000 / 10000: the `dmft.estimate` of the solve (memory, flops per
  iteration) next to XLA's memory analysis, the compile time of each stage's step, the seconds per
  iteration of each stage and their ratio to the previous size (the model says x4-x8 per doubling:
  S (T Pa)^2 fields, (T Pa)^3 factorisations), and the largest T Pa whose estimate fits one device;
* `solved`: the same solve converged at the largest of those sizes (2000 on a CPU, 10^4 on a GPU):
  seconds with compilation, iterations, the result and the final loss with its standard error;
* `linear`: `LinearClosure` at depth 2, T Pa = 250 ... 8000 (CPU) or 2000 ... 32000 (GPU): the whole
  converged solve and XLA's memory;
* `compile`: the first depth-3 solve at 100 steps and S = 4096: seconds to trace and to compile (the
  rest of the time to the first result is the iterations, `benchmarks/monte_carlo.py`), here and in
  two fresh processes sharing JAX's persistent compilation cache (the second loads the first's);
* `networks`: seed ensembles (8 seeds, GD on the grid) of depth-2 tanh networks at T Pa = 1000 up to
  width 4096 (CPU) or 16384 (GPU): seconds, and the loss's distance to the DMFT;
* `precision`: float32 against float64 on the same problem (linear closure, networks, Monte Carlo
  with the same key), at JAX's default matmul precision and at "highest" (on a GPU the default
  multiplies float32 in TF32; `dmft.solve` runs every solver at "highest" either way, so only the
  networks' two columns differ);
* `mesh`: the memory of one device's share of a solve spread over 1, 2, 4 and 8 (forced CPU) devices,
  `dmft.estimate` next to XLA's memory analysis (depth 2 and 3 tanh, S = 4096, R = 8).

Sizes follow the default backend: a GPU gets the larger ones. float64 unless a part says otherwise.

Run: python benchmarks/scale.py [PART ...] [--quick]   (--quick: the smaller half of each size list)
"""

import contextlib
import os
import subprocess
import sys
import tempfile
import time

MESH = "mesh" in sys.argv or "--mesh" in sys.argv
if MESH:  # before JAX starts
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import equinox as eqx
import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
from monte_carlo import _replica_stage  # noqa: E402  (benchmarks/monte_carlo.py, beside this script)

import dmft  # noqa: E402
from dmft._keys import as_key  # noqa: E402
from dmft.solve import _lower  # noqa: E402


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
    """The largest T Pa (in steps of P) whose estimate fits `solver`'s memory budget (`solver` with
    plain sampling: Sobol points stop at 21201 coordinates, T Pa ~ 10600 at depth 2)."""
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
    print(f"\nMonteCarlo, depth 2 tanh, S = 4096, R = 8, P = 10, {jnp.zeros(()).dtype}")
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
    whole = dmft.MonteCarlo(n_samples=4096, memory=1.0, sampling="plain")
    print(f"largest T Pa whose estimate fits this machine ({memory / 1e9:.0f} GB): {largest_fitting(whole)}")


def solved(T_Pa):
    p = problem(T_Pa // 10 - 1)
    start = time.perf_counter()
    sol = dmft.solve(p, dmft.MonteCarlo(n_samples=4096), key=0, throw=False)
    sol.loss.block_until_ready()
    seconds = time.perf_counter() - start
    replica = _replica_stage(sol)
    outcome = "converged" if sol.result == dmft.RESULTS.successful else sol.result
    print(
        f"\nMonteCarlo converged at T Pa = {T_Pa} (depth 2 tanh, S = 4096, {jnp.zeros(()).dtype}): {seconds:.1f} s "
        f"with compilation, {int(sol.iterations) - replica} pooled + {replica} replica iterations, "
        f"{outcome}, final loss {float(sol.loss[-1]):.6f} +- {float(sol.stderr['loss'][-1]):.2e} "
        f"(initial {float(sol.loss[0]):.4f})"
    )


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
    """The first depth-3 solve's trace and compile in this process, then in two fresh processes sharing
    JAX's persistent compilation cache (`JAX_COMPILATION_CACHE_DIR`): the second loads what the first
    compiled."""
    trace, compile_ = _compile_once()
    print(f"\nfirst depth-3 tanh solve, 100 steps, S = 4096: trace and lower {trace:.1f} s, compile {compile_:.1f} s")
    with tempfile.TemporaryDirectory() as cache:
        env = os.environ | {"JAX_COMPILATION_CACHE_DIR": cache}
        for which in ("a fresh process, empty cache", "a later process, same cache"):
            child = subprocess.run(
                [sys.executable, __file__, "_compile_child"], env=env, capture_output=True, text=True, check=True
            )
            trace, compile_ = map(float, child.stdout.split()[-2:])
            print(f"  {which}: trace and lower {trace:.1f} s, compile {compile_:.1f} s", flush=True)


def _compile_once():
    """Seconds to trace and lower, and to compile, the depth-3 solve as `dmft.solve` runs it when nothing
    is traced (its checks on the host)."""
    p = problem(100, depth=3)
    solver = dmft.MonteCarlo(n_samples=4096).sized(p)
    start = time.perf_counter()
    lowered = _lower(p, solver, as_key(0))
    traced = time.perf_counter() - start
    lowered.compile()
    return traced, time.perf_counter() - start - traced


def mesh():
    print("MonteCarlo on a mesh, tanh, S = 4096, R = 8, P = 10, float64: memory of one device (GB)")
    print(f"{'depth':>5} {'T Pa':>6} {'devices':>7} {'est GB':>7} {'XLA GB':>7} {'est / XLA':>9}")
    for depth in (2, 3):
        for T_Pa in (500, 1000):
            for d in (1, 2, 4, 8):
                p, solver = problem(T_Pa // 10 - 1, depth), dmft.MonteCarlo(n_samples=4096, mesh=d)
                est, xla = dmft.estimate(p, solver).memory, dmft.costs.xla_bytes(p, solver)
                print(f"{depth:>5} {T_Pa:>6} {d:>7} {est / 1e9:>7.3f} {xla / 1e9:>7.3f} {est / xla:>9.2f}", flush=True)


def networks(widths, n_seeds=8):
    """Seed ensembles by GD on the grid of a T Pa = 1000 problem, against the DMFT's loss."""
    p = problem(99)
    sol = dmft.solve(p, dmft.MonteCarlo(), key=0)
    loss0 = float(sol.loss[0])
    print(f"\nnetworks, depth 2 tanh, P = 10, 100 GD steps, {n_seeds} seeds; DMFT final loss {float(sol.loss[-1]):.5f}")
    print(f"{'width':>6} {'first s':>8} {'again s':>8} {'max |loss - DMFT| / loss0':>26} {'seed SE / loss0':>15}")
    keys = jr.split(jr.key(1), n_seeds)
    for N in widths:
        run = eqx.filter_jit(lambda p, keys, N=N: dmft.networks.ensemble(p, N, keys, method="gd").loss)
        start = time.perf_counter()
        jax.block_until_ready(run(p, keys))
        first = time.perf_counter() - start
        start = time.perf_counter()
        loss = np.asarray(jax.block_until_ready(run(p, keys)))
        again = time.perf_counter() - start
        gap = np.abs(loss.mean(0) - np.asarray(sol.loss)).max() / loss0
        se = (loss.std(0, ddof=1) / np.sqrt(n_seeds)).max() / loss0
        print(f"{N:>6} {first:>8.1f} {again:>8.2f} {gap:>26.2e} {se:>15.2e}", flush=True)


def precision(n_steps):
    """float32 against float64 on the same data and key, at the default and the highest matmul precision."""
    data = [np.asarray(x) for x in jax.tree.leaves(dmft.datasets.sphere(10, 25, 0, target="noise"))]

    def make(depth, act):
        return dmft.Problem(dmft.Dataset(*data), dmft.MLP(depth, act), gamma0=1.0, t_max=0.1 * n_steps, n_steps=n_steps)

    cases = {
        "LinearClosure, depth 2": lambda: dmft.solve(make(2, "linear"), dmft.LinearClosure()),
        "networks N = 4096, depth 2 tanh, GD": lambda: dmft.networks.train(make(2, "tanh"), 4096, 0, method="gd"),
        "MonteCarlo(), depth 2 tanh": lambda: dmft.solve(make(2, "tanh"), dmft.MonteCarlo(), key=0),
    }
    print(f"\nfloat32 against float64, P = 10, T Pa = {10 * (n_steps + 1)}: max over time of |loss difference| / loss0")
    for name, fn in cases.items():
        hi = fn()
        loss0 = float(hi.loss[0])
        row = []
        for matmul in ("default", "highest"):
            context = contextlib.nullcontext() if matmul == "default" else jax.default_matmul_precision(matmul)
            with jax.enable_x64(False), context:
                start = time.perf_counter()
                lo = jax.block_until_ready(fn())
                seconds = time.perf_counter() - start
            diff = np.abs(np.asarray(lo.loss, np.float64) - np.asarray(hi.loss))
            text = f"{matmul} {diff.max() / loss0:.1e} ({seconds:.1f} s)"
            if getattr(hi, "stderr", None) is not None:
                se = np.hypot(np.asarray(lo.stderr["loss"], np.float64), np.asarray(hi.stderr["loss"]))
                text += f", max |diff| / combined SE {(diff[1:] / se[1:]).max():.2f}"  # t = 0 is exact
            row.append(text)
        print(f"{name}: " + "; ".join(row), flush=True)


if __name__ == "__main__":
    if MESH:
        mesh()
        sys.exit()
    gpu = jax.default_backend() == "gpu"
    parts = [a for a in sys.argv[1:] if not a.startswith("--")] or ["monte_carlo", "linear", "compile"]
    half = (lambda sizes: sizes[: (len(sizes) + 1) // 2]) if "--quick" in sys.argv else (lambda sizes: sizes)
    print(f"JAX {jax.__version__}, {jax.devices()[0].device_kind}, {dmft.costs.device_memory() / 1e9:.0f} GB")
    for part in parts:
        if part == "monte_carlo":
            monte_carlo(half([1250, 2500, 5000, 10000] if gpu else [250, 500, 1000, 2000]))
        elif part == "solved":
            solved(10000 if gpu else 2000)
        elif part == "linear":
            linear(half([2000, 4000, 8000, 16000, 32000] if gpu else [250, 500, 1000, 2000, 4000, 8000]))
        elif part == "compile":
            compile_time()
        elif part == "_compile_child":  # compile_time's fresh processes
            print(*_compile_once())
        elif part == "networks":
            networks(half([1024, 4096, 16384] if gpu else [256, 1024, 4096]))
        elif part == "precision":
            precision(99 if gpu else 29)
        else:
            raise SystemExit(f"unknown part {part!r}")
