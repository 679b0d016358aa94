"""F1: two-layer ReLU networks, rich vs lazy (BP22, notebook `two_layer_nonlinear_DMFT.ipynb`).

Loss curves of the Monte Carlo DMFT against finite networks for several gamma0, the final feature and
gradient kernels Phi^1, G^1 (theory vs experiment), and the preactivation densities of the networks.
Paper settings: D = 40, P = 25, eta0 = 0.075, T = 200 steps, N = 3000, S = 1000 single-site samples.
We use S = 4096 (the library's default; the two-layer fast path is cheap) and centred networks.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib.pyplot as plt
import numpy as np

import dmft
import dmft.plotting
from paper_figs._common import (
    PALETTE,
    alignment,
    check_finite,
    notebook_problem,
    paper_data,
    paper_loss,
    run_cli,
    save,
    timed,
    train_seeds,
)

FULL = dict(P=25, D=40, eta0=0.075, T=200, gammas=(0.2, 1.0, 2.0, 3.0), width=3000, seeds=1, samples=4096)
QUICK = dict(P=8, D=10, eta0=0.075, T=20, gammas=(0.2, 1.0, 3.0), width=256, seeds=1, samples=512)


def _solve_all(cfg):
    """DMFT and networks at every gamma0, plus the lazy limit on the same grid."""
    data = paper_data(cfg["P"], cfg["D"])
    net = dmft.MLP(1, "relu")
    out = {}
    for g in cfg["gammas"]:
        problem = notebook_problem(data, net, g, cfg["eta0"], cfg["T"])
        with timed(f"gamma0 = {g}: DMFT + network N = {cfg['width']}"):
            sol = dmft.solve(
                problem, dmft.MonteCarlo(n_samples=cfg["samples"], chunk_size=min(1024, cfg["samples"])), key=0
            )
            run = train_seeds(problem, cfg["width"], cfg["seeds"])
        check_finite(sol.loss, f"DMFT loss at gamma0 = {g}")
        out[g] = (sol, run)
    lazy = dmft.solve(notebook_problem(data, net, cfg["gammas"][0], cfg["eta0"], cfg["T"]), dmft.Lazy(discrete=True))
    return data, out, lazy


def _loss_panel(ax, results, lazy):
    for i, (g, (sol, run)) in enumerate(results.items()):
        c = PALETTE[1 + i]
        ts = np.asarray(sol.ts)
        ax.plot(ts, paper_loss(run.loss).mean(0), color=c, lw=1.5, label=rf"$\gamma_0={g}$ network")
        ax.plot(ts, paper_loss(sol.loss), color=c, lw=1.5, ls="--")
    ax.plot(ts, paper_loss(lazy.loss), color=PALETTE[0], lw=1, ls=":", label="lazy (static NTK)")
    ax.plot([], [], color="gray", ls="--", label="DMFT (dashed)")
    ax.set(xlabel=r"$t=\eta_0 k$", ylabel=r"loss $\mathrm{mean}(f-y)^2$", yscale="log", title="(a) train loss")
    ax.legend(frameon=False, fontsize=7)


def _heatmaps(axes, sol, run, g):
    """Final Phi^1 and G^1: DMFT (top) vs network (bottom), a shared colour scale per kernel."""
    for j, name in enumerate(("Phi_eq", "G_eq")):
        theory = np.asarray(getattr(sol, name))[0, -1]
        expt = np.asarray(getattr(run, name)).mean(0)[0, -1]
        lo, hi = min(theory.min(), expt.min()), max(theory.max(), expt.max())
        label = r"\Phi^1" if j == 0 else r"G^1"
        for i, (K, who) in enumerate(((theory, "DMFT"), (expt, "network"))):
            im = axes[i, j].imshow(K, vmin=lo, vmax=hi, cmap="viridis")
            axes[i, j].set_title(rf"${label}(T)$ {who}, $\gamma_0={g}$", fontsize=8)
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
        plt.colorbar(im, ax=axes[:, j], shrink=0.7)


def _density_panel(ax, results):
    lo, hi = min(results), max(results)
    for g, c in ((lo, PALETTE[2]), (hi, PALETTE[5])):
        h = np.asarray(results[g][1].h_last)[:, 0].ravel()
        ax.hist(h, bins=80, density=True, histtype="step", color=c, lw=1.5, label=rf"$\gamma_0={g}$")
    grid = np.linspace(-4, 4, 200)
    var = float(np.mean(np.asarray(results[lo][1].h_last) ** 2))
    ax.plot(
        grid, np.exp(-(grid**2) / (2 * var)) / np.sqrt(2 * np.pi * var), color="gray", lw=0.8, ls=":", label="Gaussian"
    )
    ax.set(
        xlabel=r"final preactivation $h_\mu$ (all $\mu$, neurons)",
        ylabel="density",
        yscale="log",
        title="(d) network $p(h)$",
    )
    ax.legend(frameon=False, fontsize=7)


def main(quick: bool = False, out: str = "paper_figs/out") -> dict:
    cfg = QUICK if quick else FULL
    data, results, lazy = _solve_all(cfg)
    g_big = max(results)
    fig = plt.figure(figsize=(12, 6.5), layout="constrained")
    grid = fig.add_gridspec(2, 4)
    _loss_panel(fig.add_subplot(grid[:, 0]), results, lazy)
    _heatmaps(np.array([[fig.add_subplot(grid[i, 1 + j]) for j in range(2)] for i in range(2)]), *results[g_big], g_big)
    _density_panel(fig.add_subplot(grid[:, 3]), results)
    fig.suptitle(
        f"F1: two-layer ReLU, P={cfg['P']}, D={cfg['D']}, $\\eta_0$={cfg['eta0']}, T={cfg['T']}, "
        f"N={cfg['width']} (centred), DMFT S={cfg['samples']}; panels b-c at $\\gamma_0={g_big}$",
        fontsize=9,
    )
    files = save(fig, out, "f1_two_layer_relu" + ("_quick" if quick else ""))
    res = {"files": files, "lazy_final_loss": float(paper_loss(lazy.loss)[-1])}
    for g, (sol, run) in results.items():
        res[f"gamma0={g}"] = dict(
            dmft_final_loss=float(paper_loss(sol.loss)[-1]),
            net_final_loss=float(paper_loss(run.loss).mean(0)[-1]),
            max_abs_loss_diff=float(np.max(np.abs(paper_loss(sol.loss) - paper_loss(run.loss).mean(0)))),
            Phi_alignment=alignment(sol.Phi_eq[0, -1], np.asarray(run.Phi_eq).mean(0)[0, -1]),
            G_alignment=alignment(sol.G_eq[0, -1], np.asarray(run.G_eq).mean(0)[0, -1]),
            Phi_target_alignment=float(dmft.plotting.target_alignment(np.asarray(sol.Phi_eq)[0, -1], data.y)),
        )
    return res


if __name__ == "__main__":
    run_cli(main, __doc__)
