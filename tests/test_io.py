import os

import numpy as np
import pytest

import dmft


def _solution():
    data = dmft.datasets.sphere(4, 3, 0, P_test=2)
    return dmft.solve(dmft.Problem(data, dmft.MLP(2, "linear"), gamma0=1.0, t_max=1.0, n_steps=5), dmft.LinearClosure())


def _leaves_equal(a, b):
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_solution_round_trip_is_exact(tmp_path):
    sol = _solution()
    path = tmp_path / "sol.npz"
    dmft.io.save(path, sol, metadata={"solver": "LinearClosure", "gamma0": 1.0})
    back, meta = dmft.io.load(path, with_metadata=True)
    _leaves_equal(sol, back)
    assert back.result == sol.result and back.stderr is None and back.A.shape == sol.A.shape
    assert meta == {"solver": "LinearClosure", "gamma0": 1.0}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # no temporary left behind


@pytest.mark.slow
def test_comparison_round_trip(tmp_path):
    data = dmft.datasets.sphere(4, 3, 0)
    problem = dmft.Problem(data, dmft.MLP(1, "relu"), gamma0=1.0, t_max=2.0, n_steps=4)
    comp = dmft.compare(
        problem, dmft.MonteCarlo(n_samples=1024, chunk_size=512), widths=[16, 32], seeds=2, progress=False
    )
    dmft.io.save(tmp_path / "c.npz", comp)
    back = dmft.io.load(tmp_path / "c.npz")
    _leaves_equal(comp, back)
    assert back.widths == (16, 32) and back.runs[1].h_last.shape == comp.runs[1].h_last.shape


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "sol.npz"
    dmft.io.save(path, _solution())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        dmft.io.load(path)


def test_unknown_format_version_is_refused(tmp_path):
    path = tmp_path / "sol.npz"
    dmft.io.save(path, _solution())
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["__manifest__"] = np.array(
        str(arrays["__manifest__"]).replace('"format_version": 1', '"format_version": 99')
    )
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="format version 99"):
        dmft.io.load(path)


def test_save_rejects_other_objects(tmp_path):
    with pytest.raises(ValueError, match="can only save"):
        dmft.io.save(tmp_path / "x.npz", {"a": 1})
