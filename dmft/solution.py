"""The `Solution` every solver returns, and the result codes of the self-consistent iteration."""

from __future__ import annotations

import equinox as eqx
import jax

__all__ = ["RESULTS", "Solution"]


class RESULTS(eqx.Enumeration):
    """Outcome of a solve. `Solution.result` holds one of these."""

    successful = ""
    max_iters_reached = (
        "The self-consistent iteration did not reach rtol within max_iters. Increase max_iters, "
        "lower the damping (smaller steps are more stable), or loosen rtol."
    )
    nonfinite = (
        "The self-consistent iteration produced NaN or inf. Lower the damping, use more time steps "
        "(smaller dt), or a smaller gamma0 * t_max."
    )


class Solution(eqx.Module):
    """The DMFT order parameters and predictions on the grid `ts` (THEORY sections 2-4).

    Sample axes of kernels run over all points, train first then test: `Pa = P + P_test`.
    A kernel whose value does not depend on the sample index (the gradient kernel `G` of a linear
    network) is stored with size-1 sample axes; it broadcasts against the full shape.

    **Fields:**

    - `ts (n+1,)`: the time grid.
    - `f (n+1, P)`, `loss (n+1,)`: train predictions and the mean loss (`0.5 * mean (f - y)^2` for the MSE).
    - `ntk (n+1, P, P)`: the NTK `K(t, t)` on train points.
    - `f_test (n+1, P_test)`, `ntk_test (n+1, P_test, P)`, `loss_test (n+1,)`: on test points, or None.
    - `accuracy`, `accuracy_test (n+1,)`: fractions of correctly classified points for a
      classification loss (`Problem(loss="logistic")`), or None.
    - `Phi_eq`, `G_eq (L, n+1, Pa, Pa)`: equal-time kernels `Phi^l(t, t)`, `G^l(t, t)`, l = 1..L.
    - `Phi`, `G (L, n+1, Pa, n+1, Pa)`: two-time kernels, or None for solvers that only track equal
      times (the lazy limit, where they are constant, and the two-layer fast path).
    - `A`, `B (L-1, n+1, Pa, n+1, Pa)`: the discrete response functions `Abar^l`, `Bbar^l` (l = 1..L-1,
      THEORY section 4; they carry the dt) per pair of points: entry `(t, mu, s, nu)` is the response
      of the field of point mu at time t to the source of point nu at time s. None for solvers
      without responses. Size-1 axes broadcast as above (`LinearClosure`'s `A (L-1, n+1, Pa, n+1, 1)`,
      `B (L-1, n+1, 1, n+1, Pa)`).
    - `result`: a `RESULTS` item. Iterative solvers: `iterations` taken and `residuals`, the
      relative change per iteration, `(max_iters,)` per stage (`MonteCarlo` has two), the stages' in
      order and NaN-padded at the end; closed forms: 0 and None.
    - `stderr`: Monte Carlo standard errors `{"f", "loss", "ntk", ...}` (same shapes) of solvers that
      sample, or None; `noise_floor`: the relative Monte Carlo standard error of the kernels of
      `MonteCarlo`, from the spread of its replicas (the level its pooled stage stops at), or None.
    """

    ts: jax.Array
    f: jax.Array
    loss: jax.Array
    ntk: jax.Array
    Phi_eq: jax.Array
    G_eq: jax.Array
    f_test: jax.Array | None = None
    loss_test: jax.Array | None = None
    ntk_test: jax.Array | None = None
    accuracy: jax.Array | None = None
    accuracy_test: jax.Array | None = None
    Phi: jax.Array | None = None
    G: jax.Array | None = None
    A: jax.Array | None = None
    B: jax.Array | None = None
    result: RESULTS = eqx.field(default_factory=lambda: RESULTS.successful)
    iterations: jax.Array | int = 0
    residuals: jax.Array | None = None
    stderr: dict | None = None
    noise_floor: jax.Array | None = None
