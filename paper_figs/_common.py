"""Helpers shared by the figure scripts: data, notebook-to-Problem mapping, network ensembles, output.

Conventions (PAPER_NOTES 11): the authors' notebooks run full-batch gradient descent with step eta0
for T steps. Our `Problem` with `t_max = eta0 * T`, `n_steps = T` (and the library's eta0 = 1) has the
same step, so networks trained with `method="gd"` have the discrete DMFT as their exact limit. Figures
plot the paper's loss `mean (f - y)^2` (twice the library's `0.5 mean (f - y)^2`) against `t = eta0 k`.
"""

from __future__ import annotations

import argparse
import os
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import dmft  # noqa: E402
import dmft.plotting  # noqa: E402  (not imported by `import dmft`: it pulls in matplotlib)

__all__ = [
    "PALETTE",
    "paper_data",
    "notebook_problem",
    "train_seeds",
    "paper_loss",
    "alignment",
    "layer_alignment",
    "save",
    "run_cli",
    "timed",
    "check_finite",
]

PALETTE = dmft.plotting.PALETTE


def paper_data(P: int, D: int, seed: int = 0, P_test: int = 0) -> dmft.Dataset:
    """The notebooks' synthetic task: x ~ N(0, I_D), y = +1 on the first ceil(P/2) points, -1 after.

    (F1 uses 12 / 13 of 25, F2 10 / 10 of 20.) Test points, if any, get the same half / half labels.
    """
    if P < 2 or D < 1 or P_test < 0:
        raise ValueError(f"need P >= 2, D >= 1, P_test >= 0; got P={P}, D={D}, P_test={P_test}")
    X = jr.normal(jr.key(seed), (P + P_test, D))
    labels = lambda n: jnp.where(jnp.arange(n) < n // 2, 1.0, -1.0)
    if P_test:
        return dmft.Dataset(X[:P], labels(P), X[P:], labels(P_test))
    return dmft.Dataset(X, labels(P))


def notebook_problem(data, net, gamma0, eta0, T) -> dmft.Problem:
    """`T` gradient-descent steps of size `eta0` (the notebooks' parameters) as a `dmft.Problem`."""
    if eta0 <= 0 or T < 1:
        raise ValueError(f"need eta0 > 0 and T >= 1 steps; got eta0={eta0}, T={T}")
    return dmft.Problem(data, net, gamma0=gamma0, t_max=eta0 * T, n_steps=int(T))


def train_seeds(problem, width: int, seeds: int, key: int = 0, center: bool = True):
    """`seeds` networks of `width`, trained by discrete GD (vmapped): a `Run` with a leading seed axis."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    keys = jr.split(jr.fold_in(jr.key(key), width), seeds)
    run = jax.vmap(lambda k: dmft.networks.train(problem, width, k, center=center, method="gd"))(keys)
    check_finite(run.loss, f"network loss (width {width})")
    return run


def check_finite(x, what: str):
    """Raise if a curve has NaN / inf (a diverged training run must not be plotted silently)."""
    if not np.all(np.isfinite(np.asarray(x))):
        raise FloatingPointError(f"{what} is not finite: training or solve diverged")
    return x


def paper_loss(loss):
    """The paper's `mean (f - y)^2` from the library's `0.5 mean (f - y)^2`."""
    return 2.0 * np.asarray(loss)


def alignment(K1, K2):
    """`dmft.plotting.alignment` over all axes (1 = same up to scale), as a float."""
    return float(dmft.plotting.alignment(np.ravel(K1)[None], np.ravel(K2)[None]))


def layer_alignment(A, B):
    """Mean over layers (leading axis) of `alignment(A[l], B[l])`."""
    return float(np.mean([alignment(a, b) for a, b in zip(A, B)]))


def save(fig, out: str, name: str) -> list[str]:
    """Write `out/name.png` and `.pdf`; return the paths."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"{name}.{ext}") for ext in ("png", "pdf")]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths


class timed:
    """Context manager printing the wall time of a block (progress on a 2-core machine)."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        print(f"  [{time.perf_counter() - self.t0:6.1f} s] {self.what}", flush=True)


def run_cli(main, doc: str, extra: dict | None = None):
    """`python paper_figs/fN_xxx.py [--quick] [--out DIR]`: run `main` and print its numbers.

    `extra`: more options, `{"--flag-name": argparse kwargs}`, passed to `main` as `flag_name=`.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for tests")
    parser.add_argument("--out", default="paper_figs/out", help="output folder for PNG / PDF")
    for flag, kwargs in (extra or {}).items():
        parser.add_argument(flag, **kwargs)
    args = vars(parser.parse_args())
    t0 = time.perf_counter()
    result = main(**args)
    print(f"total {time.perf_counter() - t0:.1f} s")
    for k, v in result.items():
        if k != "files":
            print(f"{k}: {v}")
    print("files:", *result.get("files", []), sep="\n  ")
    return result
