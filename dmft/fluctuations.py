"""Leading-order finite-width fluctuations of a two-layer network around its DMFT (`docs/theory_extensions.md`
section 13).

A depth-1 network of width N is exactly N independent neurons `(u_i, r_i)` (`u ~ N(0, Su)` the
preactivations at t = 0, `r ~ N(0, sigma_w^2)` the scaled read-outs) coupled only through the error
signal `Delta = -dl/df`. On the grid of `problem` (gradient descent with step `eta0 dt`, the
`networks.train(..., method="gd")` rule) neuron i follows

    h_i(t) = u_i + gamma0 a_i(t),  a_i(t+1) = a_i(t) + c Su (Delta(t) . g_i(t)),  g_i = phi'(h_i) z_i,
    z_i(t) = r_i + gamma0 b_i(t),  b_i(t+1) = b_i(t) + c sigma_w^2 phi(h_i(t))^T Delta(t),   c = eta0 dt / P,

and the centred output is the sample mean `f = <psi_i> + c sigma_b^2 sum_{s<t} sum_mu Delta_mu(s)` of
`psi_i(t) = (z_i phi(h_i) - r_i phi(u_i)) / gamma0 = b_i phi(h_i) + r_i (phi(h_i) - phi(u_i)) / gamma0`
(`r_i phi'(u_i) a_i` at gamma0 = 0, the lazy limit). Writing `F(Delta)` for the N -> infinity mean and
`e = <psi_i>_N - E psi` for the sampling noise, `f_N = F(Delta_N) + e` and `Delta_N = delta(f_N)`
linearise around the DMFT to

    delta f = e + J H delta f_train,      J = dF/dDelta,  H = d delta/d f,

so each neuron contributes the influence `iota_i = (I - J H)^{-1}`-propagated `psi_i - E psi`, and
`N Cov(f) -> Cov(iota)`. The NTK and the loss follow from the same influences; the O(1/N) mean shift
from the second-order terms (section 13). Everything is estimated from `n_samples` independent neurons;
the Monte Carlo standard error of each coefficient comes from the higher moments of the influences.

Deeper networks in the lazy limit (`_lazy`): each layer's N neurons add their sampling noise to the
kernel recursion of the static NTK, and to second order the mean shift (section 13). Deep networks with
feature learning: the propagator of the DMFT action (section 13), exact by Krylov solves for linear activations
(`_propagator`, and the mean shift from the action's one-loop term on small grids, `_one_loop`), with its
ingredients sampled for other smooth ones and relu (`_sampled_propagator`).

J is built by forward-mode differentiation along each neuron's path. For an activation whose
derivative jumps (relu: `activation.smooth` is False) a small change of Delta flips `phi'(h)` of the
neurons whose field crosses zero, a contribution pathwise derivatives do not see. For relu the
first derivatives count them with a Gaussian kernel in place of phi'' (`_counting_step`), and the mean
shift's second derivatives are central second differences of each neuron's path (`_second_difference`),
whose mean over neurons counts the flips.
"""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from . import _xla
from ._keys import as_key
from ._lazy import BIAS_GROUPS, lazy_bias, lazy_bytes, lazy_coefficients, moments, normal
from ._maps import make_room
from ._one_loop import ONE_LOOP_MAX, bias_coefficients, one_loop_bytes, one_loop_size
from ._propagator import linear_bytes, linear_coefficients, symmetric
from ._sampled_propagator import sampled_bytes, sampled_coefficients
from .activations import Linear, ReLU
from .costs import budget_bytes
from .problem import Problem
from .solution import RESULTS, Solution
from .solvers._sampling import factor

__all__ = ["Fluctuations", "fluctuations"]

# Groups of neurons for the jackknife of the Jacobians' Monte Carlo error (`_coefficients`).
_GROUPS = 4
# The relative standard error of the sampled propagator's variances above which `fluctuations` warns.
_NOISY = 0.25


