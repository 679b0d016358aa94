"""Cost of `dmft.fluctuations` against the DMFT solve it starts from.

The demo's data (sphere, P = 16 + 4 test points, D = 20, gamma0 = 1, t_max = 10) with a two-layer network
(the fluctuations cover depth 1): relu as in `dmft demo`, and tanh, both with the mean shift;
`MonteCarlo(n_samples=8192)` as in `dmft demo`, and the tanh network of `dmft demo --task fluctuations`
(30 steps, `MonteCarlo(n_samples=65536)`). For 30 and 60 steps prints the wall time of the solve
and of the fluctuations (first call, compilation included, then a second, compiled call) and their
ratio. The fluctuations build the Jacobian of the mean predictions with respect to the error signal by
forward mode, one tangent per (time, point, class) of the train grid, over all sampled neurons: their
cost grows like (T P)^2 S, the solve's like T P^2 S per iteration.

Then the deep linear propagator (depth 2 and 3, gamma0 = 1, `sphere(3, 8)`, t_max = 1.5) against the
`LinearClosure` solve: m = (4 L - 2) (T Pa)^2 + T Pa order parameters, one Krylov solve per prediction
and NTK entry (T Pa + T P (P + 1) / 2 of them), each product O(L (T Pa)^3); on grids with 2m <= 8192 the
fluctuations include the one-loop mean shift (dense in 2m, its derivatives O((T Pa)^5)), whose compiled
time is printed alone.

Then deep tanh networks in the lazy limit (the demo's data at P = 16 and 32, 30 steps, gamma0 = 0) against
the `Lazy(discrete=True)` solve: the variances (one pass over each layer's neurons, their influences on
the Pa x Pa kernels) and the mean shift (8 estimates, products of influences and fourth-order moments:
O(S Pa^4) per layer), whose compiled time is printed alone.

Then the sampled propagator of deep tanh and relu networks (`sphere(3, 8)`, gamma0 = 1, t_max = 0.6 per
step, its default 16384 samples) against the `MonteCarlo(n_samples=16384)` solve: dense m x m algebra and
per-sample derivatives costing O((T Pa)^5) each; relu's at three smoothing widths.

Run: python benchmarks/fluctuations.py [--deep]   (--deep: only the deep tables)
"""

import sys
import time
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import dmft  # noqa: E402
from dmft import _lazy, _one_loop  # noqa: E402
from dmft._keys import as_key  # noqa: E402


def problem(n_steps, activation):
    data = dmft.datasets.sphere(16, 20, 0, P_test=4)
    return dmft.Problem(data, dmft.MLP(1, activation), gamma0=1.0, t_max=10.0, n_steps=n_steps)


