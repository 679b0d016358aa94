"""F2: deep linear networks (BP22, notebook `Linear_DMFT.ipynb`).

(a) loss for depths L = 2..5 at gamma0 = 1.4, exact DMFT (`LinearClosure`) vs networks;
(b) L = 5, gamma0 = 1.5: final feature kernels Phi^l(T, T) of every layer, DMFT vs network, and the
DMFT two-time trace sum_mu Phi^L_{mu mu}(t, s) (networks record equal times only);
(c) kernel movement: alignment A(Phi^l(0, 0), Phi^l(T, T)), averaged over layers, vs depth.
Paper settings: D = 40, P = 20, eta0 = 0.025, T = 100, N = 2200, one seed.
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
    layer_alignment,
    notebook_problem,
    paper_data,
    paper_loss,
    run_cli,
    save,
    timed,
    train_seeds,
)

FULL = dict(P=20, D=40, eta0=0.025, T=100, depths=(2, 3, 4, 5), gamma_sweep=1.4, gamma_kernels=1.5, width=2200, seeds=1)
QUICK = dict(P=8, D=12, eta0=0.05, T=15, depths=(1, 2, 3), gamma_sweep=1.4, gamma_kernels=1.5, width=200, seeds=8)


def movement(Phi_eq):
    """Mean over layers of A(Phi^l(0, 0), Phi^l(T, T)); `Phi_eq (L, n+1, P, P)`. 1 = no movement."""
    Phi_eq = np.asarray(Phi_eq)
    return layer_alignment(Phi_eq[:, 0], Phi_eq[:, -1])


def _depth_sweep(cfg, data):
    rows = {}
    for L in cfg["depths"]:
        problem = notebook_problem(data, dmft.MLP(L, "linear"), cfg["gamma_sweep"], cfg["eta0"], cfg["T"])
        with timed(f"L = {L}: closure + network N = {cfg['width']}"):
            sol = dmft.solve(problem, dmft.LinearClosure())
            run = train_seeds(problem, cfg["width"], cfg["seeds"])
        check_finite(sol.loss, f"DMFT loss at L = {L}")
        rows[L] = (sol, run)
    return rows


def _kernels(cfg, data):
    L = max(cfg["depths"])
    problem = notebook_problem(data, dmft.MLP(L, "linear"), cfg["gamma_kernels"], cfg["eta0"], cfg["T"])
    with timed(f"L = {L}, gamma0 = {cfg['gamma_kernels']}: kernels"):
        return dmft.solve(problem, dmft.LinearClosure()), train_seeds(problem, cfg["width"], cfg["seeds"])


def _kernel_grid(fig, grid, sol, run):
    """Row 1: DMFT Phi^l(T, T), row 2: network; one colour scale per layer."""
    L = sol.Phi_eq.shape[0]
    for l in range(L):
        theory, expt = np.asarray(sol.Phi_eq)[l, -1], np.asarray(run.Phi_eq).mean(0)[l, -1]
        lo, hi = min(theory.min(), expt.min()), max(theory.max(), expt.max())
        for i, (K, who) in enumerate(((theory, "DMFT"), (expt, "net"))):
            ax = fig.add_subplot(grid[1 + i, l])
            ax.imshow(K, vmin=lo, vmax=hi, cmap="viridis")
            ax.set_title(rf"$\Phi^{l + 1}(T)$ {who}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])


def main(quick: bool = False, out: str = "paper_figs/out") -> dict:
    cfg = QUICK if quick else FULL
    data = paper_data(cfg["P"], cfg["D"])
    rows = _depth_sweep(cfg, data)
    sol_k, run_k = _kernels(cfg, data)
    L_max = max(cfg["depths"])
    fig = plt.figure(figsize=(2.4 * max(L_max, 4), 7.5), layout="constrained")
    grid = fig.add_gridspec(3, max(L_max, 4), height_ratios=[1.6, 1, 1])
    top = fig.add_subplot(grid[0, :2]), fig.add_subplot(grid[0, 2]), fig.add_subplot(grid[0, 3:])
    for i, (L, (sol, run)) in enumerate(rows.items()):
        ts = np.asarray(sol.ts)
        top[0].plot(ts, paper_loss(run.loss).mean(0), color=PALETTE[1 + i], lw=1.5, label=f"L = {L} network")
        top[0].plot(ts, paper_loss(sol.loss), color=PALETTE[0], lw=1, ls="--")
    top[0].plot([], [], color=PALETTE[0], ls="--", label="DMFT")
    top[0].set(
        xlabel=r"$t=\eta_0 k$",
        ylabel=r"loss $\mathrm{mean}(f-y)^2$",
        yscale="log",
        title=rf"(a) depth sweep, $\gamma_0={cfg['gamma_sweep']}$",
    )
    top[0].legend(frameon=False, fontsize=7)
    depths = list(rows)
    mov_dmft = [movement(rows[L][0].Phi_eq) for L in depths]
    mov_net = [movement(np.asarray(rows[L][1].Phi_eq).mean(0)) for L in depths]
    top[1].plot(depths, mov_net, "o-", color=PALETTE[5], label="network")
    top[1].plot(depths, mov_dmft, "k--x", label="DMFT")
    top[1].set(
        xlabel="depth L", ylabel=r"$\langle A(\Phi^\ell(0),\Phi^\ell(T))\rangle_\ell$", title="(c) kernel movement"
    )
    top[1].set_xticks(depths)
    top[1].legend(frameon=False, fontsize=7)
    dmft.plotting.two_time_trace(sol_k, layer=-1, ax=top[2])
    top[2].set_title(rf"(b) DMFT $\sum_\mu\Phi^{L_max}_{{\mu\mu}}(t,s)$, $\gamma_0={cfg['gamma_kernels']}$", fontsize=9)
    _kernel_grid(fig, grid, sol_k, run_k)
    fig.suptitle(
        f"F2: deep linear, P={cfg['P']}, D={cfg['D']}, $\\eta_0$={cfg['eta0']}, T={cfg['T']}, "
        f"N={cfg['width']} (centred); kernel rows: L={L_max}, $\\gamma_0$={cfg['gamma_kernels']}",
        fontsize=9,
    )
    files = save(fig, out, "f2_deep_linear" + ("_quick" if quick else ""))
    res = {"files": files, "depths": depths, "movement_dmft": mov_dmft, "movement_net": mov_net}
    res["final_loss_dmft"] = [float(paper_loss(rows[L][0].loss)[-1]) for L in depths]
    res["final_loss_net"] = [float(paper_loss(rows[L][1].loss).mean(0)[-1]) for L in depths]
    res["max_abs_loss_diff"] = [
        float(np.max(np.abs(paper_loss(rows[L][0].loss) - paper_loss(rows[L][1].loss).mean(0)))) for L in depths
    ]
    if cfg["seeds"] > 1:  # the difference over its seed standard error, max over the times after 0
        se = lambda run: paper_loss(run.loss)[:, 1:].std(0, ddof=1) / np.sqrt(cfg["seeds"])
        diff = lambda sol, run: paper_loss(sol.loss)[1:] - paper_loss(run.loss)[:, 1:].mean(0)
        res["max_loss_z"] = [float(np.max(np.abs(diff(*rows[L]) / se(rows[L][1])))) for L in depths]
    res["final_Phi_alignment_per_layer"] = [
        alignment(np.asarray(sol_k.Phi_eq)[l, -1], np.asarray(run_k.Phi_eq).mean(0)[l, -1]) for l in range(L_max)
    ]
    return res


if __name__ == "__main__":
    run_cli(main, __doc__)
