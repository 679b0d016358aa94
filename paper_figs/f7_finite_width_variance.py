"""F7: finite-width fluctuations of two-layer networks (Bordelon & Pehlevan, NeurIPS 2023,
arXiv:2304.03408, the two-layer variance-vs-width and variance-vs-gamma0 results), at reduced size.

`dmft.fluctuations` gives the seed-to-seed covariances of a width-N network as coefficients of 1/N.
Panels: (a) N Var of the train loss over time for several gamma0 (theory curves, networks of two widths
as markers); (b) N Var of the loss at the final time against N (flat: the variance is 1/N); (c) the
variance of the final predictions against gamma0 (feature learning reduces it) and (d) of the final NTK
entries. gamma0 = 0 is the lazy limit (`dmft.Lazy` solution, lazy networks: each its empirical NTK at
initialisation).
Two-layer tanh on the notebooks' +-1 task; networks trained by GD on the DMFT grid and centred.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib.pyplot as plt
import numpy as np

import dmft
from paper_figs._common import PALETTE, check_finite, notebook_problem, paper_data, run_cli, save, timed, train_seeds

FULL = dict(P=10, D=20, eta0=0.2, T=50, gammas=(0.0, 0.5, 1.0, 2.0), widths=(256, 512, 1024, 2048), seeds=256, S=8192)
QUICK = dict(P=6, D=10, eta0=0.2, T=10, gammas=(0.0, 1.0), widths=(128, 512), seeds=32, S=2048)


def _nvar(x, N):
    """N times the seed variance of `x (seeds, ...)`, and its standard error from the fourth moment."""
    x = np.asarray(x) - np.mean(x, axis=0)
    m2, m4 = np.mean(x**2, 0), np.mean(x**4, 0)
    return N * m2 * len(x) / (len(x) - 1), N * np.sqrt(np.maximum(m4 - m2**2, 0) / len(x))


def _one_gamma(cfg, data, g):
    """Theory and network N Var for one gamma0: loss over time, final predictions and final NTK."""
    net = dmft.MLP(1, "tanh")
    problem = notebook_problem(data, net, g, cfg["eta0"], cfg["T"])
    solver = dmft.Lazy(discrete=True) if g == 0 else dmft.MonteCarlo(n_samples=cfg["S"])
    sol = dmft.solve(problem, solver, key=0)
    fl = dmft.fluctuations(problem, sol, key=1, n_samples=cfg["S"])
    nets = {}
    for N in cfg["widths"]:
        run = train_seeds(problem, N, cfg["seeds"])
        check_finite(run.loss, f"networks at gamma0 = {g}, N = {N}")
        nets[N] = dict(
            loss=_nvar(run.loss, N),
            f_final=[v.mean() for v in _nvar(run.f[:, -1], N)],
            ntk_final=[v.mean() for v in _nvar(run.ntk[:, -1], N)],
        )
    return sol, fl, nets


def main(quick: bool = False, out: str = "paper_figs/out") -> dict:
    cfg = QUICK if quick else FULL
    data = paper_data(cfg["P"], cfg["D"])
    results = {}
    for g in cfg["gammas"]:
        with timed(f"gamma0 = {g}: DMFT, fluctuations, {len(cfg['widths'])} x {cfg['seeds']} networks"):
            results[g] = _one_gamma(cfg, data, g)
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.8), layout="constrained")
    widths = np.asarray(cfg["widths"], float)
    res = {}
    for i, (g, (sol, fl, nets)) in enumerate(results.items()):
        c, ts = PALETTE[1 + i], np.asarray(sol.ts)
        loss_var = np.diagonal(np.asarray(fl.loss_cov))
        ax[0].plot(ts, loss_var, color=c, lw=1.5, label=f"$\\gamma_0$ = {g}")
        for N, marker in zip(cfg["widths"][-2:], "os"):
            ax[0].plot(ts[::5], nets[N]["loss"][0][::5], marker, color=c, ms=3, mfc="none")
        final = [nets[N]["loss"] for N in cfg["widths"]]
        ax[1].errorbar(widths, [v[0][-1] for v in final], [v[1][-1] for v in final], fmt="o", color=c, ms=3)
        ax[1].axhline(loss_var[-1], color=c, lw=1)
        res[f"gamma0={g}"] = dict(
            theory_final_loss_nvar=float(loss_var[-1]),
            networks_final_loss_nvar={N: float(nets[N]["loss"][0][-1]) for N in cfg["widths"]},
            theory_final_f_nvar=float(np.mean(fl.f_var[-1])),
            networks_final_f_nvar={N: float(nets[N]["f_final"][0]) for N in cfg["widths"]},
            theory_final_ntk_nvar=float(np.mean(fl.ntk_var[-1])),
            networks_final_ntk_nvar={N: float(nets[N]["ntk_final"][0]) for N in cfg["widths"]},
            dmft_final_loss=float(sol.loss[-1]),
        )
    gammas = np.asarray(cfg["gammas"])
    for j, (name, key) in enumerate((("predictions $f_\\mu(T)$", "f"), ("NTK entries $K_{\\mu\\nu}(T)$", "ntk"))):
        a = ax[2 + j]
        a.plot(
            gammas,
            [res[f"gamma0={g}"][f"theory_final_{key}_nvar"] for g in gammas],
            "-",
            color=PALETTE[0],
            label="theory",
        )
        for k, N in enumerate(cfg["widths"]):
            vals = [res[f"gamma0={g}"][f"networks_final_{key}_nvar"][N] for g in gammas]
            a.plot(gammas, vals, "o", color=PALETTE[1 + k % (len(PALETTE) - 1)], ms=3, mfc="none", label=f"N = {N}")
        a.set(xlabel="$\\gamma_0$", ylabel="N Var (mean over entries)", title=f"({'cd'[j]}) final {name}")
        a.legend(frameon=False, fontsize=7)
    ax[0].set(xlabel="time t", ylabel="N Var(loss)", title="(a) loss variance over time (markers: networks)")
    ax[0].legend(frameon=False, fontsize=7)
    ax[1].set(
        xscale="log", yscale="log", xlabel="width N", ylabel="N Var(final loss)", title="(b) flat in N (lines: theory)"
    )
    ax[1].set_xticks(widths, [str(int(w)) for w in widths])
    ax[1].xaxis.set_minor_formatter("")
    fig.suptitle(
        f"F7: two-layer tanh, P={cfg['P']}, D={cfg['D']}, $\\eta_0$={cfg['eta0']}, T={cfg['T']}, "
        f"{cfg['seeds']} seeds per width, fluctuations from S={cfg['S']} neurons",
        fontsize=9,
    )
    res["files"] = save(fig, out, "f7_finite_width_variance" + ("_quick" if quick else ""))
    return res


if __name__ == "__main__":
    run_cli(main, __doc__)
