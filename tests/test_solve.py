import os
import re
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dmft


def _problem(gamma0=1.0):
    data = dmft.datasets.sphere(4, 3, 0)
    return dmft.Problem(data, dmft.MLP(2, "linear"), gamma0=gamma0, t_max=2.0, n_steps=4)


def _with_gamma0(problem, g):
    return eqx.tree_at(lambda p: p.gamma0, problem, g)


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y, equal_nan=True) for x, y in zip(la, lb))


def test_progress_bar_reports_iterations_and_residual_and_changes_nothing(capsys):
    problem, solver = _problem(), dmft.LinearClosure()
    quiet = dmft.solve(problem, solver)
    assert capsys.readouterr().err == ""  # silent by default
    loud = dmft.solve(problem, solver, progress=True)
    err = capsys.readouterr().err
    assert "DMFT iterations" in err and "residual=" in err
    assert f"{int(loud.iterations)}/{solver.max_iters}" in err  # the bar reached the final iteration
    assert _leaves_equal(quiet, loud)  # bit-identical: the callbacks only read the loop carry


def test_a_solve_is_kept_in_jax_persistent_compilation_cache(tmp_path):
    # JAX does not write a compiled function with host callbacks to its persistent cache, so `solve`
    # checks gamma0 and the result on the host when nothing is traced: a later process loads the
    # compiled solve instead of compiling it again.
    script = (
        "import dmft; data = dmft.datasets.sphere(4, 3, 0); "
        "p = dmft.Problem(data, dmft.MLP(2, 'linear'), gamma0=1.0, t_max=2.0, n_steps=4); "
        "dmft.solve(p, dmft.LinearClosure())"
    )
    env = os.environ | {"JAX_COMPILATION_CACHE_DIR": str(tmp_path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    run = lambda **extra: subprocess.run(
        [sys.executable, "-c", script], env=env | extra, capture_output=True, text=True, timeout=300
    )
    first = run()
    assert first.returncode == 0, first.stderr
    (entry,) = (f for f in tmp_path.iterdir() if f.name.startswith("jit__solve-"))
    # zstandard (a dependency) compresses it: JAX falls back to zlib otherwise, 2 s of a depth-3 solve's write
    assert entry.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame's magic number
    again = run(JAX_LOG_COMPILES="1")  # logs cache hits
    assert again.returncode == 0, again.stderr
    assert "Persistent compilation cache hit for 'jit__solve'" in again.stderr


def test_on_a_cpu_a_solve_compiles_with_the_library_options_unless_xla_flags_set_them(monkeypatch):
    # The default suite's XLA_FLAGS set both options (level 0, for a fast suite), so the library leaves
    # them to it; a user without XLA_FLAGS gets `_xla._CPU`, which must compile and change nothing but
    # round-off: the same iterations, and results within eps cond^2 of their scale, cond <= T Pa / rcond
    # = 20 / 2.8e-3 the conditioning of the ridge-regularised Stein regressions (two triangular solves):
    # 2.2e-16 * 7.1e3^2 = 1.1e-8 (measured: f moves by 6.4e-12 at most).
    assert dmft._xla.options("") == dmft._xla._CPU
    assert dmft._xla.options("--xla_backend_optimization_level=0") == {"xla_cpu_use_fusion_emitters": False}
    data = dmft.datasets.sphere(4, 3, 0)
    problem = dmft.Problem(data, dmft.MLP(2, "tanh"), gamma0=1.0, t_max=2.0, n_steps=4)
    solver = dmft.MonteCarlo(n_samples=512)
    ours = dmft.solve(problem, solver, key=0)
    monkeypatch.setattr(dmft._xla, "cpu_options", lambda: dmft._xla._CPU)
    theirs = dmft.solve(problem, solver, key=0)
    assert int(theirs.iterations) == int(ours.iterations)
    for name in ("f", "loss", "ntk"):
        x = getattr(ours, name)
        np.testing.assert_allclose(getattr(theirs, name), x, rtol=0, atol=1.1e-8 * float(jnp.abs(x).max()))
    # Inside a user's jit the outer compile decides (JAX refuses options on a nested jit).
    nested = jax.jit(lambda g: dmft.solve(_with_gamma0(problem, g), solver, key=0, throw=False).loss)(1.0)
    np.testing.assert_allclose(nested, ours.loss, rtol=0, atol=1.1e-8 * float(jnp.abs(ours.loss).max()))


# 17 s, with the slow suite (12-minute budget); the progress-bar test above stays in the default suite.
@pytest.mark.slow
def test_progress_works_under_jit_and_vmap(capsys):
    problem, solver = _problem(), dmft.LinearClosure()
    gammas = jnp.array([0.5, 1.0])

    def one(g):
        return dmft.solve(_with_gamma0(problem, g), solver, throw=False, progress=True).loss

    losses = jax.jit(jax.vmap(one))(gammas)
    jax.effects_barrier()
    err = capsys.readouterr().err
    assert err.count("DMFT iterations") >= 1 and "residual=" in err
    expected = jnp.stack([dmft.solve(_with_gamma0(problem, g), solver).loss for g in gammas])
    np.testing.assert_allclose(losses, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(dmft._maps._mappings() is None, reason="the memory mappings are counted on Linux only")
def test_a_process_near_its_memory_mapping_limit_clears_the_compilation_caches(monkeypatch):
    # XLA aborts the process when a compilation exceeds vm.max_map_count (three mappings per compiled
    # kernel); a cap just above this process's count stands for a long sweep that got there.
    problem, solver = _problem(), dmft.LinearClosure()
    dmft.solve(problem, solver)  # something compiled, whose mappings clearing releases
    f = jax.jit(lambda x: x + 1)
    f(1.0)
    assert f._cache_size() == 1
    monkeypatch.setattr(dmft._maps, "_limit", lambda: dmft._maps._mappings())
    with pytest.warns(UserWarning, match="memory mappings") as record:
        sol = dmft.solve(problem, solver)
    assert f._cache_size() == 0  # JAX's caches were cleared before the solve compiled again
    message = next(str(w.message) for w in record if "memory mappings" in str(w.message))
    held, now = (int(x) for x in re.search(r"holds (\d+) .* now (\d+) mappings", message).groups())
    assert now < held
    monkeypatch.undo()
    assert _leaves_equal(sol, dmft.solve(problem, solver))  # recompiled, the same answer
