"""Finite-width networks in the DMFT parameterisation (THEORY section 1), trained and measured.

Parameters `(W0 (N, D), W (L-1, N, N), w (N, C), b (L, N), b_out (C,))`, all N(0, 1) at t = 0, C the
outputs (1 for scalar targets); `h^1 = sigma_w W0 x / sqrt(D) + sigma_b b[0]`,
`h^{l+1} = sigma_w W^l phi(h^l) / sqrt(N) + sigma_b b[l]`,
`f_c = (sigma_w w_c . phi(h^L) / N + sigma_b b_out_c / sqrt(N)) / gamma0` (`dmft.MLP`).
Training minimises the problem's loss (`0.5 mean_mu |f_mu - y_mu|^2` by default) over training
points with the width-scaled rate `eta0 gamma0^2 N` for every tensor.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .. import _mesh, _xla, costs
from .._keys import as_key
from .._maps import make_room
from ..dynamics import ntk_from_kernels, prediction_fields, split_classes, static_ntk_predictions

__all__ = ["Run", "train", "ensemble", "ensemble_bytes", "init_params", "forward"]

_METHODS = ("flow", "gd")
# Peak bytes of one seed's training per byte of its parameters, of its outputs and of its fields (the
# activations and backward fields of every layer, `_layer_fields`): every method holds the outputs
# twice (measured, then stacked or broadcast into the `Run`); GD the parameters, their update and the
# fields; diffrax's Tsit5 its stages, the error estimate and the dense output; a lazy network (gamma0 =
# 0) the parameters and their normal draws. The parameters dominate at depth >= 2, the outputs and
# fields at depth 1 with many points. Fitted on XLA's memory analysis of compiled ensembles (depths 1-3,
# P 8-64, 1 or 3 outputs, widths 256-1024) never to fall below it: 1.0-1.6x of it for trained networks,
# 1.0-2.5x for lazy ones (benchmarks/RESULTS.md).
_BYTES_PER = {"gd": (4.0, 2.0, 0.75), "flow": (19.0, 2.0, 0.25), "lazy": (3.0, 2.0, 0.75)}


class Run(eqx.Module):
    """Measurements of one finite network on the grid `ts`, with the field names of `dmft.Solution`.

    `f (n+1, P)`, `loss (n+1,)`, `ntk (n+1, P, P)`, `f_test (n+1, P_test)`, `ntk_test (n+1, P_test, P)`,
    `loss_test (n+1,)` (None without test data), `accuracy`, `accuracy_test (n+1,)` (classification
    losses only), `Phi_eq`, `G_eq (L, n+1, Pa, Pa)`: the measured
    equal-time kernels `phi(h^l) . phi(h^l) / N` and `g^l . g^l / N` with `g^l = gamma0 N df/dh^l`
    (train then test points; finite networks record equal times only); with C outputs `f`, `ntk`
    and `G_eq` gain class axes as in `dmft.Solution`; `h_last (L, Pa, N)`: the
    preactivations at the final time. Under `jax.vmap` over keys every field gains a leading seed axis.
    """

    ts: jax.Array
    f: jax.Array
    loss: jax.Array
    ntk: jax.Array
    Phi_eq: jax.Array
    G_eq: jax.Array
    h_last: jax.Array
    f_test: jax.Array | None = None
    loss_test: jax.Array | None = None
    ntk_test: jax.Array | None = None
    accuracy: jax.Array | None = None
    accuracy_test: jax.Array | None = None


def init_params(problem, width, key):
    """N(0, 1) parameters `(W0 (N, D), W (L-1, N, N), w (N, C), b (L, N), b_out (C,))` in the problem's dtype,
    drawn in float32 so that a key gives the same network in float32 and float64 (the weights do not
    depend on whether the network has biases)."""
    k0, k1, k2 = jr.split(key, 3)
    kb, kb_out = jr.split(jr.fold_in(key, 3))
    L, D, C = problem.depth, problem.data.D, problem.C
    draw = lambda k, shape: jr.normal(k, shape, jnp.float32).astype(problem.data.X.dtype)
    weights = draw(k0, (width, D)), draw(k1, (L - 1, width, width)), draw(k2, (width, C))
    return (*weights, draw(kb, (L, width)), draw(kb_out, (C,)))


def _preactivations(problem, params, X):
    """`[h^1, ..., h^L]`, each (M, N), for inputs X (M, D)."""
    W0, W, _, b, _ = params
    net, N = problem.net, W0.shape[0]
    hs = [net.sigma_w * X @ W0.T / jnp.sqrt(X.shape[1]) + net.sigma_b * b[0]]
    for l in range(problem.depth - 1):
        hs.append(net.sigma_w * net.activation.fn(hs[-1]) @ W[l].T / jnp.sqrt(N) + net.sigma_b * b[l + 1])
    return hs


def _readout(problem, params, phi_L):
    """`f = (sigma_w phi(h^L) w / N + sigma_b b_out / sqrt(N)) / gamma0 (M, C)` for `phi_L (M, N)`."""
    net, w, b_out, N = problem.net, params[2], params[4], params[0].shape[0]
    return (net.sigma_w * phi_L @ w / N + net.sigma_b * b_out / jnp.sqrt(N)) / problem.gamma0


def _outputs(problem, params, X):
    """Network outputs `f (M, C)` for inputs X (M, D) (uncentred)."""
    return _readout(problem, params, problem.activation.fn(_preactivations(problem, params, X)[-1]))


def forward(problem, params, X):
    """Network output `f (M, C)` for inputs X (M, D) (uncentred), `(M,)` for scalar targets."""
    f = _outputs(problem, params, X)
    return f[:, 0] if problem.data.y.ndim == 1 else f


def _with_class_axis(problem, f0):
    """An output offset `f0` as `(M, C)` (`forward` gives `(M,)` for scalar targets), or a scalar as is."""
    return jnp.reshape(f0, (-1, problem.C)) if jnp.ndim(f0) == 1 else f0


def _layer_fields(problem, params):
    """Activations `phi(h^l) (Pa, N)` and backward fields `g^l = gamma0 N df/dh^l (Pa, C, N)` (lists
    over l), over train then test points."""
    act, sw, (W0, W, w, _, _) = problem.activation, problem.net.sigma_w, params
    N = W0.shape[0]
    hs = _preactivations(problem, params, problem.data.X_all)
    gs = [sw * act.dfn(hs[-1])[:, None] * w.T]  # g^L; then g^l = phi'(h^l) * sigma_w (g^{l+1} W^l) / sqrt(N)
    for l in reversed(range(problem.depth - 1)):
        gs.insert(0, sw * act.dfn(hs[l])[:, None] * (gs[0] @ W[l]) / jnp.sqrt(N))
    return [act.fn(h) for h in hs], gs


def _fields(problem, params, f0):
    """`_layer_fields` and the centred output `f (Pa, C)`."""
    phis, gs = _layer_fields(problem, params)
    return phis, gs, _readout(problem, params, phis[-1]) - _with_class_axis(problem, f0)


def _measure(problem, phis, gs, f):
    """Predictions, NTK and equal-time kernels from the fields of `_fields`."""
    N = phis[0].shape[1]
    Phi = jnp.stack([p @ p.T / N for p in phis])
    flat = [g.reshape(-1, N) for g in gs]  # (point, class) pairs point-major
    G = jnp.stack([g @ g.T / N for g in flat])
    return f, ntk_from_kernels(problem.net, problem.data.Kx, Phi, G, problem.C), Phi, G


def _gd_update(problem, params, phis, gs, f):
    """One gradient-descent step `theta - eta0 dt gamma0^2 N grad Loss` from the fields at `params`:
    with `g = gamma0 N df/dh` the gradients are outer products of the fields of the train points,
    `dw = c sw phi^L Delta`, `dW^l = c sw / sqrt(N) (Delta . g^{l+1})^T phi^l`, `dW0 = c sw / sqrt(D)
    (Delta . g^1)^T x`, `db^l = c sb Delta . g^{l+1}`, `db_out = c sb sqrt(N) sum_mu Delta`, `c = eta0 dt
    gamma0 / P`, `Delta . g = sum_c Delta_c g_c`,
    so each weight matrix is read once for the step (as `jax.grad` would need a second forward and
    backward pass)."""
    W0, W, w, b, b_out = params
    sw, sb = problem.net.sigma_w, problem.net.sigma_b
    P, X, N = problem.P, problem.data.X, W0.shape[0]
    c = problem.eta0 * problem.dt * problem.gamma0 / P
    Delta = problem.loss.delta(f[:P], problem.data.Y)  # (P, C)
    train = lambda g: jnp.einsum("pc,pcn->pn", Delta, g[:P])
    w = w + c * sw * phis[-1][:P].T @ Delta
    if W.shape[0]:
        W = jnp.stack([W[l] + c * sw / jnp.sqrt(N) * train(gs[l + 1]).T @ phis[l][:P] for l in range(len(W))])
    W0 = W0 + c * sw / jnp.sqrt(X.shape[1]) * train(gs[0]).T @ X
    b = b + c * sb * jnp.stack([train(g).sum(0) for g in gs])
    b_out = b_out + c * sb * jnp.sqrt(N) * Delta.sum(0)
    return W0, W, w, b, b_out


def _loss(problem, f0_train):
    def loss(params):
        f = _outputs(problem, params, problem.data.X) - _with_class_axis(problem, f0_train)
        return problem.loss.value(f, problem.data.Y)

    return loss


def _lazy(problem) -> bool:
    """Whether `problem` asks for lazy networks: a concrete gamma0 of 0."""
    return not isinstance(problem.gamma0, jax.core.Tracer) and float(problem.gamma0) == 0


def _check(problem, width, method):
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
        raise ValueError(f"width must be an integer >= 1, got {width!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")


def _lazy_run(problem, params, method):
    """The network of `params` in the limit gamma0 -> 0 at its width: its parameters move by O(gamma0),
    so its NTK stays the empirical one at initialisation `K_N` (the fields' kernels, `_measure`) and its
    centred predictions follow `df/dt = (eta0 / P) K_N Delta` exactly (`static_ntk_predictions`: the
    grid's GD steps for `method="gd"`, the flow otherwise)."""
    n1 = problem.n_steps + 1
    _, K, Phi, G = _measure(problem, *_layer_fields(problem, params), None)
    f = static_ntk_predictions(problem, K, discrete=method == "gd")
    over_time = lambda X, axis: jnp.broadcast_to(jnp.expand_dims(X, axis), (*X.shape[:axis], n1, *X.shape[axis:]))
    return Run(
        **prediction_fields(problem, over_time(K, 0), f),
        Phi_eq=over_time(Phi, 1),
        G_eq=split_classes(problem, over_time(G, 1), (-2, -1)),
        h_last=jnp.stack(_preactivations(problem, params, problem.data.X_all)),
    )


def train(
    problem,
    width: int,
    key,
    *,
    center: bool = True,
    method: str = "flow",
    rtol: float = 1e-5,
    atol: float = 1e-7,
    max_steps: int = 65536,
) -> Run:
    """Train one network of `width` N in the parameterisation of THEORY 1 and measure it at `problem.ts`.

    - `method="flow"`: gradient flow `dtheta/dt = -eta0 gamma0^2 N grad Loss`, integrated by diffrax
      `Tsit5` with a `PIDController(rtol, atol)` and saved at `problem.ts` (dense output). The default
      tolerances put the loss error near 1e-5, far below the 1/sqrt(N) finite-width effects being
      measured; with ReLU every neuron crossing zero is a kink of the vector field, so much tighter
      tolerances cost many more steps (rtol 1e-6 was 20x slower than 1e-5 at width 256).
    - `method="gd"`: gradient descent with step `eta0 dt` on the same grid, measured before each
      update (index k = after k steps): the finite-width counterpart of the discrete DMFT.
    - `center=True` trains `f - f_0`, with `f_0` the output of the frozen initial parameters.
    - `problem.gamma0 = 0` (concrete): the lazy network of this width, the limit gamma0 -> 0 at fixed
      N, whose NTK is its empirical one at initialisation throughout (`_lazy_run`); it must be centred,
      and its flow is integrated near the dtype's precision (`rtol`, `atol`, `max_steps` unused).

    Vmappable over keys, e.g. `jax.vmap(lambda k: train(problem, 1024, k))(jr.split(key, 8))` (width
    static); pure JAX, so it runs unchanged on a GPU. One compiled program per width and shapes of the
    problem (its gamma0, eta0 and data are traced: a sweep over them does not recompile). Use float64
    at small gamma0: the learning rate grows like gamma0^2 N while the read-out shrinks like
    1 / (gamma0 N), and centring subtracts two O(1 / (gamma0 sqrt N)) numbers.
    """
    _check(problem, width, method)
    if _lazy(problem) and not center:
        raise ValueError(
            "a network at gamma0 = 0 (the lazy limit) must be centred: its output at initialisation is "
            "divided by gamma0; pass center=True"
        )
    make_room(problem, key)
    return _train(problem, width, as_key(key), center, method, rtol, atol, max_steps, _lazy(problem))


@_xla.jit
def _train(problem, width, key, center, method, rtol, atol, max_steps, lazy):
    """`train` as one compiled program (op by op, every operation would be dispatched, and every
    intermediate of the N x N updates materialised, on its own). `lazy` is decided by `train`, where
    gamma0 is concrete; here it is traced."""
    params = init_params(problem, width, key)
    if lazy:
        return _lazy_run(problem, params, method)
    f0 = _outputs(problem, params, problem.data.X_all) * center
    loss = _loss(problem, f0[: problem.P])
    rate = problem.eta0 * problem.gamma0**2 * width

    if method == "flow":
        import diffrax  # here, not at the top: it adds ~0.3 s to `import dmft`, and "gd" needs none of it

        term = diffrax.ODETerm(lambda t, p, args: jax.tree.map(lambda g: -rate * g, jax.grad(loss)(p)))
        ts = problem.ts  # to ts[-1], t_max in the grid's dtype: saveat.ts must not pass the end
        saveat = diffrax.SaveAt(
            subs=[
                diffrax.SubSaveAt(ts=ts, fn=lambda t, p, args: _measure(problem, *_fields(problem, p, f0))),
                diffrax.SubSaveAt(
                    t1=True, fn=lambda t, p, args: jnp.stack(_preactivations(problem, p, problem.data.X_all))
                ),
            ]
        )
        sol = diffrax.diffeqsolve(
            term,
            diffrax.Tsit5(),
            0.0,
            ts[-1],
            problem.dt / 4,
            params,
            saveat=saveat,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=max_steps,
        )
        (f, K, Phi, G), h_last = sol.ys[0], sol.ys[1][0]
    else:

        def gd(p, _):
            fields = _fields(problem, p, f0)
            return _gd_update(problem, p, *fields), _measure(problem, *fields)

        final, (f, K, Phi, G) = jax.lax.scan(gd, params, None, length=problem.n_steps)
        last = _measure(problem, *_fields(problem, final, f0))
        f, K, Phi, G = (jnp.concatenate([a, b[None]]) for a, b in zip((f, K, Phi, G), last))
        h_last = jnp.stack(_preactivations(problem, final, problem.data.X_all))

    if center:  # exactly 0 at t = 0 (the two evaluations of f_0 differ by round-off, which flips signs)
        f = f.at[0].set(0.0)
    return Run(
        **prediction_fields(problem, K, f),
        Phi_eq=jnp.moveaxis(Phi, 0, 1),
        G_eq=split_classes(problem, jnp.moveaxis(G, 0, 1), (-2, -1)),
        h_last=h_last,
    )


def ensemble(problem, width: int, keys, *, mesh=None, memory=None, **kwargs) -> Run:
    """`train` for every key of `keys (n_seeds,)` (e.g. `jr.split(key, 64)`), vmapped, with the seeds
    spread over the devices of `mesh`: None (default) the largest number of `jax.devices()` that
    divides n_seeds, an int d the first d devices, or a `jax.sharding.Mesh` whose size divides
    n_seeds. `kwargs` go to `train`.

    `memory`: one device's budget (bytes, a string such as "8GB", or a fraction of the device; None:
    half of it, `dmft.costs`). A device trains its seeds in batches of as many as fit
    (`ensemble_bytes`), one batch after the other; a ValueError says so when one seed does not fit.

    Returns a `Run` with a leading seed axis; a seed's network does not depend on the mesh or the
    batches (up to the rounding of batched products)."""
    make_room(problem, keys)
    mesh = _mesh.resolve(mesh, keys.shape[0], "the number of seeds")
    per_device = keys.shape[0] // (1 if mesh is None else mesh.size)
    batch = _batch(problem, width, per_device, kwargs.get("method", "flow"), memory)
    one = lambda k: train(problem, width, k, **kwargs)
    run = jax.vmap(one) if batch == per_device else lambda keys: jax.lax.map(one, keys, batch_size=batch)
    return run(keys) if mesh is None else _mesh.shard(run, mesh)(keys)


def ensemble_bytes(problem, width: int, n_seeds: int = 1, method: str = "flow") -> int:
    """Peak bytes on one device of training `n_seeds` networks of `width` at once (`ensemble`, one
    batch): a model of XLA's buffers, per seed a weighted sum (`_BYTES_PER[method]`) of the bytes of
    the parameters, of the outputs and of the fields (exact, from the traced shapes)."""
    _check(problem, width, method)
    key = jr.key(0)
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    params = jax.eval_shape(lambda: init_params(problem, width, key))
    outputs = jax.eval_shape(lambda: train(problem, width, key, method=method))
    fields = jax.eval_shape(lambda p: _layer_fields(problem, p), params)
    sizes = nbytes(params), nbytes(outputs), nbytes(fields)
    weights = _BYTES_PER["lazy" if _lazy(problem) else method]
    return int(n_seeds * sum(w * b for w, b in zip(weights, sizes)))


def _batch(problem, width, n_seeds, method, memory):
    """How many of a device's `n_seeds` seeds train at once within the budget `memory`."""
    budget, one = costs.budget_bytes(memory), ensemble_bytes(problem, width, 1, method)
    if one > budget:
        raise ValueError(
            f"one network of width {width} (method={method!r}) needs ~{one / 1e9:.3g} GB, more than the "
            f"memory budget of {budget / 1e9:.3g} GB: raise memory=, or use a smaller width"
            + (" or method='gd' (it needs less)" if method == "flow" else "")
        )
    return min(n_seeds, budget // one)
