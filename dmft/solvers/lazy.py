"""The lazy (NTK) limit gamma0 -> 0: static kernels and closed-form predictions (THEORY section 8)."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp

from ..dynamics import ntk_from_kernels, prediction_fields, split_classes, static_ntk_predictions, with_classes
from ..losses import MSE
from ..solve import AbstractSolver

__all__ = ["Lazy", "lazy_kernels", "gradient_flow_predictions"]


def lazy_kernels(problem):
    """The NNGP / NTK recursion at initialisation over train then test points.

    Returns `Phi (L, Pa, Pa)` (`Phi^l = E[phi(u) phi(u)^T]`, `u ~ N(0, Phi~^{l-1})`, l = 1..L),
    `G (L, Pa, Pa)` (`G^l = sigma_w^2 G^{l+1} * E[phi'(u) phi'(u)^T]`, `G^{L+1} = 1`) and the NTK
    `K (Pa, Pa) = sum_{l=0..L} G^{l+1} * Phi~^l`, with `Phi~ = sigma_w^2 Phi + sigma_b^2` (THEORY 8, 11).
    With C outputs the gradient kernels and the NTK are these times `I_C` (THEORY 12).
    """
    net, Kx = problem.net, problem.data.Kx
    Phi, Gdot, prev = [], [], net.preactivation_kernel(Kx)
    for _ in range(problem.depth):
        phi, dphi = net.activation.kernels(prev)
        Phi.append(phi)
        Gdot.append(dphi)
        prev = net.preactivation_kernel(phi)
    G, upper = [], jnp.ones_like(Kx)
    for dphi in reversed(Gdot):
        upper = net.sw2 * upper * dphi
        G.insert(0, upper)
    Phi, G = jnp.stack(Phi), jnp.stack(G)
    return Phi, G, ntk_from_kernels(net, Kx, Phi[:, None], G[:, None])[0]


def gradient_flow_predictions(K, y, ts, eta0):
    """Exact gradient flow on the MSE, `df/dt = (eta0/P) K (y - f)`, `f(0) = 0`, with a static NTK
    shared by the outputs (`K (x) I_C`, THEORY 12).

    `K (Pa, Pa)` over train then test points, `y (P, C)` (or `(P,)`), `ts (n+1,)` -> `f (n+1, Pa, C)`
    (or `(n+1, Pa)`):
    train `f(t) = (I - exp(-eta0 K t / P)) y`, test `f_*(t) = K_{*.} K^{-1} (I - exp(-eta0 K t / P)) y`,
    both through the eigendecomposition of the train block (no inverse of an ill-conditioned K:
    `(1 - exp(-lam c)) / lam -> c` on its near-null space).
    """
    if y.ndim == 1:
        return gradient_flow_predictions(K, y[:, None], ts, eta0)[..., 0]
    P = y.shape[0]
    lam, V = jnp.linalg.eigh(K[:P, :P])
    lam = jnp.maximum(lam, 0.0)
    c = eta0 * ts / P
    decay = -jnp.expm1(-lam[None, :] * c[:, None])  # (n+1, P)
    coeff = V.T @ y  # (P, C)
    f_train = jnp.einsum("tk,kc,pk->tpc", decay, coeff, V)
    tiny = jnp.finfo(K.dtype).eps * P * jnp.max(lam)
    ratio = jnp.where(lam > tiny, decay / jnp.where(lam > tiny, lam, 1.0), c[:, None])
    f_test = jnp.einsum("tk,kc,pk->tpc", ratio, coeff, K[P:, :P] @ V)
    return jnp.concatenate([f_train, f_test], axis=1)


class Lazy(AbstractSolver):
    """The static-NTK (lazy) limit gamma0 -> 0 of THEORY section 8, for any depth and activation.

    `discrete=False` (default) integrates gradient flow exactly (in closed form for the MSE, by
    diffrax for other losses, whose flow is nonlinear in f); `discrete=True` takes the explicit
    Euler steps of the discrete DMFT (THEORY section 4), i.e. the gamma0 -> 0 limit of the iterative
    solvers on the same grid, so that their deviation from it is purely O(gamma0^2).
    `problem.gamma0` is ignored, so this is also the static-NTK approximation of the literature
    (THEORY 9) at any gamma0.
    """

    discrete: bool = eqx.field(static=True, default=False)

    def init(self, problem, key):
        return lazy_kernels(problem)

    def postprocess(self, problem, state, key):
        Phi, G, K = state
        n1, C = problem.n_steps + 1, problem.C
        K_t = jnp.broadcast_to(with_classes(K, C), (n1, K.shape[0] * C, K.shape[1] * C))
        if isinstance(problem.loss, MSE) and not self.discrete:
            f_all = gradient_flow_predictions(K, problem.data.Y, problem.ts, problem.eta0)
        else:
            f_all = static_ntk_predictions(problem, with_classes(K, C), self.discrete)
        tile = lambda X: jnp.broadcast_to(X[:, None], (X.shape[0], n1, *X.shape[1:]))
        G_eq = split_classes(problem, tile(with_classes(G, C)), (-2, -1))
        return dict(**prediction_fields(problem, K_t, f_all), Phi_eq=tile(Phi), G_eq=G_eq)
