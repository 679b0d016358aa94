"""F3: where the approximations of the literature break down (BP22, `Linear_DMFT.ipynb` "gamma sweep").

Deep linear networks, solved exactly by `LinearClosure`, against the static NTK (`Lazy`), the gradient
independence approximation (GIA: `LinearClosure(responses=False)`), leading-order perturbation theory
(`Perturbative`: the exact O(gamma0^2) term, not the notebook's GIA-type expansion, PAPER_NOTES 9.3)
and a finite network; then a nonlinear case (tanh) with `MonteCarlo` vs `MonteCarlo(responses="none")`,
`Lazy` and `Perturbative`.

Error of an approximation = max_t |loss_approx(t) - loss_DMFT(t)| / loss(0) (paper loss mean (f-y)^2),
and 1 - the mean-over-layers alignment of its final feature kernels Phi^l(T, T) with the DMFT's.
GIA is exact at depth 1 (there are no response functions), so its error there is exactly 0.
Paper settings: L = 5, gamma0 = 1.5, D = 40, P = 20, eta0 = 0.025, T = 100, gamma0 in linspace(0.25, 1.5, 15).
We take eta0 = 0.05, T = 50 (same t_max = 2.5) and 6 values of gamma0: `Perturbative` costs ~40 s per
gamma0 at T = 100 on 2 cores and ~T^3.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib.pyplot as plt
import numpy as np

import dmft
from paper_figs._common import (
    PALETTE,
    check_finite,
    layer_alignment,
    notebook_problem,
    paper_data,
    paper_loss,
    run_cli,
    save,
    timed,
    train_seeds,
)

FULL = dict(
    P=20,
    D=40,
    eta0=0.05,
    T=50,
    L=5,
    gamma=1.5,
    gammas=tuple(np.linspace(0.25, 1.5, 6)),
    depths=(1, 2, 3, 4, 5),
    width=2200,
    nl=dict(P=10, D=25, eta0=0.1, T=30, gamma=1.5, depths=(1, 2, 3), samples=4096, width=2000),
)
QUICK = dict(
    P=6,
    D=10,
    eta0=0.1,
    T=10,
    L=3,
    gamma=1.5,
    gammas=(0.5, 1.5),
    depths=(1, 3),
    width=200,
    nl=dict(P=4, D=8, eta0=0.2, T=8, gamma=1.5, depths=(1, 2), samples=512, width=200),
)

LINEAR_METHODS = {  # label -> solver; "DMFT" is the reference
    "DMFT": dmft.LinearClosure(),
    "static NTK": dmft.Lazy(discrete=True),
    "GIA": dmft.LinearClosure(responses=False),
    "perturbative": dmft.Perturbative(),
}


def loss_error(sol, ref):
    """max_t |loss(t) - loss_ref(t)| / loss_ref(0), in the paper's loss units."""
    a, b = paper_loss(sol.loss), paper_loss(ref.loss)
    return float(np.max(np.abs(a - b)) / b[0])


def kernel_misalignment(sol, ref):
    """1 - mean over layers of A(Phi^l(T, T), Phi^l_ref(T, T)) (0 = same final kernels up to scale)."""
    return 1.0 - layer_alignment(np.asarray(sol.Phi_eq)[:, -1], np.asarray(ref.Phi_eq)[:, -1])


def _solve_methods(problem, methods, key=0):
    sols = {name: dmft.solve(problem, s, key=key) for name, s in methods.items()}
    for name, sol in sols.items():
        check_finite(sol.loss, f"{name} loss")
    return sols


def _errors(sols):
    ref = sols["DMFT"]
    return {n: (loss_error(s, ref), kernel_misalignment(s, ref)) for n, s in sols.items() if n != "DMFT"}


def _linear(cfg, data):
    cache = {}  # (L, gamma0) -> solutions: the sweeps share the (L, gamma) point of panel (a)

    def solved(L, g):
        if (L, float(g)) not in cache:
            problem = notebook_problem(data, dmft.MLP(L, "linear"), g, cfg["eta0"], cfg["T"])
            cache[L, float(g)] = _solve_methods(problem, LINEAR_METHODS)
        return cache[L, float(g)]

    with timed(f"linear L = {cfg['L']}, gamma0 = {cfg['gamma']}: all methods + network N = {cfg['width']}"):
        curves = solved(cfg["L"], cfg["gamma"])
        problem = notebook_problem(data, dmft.MLP(cfg["L"], "linear"), cfg["gamma"], cfg["eta0"], cfg["T"])
        run = train_seeds(problem, cfg["width"], 1)
    with timed(f"linear gamma0 sweep {len(cfg['gammas'])} values"):
        vs_gamma = [_errors(solved(cfg["L"], g)) for g in cfg["gammas"]]
    with timed(f"linear depth sweep {cfg['depths']}"):
        vs_depth = [_errors(solved(L, cfg["gamma"])) for L in cfg["depths"]]
    return curves, run, vs_gamma, vs_depth


def _nonlinear(nl):
    data = paper_data(nl["P"], nl["D"])
    methods = {
        "DMFT": dmft.MonteCarlo(n_samples=nl["samples"], chunk_size=min(1024, nl["samples"])),
        "GIA": dmft.MonteCarlo(n_samples=nl["samples"], chunk_size=min(1024, nl["samples"]), responses="none"),
        "static NTK": dmft.Lazy(discrete=True),
        "perturbative": dmft.Perturbative(n_samples=4 * nl["samples"]),
    }
    rows = {}
    for L in nl["depths"]:
        with timed(f"tanh L = {L}: DMFT, GIA (same key), lazy, perturbative, network N = {nl['width']}"):
            problem = notebook_problem(data, dmft.MLP(L, "tanh"), nl["gamma"], nl["eta0"], nl["T"])
            rows[L] = (_solve_methods(problem, methods), train_seeds(problem, nl["width"], 1))
    return rows