def wall(fn, *args, **kwargs):
    """`(seconds, result)` of one call."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    jax.block_until_ready(jax.tree.leaves(out))
    return time.perf_counter() - start, out


def main():
    print(
        "act   steps   T P   samples   solve first / compiled (s)   fluctuations first / compiled (s)   "
        "ratio first / compiled"
    )
    # the last row is `dmft demo --task fluctuations`: its solve has 65536 samples
    for activation, n_steps, S in (
        ("relu", 30, 8192),
        ("relu", 60, 8192),
        ("tanh", 30, 8192),
        ("tanh", 60, 8192),
        ("tanh", 30, 65536),
    ):
        p, solver = problem(n_steps, activation), dmft.MonteCarlo(n_samples=S)
        s1, sol = wall(dmft.solve, p, solver, key=0)
        s2, _ = wall(dmft.solve, p, solver, key=1)
        f1, _ = wall(dmft.fluctuations, p, sol, key=0)
        f2, _ = wall(dmft.fluctuations, p, sol, key=1)
        sizes = f"{activation:5s} {n_steps:5d} {(n_steps + 1) * p.P:5d} {S:9d}"
        print(f"{sizes}   {s1:8.1f} / {s2:6.2f}{'':14s}{f1:8.1f} / {f2:6.2f}{'':18s}{f1 / s1:5.1f} / {f2 / s2:5.0f}")


def deep_linear():
    head = "depth   T Pa      m   closure first / compiled (s)   fluctuations first / compiled (s)   one loop (s)"
    print(head)
    for depth, n_steps in ((2, 3), (2, 5), (2, 7), (2, 11), (2, 15), (3, 3), (3, 5), (3, 7)):
        data = dmft.datasets.sphere(3, 8, 0)
        p = dmft.Problem(data, dmft.MLP(depth, "linear"), gamma0=1.0, t_max=1.5, n_steps=n_steps)
        s1, sol = wall(dmft.solve, p, dmft.LinearClosure())
        s2, _ = wall(dmft.solve, p, dmft.LinearClosure())
        f1, fl = wall(dmft.fluctuations, p, sol, key=0)
        f2, _ = wall(dmft.fluctuations, p, sol, key=0)
        # the compiled mean shift alone, where `fluctuations` computes it (`_one_loop.ONE_LOOP_MAX`), at
        # the matmul precision `fluctuations` sets (a part of the compiled function's cache key)
        with jax.default_matmul_precision("highest"):
            one_loop = "-" if fl.f_bias is None else f"{wall(_one_loop.mean_shift, p, sol.f)[0]:.2f}"
        n = (n_steps + 1) * p.P
        m = (4 * depth - 2) * n * n + n
        print(f"{depth:5d} {n:6d} {m:6d}   {s1:12.2f} / {s2:6.3f}{'':13s}{f1:10.1f} / {f2:6.2f}{'':14s}{one_loop:>6s}")


def deep_lazy():
    print("depth    Pa   Lazy solve (s)   fluctuations first / compiled (s)   mean shift alone (s)")
    for depth, P in ((2, 16), (3, 16), (2, 32), (3, 32)):
        data = dmft.datasets.sphere(P, 20, 0, P_test=P // 4)
        p = dmft.Problem(data, dmft.MLP(depth, "tanh"), gamma0=0.0, t_max=10.0, n_steps=30)
        s1, sol = wall(dmft.solve, p, dmft.Lazy(discrete=True))
        f1, _ = wall(dmft.fluctuations, p, sol, key=0)
        f2, _ = wall(dmft.fluctuations, p, sol, key=1)
        with jax.default_matmul_precision("highest"):  # as `fluctuations` calls it (a part of the cache key)
            shift = wall(_lazy.lazy_bias, p, as_key(1), 4096, 512)[0]
        print(f"{depth:5d} {data.Kx.shape[0]:5d}   {s1:14.2f}   {f1:12.1f} / {f2:6.2f}{'':18s}{shift:8.2f}")


def deep_sampled(activation):
    head = "depth   T Pa      m   MonteCarlo first / compiled (s)   sampled propagator first / compiled (s)"
    print(f"{activation}: {head}")
    for depth, n_steps in ((2, 2), (2, 3), (3, 2)):
        data = dmft.datasets.sphere(3, 8, 0)
        p = dmft.Problem(data, dmft.MLP(depth, activation), gamma0=1.0, t_max=0.6 * n_steps, n_steps=n_steps)
        solver = dmft.MonteCarlo(n_samples=16384)
        s1, sol = wall(dmft.solve, p, solver, key=0)
        s2, _ = wall(dmft.solve, p, solver, key=1)
        f1, _ = wall(dmft.fluctuations, p, sol, key=0)
        f2, _ = wall(dmft.fluctuations, p, sol, key=1)
        n = (n_steps + 1) * p.P
        m = (4 * depth - 2) * n * n + n
        print(f"{'':6s}{depth:5d} {n:6d} {m:6d}   {s1:15.2f} / {s2:6.2f}{'':13s}{f1:12.1f} / {f2:6.1f}")


if __name__ == "__main__":
    warnings.simplefilter("ignore", UserWarning)  # relu's documented limitation, said at every call
    if "--deep" not in sys.argv:
        main()
    deep_linear()
    deep_lazy()
    deep_sampled("tanh")
    deep_sampled("relu")
