"""F4: deep nonlinear networks (BP22, notebook `deep_nonlinear_DMFT.ipynb`).

Depth-3 network with phi(h) = tanh(0.8 h) / 0.8: Monte Carlo DMFT vs a finite network at gamma0 = 1
(rich) and 0.2 (near lazy): loss curves, final kernels Phi^l(T, T), G^l(T, T) of every layer (DMFT |
network side by side), the DMFT two-time trace sum_mu Phi^L_{mu mu}(t, s), and histograms of the
networks' final preactivations h^l (`Run.h_last`; the public API exposes no DMFT field samples).
Paper settings: D = 25, P = 10, eta0 = 0.1, T = 100, S = 1000, N = 2000 centred, seed 0.
We take eta0 = 0.2, T = 50 (same t_max = 10): the Monte Carlo solver costs ~ T^2 per iteration and
T = 100 did not fit a few minutes on 2 cores. S = 2048.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import dmft
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

FULL = dict(P=10, D=25, L=3, eta0=0.2, T=50, gammas=(0.2, 1.0), samples=2048, width=2000, seeds=1)
QUICK = dict(P=4, D=8, L=2, eta0=0.25, T=8, gammas=(0.2, 1.0), samples=256, width=200, seeds=1)

SCALE = 0.8  # phi(h) = tanh(SCALE h) / SCALE, the notebook's activation


def _phi(h):
    return jnp.tanh(SCALE * h) / SCALE


def _dphi(h):
    return 1.0 - jnp.tanh(SCALE * h) ** 2


ACTIVATION = dmft.activations.Elementwise(_phi, _dphi, label="tanh(0.8h)/0.8")


def make_problem(cfg, gamma0) -> dmft.Problem:
    """The F4 problem (also used by F5) at feature strength gamma0."""
    return notebook_problem(
        paper_data(cfg["P"], cfg["D"]), dmft.MLP(cfg["L"], ACTIVATION), gamma0, cfg["eta0"], cfg["T"]
    )


def solve_dmft(cfg, gamma0, key=0):
    """Monte Carlo DMFT with Stein responses; raises if it does not converge or goes non-finite."""
    solver = dmft.MonteCarlo(n_samples=cfg["samples"], chunk_size=min(1024, cfg["samples"]))
    sol = dmft.solve(make_problem(cfg, gamma0), solver, key=key)
    return check_finite(sol.loss, f"DMFT loss at gamma0 = {gamma0}") is not None and sol


def _side_by_side(ax, theory, expt, title):
    both = np.concatenate([theory, expt], axis=1)
    im = ax.imshow(both, cmap="viridis")
    ax.axvline(theory.shape[1] - 0.5, color="w", lw=1)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([]), ax.set_yticks([])
    plt.colorbar(im, ax=ax, shrink=0.7)


def _histograms(axes, runs):
    for l, ax in enumerate(axes):
        for (g, run), c in zip(runs.items(), (PALETTE[2], PALETTE[5])):
            h = np.asarray(run.h_last)[:, l].ravel()
            ax.hist(h, bins=60, density=True, histtype="step", color=c, lw=1.5, label=rf"$\gamma_0={g}$")
        ax.set(xlabel=rf"$h^{l + 1}$ at $t=T$ (network)", yscale="log")
        ax.set_title(f"layer {l + 1} preactivations", fontsize=9)
    axes[0].set_ylabel("density")
    axes[0].legend(frameon=False, fontsize=7)


def main(quick: bool = False, out: str = "paper_figs/out") -> dict:
    cfg = QUICK if quick else FULL
    sols, runs = {}, {}
    for g in cfg["gammas"]:
        with timed(f"gamma0 = {g}: DMFT S = {cfg['samples']} + network N = {cfg['width']}"):
            sols[g] = solve_dmft(cfg, g)
            runs[g] = train_seeds(make_problem(cfg, g), cfg["width"], cfg["seeds"])
    g_rich, L = max(cfg["gammas"]), cfg["L"]
    fig, ax = plt.subplots(3, L + 1, figsize=(3.3 * (L + 1), 9), layout="constrained")
    for i, g in enumerate(cfg["gammas"]):
        ts = np.asarray(sols[g].ts)
        ax[0, 0].plot(
            ts, paper_loss(runs[g].loss).mean(0), color=PALETTE[2 + 3 * i], lw=1.5, label=rf"network $\gamma_0={g}$"
        )
        ax[0, 0].plot(ts, paper_loss(sols[g].loss), color="k", lw=1, ls="--")
    ax[0, 0].plot([], [], "k--", label="DMFT")
    ax[0, 0].set(xlabel=r"$t=\eta_0 k$", ylabel=r"loss $\mathrm{mean}(f-y)^2$", yscale="log", title="(a) train loss")
    ax[0, 0].legend(frameon=False, fontsize=7)
    _histograms(ax[0, 1:], runs)
    sol, run = sols[g_rich], runs[g_rich]
    for l in range(L):
        for row, name, sym in ((1, "Phi_eq", r"\Phi"), (2, "G_eq", "G")):
            theory, expt = np.asarray(getattr(sol, name))[l, -1], np.asarray(getattr(run, name)).mean(0)[l, -1]
            _side_by_side(ax[row, l], theory, expt, rf"${sym}^{l + 1}(T)$: DMFT | network, $\gamma_0={g_rich}$")
    dmft.plotting.two_time_trace(sol, layer=-1, ax=ax[1, L])
    ax[1, L].set_title(rf"DMFT $\sum_\mu\Phi^{L}_{{\mu\mu}}(t,s)$", fontsize=9)
    ax[2, L].plot(np.asarray(sol.ts), np.einsum("ltmm->lt", np.asarray(sol.Phi_eq)).T, "k--", lw=1)
    ax[2, L].plot(np.asarray(sol.ts), np.einsum("sltmm->lt", np.asarray(run.Phi_eq)).T / cfg["seeds"], lw=1.5)
    ax[2, L].set(xlabel=r"$t$", title=r"$\sum_\mu\Phi^\ell_{\mu\mu}(t,t)$, layers (net solid, DMFT dashed)")
    ax[2, L].title.set_fontsize(8)
    fig.suptitle(
        f"F4: depth {L}, tanh(0.8h)/0.8, P={cfg['P']}, D={cfg['D']}, $\\eta_0$={cfg['eta0']}, T={cfg['T']}, "
        f"S={cfg['samples']}, N={cfg['width']} (centred)",
        fontsize=9,
    )
    files = save(fig, out, "f4_deep_tanh" + ("_quick" if quick else ""))
    res = {"files": files}
    for g in cfg["gammas"]:
        s, r = sols[g], runs[g]
        res[f"gamma0={g}"] = dict(
            dmft_final_loss=float(paper_loss(s.loss)[-1]),
            net_final_loss=float(paper_loss(r.loss).mean(0)[-1]),
            dmft_iterations=int(s.iterations),
            Phi_alignment=[alignment(s.Phi_eq[l, -1], np.asarray(r.Phi_eq).mean(0)[l, -1]) for l in range(L)],
            G_alignment=[alignment(s.G_eq[l, -1], np.asarray(r.G_eq).mean(0)[l, -1]) for l in range(L)],
            h_last_kurtosis=[float(_excess_kurtosis(np.asarray(r.h_last)[:, l])) for l in range(L)],
        )
    return res


def _excess_kurtosis(x):
    """E[x^4] / E[x^2]^2 - 3 over all entries (0 for a Gaussian): how non-Gaussian the preactivations are."""
    x = x.ravel() - x.mean()
    return np.mean(x**4) / np.mean(x**2) ** 2 - 3.0


if __name__ == "__main__":
    run_cli(main, __doc__)
