"""Pieces every solver shares: NTK from kernels, prediction dynamics, train/test outputs.

Conventions (THEORY sections 2-4): kernels are over all points, train then test (`Pa = P + P_test`);
the error signal `Delta = y - f` lives on train points only; `df/dt = (eta0 / P) K Delta`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["equal_time", "ntk_from_kernels", "euler_predictions", "error_signal", "mse_loss", "prediction_fields"]


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


def euler_predictions(K, y, dt, eta0):
    """Explicit Euler for `df/dt = (eta0/P) K(t) (y - f)` from `f(0) = 0` (THEORY section 4).

    `K (n+1, Pa, P')` with `P' >= P = len(y)` train columns first; returns `f (n+1, Pa)`.
    This is exactly what infinite-width discrete gradient descent with step `eta0 * dt` does.
    """
    P = y.shape[0]

    def step(f, K_t):
        f_next = f + dt * eta0 / P * K_t[:, :P] @ (y - f[:P])
        return f_next, f

    f0 = jnp.zeros(K.shape[1], K.dtype)
    f_last, fs = jax.lax.scan(step, f0, K[:-1])
    return jnp.concatenate([fs, f_last[None]])


def error_signal(problem, K):
    """`Delta = y - f (n+1, Pa)` from the NTK `K (n+1, Pa, Pa)` by Euler predictions; zero on test columns."""
    y, P = problem.data.y, problem.P
    f = euler_predictions(K, y, problem.dt, problem.eta0)
    return jnp.zeros_like(f).at[:, :P].set(y - f[:, :P])


def mse_loss(f, y):
    """`0.5 * mean_mu (f_mu - y_mu)^2` over the last axis."""
    return 0.5 * jnp.mean((f - y) ** 2, axis=-1)


def prediction_fields(problem, K, f_all):
    """Solution fields `ts, f, loss, ntk` (+ test ones) from `K (n+1, Pa, Pa)` and `f_all (n+1, Pa)`."""
    data, P = problem.data, problem.P
    fields = dict(
        ts=problem.ts,
        f=f_all[:, :P],
        loss=mse_loss(f_all[:, :P], data.y),
        ntk=K[:, :P, :P],
    )
    if data.X_test is not None:
        fields["f_test"] = f_all[:, P:]
        fields["ntk_test"] = K[:, P:, :P]
        if data.y_test is not None:
            fields["loss_test"] = mse_loss(f_all[:, P:], data.y_test)
    return fields
