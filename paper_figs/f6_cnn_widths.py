"""F6: muP CNNs at fixed gamma0 across widths (BP22, notebook `scratch_cnn_expt.ipynb`).

A finite CNN in the DMFT parameterisation (THEORY 1 with convolutions; written in plain JAX here since
the library's networks are MLPs): every weight N(0, 1) with an explicit 1/sqrt(fan-in) multiplier,

    h^1 = conv3x3(x, W^0) / sqrt(9 C_in),  h^{l+1} = conv3x3(relu(h^l), W^l) / sqrt(9 N),
    f = w . mean_positions relu(h^L) / (gamma0 N),     trained output f - f_0 (centred),

full-batch gradient descent on 0.5 mean (f - y)^2 with learning rate eta0 gamma0^2 N for every tensor.
The claim: at fixed gamma0 the test-loss and feature-alignment curves of different channel counts N
coincide more and more closely as N grows (the muP / DMFT limit exists); measured between single
networks of consecutive widths, as the paper's one run per width shows it (`pair_distances`). Data: scikit-learn's 8x8
digits, classes 3 vs 8 with labels +1 / -1; or CIFAR-10 airplane vs automobile when `cifar_dir` is the
folder of the "CIFAR-10 python version" (the pickles data_batch_1..5 and test_batch from
cifar-10-python.tar.gz, extracted; nothing is downloaded).

Step size: GD on the NTK scale is stable when eta0 * lambda_max(K) / P < 2 (K the NTK, P train points).
eta0 is set from the initial NTK's top eigenvalue (power iteration with jvp / vjp) so that
eta0 * lambda_max(K_0) / P = STABILITY (0.25), divided by (1 + gamma0)^2 (see `eta0_for`:
the feature dynamics, not the NTK, limit the step at large gamma0); the final NTK's
eta0 lambda_max / P is measured and returned as a check, and every curve is checked for NaN.
Paper: CIFAR, N in {250, 500}, gamma0 in {1, 5, 10}, minibatch SGD (batch 250),
5000 steps, eta0 = 2e-4; here digits (P = 64 train, 128 test), N in {16, 32, 64, 128}, gamma0 in
{0.1, 1, 5}, 200 full-batch steps, 16 seeds (with 4, the mean-curve differences between widths were
all at the seed-noise level and could not show a trend). (At STABILITY = 0.5 and 100 steps, gamma0 = 1 ended at
eta0 lambda_max(K_T) / P = 1.47 and the N = 64 and 128 losses spiked at the edge of stability.)
"""

from __future__ import annotations

import os
import pickle
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np

from paper_figs._common import PALETTE, check_finite, run_cli, save, timed

FULL = dict(widths=(16, 32, 64, 128), gammas=(0.1, 1.0, 5.0), depth=2, steps=200, every=20, P=64, P_test=128, seeds=16)
QUICK = dict(widths=(4, 8, 16), gammas=(0.1, 1.0, 5.0), depth=2, steps=10, every=5, P=24, P_test=32, seeds=2)
STABILITY = 0.25  # target eta0 * lambda_max(K_0) / P; GD on a quadratic diverges above 2
POWER_ITERS = 30  # power-iteration steps for lambda_max (relative accuracy ~1e-3 here)


# --------------------------------------------------------------------------------------------- data
def _standardise(X_train, X_test):
    """Centre by the training mean image, scale to unit mean square pixel (the notebook's normalisation)."""
    mean = X_train.mean(axis=0)
    scale = np.sqrt(np.mean((X_train - mean) ** 2))
    return (X_train - mean) / scale, (X_test - mean) / scale


def digits_data(P, P_test, classes=(3, 8), seed=0):
    """(X (P, 1, 8, 8), y (P,), X_test (P_test, ...), y_test) from scikit-learn's digits, classes +1 / -1."""
    from sklearn.datasets import load_digits

    X, labels = load_digits(return_X_y=True)
    keep = np.isin(labels, classes)
    X, labels = X[keep].reshape(-1, 1, 8, 8), labels[keep]
    if P < 1 or P_test < 1 or P + P_test > len(X):
        raise ValueError(f"need P, P_test >= 1 and P + P_test <= {len(X)} for digits {classes}; got {P}, {P_test}")
    order = np.random.default_rng(seed).permutation(len(X))
    X, y = X[order], np.where(labels[order] == classes[0], 1.0, -1.0)
    Xtr, Xte = _standardise(X[:P], X[P : P + P_test])
    return Xtr, y[:P], Xte, y[P : P + P_test]