class Fluctuations(eqx.Module):
    """Seed-to-seed covariances of a width-N network as coefficients of 1/N: at width N,
    `Var f_mu(t) ~= f_var[t, mu] / N`, and so on (leading order in 1/N, centred networks trained by
    gradient descent on the problem's grid).

    **Fields** (C = number of outputs; the class axes are absent for scalar targets):

    - `ts (n+1,)`: the time grid.
    - `f_var (n+1, P[, C])`, `f_test_var (n+1, P_test[, C])`: variance coefficients of the predictions.
    - `loss_cov (n+1, n+1)`: covariance coefficient of the train loss between pairs of times (its
      diagonal is the loss variance); `loss_test_cov` likewise, or None without test targets.
    - `ntk_var (n+1, P[, C], P[, C])`: variance coefficients of the train NTK entries.
    - `f_bias (n+1, P[, C])`, `f_test_bias`, `loss_bias (n+1,)`, `loss_test_bias`: the mean shift
      `E[x_N] - x_DMFT ~= x_bias / N` (second order in the sampling noise): at depth 1 (relu's second
      derivatives by differences), at depth >= 2 in the lazy limit for smooth activations and relu, and
      with feature learning for linear networks on small grids (T Pa <= 26 at depth 2, 20 at depth 3,
      and within the memory budget); None otherwise.
    - `ntk_bias (n+1, P, P)`: the mean shift of the train NTK entries, at depth >= 2 in the lazy limit for
      smooth activations and relu (static); None otherwise.
    - `stderr`: Monte Carlo standard errors of each of the above, keyed by field name.
    - `n_samples`: neurons sampled.
    """

    ts: jax.Array
    f_var: jax.Array
    loss_cov: jax.Array
    ntk_var: jax.Array
    stderr: dict
    n_samples: int = eqx.field(static=True)
    f_test_var: jax.Array | None = None
    loss_test_cov: jax.Array | None = None
    f_bias: jax.Array | None = None
    f_test_bias: jax.Array | None = None
    loss_bias: jax.Array | None = None
    loss_test_bias: jax.Array | None = None
    ntk_bias: jax.Array | None = None

    def sd(self, name: str, width: int) -> jax.Array:
        """Standard deviation across seeds at `width` of `name` ("f", "f_test", "loss", "loss_test" or
        "ntk"); for the losses, over time."""
        var = getattr(self, f"{name}_cov" if name.startswith("loss") else f"{name}_var")
        if var is None:
            raise ValueError(f"these fluctuations have no {name!r} (no test data?)")
        if name.startswith("loss"):
            var = jnp.diagonal(var)
        return jnp.sqrt(var / width)


def _check(problem, sol, n_samples, chunk_size):
    if not isinstance(problem, Problem) or not isinstance(sol, Solution):
        raise ValueError("fluctuations(problem, sol) takes a dmft.Problem and the dmft.Solution solved for it")
    if problem.depth > 1 and not deep_lazy(problem):
        if not deep_propagator(problem):
            raise ValueError(
                f"fluctuations covers two-layer networks (MLP(depth=1)), and deeper ones (depth {problem.depth}) "
                "with a smooth activation or relu and scalar targets: in the lazy limit (gamma0 = 0), and with "
                "feature learning for sigma_w = 1 and sigma_b = 0"
            )
    if sol.result != RESULTS.successful:
        raise ValueError("the Solution did not converge: fluctuations around it would mean nothing; solve it again")
    T, P, C = problem.n_steps + 1, problem.P, problem.C
    if sol.f.reshape(sol.f.shape[0], -1).shape != (T, P * C):
        raise ValueError(
            f"sol.f has shape {sol.f.shape} but the problem has (n_steps + 1, P[, C]) = {(T, P, C)}: pass the "
            "Problem the Solution was solved for"
        )
    for name, value in (("n_samples", n_samples), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"{name} must be an integer >= 2, got {value!r}")
    if n_samples % chunk_size or chunk_size % _GROUPS:
        raise ValueError(
            f"chunk_size ({chunk_size}) must be a multiple of {_GROUPS} (neurons are paired for the mean shift "
            f"and grouped for the jackknife) and divide n_samples ({n_samples})"
        )
    lazy_shift = problem.depth > 1 and float(problem.gamma0) == 0
    if lazy_shift and (n_samples % BIAS_GROUPS or n_samples < 2 * BIAS_GROUPS):
        raise ValueError(
            f"n_samples ({n_samples}) must be a multiple of {BIAS_GROUPS} and at least {2 * BIAS_GROUPS}: the "
            f"mean shift of a deep network in the lazy limit comes from {BIAS_GROUPS} independent groups of neurons"
        )


def _deep_covered(act) -> bool:
    """Whether deep networks are covered: Price's theorem holds pathwise for a smooth activation; relu's
    comes in closed form in the lazy limit (`_relu_price`) and from relu smoothed by a narrow Gaussian
    with feature learning (`_sampled_propagator`)."""
    return act.smooth or isinstance(act, ReLU)


def deep_lazy(problem) -> bool:
    """Whether the lazy limit's layer recursion (`_lazy`) covers `problem`: gamma0 = 0, a smooth
    activation or relu, scalar targets."""
    return float(problem.gamma0) == 0 and _deep_covered(problem.activation) and problem.C == 1


def deep_propagator(problem) -> bool:
    """Whether the propagator of the action covers `problem` at depth >= 2 with feature learning:
    exactly (`_propagator`) for a linear activation, by sampling (`_sampled_propagator`) for another
    smooth one or relu."""
    net = problem.net
    plain = float(net.sigma_w) == 1.0 and float(net.sigma_b) == 0.0
    return _deep_covered(problem.activation) and problem.C == 1 and plain


