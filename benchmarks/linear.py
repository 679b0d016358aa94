"""LinearClosure speed and memory: the reference problem, then doublings of n and P.

Reference (PAPER_NOTES F2): P = 20, D = 40, X ~ N(0, 1), y = +1 / -1 halves, depth 5, gamma0 = 1.5,
100 steps of eta0 dt = 0.025 (t_max = 2.5). The authors' public notebook solver takes ~23 s on a
2-core machine for 10 unconverged iterations; the target is a converged solve (relative residual
<= 1e-8) in under 23 / 20 = 1.15 s after compilation.

Run: python benchmarks/linear.py
"""

import time

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402

import dmft  # noqa: E402

REFERENCE_SECONDS = 23.0


def problem(P=20, n_steps=100, depth=5, gamma0=1.5):
    """The reference problem on [0, 2.5]; a larger n_steps refines the grid (same t_max)."""
    X = jr.normal(jr.key(0), (P, 40))
    y = jnp.where(jnp.arange(P) < P // 2, 1.0, -1.0)
    return dmft.Problem(dmft.Dataset(X, y), dmft.MLP(depth, "linear"), gamma0=gamma0, t_max=2.5, n_steps=n_steps)


def timed(p, solver=dmft.LinearClosure(rtol=1e-8)):
    sol = dmft.solve(p, solver)
    sol.loss.block_until_ready()  # compile
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        sol = dmft.solve(p, solver)
        sol.loss.block_until_ready()
        best = min(best, time.perf_counter() - start)
    return sol, best


def memory_mb(p):
    """Iteration state (factors) and the returned two-time Phi, in MB of float64."""
    L, T, Pa = p.depth, p.n_steps + 1, p.data.Kx.shape[0]
    state = 2 * L * T * T * Pa + L * T * T + (L - 1) * T * T * Pa
    returned = L * (T * Pa) ** 2
    return 8 * state / 1e6, 8 * returned / 1e6


if __name__ == "__main__":
    print(f"{'P':>4} {'n':>5} {'L':>3} {'iters':>6} {'residual':>10} {'seconds':>8} {'state MB':>9} {'Phi MB':>8}")
    rows = [(20, 100), (20, 200), (40, 100)]
    times = {}
    for P, n in rows:
        p = problem(P, n)
        sol, seconds = timed(p)
        it = int(sol.iterations)
        state_mb, phi_mb = memory_mb(p)
        times[(P, n)] = seconds
        print(f"{P:>4} {n:>5} {5:>3} {it:>6} {float(sol.residuals[it - 1]):>10.1e} {seconds:>8.3f} {state_mb:>9.1f} {phi_mb:>8.1f}")
        if (P, n) == (20, 100):
            print(f"     reference ratio: {REFERENCE_SECONDS:.0f} s / {seconds:.3f} s = {REFERENCE_SECONDS / seconds:.1f}x (target 20x)")
    print(f"time ratio when n doubles: {times[(20, 200)] / times[(20, 100)]:.2f} (iteration O(L^2 n^3 P) flops, memory O(L n^2 P))")
    print(f"time ratio when P doubles: {times[(40, 100)] / times[(20, 100)]:.2f} (returned two-time Phi: O(L (nP)^2) memory)")