def cifar_data(cifar_dir, P, P_test=2000, classes=(0, 1)):
    """CIFAR-10 classes 0 vs 1 (labels +1 / -1) from the extracted python pickles in `cifar_dir`."""
    files = [os.path.join(cifar_dir, f"data_batch_{i}") for i in range(1, 6)] + [os.path.join(cifar_dir, "test_batch")]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise ValueError(
            f"cifar_dir must hold the CIFAR-10 python pickles (data_batch_1..5, test_batch); missing {missing}"
        )

    def load(names):
        parts = [pickle.load(open(f, "rb"), encoding="bytes") for f in names]
        X = np.concatenate([p[b"data"] for p in parts]).reshape(-1, 3, 32, 32) / 255.0
        lab = np.concatenate([p[b"labels"] for p in parts])
        keep = np.isin(lab, classes)
        return X[keep], np.where(lab[keep] == classes[0], 1.0, -1.0)

    (Xtr, ytr), (Xte, yte) = load(files[:5]), load(files[5:])
    Xtr, Xte = _standardise(Xtr[:P], Xte[:P_test])
    return Xtr, ytr[:P], Xte, yte[:P_test]


# -------------------------------------------------------------------------------------------- model
def init_params(key, width, channels, depth):
    """N(0, 1) weights: convs (out, in, 3, 3) and the read-out w (N,)."""
    keys = jr.split(key, depth + 1)
    convs = [jr.normal(keys[0], (width, channels, 3, 3))]
    convs += [jr.normal(k, (width, width, 3, 3)) for k in keys[1:depth]]
    return convs, jr.normal(keys[depth], (width,))


def _conv(x, W):
    """3x3 'SAME' convolution `x (M, C, H, W)` with `W (out, C, 3, 3)`, divided by sqrt(fan-in).

    Written as nine shifted matrix products (one per kernel offset) instead of
    `lax.conv_general_dilated`: on CPU, XLA's convolution (and its gradient) ran at ~2 GFlop/s here,
    the products at matrix-multiply speed."""
    fan_in = W.shape[1] * W.shape[2] * W.shape[3]
    H, Wd = x.shape[2], x.shape[3]
    xp = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = sum(
        jnp.einsum("mchw,oc->mohw", xp[:, :, dy : dy + H, dx : dx + Wd], W[:, :, dy, dx])
        for dy in range(3)
        for dx in range(3)
    )
    return out / jnp.sqrt(fan_in)


def features(params, X):
    """Pooled last-layer features relu(h^L) averaged over positions, (M, N)."""
    h = X
    for i, W in enumerate(params[0]):
        h = _conv(h if i == 0 else jax.nn.relu(h), W)
    return jax.nn.relu(h).mean(axis=(2, 3))


def output(params, X, gamma0):
    return features(params, X) @ params[1] / (gamma0 * params[1].shape[0])


# ----------------------------------------------------------------------------------------- training
def ntk_lambda_max(params, X, gamma0, key):
    """Top eigenvalue of the NTK K = gamma0^2 N J J^T on X (J = df/dtheta), by power iteration."""
    N = params[1].shape[0]
    f = lambda p: output(p, X, gamma0)
    _, vjp = jax.vjp(f, params)
    Kv = lambda v: gamma0**2 * N * jax.jvp(f, (params,), vjp(v))[1]
    v = jr.normal(key, (X.shape[0],))

    def body(v, _):
        w = Kv(v)
        return w / jnp.linalg.norm(w), None

    v, _ = jax.lax.scan(body, v / jnp.linalg.norm(v), None, length=POWER_ITERS)
    return v @ Kv(v)