def _curves_panel(ax, sols, run, title):
    styles = {
        "DMFT": ("k", "-"),
        "static NTK": (PALETTE[2], ":"),
        "GIA": (PALETTE[5], "--"),
        "perturbative": (PALETTE[3], "-."),
    }
    ts = np.asarray(sols["DMFT"].ts)
    ax.plot(ts, paper_loss(run.loss).mean(0), color=PALETTE[1], lw=4, alpha=0.6, label="network")
    for name, sol in sols.items():
        c, ls = styles[name]
        ax.plot(ts, paper_loss(sol.loss), color=c, ls=ls, lw=1.5, label=name)
    ax.set(xlabel=r"$t=\eta_0 k$", ylabel=r"loss $\mathrm{mean}(f-y)^2$", yscale="log", title=title)
    ax.legend(frameon=False, fontsize=7)


def _error_panel(ax, xs, table, idx, xlabel, ylabel, title, linthresh=None):
    """Errors of each approximation vs xs; `linthresh`: symlog axis, so that an exact 0 is drawn at 0."""
    colours = {"static NTK": PALETTE[2], "GIA": PALETTE[5], "perturbative": PALETTE[3]}
    for name in table[0]:
        vals = np.array([row[name][idx] for row in table])
        ax.plot(xs, vals, "o-", color=colours[name], label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_yscale("log") if linthresh is None else ax.set_yscale("symlog", linthresh=linthresh)
    ax.legend(frameon=False, fontsize=7)


def main(quick: bool = False, out: str = "paper_figs/out") -> dict:
    cfg = QUICK if quick else FULL
    curves, run, vs_gamma, vs_depth = _linear(cfg, paper_data(cfg["P"], cfg["D"]))
    nl_rows = _nonlinear(cfg["nl"])
    fig, ax = plt.subplots(2, 3, figsize=(13, 7.5), layout="constrained")
    _curves_panel(ax[0, 0], curves, run, rf"(a) deep linear L={cfg['L']}, $\gamma_0={cfg['gamma']}$")
    g, d = list(cfg["gammas"]), list(cfg["depths"])
    _error_panel(
        ax[0, 1],
        g,
        vs_gamma,
        0,
        r"$\gamma_0$",
        "max$_t$ |loss error| / loss(0)",
        f"(b) loss error vs DMFT, L={cfg['L']}",
    )
    _error_panel(
        ax[0, 2],
        g,
        vs_gamma,
        1,
        r"$\gamma_0$",
        r"$1-\langle A(\Phi^\ell_{\rm approx}(T),\Phi^\ell(T))\rangle_\ell$",
        f"(c) final-kernel misalignment, L={cfg['L']}",
    )
    _error_panel(
        ax[1, 0],
        d,
        vs_depth,
        0,
        "depth L",
        "max$_t$ |loss error| / loss(0)",
        rf"(d) linear, $\gamma_0={cfg['gamma']}$ (GIA exactly 0 at L=1)",
        linthresh=1e-3,
    )
    nl, L_nl = cfg["nl"], max(cfg["nl"]["depths"])
    sols, nl_run = nl_rows[L_nl]
    _curves_panel(ax[1, 1], sols, nl_run, rf"(e) tanh L={L_nl}, $\gamma_0={nl['gamma']}$, N={nl['width']}")
    nl_err = [_errors(s) for s, _ in nl_rows.values()]
    _error_panel(
        ax[1, 2],
        list(nl["depths"]),
        nl_err,
        0,
        "depth L",
        "max$_t$ |loss error| / loss(0)",
        "(f) tanh (GIA exactly 0 at L=1)",
        linthresh=1e-3,
    )
    ax[1, 2].set_xticks(list(nl["depths"])), ax[1, 0].set_xticks(d)
    fig.suptitle(
        f"F3: approximations vs the full DMFT. Linear: P={cfg['P']}, D={cfg['D']}, "
        f"$\\eta_0$={cfg['eta0']}, T={cfg['T']}; "
        f"tanh: P={nl['P']}, D={nl['D']}, $\\eta_0$={nl['eta0']}, T={nl['T']}, S={nl['samples']}",
        fontsize=9,
    )
    files = save(fig, out, "f3_approximations" + ("_quick" if quick else ""))
    per = lambda table, i: {n: [row[n][i] for row in table] for n in table[0]}
    return {
        "files": files,
        "gammas": [float(x) for x in g],
        "depths": d,
        "linear_loss_error_vs_gamma": per(vs_gamma, 0),
        "linear_kernel_misalignment_vs_gamma": per(vs_gamma, 1),
        "linear_loss_error_vs_depth": per(vs_depth, 0),
        "linear_kernel_misalignment_vs_depth": per(vs_depth, 1),
        "linear_final_loss": {n: float(paper_loss(s.loss)[-1]) for n, s in curves.items()}
        | {"network": float(paper_loss(run.loss)[0, -1])},
        "tanh_depths": list(nl["depths"]),
        "tanh_loss_error_vs_depth": per(nl_err, 0),
        "tanh_final_loss": {
            L: {n: float(paper_loss(s.loss)[-1]) for n, s in ss.items()} | {"network": float(paper_loss(r.loss)[0, -1])}
            for L, (ss, r) in nl_rows.items()
        },
    }


if __name__ == "__main__":
    run_cli(main, __doc__)
