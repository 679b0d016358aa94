"""F5: convergence of finite networks to the DMFT as the width grows (BP22, last cells of
`deep_nonlinear_DMFT.ipynb`).

The F4 problem (depth 3, tanh(0.8 h)/0.8) at gamma0 = 1: for each width N and seed, the alignment
A(K_net, K_DMFT) of the per-layer kernels Phi^l(t, t), G^l(t, t) over all times (networks record equal
times only; the paper aligns the full two-time tensors), and the loss error max_t |loss_net - loss_DMFT|
/ loss(0). Mean +- std over seeds, log-N axis; the loss error gets a least-squares slope in log-log.
Paper: N in {2, 5, ..., 2000}, 10 seeds (we use 8). The DMFT's own Monte Carlo error (S samples)
is a floor comparable to a network of width ~S.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter

from paper_figs import f4_deep_tanh as f4
from paper_figs._common import PALETTE, alignment, paper_loss, run_cli, save, timed, train_seeds

FULL = dict(base=f4.FULL, gamma0=1.0, widths=(2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000), seeds=8)
QUICK = dict(base=f4.QUICK, gamma0=1.0, widths=(4, 16, 64), seeds=4)


def _per_seed(sol, run):
    """Per seed: alignments (L,) of Phi and G over all equal times, and the relative max loss error."""
    P = sol.f.shape[1]
    Phi_d, G_d = np.asarray(sol.Phi_eq)[..., :P, :P], np.asarray(sol.G_eq)[..., :P, :P]
    Phi_n, G_n = np.asarray(run.Phi_eq)[..., :P, :P], np.asarray(run.G_eq)[..., :P, :P]
    L = Phi_d.shape[0]
    a_phi = np.array([[alignment(Phi_n[s, l], Phi_d[l]) for l in range(L)] for s in range(len(Phi_n))])
    a_g = np.array([[alignment(G_n[s, l], G_d[l]) for l in range(L)] for s in range(len(G_n))])
    ref = paper_loss(sol.loss)
    err = np.max(np.abs(paper_loss(run.loss) - ref), axis=1) / ref[0]
    return a_phi, a_g, err


def _width_axis(ax, widths):
    """Log width axis labelled at the widths themselves (the default minor labels overlap)."""
    ax.set_xscale("log")
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.xaxis.set_minor_formatter(NullFormatter())


def _alignment_panel(ax, widths, stats, name):
    L = stats[0].shape[1]
    for l in range(L):
        m = np.array([s[:, l].mean() for s in stats])
        sd = np.array([s[:, l].std(ddof=1) for s in stats])
        ax.errorbar(widths, m, yerr=sd, marker="o", ms=3, capsize=2, color=PALETTE[1 + l], label=f"layer {l + 1}")
    _width_axis(ax, widths)
    ax.set(xlabel="width N", ylabel=rf"$A({name}_{{NN}},{name}_{{DMFT}})$", ylim=(None, 1.005))
    ax.legend(frameon=False, fontsize=7)


def main(quick: bool = False, out: str = "paper_figs/out") -> dict:
    cfg = QUICK if quick else FULL
    base, widths = cfg["base"], list(cfg["widths"])
    with timed(f"DMFT at gamma0 = {cfg['gamma0']}"):
        sol = f4.solve_dmft(base, cfg["gamma0"])
    problem = f4.make_problem(base, cfg["gamma0"])
    rows = []
    for N in widths:
        with timed(f"N = {N}: {cfg['seeds']} seeds"):
            rows.append(_per_seed(sol, train_seeds(problem, N, cfg["seeds"])))
    a_phi, a_g, err = zip(*rows)
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    _alignment_panel(ax[0], widths, a_phi, r"\Phi^\ell")
    _alignment_panel(ax[1], widths, a_g, r"G^\ell")
    m, sd = np.array([e.mean() for e in err]), np.array([e.std(ddof=1) for e in err])
    slope, icpt = np.polyfit(np.log(widths), np.log(m), 1)
    ax[2].errorbar(
        widths, m, yerr=sd, marker="o", ms=3, capsize=2, color=PALETTE[5], label="networks (mean $\\pm$ std)"
    )
    ax[2].plot(widths, np.exp(icpt) * np.asarray(widths, float) ** slope, "k:", label=f"fit $N^{{{slope:.2f}}}$")
    _width_axis(ax[2], widths)
    ax[2].set(yscale="log", xlabel="width N", ylabel="max$_t$ |loss$_{NN}$ - loss$_{DMFT}$| / loss(0)")
    ax[2].legend(frameon=False, fontsize=7)
    for a, letter in zip(ax, "abc"):
        a.set_title(f"({letter})", loc="left")
    fig.suptitle(
        f"F5: width convergence, F4 problem at $\\gamma_0$={cfg['gamma0']}, {cfg['seeds']} seeds per width, "
        f"DMFT S={base['samples']}",
        fontsize=9,
    )
    files = save(fig, out, "f5_width_convergence" + ("_quick" if quick else ""))
    return {
        "files": files,
        "widths": widths,
        "loss_error_mean": m.tolist(),
        "loss_error_std": sd.tolist(),
        "loss_error_slope": float(slope),
        "Phi_alignment_mean": [a.mean(0).tolist() for a in a_phi],
        "G_alignment_mean": [a.mean(0).tolist() for a in a_g],
    }


if __name__ == "__main__":
    run_cli(main, __doc__)
