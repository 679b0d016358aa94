"""Figures for solutions and comparisons. The only module that imports matplotlib (lazily).

Colours: the Okabe-Ito colour-blind-safe palette. Every function takes an optional `ax` and returns
the matplotlib figure.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "PALETTE",
    "loss_curves",
    "alignment_curves",
    "error_vs_width",
    "kernel_heatmap",
    "two_time_trace",
    "preactivation_histogram",
    "comparison_figure",
    "classification_figure",
    "accuracy_curves",
    "target_alignment",
]

PALETTE = ["#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442"]


def _axes(ax):
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(4.2, 3.2), layout="constrained")
    return ax.figure, ax


def alignment(K1, K2):
    """Kernel alignment `<K1, K2>_F / (|K1|_F |K2|_F)` over the last two axes (1: equal up to scale)."""
    K1, K2 = np.asarray(K1), np.asarray(K2)
    norm = lambda K: np.linalg.norm(K, axis=(-2, -1))
    return np.sum(K1 * K2, axis=(-2, -1)) / (norm(K1) * norm(K2))


def target_alignment(K, y):
    """`alignment(K, y y^T) = y^T K y / (|K|_F |y|^2)` over the last two axes of K; with C outputs,
    `K (..., P, C, P, C)` and `y (P, C)` over the flattened (point, class) pairs."""
    y, K = np.asarray(y), np.asarray(K)
    if y.ndim == 2:
        n = y.size
        K, y = K.reshape(*K.shape[:-4], n, n), y.reshape(n)
    return alignment(K, np.outer(y, y))


def _width_colour(i):
    return PALETTE[1 + i % (len(PALETTE) - 1)]


def loss_curves(comparison, ax=None, field="loss", ylabel=r"loss $\frac{1}{2}\,\mathrm{mean}(f-y)^2$", log=True):
    """`field` over time (train loss by default; `"loss_test"`, `"accuracy_test"`, ...): DMFT (black),
    lazy limit (dashed), each width's seed mean +- 1 standard error; with the comparison's
    fluctuations, dotted in each width's colour the DMFT (plus the predicted 1/N mean shift, where there
    is one) +- the predicted seed-to-seed standard deviation at that width (where one seed is expected
    to lie)."""
    fig, ax = _axes(ax)
    ts = np.asarray(comparison.dmft.ts)
    dmft_curve = np.asarray(getattr(comparison.dmft, field))
    fl = getattr(comparison, "fluctuations", None)
    for i, (N, run) in enumerate(zip(comparison.widths, comparison.runs)):
        values = np.asarray(getattr(run, field))
        mean, se = values.mean(0), values.std(0, ddof=1) / np.sqrt(len(values))
        ax.fill_between(ts, mean - se, mean + se, color=_width_colour(i), alpha=0.3, lw=0)
        ax.plot(ts, mean, color=_width_colour(i), lw=1.2, label=f"N = {N}")
        if fl is not None and field in ("loss", "loss_test") and getattr(fl, f"{field}_cov") is not None:
            bias = getattr(fl, f"{field}_bias")
            centre = dmft_curve + (0.0 if bias is None else np.asarray(bias) / N)
            sd = np.asarray(fl.sd(field, N))
            for sign in (-1, 1):
                ax.plot(ts, centre + sign * sd, color=_width_colour(i), lw=0.8, ls=":")
    ax.plot(
        ts,
        dmft_curve,
        color=PALETTE[0],
        lw=2,
        label="DMFT" + (r" ($\pm1\sigma$ per width dotted)" if fl is not None else ""),
    )
    ax.plot(ts, np.asarray(getattr(comparison.lazy, field)), color=PALETTE[0], lw=1.2, ls="--", label="lazy (NTK)")
    ax.set(xlabel="time t", ylabel=ylabel, yscale="log" if log else "linear")
    ax.legend(frameon=False, fontsize=8)
    return fig


def accuracy_curves(comparison, ax=None, test=True):
    """Test (or train) accuracy over time of a classification comparison, as `loss_curves`."""
    field = "accuracy_test" if test else "accuracy"
    fig = loss_curves(comparison, ax, field, ("test" if test else "train") + " accuracy", log=False)
    ax = ax or fig.axes[0]
    ax.set_ylim(max(0.0, float(np.min(np.asarray(getattr(comparison.dmft, field))[1:])) - 0.1), 1.005)
    return fig


def alignment_curves(comparison, y=None, ax=None):
    """Target alignment of the last layer's feature kernel Phi^L(t, t) over time."""
    fig, ax = _axes(ax)
    sol = comparison.dmft
    P = sol.f.shape[1]
    y = np.asarray(y) if y is not None else None
    if y is None:
        raise ValueError("alignment_curves needs the training targets y")
    ts = np.asarray(sol.ts)
    for i, (N, run) in enumerate(zip(comparison.widths, comparison.runs)):
        A = target_alignment(np.asarray(run.Phi_eq)[:, -1, :, :P, :P], y)
        ax.plot(ts, A.mean(0), color=_width_colour(i), lw=1.2, label=f"N = {N}")
    ax.plot(ts, target_alignment(np.asarray(sol.Phi_eq)[-1, :, :P, :P], y), color=PALETTE[0], lw=2, label="DMFT")
    ax.plot(
        ts,
        target_alignment(np.asarray(comparison.lazy.Phi_eq)[-1, :, :P, :P], y),
        color=PALETTE[0],
        ls="--",
        label="lazy",
    )
    ax.set(xlabel="time t", ylabel=r"alignment $y^\top\Phi^L y/(|\Phi^L|_F|y|^2)$")
    ax.legend(frameon=False, fontsize=8)
    return fig