def train(params, data, gamma0, eta0, steps, every):
    """Full-batch GD; every `every` steps record test loss, test accuracy and the target alignment of
    the pooled test feature kernel. Returns (final params, dict of (steps // every + 1,) curves)."""
    Xtr, ytr, Xte, yte = data
    f0_tr, f0_te = output(params, Xtr, gamma0), output(params, Xte, gamma0)
    loss = lambda p: 0.5 * jnp.mean((output(p, Xtr, gamma0) - f0_tr - ytr) ** 2)
    rate = eta0 * gamma0**2 * params[1].shape[0]

    def measure(p):
        f = output(p, Xte, gamma0) - f0_te
        phi = features(p, Xte)
        align = (
            yte @ (phi @ (phi.T @ yte)) / (jnp.linalg.norm(phi.T @ phi) * (yte @ yte))
        )  # |phi phi^T|_F = |phi^T phi|_F
        return dict(
            test_loss=0.5 * jnp.mean((f - yte) ** 2),
            test_acc=jnp.mean(jnp.sign(f) == yte),
            alignment=align,
            train_loss=loss(p),
        )

    def chunk(p, _):
        p = jax.lax.fori_loop(0, every, lambda i, q: jax.tree.map(lambda a, g: a - rate * g, q, jax.grad(loss)(q)), p)
        return p, measure(p)

    p, curves = jax.lax.scan(chunk, params, None, length=steps // every)
    first = measure(params)
    return p, {k: jnp.concatenate([first[k][None], v]) for k, v in curves.items()}


def choose_eta0(data, width, depth, key):
    """`(eta0_base, lambda_max(K_0))` with eta0_base * lambda_max(K_0) / P = STABILITY.

    K_0 does not depend on gamma0 and is O(1) in muP (about width independent)."""
    params = init_params(key, width, data[0].shape[1], depth)
    lam = float(_lam_max(params, jnp.asarray(data[0]), jnp.asarray(1.0), key))
    return STABILITY * data[0].shape[0] / lam, lam


def eta0_for(eta0_base, gamma0):
    """eta0_base / (1 + gamma0)^2: at large gamma0 the features move by ~gamma0 per unit eta0, the NTK
    grows during training and GD becomes unstable long before the initial-NTK bound (measured: at
    gamma0 = 5 eta0_base and eta0_base / 5 diverged at N = 32, eta0_base / 25 trained stably; at
    gamma0 = 1 eta0_base ended with eta0 lambda_max(K_T) / P = 6 > 2 in the quick run)."""
    return eta0_base / (1.0 + gamma0) ** 2


# ------------------------------------------------------------------------------------------- figure
@jax.jit
def _lam_max(params, X, gamma0, key):
    return ntk_lambda_max(params, X, gamma0, key)


def _train_seeds(keys, data, gamma0, eta0, width, depth, steps, every):
    """vmap over seeds of init + train; jitted once per width (gamma0, eta0 traced)."""
    go = lambda k: train(init_params(k, width, data[0].shape[1], depth), data, gamma0, eta0, steps, every)
    return jax.vmap(go)(keys)


_train_seeds = jax.jit(_train_seeds, static_argnames=("width", "depth", "steps", "every"))


def run_grid(cfg, data):
    """`curves[(gamma0, N)]`, `errors[(gamma0, N)]`: seed means and their standard errors (dicts of
    curves); eta0 and lambda_max(K_0); the final stability number per gamma0; and `runs[(gamma0, N)]`,
    the single networks' curves (dicts of (seeds, records) arrays)."""
    data = tuple(jnp.asarray(a) for a in data)
    P = data[0].shape[0]
    eta0_base, lam0 = choose_eta0(data, max(cfg["widths"]), cfg["depth"], jr.key(123))
    curves, errors, final_stability, runs = {}, {}, {}, {}
    for N in cfg["widths"]:
        keys = jr.split(jr.fold_in(jr.key(0), N), cfg["seeds"])
        for g in cfg["gammas"]:
            eta0 = eta0_for(eta0_base, g)
            with timed(f"gamma0 = {g}, N = {N}: {cfg['seeds']} seeds x {cfg['steps']} steps"):
                p_final, c = _train_seeds(
                    keys,
                    data,
                    jnp.asarray(g),
                    jnp.asarray(eta0),
                    width=N,
                    depth=cfg["depth"],
                    steps=cfg["steps"],
                    every=cfg["every"],
                )
            for k, v in c.items():
                check_finite(v, f"{k} at gamma0 = {g}, N = {N}")
            runs[g, N] = {k: np.asarray(v) for k, v in c.items()}
            curves[g, N] = {k: v.mean(0) for k, v in runs[g, N].items()}
            errors[g, N] = {k: v.std(0, ddof=1) / np.sqrt(cfg["seeds"]) for k, v in runs[g, N].items()}
            if N == max(cfg["widths"]):
                p_last = jax.tree.map(lambda a: a[0], p_final)
                final_stability[g] = float(eta0 * _lam_max(p_last, data[0], jnp.asarray(g), jr.key(1)) / P)
    return curves, errors, eta0_base, lam0, final_stability, runs


def pair_distances(runs, gammas, widths, key, seeds=slice(None)):
    """Distance between single networks of consecutive widths N < N', per gamma0: the rms over all
    pairs of seeds (s, s') of `max_k |curve_{N,s}(k) - curve_{N',s'}(k)|`. What one run per width
    (as in the paper's figure) shows: it holds the mean curves' difference (finite-width bias) and
    both widths' seed-to-seed spread, so it shrinks only if both do. `seeds`: a subset (a slice)."""

    def one(g, a, b):
        x, z = runs[g, a][key][seeds], runs[g, b][key][seeds]
        d = np.max(np.abs(x[:, None] - z[None]), axis=-1)
        return float(np.sqrt(np.mean(d**2)))

    return {g: [one(g, a, b) for a, b in zip(widths, widths[1:])] for g in gammas}


def consecutive_differences(curves, gammas, widths, key, errors=None):
    """max_k |curve_N(k) - curve_N'(k)| for consecutive widths N < N', per gamma0; with `errors`, in
    units of the difference's standard error `sqrt(se_N^2 + se_N'^2)` (steps where it is 0 skipped)."""

    def one(g, a, b):
        d = np.abs(curves[g, a][key] - curves[g, b][key])
        if errors is None:
            return float(np.max(d))
        se = np.hypot(errors[g, a][key], errors[g, b][key])
        return float(np.max(d[se > 0] / se[se > 0]))

    return {g: [one(g, a, b) for a, b in zip(widths, widths[1:])] for g in gammas}


def main(quick: bool = False, out: str = "paper_figs/out", cifar_dir: str | None = None) -> dict:
    cfg = QUICK if quick else FULL
    data = cifar_data(cifar_dir, cfg["P"], cfg["P_test"]) if cifar_dir else digits_data(cfg["P"], cfg["P_test"])
    curves, errors, eta0, lam0, stab, runs = run_grid(cfg, data)
    gammas, widths = cfg["gammas"], list(cfg["widths"])
    steps = np.arange(0, cfg["steps"] + 1, cfg["every"])
    fig, ax = plt.subplots(2, len(gammas), figsize=(4 * len(gammas), 6.5), layout="constrained", sharex=True)
    for j, g in enumerate(gammas):
        for i, N in enumerate(widths):
            c = PALETTE[1 + i]
            for row, key, scale in ((0, "test_loss", 2), (1, "alignment", 1)):
                m, se = scale * curves[g, N][key], scale * errors[g, N][key]
                ax[row, j].plot(steps, m, color=c, label=f"N = {N}")
                ax[row, j].fill_between(steps, m - se, m + se, color=c, alpha=0.2, lw=0)
        ax[0, j].set(title=rf"$\gamma_0={g}$", ylabel=r"test loss $\mathrm{mean}(f-y)^2$")
        ax[1, j].set(xlabel="GD step k", ylabel=r"$y^\top\Phi^L y/(|\Phi^L|_F|y|^2)$ (test)")
    ax[0, 0].legend(frameon=False, fontsize=7)
    name = "CIFAR-10 0 vs 1" if cifar_dir else "digits 3 vs 8"
    fig.suptitle(
        f"F6: muP CNN ({cfg['depth']} conv layers, ReLU, GAP), {name}, P={cfg['P']}, full-batch GD, "
        f"eta0={eta0:.3g}/(1+$\\gamma_0$)$^2$ (eta0 lam_max(K0)/P={STABILITY}), seed mean +- SE of {cfg['seeds']}",
        fontsize=9,
    )
    files = save(fig, out, "f6_cnn_widths" + ("_quick" if quick else ""))
    return {
        "files": files,
        "eta0_base": eta0,
        "lambda_max_K0": lam0,
        "final_eta0_lambda_max_over_P": stab,
        "test_loss_consecutive_max_diff": consecutive_differences(curves, gammas, widths, "test_loss"),
        "alignment_consecutive_max_diff": consecutive_differences(curves, gammas, widths, "alignment"),
        "test_loss_consecutive_max_z": consecutive_differences(curves, gammas, widths, "test_loss", errors),
        "alignment_consecutive_max_z": consecutive_differences(curves, gammas, widths, "alignment", errors),
        # Single networks of consecutive widths, all seed pairs, and on the two halves of the seeds
        # (independent estimates, to show the trend is not one draw's).
        "test_loss_pair_distance": pair_distances(runs, gammas, widths, "test_loss"),
        "test_loss_pair_distance_halves": [
            pair_distances(runs, gammas, widths, "test_loss", half)
            for half in (slice(0, cfg["seeds"] // 2), slice(cfg["seeds"] // 2, None))
        ],
        "alignment_pair_distance": pair_distances(runs, gammas, widths, "alignment"),
        # Seed-to-seed spread of single networks (max over steps of the standard deviation), per width.
        "test_loss_seed_sd": {
            g: [float(np.max(errors[g, N]["test_loss"]) * np.sqrt(cfg["seeds"])) for N in widths] for g in gammas
        },
        "final": {
            f"gamma0={g}, N={N}": {k: float(v[-1]) for k, v in curves[g, N].items()} for g in gammas for N in widths
        },
    }


if __name__ == "__main__":
    run_cli(main, __doc__, extra={"--cifar-dir": dict(default=None, help="folder with the CIFAR-10 python pickles")})
