"""Pieces every solver shares: NTK from kernels, prediction dynamics, train/test outputs.

Conventions (THEORY sections 2-4): kernels are over all points, train then test (`Pa = P + P_test`);
the error signal `Delta = -dl/df` (`y - f` for the MSE) lives on train points only; `df/dt = (eta0 / P) K Delta`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "equal_time",
    "ntk_from_kernels",
    "euler_predictions",
    "error_signal",
    "loss_fields",
    "prediction_fields",
]


def equal_time(X):
    """Equal-time slice `X[..., t, :, t, :]` of two-time kernels `(..., n+1, M, n+1, M')`."""
    diag = jnp.diagonal(X, axis1=-4, axis2=-2)  # (..., M, M', n+1)
    return jnp.moveaxis(diag, -1, -3)


def ntk_from_kernels(net, Kx, Phi_eq, G_eq):
    """`K(t) = sum_{l=0..L} G^{l+1}(t,t) * Phi~^l(t,t)` with `Phi^0 = Kx`, `G^{L+1} = 1` and
    `Phi~ = sigma_w^2 Phi + sigma_b^2` (`net.preactivation_kernel`: weights and biases of every layer).

    `Kx (Pa, Pa)`, `Phi_eq`, `G_eq (L, n+1, Pa, Pa)` (G may have size-1 sample axes) -> `(n+1, Pa, Pa)`.
    """
    pre = net.preactivation_kernel
    K = G_eq[0] * pre(Kx) + pre(Phi_eq[-1])
    if Phi_eq.shape[0] > 1:
        K = K + jnp.sum(G_eq[1:] * pre(Phi_eq[:-1]), axis=0)
    return K


def euler_predictions(problem, K):
    """Explicit Euler for `df/dt = (eta0/P) K(t) Delta(t)`, `Delta = -dl/df` on the train points, from
    `f(0) = 0` (THEORY section 4).

    `K (n+1, Pa, P')` with `P' >= P` train columns first; returns `f (n+1, Pa)`. This is exactly what
    infinite-width discrete gradient descent with step `eta0 * dt` does.
    """
    y, P, delta = problem.data.y, problem.P, problem.loss.delta
    c = problem.dt * problem.eta0 / P

    def step(f, K_t):
        return f + c * K_t[:, :P] @ delta(f[:P], y), f

    f0 = jnp.zeros(K.shape[1], K.dtype)
    f_last, fs = jax.lax.scan(step, f0, K[:-1])
    return jnp.concatenate([fs, f_last[None]])


def error_signal(problem, K):
    """`Delta = -dl/df (n+1, Pa)` (`y - f` for the MSE) from the NTK `K (n+1, Pa, Pa)` by Euler
    predictions; zero on test columns."""
    P = problem.P
    f = euler_predictions(problem, K)
    return jnp.zeros_like(f).at[:, :P].set(problem.loss.delta(f[:, :P], problem.data.y))


def loss_fields(problem, f_all):
    """`loss (n+1,)` (and `accuracy` for a classification loss), and on test points with targets
    `loss_test`, `accuracy_test`, from the predictions `f_all (n+1, Pa)` over train then test points."""
    data, P, loss = problem.data, problem.P, problem.loss
    out = {"loss": loss.value(f_all[:, :P], data.y), "accuracy": loss.accuracy(f_all[:, :P], data.y)}
    if data.y_test is not None:
        f_test = f_all[:, P:]
        out |= {"loss_test": loss.value(f_test, data.y_test), "accuracy_test": loss.accuracy(f_test, data.y_test)}
    return {k: v for k, v in out.items() if v is not None}


def prediction_fields(problem, K, f_all):
    """Solution fields `ts, f, loss, ntk` (+ test ones, + accuracies) from `K (n+1, Pa, Pa)` and
    `f_all (n+1, Pa)`."""
    data, P = problem.data, problem.P
    fields = dict(ts=problem.ts, f=f_all[:, :P], ntk=K[:, :P, :P], **loss_fields(problem, f_all))
    if data.X_test is not None:
        fields["f_test"] = f_all[:, P:]
        fields["ntk_test"] = K[:, P:, :P]
    return fields
