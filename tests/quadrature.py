"""Independent reference: Gaussian expectations by scipy adaptive quadrature (test-side only).

E[f(u) g(v)] for (u, v) ~ N(0, [[c11, c12], [c12, c22]]) as a nested `scipy.integrate.quad`, split at
the kinks of non-smooth functions so that the adaptive rule converges to ~1e-12.
"""

import numpy as np
from scipy import integrate


def _gauss(z):
    return np.exp(-z * z / 2) / np.sqrt(2 * np.pi)


def _quad_split(fun, breaks):
    edges = [-np.inf, *sorted(set(breaks)), np.inf]
    return sum(
        integrate.quad(fun, lo, hi, epsabs=1e-13, epsrel=1e-12, limit=200)[0] for lo, hi in zip(edges[:-1], edges[1:])
    )


def pair_expectation(f, g, c11, c12, c22, kinks=()):
    s1 = np.sqrt(c11)
    a = c12 / s1
    b = np.sqrt(max(c22 - a * a, 0.0))

    def inner(z1):
        m = a * z1
        if b <= 1e-6 * np.sqrt(c22):  # (numerically) perfectly correlated pair
            return g(m)
        return _quad_split(lambda z2: g(m + b * z2) * _gauss(z2), [(k - m) / b for k in kinks])

    return _quad_split(lambda z1: f(s1 * z1) * inner(z1) * _gauss(z1), [k / s1 for k in kinks])


def kernel_matrix(f, g, cov, kinks=()):
    """Matrix of pairwise expectations E[f(u_mu) g(u_nu)] for u ~ N(0, cov)."""
    M = cov.shape[0]
    out = np.empty((M, M))
    for i in range(M):
        for j in range(i, M):
            out[i, j] = out[j, i] = pair_expectation(f, g, cov[i, i], cov[i, j], cov[j, j], kinks)
    return out