def error_vs_width(comparison, ax=None):
    """Max-over-time loss error of the seed mean (fraction of the initial loss) vs width, log-log. With
    the comparison's fluctuations, what the 1/N theory predicts for it: the mean shift (max over time of
    `|loss_bias| / N`) and the noise of the measured error (max over time of the seed mean's predicted
    standard error `sd(N) / sqrt(seeds)` and the DMFT's own, in quadrature), below which no error is
    resolved."""
    fig, ax = _axes(ax)
    widths, err = np.asarray(comparison.widths, float), np.asarray(comparison.max_loss_error)
    ax.loglog(widths, err, "o", color=PALETTE[5], label="networks vs DMFT")
    if len(widths) > 1 and np.isfinite(float(comparison.exponent)):
        slope = float(comparison.exponent)
        fit = np.exp(np.polyfit(np.log(widths), np.log(err), 1)[1]) * widths**slope
        ax.loglog(widths, fit, color=PALETTE[5], lw=1, label=f"fit: N^{slope:.2f}")
    fl = getattr(comparison, "fluctuations", None)
    if fl is not None:
        sol, seeds = comparison.dmft, comparison.runs[0].loss.shape[0]
        own = 0.0 if sol.stderr is None else np.asarray(sol.stderr["loss"]) ** 2
        noise = [np.sqrt(np.max(np.asarray(fl.sd("loss", int(N))) ** 2 / seeds + own)) for N in widths]
        L0 = float(sol.loss[0])
        ax.loglog(widths, np.asarray(noise) / L0, color=PALETTE[4], lw=1, ls="--", label=f"noise ({seeds} seeds, DMFT)")
        if fl.loss_bias is not None:
            shift = float(np.max(np.abs(fl.loss_bias))) / L0 / widths
            ax.loglog(widths, shift, color=PALETTE[4], lw=1, ls=":", label="predicted 1/N shift")
    ax.set(xlabel="width N", ylabel=r"$\max_t$ |loss error| / loss(0)")
    ax.set_xticks(widths, [str(int(w)) for w in widths])
    ax.xaxis.set_minor_formatter("")
    ax.legend(frameon=False, fontsize=8)
    return fig


def kernel_heatmap(kernel, title="", ax=None):
    """A P x P kernel matrix (e.g. `sol.Phi_eq[-1, -1]`) as a heatmap."""
    import matplotlib.pyplot as plt

    fig, ax = _axes(ax)
    im = ax.imshow(np.asarray(kernel), cmap="viridis")
    ax.set(title=title, xlabel=r"sample $\nu$", ylabel=r"sample $\mu$")
    plt.colorbar(im, ax=ax, shrink=0.8)
    return fig


def two_time_trace(sol, layer=-1, ax=None):
    """`sum_mu Phi^l_{mu mu}(t, s)` over the two-time grid (needs two-time kernels)."""
    import matplotlib.pyplot as plt

    if sol.Phi is None:
        raise ValueError("this solution has no two-time kernels (lazy or two-layer fast path)")
    fig, ax = _axes(ax)
    trace = np.einsum("tmsm->ts", np.asarray(sol.Phi[layer]))
    t_max = float(sol.ts[-1])
    im = ax.imshow(trace, origin="lower", extent=(0, t_max, 0, t_max), cmap="magma")
    ax.set(xlabel="time s", ylabel="time t", title=r"$\sum_\mu \Phi_{\mu\mu}(t,s)$")
    plt.colorbar(im, ax=ax, shrink=0.8)
    return fig


