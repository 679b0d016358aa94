"""Pieces every solver shares: NTK from kernels, prediction dynamics, train/test outputs.

Conventions (THEORY sections 2-4 and 12): kernels are over all points, train then test (`Pa = P + P_test`);
predictions carry a class axis, `f (n+1, Pa, C)` (C = 1 for scalar targets); a kernel with a class
index (the gradient kernel G, the NTK) has its (point, class) pairs flattened point-major, `Pa C`;
the error signal `Delta = -dl/df (n+1, Pa, C)` lives on train points only; `df/dt = (eta0 / P) K Delta`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "equal_time",
    "with_classes",
    "split_classes",
    "ntk_from_kernels",
    "euler_predictions",
    "static_ntk_predictions",
    "readout_correction",
    "error_signal",
    "loss_fields",
    "prediction_fields",
]


def equal_time(X):
    """Equal-time slice `X[..., t, :, t, :]` of two-time kernels `(..., n+1, M, n+1, M')`."""
    diag = jnp.diagonal(X, axis1=-4, axis2=-2)  # (..., M, M', n+1)
    return jnp.moveaxis(diag, -1, -3)


def _unflatten(X, C):
    """`(..., M C, M' C) -> (..., M, C, M', C)`."""
    return X.reshape(*X.shape[:-2], X.shape[-2] // C, C, X.shape[-1] // C, C)


def with_classes(X, C):
    """A kernel without class index `(..., M, M')` as a class-diagonal one, `X (x) I_C (..., M C, M' C)`:
    the lazy gradient kernels, whose read-outs are independent per class (THEORY 12)."""
    Y = X[..., :, None, :, None] * jnp.eye(C, dtype=X.dtype)[:, None, :]
    return Y.reshape(*X.shape[:-2], X.shape[-2] * C, X.shape[-1] * C)


def split_classes(problem, X, axes):
    """Report a kernel: each flattened `(point, class)` axis of `X` in `axes` split into `(points, C)`;
    for scalar targets (`y (P,)`) X is returned unchanged (C = 1: no class axes)."""
    if problem.data.y.ndim == 1:
        return X
    C = problem.C
    for a in sorted((a % X.ndim for a in axes), reverse=True):
        X = X.reshape(*X.shape[:a], X.shape[a] // C, C, *X.shape[a + 1 :])
    return X


def ntk_from_kernels(net, Kx, Phi_eq, G_eq, C=1):
    """`K(t) = sum_{l=0..L} G^{l+1}(t,t) * Phi~^l(t,t)` with `Phi^0 = Kx`, `G^{L+1} = I_C` and
    `Phi~ = sigma_w^2 Phi + sigma_b^2` (`net.preactivation_kernel`: weights and biases of every layer);
    `K_{mu c, nu c'} = sum_l G^{l+1}_{mu c, nu c'} Phi~^l_{mu nu}` for C outputs (THEORY 12).

    `Kx (Pa, Pa)`, `Phi_eq (L, n+1, Pa, Pa)`, `G_eq (L, n+1, M C, M C)` with `M = Pa` or 1 (a G that
    does not depend on the points) -> `(n+1, Pa C, Pa C)`.
    """
    pre = lambda X: net.preactivation_kernel(X)[..., :, None, :, None]
    G = _unflatten(G_eq, C)
    K = G[0] * pre(Kx) + pre(Phi_eq[-1]) * jnp.eye(C, dtype=Kx.dtype)[:, None, :]
    # Layer by layer, not `jnp.sum(G[1:] * pre(Phi_eq[:-1]), axis=0)`: under vmap in float32 that
    # reduction over two layers (depth 3) with several classes crashes XLA's CPU runtime (segmentation
    # fault, jaxlib 0.10.2).
    for l in range(1, Phi_eq.shape[0]):
        K = K + G[l] * pre(Phi_eq[l - 1])
    n = Kx.shape[0] * C
    return K.reshape(*K.shape[:-4], n, n)


def euler_predictions(problem, K, eps=None):
    """Explicit Euler for `df/dt = (eta0/P) K(t) Delta(t)`, `Delta = -dl/df` on the train points, from
    `f(0) = 0` (THEORY section 4), each step corrected by `eps(t)` when given (`readout_correction`).

    `K (n+1, Pa C, P' C)` with `P' >= P` train columns first, `eps (n+1, Pa, C)`; returns `f (n+1, Pa, C)`.
    Gradient descent with step `eta0 * dt` moves f by the Euler step plus, even at infinite width, the
    product of the read-out's and the features' updates, O(gamma0^2 dt^2) per step: `eps`.
    """
    Y, P, C, delta = problem.data.Y, problem.P, problem.C, problem.loss.delta
    c = problem.dt * problem.eta0 / P
    eps = jnp.zeros((K.shape[0], K.shape[1]), K.dtype) if eps is None else eps.reshape(K.shape[0], -1)

    def step(f, xs):
        K_t, eps_t = xs
        return f + c * K_t[:, : P * C] @ delta(f[: P * C].reshape(P, C), Y).reshape(-1) + eps_t, f

    f0 = jnp.zeros(K.shape[1], K.dtype)
    f_last, fs = jax.lax.scan(step, f0, (K[:-1], eps[:-1]))
    f = jnp.concatenate([fs, f_last[None]])
    return f.reshape(f.shape[0], -1, C)


def _static_flow(problem, K):
    """Gradient flow `df/dt = (eta0/P) K Delta(f)` with a static NTK `K (Pa C, Pa C)` for any loss:
    diffrax `Tsit5` with a tolerance near the dtype's precision, saved at `problem.ts` -> `(n+1, Pa, C)`."""
    Y, P, C = problem.data.Y, problem.P, problem.C
    rate = problem.eta0 / P

    def field(t, f, args):
        return rate * K[:, : P * C] @ problem.loss.delta(f[: P * C].reshape(P, C), Y).reshape(-1)

    import diffrax  # here, not at the top: it adds ~0.3 s to `import dmft`, and few solves integrate an ODE

    tol = 0.01 * float(np.sqrt(np.finfo(K.dtype).eps))
    ts = problem.ts  # to ts[-1], t_max in the grid's dtype: saveat.ts must not pass the end
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        diffrax.Tsit5(),
        0.0,
        ts[-1],
        problem.dt,
        jnp.zeros(K.shape[0], K.dtype),
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
        max_steps=65536,
    )
    return sol.ys.reshape(sol.ys.shape[0], -1, C)


