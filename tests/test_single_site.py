"""The causal single-site pass (`dmft.single_site.fields`) against the recursion written out step by step."""

import jax
import numpy as np
import pytest

from dmft.activations import Tanh
from dmft.single_site import fields


def _step_by_step(act, gamma0, u, r, C, D):
    """h(t) = u(t) + gamma0 sum_{s<t} C(t, s) g(s), z(t) = r(t) + gamma0 sum_{s<=t} D(t, s) phi(s),
    g(t) = phi'(h(t)) z(t) (class-wise), one time after the other (THEORY 3)."""
    S, T, Pa = u.shape
    PC = r.shape[2]
    h, z = np.zeros((S, T, Pa)), np.zeros((S, T, PC))
    phi, g = np.zeros((S, T, Pa)), np.zeros((S, T, PC))
    for t in range(T):
        h[:, t] = u[:, t] + gamma0 * np.einsum("sbj,ibj->si", g[:, :t], C[t, :, :t])
        phi[:, t] = np.asarray(act.fn(h[:, t]))
        z[:, t] = r[:, t] + gamma0 * np.einsum("sbj,ibj->si", phi[:, : t + 1], D[t, :, : t + 1])
        g[:, t] = (np.asarray(act.dfn(h[:, t]))[:, :, None] * z[:, t].reshape(S, Pa, -1)).reshape(S, PC)
    return phi.reshape(S, -1), g.reshape(S, -1), h, z


@pytest.mark.parametrize("T, classes", [(3, 1), (17, 1), (13, 2)])
def test_fields_follow_the_causal_recursion(T, classes):
    # Random memory kernels; the blocked pass must give the recursion's fields to float64 rounding
    # (the same sums in another order: ~1e-15 relative for O(1) fields over T <= 17 steps).
    rng = np.random.default_rng(T)
    S, Pa, gamma0 = 5, 3, 0.7
    PC = Pa * classes
    u, r = rng.standard_normal((S, T, Pa)), rng.standard_normal((S, T, PC))
    C = 0.3 * rng.standard_normal((T, Pa, T, PC)) / np.sqrt(T)
    D = 0.3 * rng.standard_normal((T, PC, T, Pa)) / np.sqrt(T)
    want = _step_by_step(Tanh(), gamma0, u, r, C, D)
    # Entries that causality excludes must not matter: C strictly causal, D causal.
    after = np.arange(T)[:, None] < np.arange(T)[None, :]
    C[np.broadcast_to((after | np.eye(T, dtype=bool))[:, None, :, None], C.shape)] = 1e3
    D[np.broadcast_to(after[:, None, :, None], D.shape)] = 1e3
    got = jax.jit(lambda *a: fields(Tanh(), gamma0, *a, full=True))(u, r, C, D)
    for x, y in zip(got, want):
        np.testing.assert_allclose(np.asarray(x).reshape(y.shape), y, rtol=0, atol=1e-12)
