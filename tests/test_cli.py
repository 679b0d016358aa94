import json
import os
import re
import subprocess
import sys
import tomllib

import pytest

from dmft.cli import SOLVERS, build, demo_config, example_config, main, validate_config

TINY = """
[data]
P = 4
P_test = 1
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


def _solve(tmp_path, text, *flags):
    out = tmp_path / "out"
    code = main(["solve", _write(tmp_path, text), "--out", str(out), "--quiet", *flags])
    return code, (json.loads((out / "summary.json").read_text()) if code == 0 else None)


def test_solve_happy_path(tmp_path):
    code, summary = _solve(tmp_path, TINY, "--x64")
    assert code == 0 and summary["converged"] and summary["final_loss"] < summary["initial_loss"]
    assert (tmp_path / "out" / "solution.npz").is_file()


def test_example_config_lists_every_key_and_each_is_accepted():
    text = example_config()
    config = validate_config(tomllib.loads(text))
    for section, body in demo_config().items():  # the example is the demo problem, written out
        assert {k: config[section][k] for k in body} == body
    # Every commented solver key of every kind is accepted by that kind (and only it builds it).
    for kind in SOLVERS:
        keys = re.findall(rf"^#? ?(\w+) = .*# {kind}: ", text, flags=re.M)
        assert keys, kind
        lines = [line.lstrip("# ") for line in text.splitlines() if f"# {kind}: " in line and "omit" not in line]
        solver = "\n".join(["[solver]", f'kind = "{kind}"', *lines])
        parsed = validate_config(tomllib.loads(solver))
        problem, obj, _ = build(parsed | {"network": {"activation": "linear"}})
        assert type(obj).__name__ == SOLVERS[kind]


@pytest.mark.parametrize(
    "solver",
    [
        'kind = "lazy"\ndiscrete = true',
        'kind = "linear"',
        'kind = "linear"\nresponses = false',
        'kind = "perturbative"',
        'kind = "monte_carlo"\nn_samples = 256\nsampling = "plain"\ncontrol_variates = false\nresponses = "none"',
    ],
)
def test_every_solver_is_reachable_in_float32(tmp_path, solver):
    # No --x64: JAX's default float32 must work for every kind (linear network, depth 2).
    text = TINY.replace('kind = "lazy"', solver).replace("depth = 1", "depth = 2").replace('"relu"', '"linear"')
    code, summary = _solve(tmp_path, text)
    assert code == 0 and summary["final_loss"] < summary["initial_loss"]


def test_the_command_keeps_compiled_solves_between_runs(tmp_path):
    # On the command line (not through main(argv)), compiled functions go to JAX's persistent cache in
    # $XDG_CACHE_HOME/dmft/jax; with --quiet the solve too (a progress bar is a host callback).
    text = (
        TINY.replace('kind = "lazy"', 'kind = "linear"').replace("depth = 1", "depth = 2").replace('"relu"', '"linear"')
    )
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    command = [sys.executable, "-m", "dmft", "solve", _write(tmp_path, text), "--out", str(tmp_path / "o"), "--quiet"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert any(f.name.startswith("jit__solve-") for f in (tmp_path / "xdg" / "dmft" / "jax").iterdir())


@pytest.mark.parametrize(
    "text, message",
    [
        (TINY + "\n[extra]\nx = 1\n", "unknown section [extra]"),
        (TINY.replace("depth = 1", "depht = 1"), "unknown key network.depht"),
        (TINY.replace('"relu"', '"swish"'), "network.activation = 'swish' is not allowed"),
        (TINY.replace("n_steps = 4", "n_steps = 4.5"), "problem.n_steps must be an integer"),
        (TINY.replace('kind = "lazy"', 'kind = "exact"'), "solver.kind = 'exact' is not allowed"),
        (TINY.replace('kind = "lazy"', 'kind = "lazy"\nn_samples = 4'), "unknown key solver.n_samples for kind"),
        (
            TINY.replace('kind = "lazy"', 'kind = "linear"\nresponses = "none"'),
            "solver.responses must be true or false",
        ),
        (TINY.replace("t_max = 2.0", "t_max = -1.0"), "t_max must be a finite scalar > 0"),
        (TINY.replace('"relu"', '"relu"\nsigma_b = -0.5'), "sigma_b must be a finite scalar >= 0"),
        (TINY.replace("t_max = 2.0", 't_max = 2.0\nloss = "hinge"'), "problem.loss = 'hinge' is not allowed"),
        (TINY.replace("t_max = 2.0", 't_max = 2.0\nloss = "logistic"'), "needs labels y = +1 or -1"),
        (
            TINY.replace('kind = "lazy"', 'kind = "monte_carlo"\nmemory = [1]'),
            "solver.memory must be a number or a string, got [1]",
        ),
        (
            TINY.replace('kind = "lazy"', 'kind = "monte_carlo"\nmemory = "1kB"'),
            "more than its memory budget of 1e-06 GB",
        ),
        ("[data]\nP = [\n", "is not valid TOML"),
        ("[data]\nP = 4\n", "[solver] kind is required"),
    ],
)
def test_config_errors(tmp_path, capsys, text, message):
    assert main(["solve", _write(tmp_path, text), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_debug_keeps_the_traceback(tmp_path):
    text = TINY.replace("t_max = 2.0", "t_max = -1.0")
    with pytest.raises(ValueError, match="t_max must be"):
        main(["solve", _write(tmp_path, text), "--out", str(tmp_path / "o"), "--debug"])


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


def test_compare_and_plot(tmp_path):
    text = TINY.replace('kind = "lazy"', 'kind = "monte_carlo"\nn_samples = 1024')
    text += "\n[compare]\nwidths = [16, 32]\nseeds = 2\n"
    out = tmp_path / "cmp"
    assert main(["compare", _write(tmp_path, text), "--out", str(out), "--x64", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["widths"] == [16, 32] and "fitted_exponent_error_vs_width" in report
    # a two-layer problem: the predicted seed spread (dmft.fluctuations) against the measured one
    spread = report["fluctuations"]["32"]
    assert spread["predicted_final_loss_sd"] > 0 and spread["seeds_for_0.1%_standard_error"] >= 1
    import numpy as np

    import dmft
    from dmft.plotting import error_vs_width

    comp = dmft.io.load(out / "comparison.npz")
    assert comp.fluctuations_note is None  # saved and loaded with the comparison
    # the measured shift's standard error: the seed mean's and the DMFT's own, in quadrature
    se = np.hypot(comp.loss_se[1, -1], comp.dmft.stderr["loss"][-1])
    assert np.isclose(spread["measured_final_loss_bias_stderr"], se)
    labels = [t.get_text() for t in error_vs_width(comp).axes[0].get_legend().get_texts()]
    assert labels[-2:] == ["noise (2 seeds, DMFT)", "predicted 1/N shift"]

    assert np.load(out / "samples.npz")["h"].shape == (1, 4096, 5)  # DMFT histogram samples (L, S, Pa)
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # every file written whole, then renamed
    os.remove(out / "comparison.png")
    assert main(["plot", str(out)]) == 0
    assert (out / "comparison.png").stat().st_size > 10_000
    assert main(["plot", str(tmp_path)]) == 2


# cross_entropy with the slow suite (the default suite's 12-minute budget); logistic covers the path.
@pytest.mark.parametrize("loss", ["logistic", pytest.param("cross_entropy", marks=pytest.mark.slow)])
def test_classification_compare_reports_accuracies(tmp_path, loss):
    # A classification problem through the CLI: binary labels from the sphere teacher (logistic) or
    # three digits (cross-entropy, one-hot targets), accuracies in the report, the classification
    # figure (train / test loss, test accuracy, error vs width) written, and `dmft plot` redraws it.
    if loss == "logistic":
        data = '[data]\ntarget = "sign"'
    else:
        pytest.importorskip("sklearn")
        data = '[data]\nkind = "digits"\nclasses = [3, 5, 8]\nP = 6\nP_test = 3'
    text = TINY.replace("[data]\nP = 4\nP_test = 1", data).replace("t_max = 2.0", f't_max = 2.0\nloss = "{loss}"')
    text += "\n[compare]\nwidths = [16, 32]\nseeds = 2\nfluctuations = false\n"  # test_compare_and_plot has them
    out = tmp_path / "cls"
    assert main(["compare", _write(tmp_path, text), "--out", str(out), "--x64", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "fluctuations" not in report
    accuracy = report["final_accuracy_test"]
    assert set(accuracy) == {"dmft", "lazy", "networks"} and list(accuracy["networks"]) == ["16", "32"]
    assert all(0.0 <= a <= 1.0 for a in (accuracy["dmft"], accuracy["lazy"], *accuracy["networks"].values()))
    assert (out / "comparison.png").stat().st_size > 10_000
    assert main(["plot", str(out)]) == 0


def test_help_shows_example_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["solve", "--help"])
    assert exit_info.value.code == 0
    assert "[solver]" in capsys.readouterr().out


def test_demos_say_whether_they_draw_fluctuation_bands():
    # The default demo's deep relu network is beyond the sampled propagator's grids, and says so in its
    # report; `--task fluctuations` is within the two-layer networks' (no solve needed to decide).
    from dmft.compare import why_no_fluctuations

    assert "620 (time, point) pairs at depth 2" in why_no_fluctuations(build(demo_config())[0])
    assert why_no_fluctuations(build(demo_config(task="fluctuations"))[0]) is None
    assert why_no_fluctuations(build(demo_config(quick=True, task="fluctuations"))[0]) is None


@pytest.mark.slow
@pytest.mark.parametrize("task", ["regression", "fluctuations"])
def test_demo_quick(tmp_path, task):
    assert main(["demo", "--quick", "--task", task, "--out", str(tmp_path), "--quiet"]) == 0
    assert (tmp_path / "comparison.png").is_file() and (tmp_path / "comparison.pdf").is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dmft"]["converged"]
    if task == "regression":
        assert "pairs at depth 2" in report["fluctuations"]["not_computed"]
    else:  # the predicted seed spread against 16 seeds (a 16-seed sd is uncertain by ~18%)
        for row in report["fluctuations"].values():
            assert 0.5 < row["measured_final_loss_sd"] / row["predicted_final_loss_sd"] < 1.5


def test_solve_shows_progress_unless_quiet(tmp_path, capsys):
    text = TINY.replace('kind = "lazy"', 'kind = "linear"').replace('"relu"', '"linear"')
    assert main(["solve", _write(tmp_path, text), "--out", str(tmp_path / "a"), "--x64"]) == 0
    assert "DMFT iterations" in capsys.readouterr().err
    assert main(["solve", _write(tmp_path, text), "--out", str(tmp_path / "b"), "--x64", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