def preactivation_histogram(run, layer=-1, point=0, ax=None, samples=None):
    """Density of finite-network preactivations `h^l_mu` at the final time (all seeds and neurons
    pooled; `run.h_last (..., L, Pa, N)`), with, when given, the DMFT single-site density of the same
    `h^l_mu` on the same bins: `samples` is a `dmft.FieldSamples` drawn at `time=-1` (or its `h`,
    an `(L, S, Pa)` array)."""
    fig, ax = _axes(ax)
    h = np.asarray(run.h_last)[..., layer, point, :].ravel()
    d = None if samples is None else np.asarray(getattr(samples, "h", samples))[layer, :, point]
    bins = np.histogram_bin_edges(h if d is None else np.concatenate([h, d]), bins=60)
    width = np.shape(run.h_last)[-1]
    ax.hist(h, bins=bins, density=True, color=PALETTE[2], alpha=0.8, label=f"network, N = {width}")
    if d is not None:
        ax.hist(d, bins=bins, density=True, histtype="step", color=PALETTE[0], lw=1.5, label="DMFT")
        ax.legend(frameon=False, fontsize=8)
    ax.set(xlabel=r"preactivation $h$", ylabel="density", yscale="log")
    return fig


def comparison_figure(comparison, y, samples=None):
    """Loss curves, kernel alignment, error vs width and final kernels, DMFT vs networks; with DMFT
    `samples` (see `preactivation_histogram`) a third column of final preactivation histograms of the
    widest network against the DMFT: point 0 of the first and last layer (of a two-layer network's one
    layer, points 0 and 1)."""
    import matplotlib.pyplot as plt

    cols = 2 if samples is None else 3
    fig, axes = plt.subplots(2, cols, figsize=(4.5 * cols, 7), layout="constrained", squeeze=False)
    loss_curves(comparison, ax=axes[0, 0])
    alignment_curves(comparison, y, ax=axes[0, 1])
    error_vs_width(comparison, ax=axes[1, 0])
    P = comparison.dmft.f.shape[1]
    K_dmft = np.asarray(comparison.dmft.Phi_eq)[-1, -1, :P, :P]
    K_net = np.asarray(comparison.runs[-1].Phi_eq).mean(0)[-1, -1, :P, :P]
    order = np.argsort(np.asarray(y))
    both = np.concatenate([K_dmft[np.ix_(order, order)], K_net[np.ix_(order, order)]], axis=1)
    kernel_heatmap(both, ax=axes[1, 1])
    if samples is not None:
        L = comparison.dmft.Phi_eq.shape[0]
        panels = ((0, 0), (-1, 0)) if L > 1 else ((0, 0), (0, min(1, P - 1)))
        for row, (layer, point) in enumerate(panels):
            preactivation_histogram(comparison.runs[-1], layer, point, ax=axes[row, 2], samples=samples)
            axes[row, 2].set_title(f"layer {layer % L + 1}, point {point}", fontsize=9)
    for ax, letter in zip([*axes[:, :2].flat, *axes[:, 2:].flat], "abcdef"):
        ax.set_title(f"({letter})", loc="left", fontsize=10)
    axes[1, 1].set_title(f"final $\\Phi^L$ (sorted by y): DMFT | N = {comparison.widths[-1]}", fontsize=9)
    return fig


def classification_figure(comparison):
    """For a classification loss: train loss, test loss, test accuracy and the loss error vs width,
    DMFT against the lazy limit and the networks (test panels need test points with targets)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 7), layout="constrained")
    test = comparison.dmft.loss_test is not None
    loss_curves(comparison, axes[0, 0], "loss", "train loss")
    loss_curves(comparison, axes[0, 1], "loss_test" if test else "loss", ("test" if test else "train") + " loss")
    accuracy_curves(comparison, axes[1, 0], test=test)
    error_vs_width(comparison, axes[1, 1])
    for ax, letter in zip(axes.flat, "abcd"):
        ax.set_title(f"({letter})", loc="left", fontsize=10)
    return fig
