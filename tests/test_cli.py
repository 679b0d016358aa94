import json
import os

import pytest

from dmft.cli import EXAMPLE_CONFIG, main

TINY = """
[data]
P = 4
D = 3
[network]
depth = 1
activation = "relu"
[problem]
n_steps = 4
t_max = 2.0
[solver]
kind = "lazy"
"""


def _write(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_solve_happy_path(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["solve", _write(tmp_path, TINY), "--out", str(out), "--x64"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["converged"] and summary["final_loss"] < summary["initial_loss"]
    assert (out / "solution.npz").is_file()


def test_example_config_is_valid():
    import tomllib

    from dmft.cli import validate_config

    validate_config(tomllib.loads(EXAMPLE_CONFIG))


@pytest.mark.parametrize(
    "text, message",
    [
        (TINY + "\n[extra]\nx = 1\n", "unknown section [extra]"),
        (TINY.replace("depth = 1", "depht = 1"), "unknown key network.depht"),
        (TINY.replace('"relu"', '"swish"'), "network.activation = 'swish' is not allowed"),
        (TINY.replace("n_steps = 4", "n_steps = 4.5"), "problem.n_steps must be an integer"),
        (TINY.replace('kind = "lazy"', 'kind = "exact"'), "solver.kind = 'exact' is not allowed"),
        (TINY.replace("t_max = 2.0", "t_max = -1.0"), "t_max must be a finite scalar > 0"),
        ("[data]\nP = [\n", "is not valid TOML"),
    ],
)
def test_config_errors(tmp_path, capsys, text, message):
    assert main(["solve", _write(tmp_path, text), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert main(["solve", str(tmp_path / "nope.toml"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_directory(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["solve", _write(tmp_path, TINY), "--out", str(locked / "sub")]) == 2
    assert "output directory" in capsys.readouterr().err


def test_output_path_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["solve", _write(tmp_path, TINY), "--out", str(blocker / "sub")]) == 2
    assert "cannot create output directory" in capsys.readouterr().err


def test_compare_and_plot(tmp_path, capsys):
    text = TINY.replace('kind = "lazy"', 'kind = "monte_carlo"\nn_samples = 1024\nchunk_size = 512')
    text += "\n[compare]\nwidths = [16, 32]\nseeds = 2\n"
    out = tmp_path / "cmp"
    assert main(["compare", _write(tmp_path, text), "--out", str(out), "--x64"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["widths"] == [16, 32] and "fitted_exponent_error_vs_width" in report
    import numpy as np

    assert np.load(out / "samples.npz")["h"].shape == (1, 4096, 4)  # DMFT histogram samples (L, S, P)
    os.remove(out / "comparison.png")
    assert main(["plot", str(out)]) == 0
    assert (out / "comparison.png").stat().st_size > 10_000
    assert main(["plot", str(tmp_path)]) == 2


def test_help_shows_example_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["solve", "--help"])
    assert exit_info.value.code == 0
    assert "[solver]" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_quick(tmp_path):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "comparison.png").is_file() and (tmp_path / "comparison.pdf").is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dmft"]["converged"]


def test_solve_shows_progress_unless_quiet(tmp_path, capsys):
    text = TINY.replace('kind = "lazy"', 'kind = "linear"').replace('"relu"', '"linear"')
    assert main(["solve", _write(tmp_path, text), "--out", str(tmp_path / "a"), "--x64"]) == 0
    assert "DMFT iterations" in capsys.readouterr().err
    assert main(["solve", _write(tmp_path, text), "--out", str(tmp_path / "b"), "--x64", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
