"""Several outputs: the cost of a 10-class solve against the scalar one at equal P and T.

For C = 1 (scalar MSE) and C = 10 (one-hot cross-entropy) on the same inputs, prints the wall time
of a converged solve (compilation included, then a second, compiled call), `dmft.estimate`'s memory,
the solution's stored bytes, and which order parameters grew with C:

* `LinearClosure`, depth 2, P = 10, 40 steps: the backward index is (time, class), so its factors
  and G grow C-fold / C^2-fold; Phi does not.
* `MonteCarlo`, depth 1 (THEORY 7), P = 20 (+ 20 test points), 40 steps, S = 4096.
* `MonteCarlo`, depth 2, P = 6, 10 steps, S = 4096: every G^l and response carries the class index.

Run: python benchmarks/classes.py
"""

import time

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402

import dmft  # noqa: E402


def problem(C, P, P_test, depth, act, n_steps):
    base = dmft.datasets.sphere(P, 20, 0, P_test=P_test)
    X = base.X_all
    if C == 1:
        y = X @ jr.normal(jr.key(1), (20,)) / np.sqrt(20)
        data = dmft.Dataset(X[:P], y[:P], X[P:] if P_test else None, y[P:] if P_test else None)
        loss = "mse"
    else:
        Y = dmft.datasets.one_hot(np.asarray(jnp.argmax(X @ jr.normal(jr.key(1), (20, C)), 1)), C)
        data = dmft.Dataset(X[:P], Y[:P], X[P:] if P_test else None, Y[P:] if P_test else None)
        loss = "cross_entropy"
    return dmft.Problem(data, dmft.MLP(depth, act), gamma0=1.0, t_max=0.1 * n_steps, n_steps=n_steps, loss=loss)


def timed(p, solver):
    t0 = time.perf_counter()
    sol = dmft.solve(p, solver, key=0)
    jax.block_until_ready(sol.f)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(dmft.solve(p, solver, key=0).f)
    return sol, first, time.perf_counter() - t0


def stored(sol):
    return {k: v.nbytes for k, v in vars(sol).items() if isinstance(v, jax.Array)}


def main():
    cases = [
        (
            "LinearClosure depth 2, P=10, 40 steps",
            dict(P=10, P_test=0, depth=2, act="linear", n_steps=40),
            dmft.LinearClosure(),
        ),
        (
            "MonteCarlo depth 1, P=20+20, 40 steps",
            dict(P=20, P_test=20, depth=1, act="tanh", n_steps=40),
            dmft.MonteCarlo(n_samples=4096),
        ),
        (
            "MonteCarlo depth 2, P=6, 10 steps",
            dict(P=6, P_test=0, depth=2, act="tanh", n_steps=10),
            dmft.MonteCarlo(n_samples=4096),
        ),
    ]
    for name, kw, solver in cases:
        print(f"== {name}")
        rows = {}
        for C in (1, 10):
            p = problem(C, **kw)
            sol, first, second = timed(p, solver)
            est = dmft.estimate(p, solver)
            rows[C] = stored(sol)
            print(
                f"C = {C:2d}: first call {first:7.2f} s, compiled {second:7.2f} s, "
                f"iterations {int(sol.iterations):3d}, "
                f"estimate {est.memory / 1e6:8.1f} MB, stored {sum(rows[C].values()) / 1e6:7.2f} MB, "
                f"final loss {float(sol.loss[-1]):.4f}"
            )
        grew = {k: rows[10][k] / rows[1][k] for k in rows[1] if rows[1][k]}
        print("stored bytes, C = 10 over C = 1:", ", ".join(f"{k} {v:.0f}x" for k, v in grew.items()))


if __name__ == "__main__":
    main()