def _sampled(problem) -> bool:
    """Whether `fluctuations` uses the sampled propagator (`_sampled_propagator`): depth >= 2, feature
    learning, a nonlinear activation."""
    return problem.depth > 1 and float(problem.gamma0) > 0 and not isinstance(problem.activation, Linear)


@jax.custom_jvp
def _counting_step(h, width):
    """relu's `phi'(h) = 1[h > 0]`, whose forward-mode derivative is a Gaussian kernel of `width` instead
    of the delta function: a derivative along a neuron's path then counts the neurons whose phi' flips
    (a kernel estimate of their density at h = 0) instead of missing them."""
    return ReLU().dfn(h)


@_counting_step.defjvp
def _counting_step_jvp(primals, tangents):
    (h, width), (dh, _) = primals, tangents
    return _counting_step(h, width), jax.scipy.stats.norm.pdf(h, scale=width) * dh


def _step(problem, u, r, kink_width=0.0):
    """One gradient-descent step `((a, b), Delta_t) -> ((a', b'), (psi, phi(h) on train points, g))` of
    neurons `u (S, Pa)`, `r (S, C)` (module docstring; `Delta_t (Pa, C)`). `kink_width > 0` (relu): its
    derivatives count the flips of phi' (`_counting_step`) with a kernel of that width times each point's
    preactivation scale `sqrt(Su_mumu)`; the steps themselves are the same."""
    act, gamma0, net, P = problem.activation, problem.gamma0, problem.net, problem.P
    Su = net.preactivation_kernel(problem.data.Kx)
    dfn = act.dfn
    if kink_width > 0:
        width = kink_width * jnp.sqrt(jnp.diagonal(Su))
        dfn = lambda h: _counting_step(h, width)
    c = problem.dt * problem.eta0 / P
    S, C = r.shape
    lazy = gamma0 == 0
    safe = jnp.where(lazy, 1.0, gamma0)
    phi_u = act.fn(u)

    def step(carry, Delta_t):
        a, b = carry
        h, z = u + gamma0 * a, r + gamma0 * b
        phi, dphi = act.fn(h), dfn(h)
        moved = jnp.where(lazy, act.dfn(u) * a, (phi - phi_u) / safe)  # (phi(h) - phi(u)) / gamma0
        psi = b[:, None, :] * phi[:, :, None] + r[:, None, :] * moved[:, :, None]
        g = (dphi[:, :P, None] * z[:, None, :]).reshape(S, P * C)
        a = a + c * (dphi * (z @ Delta_t.T)) @ Su
        b = b + c * net.sw2 * phi @ Delta_t
        return (a, b), (psi, phi[:, :P], g)

    return step


_FD_STEP = 0.1


def _second_difference(fn, x, v):
    """`fn''(x)[v, v]` by the central second difference along `v` with a step of `_FD_STEP` (root mean
    square over v's entries): for relu, whose paths' second derivatives miss the neurons whose phi'
    flips between the three paths, while the difference of their means is exact to O(step^2)."""
    size = jnp.sqrt(jnp.mean(v**2))
    safe = jnp.where(size > 0, size, 1.0)
    d = _FD_STEP * v / safe
    return (fn(x + d) + fn(x - d) - 2 * fn(x)) * (size / _FD_STEP) ** 2


def _neurons(problem, u, r, Delta, carries=False, kink_width=0.0):
    """`psi (S, T, Pa, C)`, `phi(h) (S, T, P)` and `g (S, T, P C)` on train points of neurons `u (S, Pa)`,
    `r (S, C)` driven by `Delta (T, Pa, C)`; with `carries`, also the states `(a (T, S, Pa), b (T, S, C))`
    each step starts from. `kink_width`: as in `_step`."""

    step_fn = _step(problem, u, r, kink_width)

    def step(carry, Delta_t):
        new, out = step_fn(carry, Delta_t)
        return new, (out, carry) if carries else out

    _, out = jax.lax.scan(step, (jnp.zeros_like(u), jnp.zeros_like(r)), Delta)
    fields = tuple(jnp.moveaxis(x, 0, 1) for x in (out[0] if carries else out))
    return (fields, out[1]) if carries else fields


def _ntk_terms(problem, phi, g, dphi, dg):
    """`sum_s` over neurons of the NTK's bilinear form `Su (x) (dg g^T) + sw2 (dphi phi^T) (x) I_C`,
    `(..., T, P C, P C)`, for fields `phi (S, T, P)`, `g (S, T, P C)` and a second set `dphi`, `dg`
    with optional leading axes (the per-neuron NTK for `dphi = phi`, `dg = g` neuron by neuron)."""
    P, C = problem.P, problem.C
    Su = problem.net.preactivation_kernel(problem.data.Kx)[:P, :P]
    gg = jnp.einsum("...sta,stb->...tab", dg, g)
    pp = jnp.einsum("...sta,stb->...tab", dphi, phi)
    return gg * jnp.kron(Su, jnp.ones((C, C), g.dtype)) + problem.net.sw2 * jnp.kron(pp, jnp.eye(C, dtype=g.dtype))


