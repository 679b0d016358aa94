"""The core of the library in float32 (JAX's default and the GPU's): every solver reaches its default
tolerance and agrees with the same solve in float64 (the rest of the suite runs in float64).

Tolerances: float32 has eps = 1.2e-7. The deterministic paths (lazy, linear closure, networks) are
short chains of well-conditioned products and solves over T <= 21 times, so their round-off is a few
hundred eps; we allow 1e-4 relative to the initial loss (~800 eps). The Monte Carlo solve differs from
the float64 one by its sampling (float32 Sobol points carry 24 instead of 32 bits), so the two agree
within 4 combined standard errors.
"""

import re

import jax
import numpy as np
import pytest

import dmft
from dmft.cli import main


def _both(fn):
    """`fn()` in float32 and in float64."""
    with jax.enable_x64(False):
        lo = fn()
    return lo, fn()


# One data set for both precisions (random draws differ between float32 and float64), built in float64.
_DATA = [np.asarray(x) for x in jax.tree.leaves(dmft.datasets.sphere(6, 5, 0, P_test=2))]


def _problem(depth, act, n_steps=20):
    data = dmft.Dataset(*_DATA)  # in the precision of the caller
    return dmft.Problem(data, dmft.MLP(depth, act), gamma0=1.0, t_max=4.0, n_steps=n_steps)


def _close(lo, hi, scale, tol=1e-4):
    assert lo.dtype == np.float32 and hi.dtype == np.float64
    assert np.abs(np.asarray(lo, np.float64) - np.asarray(hi)).max() <= tol * scale


@pytest.mark.parametrize("solver", [dmft.Lazy(), dmft.Lazy(discrete=True)])
def test_lazy(solver):
    lo, hi = _both(lambda: dmft.solve(_problem(3, "relu"), solver))
    _close(lo.loss, hi.loss, float(hi.loss[0]))
    _close(lo.ntk, hi.ntk, float(np.abs(hi.ntk).max()))


@pytest.mark.parametrize(
    "depth, responses",
    [(1, True), pytest.param(3, True, marks=pytest.mark.slow), pytest.param(3, False, marks=pytest.mark.slow)],
)
def test_linear_closure_reaches_its_default_tolerance(depth, responses):
    lo, hi = _both(lambda: dmft.solve(_problem(depth, "linear"), dmft.LinearClosure(responses=responses)))
    assert lo.result == dmft.RESULTS.successful
    _close(lo.loss, hi.loss, float(hi.loss[0]))


@pytest.mark.parametrize("depth, act", [(1, "relu"), pytest.param(2, "tanh", marks=pytest.mark.slow)])
def test_monte_carlo_at_its_defaults(depth, act):
    lo, hi = _both(lambda: dmft.solve(_problem(depth, act, n_steps=10), dmft.MonteCarlo(n_samples=1024), key=0))
    assert lo.result == dmft.RESULTS.successful and lo.loss.dtype == np.float32
    se = np.hypot(np.asarray(lo.stderr["loss"], np.float64), np.asarray(hi.stderr["loss"]))
    assert np.all(np.abs(np.asarray(lo.loss, np.float64) - np.asarray(hi.loss)) <= 4 * se + 1e-6)


def test_networks():
    # The same key draws the same initial weights in both precisions (drawn in float32).
    lo, hi = _both(lambda: dmft.networks.train(_problem(2, "tanh", n_steps=10), 64, 0, method="gd"))
    _close(lo.loss, hi.loss, float(hi.loss[0]))


def test_io_round_trip_keeps_float32(tmp_path):
    with jax.enable_x64(False):
        sol = dmft.solve(_problem(2, "linear"), dmft.LinearClosure())
    dmft.io.save(tmp_path / "sol.npz", sol)
    back = dmft.io.load(tmp_path / "sol.npz")
    assert back.loss.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(back.ntk), np.asarray(sol.ntk))


def test_cli_solve_without_x64_computes_in_float32(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(
        '[data]\nP = 4\nD = 3\n[network]\ndepth = 2\nactivation = "tanh"\n[problem]\nn_steps = 4\n'
        '[solver]\nkind = "monte_carlo"\nn_samples = 256\n'
    )
    assert main(["solve", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert dmft.io.load(tmp_path / "out" / "solution.npz").loss.dtype == np.float32
    assert jax.config.jax_enable_x64  # the CLI scoped its precision: the caller's setting is intact


def test_logistic_lazy_flow():
    # The lazy limit of a classification loss is integrated by diffrax at a tolerance of 1% of the
    # square root of the dtype's eps (3e-6 in float32), well inside the 1e-4 allowed here.
    def solve():
        X, y, X_test, y_test = (np.asarray(a) for a in _DATA)
        data = dmft.Dataset(X, np.sign(y), X_test, np.sign(y_test))
        problem = dmft.Problem(data, dmft.MLP(2, "tanh"), t_max=4.0, n_steps=20, loss="logistic")
        return dmft.solve(problem, dmft.Lazy())

    lo, hi = _both(solve)
    _close(lo.loss, hi.loss, float(hi.loss[0]))
    _close(lo.loss_test, hi.loss_test, float(hi.loss_test[0]))


def test_a_problem_has_one_precision():
    # Data built under one x64 setting and the Problem under the other: the Problem casts it (a float32
    # Dataset beside float64 scalars used to fail inside LinearClosure's jitted sweep).
    with jax.enable_x64(False):
        data = dmft.Dataset(*_DATA)
    make = lambda data: dmft.Problem(data, dmft.MLP(2, "linear"), gamma0=1.0, t_max=4.0, n_steps=10)
    p = make(data)
    assert p.data.X.dtype == p.gamma0.dtype == p.net.sigma_w.dtype == np.float64
    lo, hi = dmft.solve(p, dmft.LinearClosure()), dmft.solve(make(dmft.Dataset(*_DATA)), dmft.LinearClosure())
    # the float64 solve of float32-rounded inputs (relative rounding 6e-8): far inside 1e-4
    assert np.abs(np.asarray(lo.loss) - np.asarray(hi.loss)).max() <= 1e-4 * float(hi.loss[0])


@pytest.mark.parametrize("solver", [dmft.LinearClosure(), dmft.Lazy(), dmft.MonteCarlo(n_samples=64)])
def test_solvers_multiply_at_the_highest_precision(solver):
    # On a GPU JAX's default multiplies float32 in TF32: 3 digits off for the exact solvers, and at
    # T Pa = 10^4 it corrupted a Monte Carlo solve's responses until it went non-finite (measured on an
    # H200, benchmarks/RESULTS.md). The precision is fixed when the products are traced, so the jaxpr
    # shows it on any backend: every product of a solve is at "highest".
    problem = _problem(2, "linear", n_steps=4)
    outer = jax.make_jaxpr(lambda p: dmft.solve(p, solver, key=0, throw=False))(problem).jaxpr
    # the compiled solve (outside it: the input checks' shape arithmetic, which computes nothing used)
    (jaxpr,) = [str(e.params["jaxpr"]) for e in outer.eqns if e.params.get("name") == "_solve"]
    params = re.findall(r"dot_general\[(.*?)preferred_element_type", jaxpr, re.DOTALL)
    assert params and all("Precision.HIGHEST" in p for p in params)