def static_ntk_predictions(problem, K, discrete):
    """Predictions `f (n+1, Pa, C)` from `f(0) = 0` under a static NTK `K (Pa C, Pa C)` (train then test
    points, point-major with classes) for any loss: the explicit Euler steps of the grid (`discrete`:
    gradient descent with step `eta0 dt`, `euler_predictions`) or gradient flow (`_static_flow`)."""
    if discrete:
        return euler_predictions(problem, jnp.broadcast_to(K, (problem.n_steps + 1, *K.shape)))
    return _static_flow(problem, K)


def error_signal(problem, K, eps=None):
    """`Delta = -dl/df (n+1, Pa, C)` (`y - f` for the MSE) from the NTK `K (n+1, Pa C, Pa C)` by
    `euler_predictions` (with its correction `eps`); zero on test points."""
    P = problem.P
    f = euler_predictions(problem, K, eps)
    return jnp.zeros_like(f).at[:, :P].set(problem.loss.delta(f[:, :P], problem.data.Y))


def readout_correction(problem, f, K, Delta):
    """`eps (n+1, Pa, C)`: what gradient descent with step `eta0 dt` adds to each Euler step,
    `eps(t) = f(t+1) - f(t) - c K(t) Delta(t)` (`eps(n) = 0`), from the predictions `f (n+1, Pa, C)` the
    network's read-out gives under the error signal `Delta (n+1, Pa, C)`, and the NTK `K (n+1, Pa C, Pa C)`;
    `c = eta0 dt / P`."""
    P, C = problem.P, problem.C
    c = problem.dt * problem.eta0 / P
    step = c * jnp.einsum("tij,tj->ti", K[:-1, :, : P * C], Delta[:-1, :P].reshape(K.shape[0] - 1, -1))
    eps = f[1:] - f[:-1] - step.reshape(f[1:].shape)
    return jnp.concatenate([eps, jnp.zeros_like(f[:1])])


def loss_fields(problem, f_all):
    """`loss (n+1,)` (and `accuracy` for a classification loss), and on test points with targets
    `loss_test`, `accuracy_test`, from the predictions `f_all (n+1, Pa, C)` over train then test points."""
    data, P, loss = problem.data, problem.P, problem.loss
    out = {"loss": loss.value(f_all[:, :P], data.Y), "accuracy": loss.accuracy(f_all[:, :P], data.Y)}
    if data.y_test is not None:
        f_test = f_all[:, P:]
        out |= {"loss_test": loss.value(f_test, data.Y_test), "accuracy_test": loss.accuracy(f_test, data.Y_test)}
    return {k: v for k, v in out.items() if v is not None}


def prediction_fields(problem, K, f_all):
    """Solution fields `ts, f, loss, ntk` (+ test ones, + accuracies) from `K (n+1, Pa C, Pa C)` and
    `f_all (n+1, Pa, C)`: `f (n+1, P, C)`, `ntk (n+1, P, C, P, C)`, or without the class axes for scalar
    targets."""
    data, P, C = problem.data, problem.P, problem.C
    K = _unflatten(K, C)
    if data.y.ndim == 1:  # scalar targets: no class axes
        f, block = f_all[..., 0], lambda rows: K[:, rows, 0, :P, 0]
    else:
        f, block = f_all, lambda rows: K[:, rows, :, :P, :]
    fields = dict(ts=problem.ts, f=f[:, :P], ntk=block(slice(None, P)), **loss_fields(problem, f_all))
    if data.X_test is not None:
        fields["f_test"] = f[:, P:]
        fields["ntk_test"] = block(slice(P, None))
    return fields