@_xla.jit
def _coefficients(problem, f, key, n_samples, chunk_size, kink_width):
    """The variance coefficients (and mean shifts) with their standard errors, as flat dicts keyed by
    "f", "ntk", "loss", "loss_test" and "<name>_bias", and the network's mean predictions on train points
    (the neurons' mean plus the read-out bias's drift). `f`: the DMFT's predictions, on train then (where
    there are) test points, around which the losses are linearised."""
    data, P, C, loss = problem.data, problem.P, problem.C, problem.loss
    T, Pa, dtype = problem.n_steps + 1, data.Kx.shape[0], data.Kx.dtype
    n = T * P * C
    f_all = f.reshape(T, -1, C)
    f_star = f_all[:, :P]
    Delta_star = jnp.zeros((T, Pa, C), dtype).at[:, :P].set(loss.delta(f_star, data.Y))
    H = jax.scipy.linalg.block_diag(
        *jax.vmap(jax.jacfwd(lambda f: loss.delta(f, data.Y)))(f_star).reshape(T, P * C, -1)
    )

    k_u, k_r = jr.split(key)
    M_u = factor(problem.net.preactivation_kernel(data.Kx))[0]
    u = (normal(k_u, (n_samples, Pa), dtype) @ M_u.T).reshape(-1, chunk_size, Pa)
    r = (problem.net.sigma_w * normal(k_r, (n_samples, C), dtype)).reshape(-1, chunk_size, C)
    G = _GROUPS  # neuron j's Jacobians are summed in group j mod G, for the jackknife of their error
    by_group = lambda x: x.reshape(x.shape[0], -1, G, *x.shape[2:])  # (., S, ...) -> (., S / G, G, ...)
    # the NTK is symmetric: its Jacobians and influences are kept on the upper triangle, ntri entries
    iu = jnp.triu_indices(P * C)
    upper = lambda x: x[..., iu[0], iu[1]]  # (..., P C, P C) -> (..., ntri)

    def chunk_sums(ur):
        """Sums over one chunk of neurons of psi and the NTK, and, per group, of their Jacobians with
        respect to Delta on train points, tangent-first: `(G, n, T, Pa, C)`, `(G, n, T, ntri)`. A
        change of Delta(s) moves the neurons from step s + 1 on, so the tangents of time s are carried
        from s only."""
        step = _step(problem, *ur, kink_width)
        (psi, phi, g), (a, b) = _neurons(problem, *ur, Delta_star, carries=True)
        directions = jnp.zeros((P * C, Pa, C), dtype).at[:, :P].set(jnp.eye(P * C, dtype=dtype).reshape(-1, P, C))
        # one-hot groups: a sum as a product, where XLA's CPU reduction over the neurons' (middle) axis is slow
        groups = jax.nn.one_hot(jnp.arange(chunk_size) % G, G, dtype=dtype)

        def from_time(s):
            def body(t, acc):
                dcarry, J_psi, J_K = acc
                tangent = lambda dc, dD: jax.jvp(step, ((a[t], b[t]), Delta_star[t]), (dc, dD))[1]
                dcarry, (dpsi, dphi, dg) = jax.vmap(tangent)(dcarry, directions * (t == s))
                # the groups take the place of _ntk_terms' time axis: (P C, G, P C, P C)
                fields = (phi[:, t].reshape(-1, G, P), g[:, t].reshape(-1, G, P * C))
                dK = jnp.moveaxis(_ntk_terms(problem, *fields, by_group(dphi), by_group(dg)), 1, 0)
                J_psi = J_psi.at[:, :, t].set(jnp.einsum("dsac,sg->gdac", dpsi, groups))
                return dcarry, J_psi, J_K.at[:, :, t].set(upper(dK + jnp.swapaxes(dK, -1, -2)))

            zeros = (jnp.zeros((P * C, *a.shape[1:]), dtype), jnp.zeros((P * C, *b.shape[1:]), dtype))
            J0 = (jnp.zeros((G, P * C, T, Pa, C), dtype), jnp.zeros((G, P * C, T, len(iu[0])), dtype))
            return jax.lax.fori_loop(s, T, body, (zeros, *J0))[1:]

        J = jax.lax.map(from_time, jnp.arange(T))  # (T, G, P C, ...): Delta's time first
        J = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0).reshape(G, n, *x.shape[3:]), J)
        return (psi.sum(0), upper(_ntk_terms(problem, phi, g, phi, g))), J

    def add_chunk(acc, ur):  # a running sum: the Jacobians exist once, not once per chunk
        return jax.tree.map(jnp.add, acc, chunk_sums(ur)), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(chunk_sums, (u[0], r[0])))
    (F, K), J_groups = jax.lax.scan(add_chunk, zeros, (u, r))[0]
    F, K = F / n_samples, K / n_samples

    def variants(x):
        """The Jacobians of all neurons, then those of all but group g (g = 1..G): `(G + 1, n, ...)`."""
        total = x.sum(0)
        return jnp.concatenate([total[None] / n_samples, (total[None] - x) / (n_samples - n_samples // G)])

    J_f_all, J_K_all = map(variants, J_groups)
    # the read-out bias moves every output by c sigma_b^2 sum_{s<t} sum_mu Delta_mu(s): a deterministic
    # term of F, so only its Jacobian matters
    c = problem.dt * problem.eta0 / P
    steps = jnp.tril(jnp.ones((T, T), dtype), -1)
    J_bias = c * problem.net.sigma_b**2 * jnp.einsum("ts,de->sdte", steps, jnp.eye(C, dtype=dtype))
    J_f_all = J_f_all + jnp.broadcast_to(J_bias[:, None, :, :, None], (T, P, C, T, 1, C)).reshape(n, T, 1, C)
    propagate_all = jax.vmap(
        lambda J_f: jax.scipy.linalg.lu_factor(jnp.eye(n, dtype=dtype) - J_f[:, :, :P].reshape(n, n).T @ H)
    )(J_f_all)
    grad_loss = lambda Y, f: jax.vmap(jax.grad(lambda f: loss.value(f, Y)))(f)  # (T, M, C)
    dloss = grad_loss(data.Y, f_star)
    if data.y_test is not None:
        dloss_test = grad_loss(data.Y_test, f_all[:, P:])

    smooth = problem.activation.smooth
    train = lambda x: x[..., :P, :].reshape(*x.shape[:-3], n)  # (..., T, Pa, C) -> (..., n) on train points

    def second(fn, x, v):
        """The second directional derivative of `fn` at `x` along `v`."""
        return jax.jvp(lambda y: jax.jvp(fn, (y,), (v,))[1], (x,), (v,))[1]

    def propagated(e, J_f, propagate):
        """`(delta f (S, T, Pa, C), delta Delta (S, n))` of per-neuron sources `e (S, T, Pa, C)`: the first-order
        response of the self-consistent error signal (module docstring)."""
        dDelta = jax.scipy.linalg.lu_solve(propagate, train(e).T).T @ H.T
        return e + (dDelta @ J_f.reshape(n, -1)).reshape(e.shape), dDelta

    def bias_terms(ur, i_f, dDelta, J_f, propagate):
        """Each neuron's share of N (E f_N - f): `psi_j'[v_j] + psi_j''[v_k, v_k] / 2 + J delta''[iota_j, iota_j] / 2`
        (v = H times the influence on train points, k the neuron paired with j), propagated like `e`."""
        pad = lambda v: jnp.zeros((T, Pa, C), dtype).at[:, :P].set(v.reshape(T, P, C))
        own = jax.vmap(pad)(dDelta)
        other = own.reshape(-1, 2, T, Pa, C)[:, ::-1].reshape(own.shape)  # neuron 2i with 2i + 1

        def one(u1, r1, v_own, v_other):
            psi = lambda D: _neurons(problem, u1[None], r1[None], D, kink_width=kink_width)[0][0]
            curved = second(psi, Delta_star, v_other) if smooth else _second_difference(psi, Delta_star, v_other)
            return jax.jvp(psi, (Delta_star,), (v_own,))[1] + 0.5 * curved

        q = jax.vmap(one)(*ur, own, other)
        curvature = jax.vmap(lambda x: second(lambda f: loss.delta(f, data.Y), f_star, x))(i_f[:, :, :P])
        q = q + 0.5 * (curvature.reshape(-1, n) @ J_f.reshape(n, -1)).reshape(q.shape)
        b = propagated(q, J_f, propagate)[0]
        out = {"f_bias": b, "loss_bias": jnp.einsum("tpc,stpc->st", dloss, b[:, :, :P])}
        out["loss_bias"] += 0.5 * jax.vmap(lambda x: second(lambda f: loss.value(f, data.Y), f_star, x))(i_f[:, :, :P])
        if data.y_test is not None:
            f_test, value = f_all[:, P:], lambda f: loss.value(f, data.Y_test)
            out["loss_test_bias"] = jnp.einsum("tpc,stpc->st", dloss_test, b[:, :, P:])
            out["loss_test_bias"] += 0.5 * jax.vmap(lambda x: second(value, f_test, x))(i_f[:, :, P:])
        return {k: (v.sum(0), (v**2).sum(0)) for k, v in out.items()}

    def influences(ur):
        """Moments over a chunk of neurons of their influences, for each Jacobian variant (leading axis)."""
        psi, phi, g = _neurons(problem, *ur, Delta_star)
        k = upper(jax.vmap(lambda p, q: _ntk_terms(problem, p[None], q[None], p[None], q[None]))(phi, g)) - K[None]

        def variant(J_f, J_K, propagate):
            i_f, dDelta = propagated(psi - F[None], J_f, propagate)
            i_K = k + (dDelta @ J_K.reshape(n, -1)).reshape(k.shape)
            out = {"f": i_f, "ntk": i_K, "loss": jnp.einsum("tpc,stpc->st", dloss, i_f[:, :, :P])}
            if data.y_test is not None:
                out["loss_test"] = jnp.einsum("tpc,stpc->st", dloss_test, i_f[:, :, P:])
            return moments(out) | bias_terms(ur, i_f, dDelta, J_f, propagate)

        return jax.vmap(variant)(J_f_all, J_K_all, propagate_all)

    # (G + 1, ...): the neurons' paths once, their propagation with each variant of the Jacobians
    m = jax.tree.map(lambda x: x.sum(0) / n_samples, jax.lax.map(influences, (u, r)))
    # biases are means over neurons of (m1, m2), variances sample variances of (m2, m4): the same
    # standard error formula; the variances are unbiased with S / (S - 1)
    unbias = lambda name: 1.0 if name.endswith("_bias") else n_samples / (n_samples - 1)
    coef = {name: lo * unbias(name) for name, (lo, _) in m.items()}
    # The standard error of the influences' moments at the Jacobians of all neurons, and the jackknife
    # error of those Jacobians (the coefficients again without each group's), added in quadrature.
    jack = {name: (G - 1) / G * jnp.sum((x[1:] - x[1:].mean(0)) ** 2, 0) for name, x in coef.items()}
    se = {name: jnp.sqrt(jnp.maximum(hi[0] - lo[0] ** 2, 0.0) / n_samples + jack[name]) for name, (lo, hi) in m.items()}
    drift = c * problem.net.sigma_b**2 * steps @ Delta_star.sum(1)  # the read-out bias's, (T, C)
    coef = {name: x[0] for name, x in coef.items()}
    for d in (coef, se):  # the NTK's full, symmetric matrices from their upper triangles
        d["ntk"] = symmetric(d["ntk"], iu, P * C)
    return coef, se, F[:, :P] + drift[:, None]


def fluctuations(
    problem: Problem,
    sol: Solution,
    *,
    key,
    n_samples: int | None = None,
    chunk_size: int = 512,
    memory=None,
    kink_width: float = 0.2,
) -> Fluctuations:
    """The leading-order covariances across seeds of width-N networks around the DMFT `sol` of
    `problem`, as coefficients of 1/N (`Fluctuations`): two-layer networks (`MLP(depth=1)`), any
    activation, loss and number of outputs; `problem.gamma0 = 0` gives the lazy limit (pass the
    `dmft.Lazy(discrete=True)` solution), at any depth for smooth activations and relu with scalar targets; deep
    networks with feature learning and a smooth activation or relu (scalar targets, `sigma_w = 1`, `sigma_b =
    0`): linear ones exactly (pass the `dmft.LinearClosure()` solution; standard errors 0; `key`,
    `n_samples` and `chunk_size` unused), others from `n_samples` sampled single sites per layer (8
    times a power of 2, quasi-random; dense, cost ~ `n_samples (T Pa)^5`: small grids only; `chunk_size` unused, the
    samples differentiated at once follow from `memory`). Theory section 13. The mean shift at depth >= 2:
    in the lazy limit for smooth activations and relu (8 independent estimates of `n_samples / 8` neurons per
    layer), and with feature learning for linear networks on small grids (`Fluctuations`), from the
    one-loop term of the action (dense).
    Matrices are multiplied at `jax.default_matmul_precision("highest")`, as in `dmft.solve`.

    `sol` fixes the error signal `Delta = -dl/df` the neurons are linearised around; it must be a
    converged solution of this problem. `n_samples` independent neurons estimate the covariances (their
    relative Monte Carlo error is about `sqrt(2 / n_samples)`, reported in `stderr`; None: 4096, and
    16384 for the sampled propagator, whose error bars at 4096 are up to 3x too small on some keys); `chunk_size`
    neurons are processed at a time (memory only: the result does not depend on it). `memory` is the
    budget (bytes, "8GB", or a fraction of the device; None: half of it): a problem whose Jacobians do
    not fit is refused before anything is allocated. The cost grows like `(T P C)^2 n_samples`
    (`benchmarks/fluctuations.py`).

    The standard errors include the Monte Carlo error of the Jacobians with respect to the error signal
    (a jackknife over 4 groups of neurons), so a propagator that the sampling noise makes near-singular
    shows as a large error bar rather than as a confident number. The sampled propagator warns where its
    standard errors exceed a quarter of its variances (the NTK's of relu, and everything with strong feature
    learning, where the estimate is then biased too).

    relu with feature learning (depth 1): a change of the error signal flips `phi'(h)` of the neurons
    whose field crosses zero, which derivatives along each neuron's path cannot see. The Jacobians count
    them with a Gaussian kernel of `kink_width` times each point's preactivation scale (a kernel
    estimate of their density at h = 0; 0 leaves them out). As they learn, neurons pile up at h = 0;
    the predictions and the loss hardly depend on the width, the NTK's variance does (a few per cent
    per halving), and with strong feature learning it is too small (networks' own N Var of the NTK
    still grows with N there). Deep relu networks with feature learning: the sampled propagator
    replaces relu by its smoothing with a Gaussian of 1, 2 and 3 times `kink_width` times each point's
    preactivation scale, extrapolated to width 0 (`kink_width` must be > 0), and computes no mean shift.
    relu's mean shift at depth 1 takes its second derivatives along the neurons' paths by central
    differences (a step of 0.1 in units of the direction's root mean square), which count the flips
    between the paths exactly.
    """
    if n_samples is None:
        n_samples = 16384 if _sampled(problem) else 4096
    _check(problem, sol, n_samples, chunk_size)
    if isinstance(kink_width, bool) or not isinstance(kink_width, (int, float)) or not kink_width >= 0:
        raise ValueError(f"kink_width must be a number >= 0 (0: no flips counted), got {kink_width!r}")
    counted = isinstance(problem.activation, ReLU) and kink_width > 0
    if isinstance(problem.activation, ReLU) and _sampled(problem) and not counted:
        raise ValueError(
            "deep relu networks with feature learning need kink_width > 0: the sampled propagator smooths relu's "
            "kink over that width (0.2, the default, is the width validated against networks)"
        )
    _check_memory(problem, n_samples, chunk_size, memory)
    if not problem.activation.smooth and float(problem.gamma0) > 0:  # lazy: the fields do not move
        if not counted:
            how = "the fluctuations miss the neurons whose phi'(h) jumps as the error signal changes"
        elif _sampled(problem):
            how = (
                f"the sampled propagator smooths its kink by Gaussians of width {kink_width}, twice and three "
                "times that (times its scale) and extrapolates to width 0; the mean shift is not computed"
            )
        else:
            how = (
                f"the neurons whose phi'(h) flips are counted with a kernel of width {kink_width}; where "
                "neurons pile up at h = 0 (strong feature learning) the NTK's variance depends on it and is too "
                "small (0.6 and 0.4 of networks' at N = 4096 for gamma0 * t_max = 20 and 30)"
            )
        warnings.warn(f"{type(problem.activation).__name__} is not smooth: {how}", stacklevel=2)
    # As in `dmft.solve`: full float32 products on a GPU, not TF32, which costs exact linear algebra
    # three digits (the linear closure's, benchmarks/RESULTS.md).
    kink = float(kink_width) if counted else 0.0
    make_room(problem, sol)
    f = sol.f if sol.f_test is None else jnp.concatenate([sol.f, sol.f_test], axis=1)
    with jax.default_matmul_precision("highest"):
        if problem.depth > 1 and float(problem.gamma0) > 0:
            if _sampled(problem):
                coef, se, F = sampled_coefficients(problem, f, as_key(key), n_samples, budget_bytes(memory), kink)
                _warn_if_noisy(coef, se, n_samples)
            else:
                coef, se, F = linear_coefficients(problem, f)
                if one_loop_size(problem) <= ONE_LOOP_MAX and one_loop_bytes(problem) <= budget_bytes(memory):
                    bias = bias_coefficients(problem, f.astype(problem.data.Kx.dtype))
                    coef, se = coef | bias, se | {name: jnp.zeros_like(x) for name, x in bias.items()}
        elif problem.depth == 1:
            coef, se, F = _coefficients(problem, f, as_key(key), n_samples, chunk_size, kink)
        else:
            coef, se, F = lazy_coefficients(problem, sol.f, as_key(key), n_samples, chunk_size)
            bias, bias_se = lazy_bias(problem, as_key(key), n_samples, chunk_size)
            coef, se = coef | bias, se | bias_se
    _check_same_problem(problem, sol, F, coef["f"][:, : problem.P], n_samples)
    return _assemble(problem, coef, se, n_samples)


def _warn_if_noisy(coef, se, n_samples):
    """Warn where the sampled propagator's standard errors (norm over t > 0) exceed `_NOISY` of its
    coefficients': its estimate is a polynomial in sampled matrices, biased where their noise is not small
    (strong feature learning), and more samples are what it needs."""
    ratio = {k: float(jnp.linalg.norm(se[k][1:]) / jnp.linalg.norm(coef[k][1:])) for k in ("f", "loss", "ntk")}
    noisy = [f"{k} {r:.0%}" for k, r in ratio.items() if r > _NOISY]
    if noisy:
        warnings.warn(
            f"the sampled propagator's variances are uncertain at n_samples={n_samples} (standard error over "
            f"size: {', '.join(noisy)}), and where strong feature learning makes them so they are biased too: pass "
            "a larger n_samples (the cost grows in proportion)",
            stacklevel=3,
        )


def two_layer_bytes(problem, chunk_size) -> int:
    """The memory of `_coefficients`: the dense Jacobians `(n, T, Pa C + ntri)` (the NTK's on its upper
    triangle, ntri = P C (P C + 1) / 2: a chunk's and the running sums in `_GROUPS` groups, and `_GROUPS + 1`
    jackknife variants), a chunk's influences in every variant and the `(n, n)` propagators, `n = T P C`.
    Coefficients fitted to XLA's memory analysis on 10 problems (P 6-48, T 11-101, 1-4 outputs, chunks of
    256-2048, 0.2-5 GB; `_GROUPS = 4`), within 0.94-1.10 of it at XLA's defaults and `_xla`'s options."""
    T, P, C, Pa = problem.n_steps + 1, problem.P, problem.C, problem.data.Kx.shape[0]
    n, per_time = T * P * C, Pa * C + P * C * (P * C + 1) // 2
    numbers = 3.5 * n * T * per_time + 12.8 * chunk_size * T * per_time + 43.5 * n**2
    return int(numbers * problem.data.Kx.dtype.itemsize)


def _check_memory(problem, n_samples, chunk_size, memory):
    """Refuse a problem whose memory exceeds the budget: two-layer networks' Jacobians (`two_layer_bytes`);
    at depth >= 2 with feature learning, the propagator's (`linear_bytes`, `sampled_bytes`), and in the
    lazy limit the layer recursion's (`lazy_bytes`)."""
    T, P, C, Pa = problem.n_steps + 1, problem.P, problem.C, problem.data.Kx.shape[0]
    n = T * P * C
    if problem.depth > 1 and float(problem.gamma0) > 0:  # the propagator of the action
        sampled = _sampled(problem)
        needed = sampled_bytes(problem, n_samples, budget_bytes(memory)) if sampled else linear_bytes(problem)
        what = f"T Pa = {T * Pa} (time, point) pairs in {problem.depth} layers"
    elif problem.depth > 1:
        needed, what = lazy_bytes(problem, n_samples, chunk_size), f"Pa = {Pa} points and {T} times"
    else:
        needed, what = two_layer_bytes(problem, chunk_size), f"T P C = {n} train (time, point, class) triples"
    budget = budget_bytes(memory)
    if needed > budget:
        raise ValueError(
            f"these fluctuations need about {needed / 1e9:.3g} GB ({what}), more than the memory budget of "
            f"{budget / 1e9:.3g} GB: raise memory=, or use fewer steps or points"
        )


def _check_same_problem(problem, sol, F, f_var, n_samples):
    """Refuse a Solution whose predictions the neurons of `problem`, driven by its error signal, do not
    reproduce: allowed are 5 Monte Carlo standard errors of their mean plus 10% of the predictions'
    scale, which covers the DMFT's own sampling error and the O(gamma0^2 dt) difference between the
    Euler rule (`predictions="euler"`, `Lazy`) and gradient descent, and not a different gamma0,
    activation or data set."""
    f = sol.f.reshape(F.shape)
    allowed = 5 * jnp.sqrt(f_var.max() / n_samples) + 0.1 * jnp.abs(f).max()
    gap = float(jnp.abs(F - f).max())
    if not gap <= float(allowed):
        raise ValueError(
            f"sol does not solve this problem: neurons driven by its error signal give predictions {gap:.3g} "
            f"away from sol.f (allowed {float(allowed):.3g}); pass the Problem the Solution was solved for "
            "(for dmft.Lazy() solutions, the same problem with gamma0=0)"
        )


def _assemble(problem, coef, se, n_samples):
    """The flat dicts of `_coefficients` as a `Fluctuations` (class axes dropped for scalar targets,
    predictions split into train and test points)."""
    data, P, C = problem.data, problem.P, problem.C
    scalar = data.y.ndim == 1

    def fields(d):
        out = {}
        for name, x in d.items():
            if name == "ntk":
                x = x.reshape(x.shape[0], P, C, P, C)
                x = x[:, :, 0, :, 0] if scalar else x
            if name.startswith("f"):  # f, f_bias: (T, Pa, C)
                x = x[..., 0] if scalar else x
                if data.X_test is not None:
                    out[name.replace("f", "f_test", 1)] = x[:, P:]
                x = x[:, :P]
            out[name] = x
        return out

    c = fields(coef)
    names = {"f": "f_var", "f_test": "f_test_var", "loss": "loss_cov", "loss_test": "loss_test_cov", "ntk": "ntk_var"}
    return Fluctuations(
        ts=problem.ts,
        **{names.get(k, k): v for k, v in c.items()},
        stderr={names.get(k, k): v for k, v in fields(se).items()},
        n_samples=n_samples,
    )
