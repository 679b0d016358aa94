"""The `dmft` command: parse, build the Problem and solver, solve / compare, save, plot.

Every option of the Python API is a key of the TOML configuration with the same default: the
[solver] keys are the fields of the chosen solver class, the [problem] and [network] defaults those
of `dmft.Problem` and `dmft.MLP`, the [compare] defaults those of `dmft.compare`.

Exit codes: 0 success, 1 the solver failed (non-convergence, non-finite), 2 usage or configuration error.
On the command line, compiled functions are kept in JAX's persistent compilation cache (`_compilation_cache`).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import sys
import time
import tomllib

SOLVERS = {"lazy": "Lazy", "linear": "LinearClosure", "perturbative": "Perturbative", "monte_carlo": "MonteCarlo"}
_DATA = {"kind": "sphere", "P": 16, "P_test": 4, "D": 20, "target": "teacher", "classes": [0, 1], "seed": 0}
_CHOICES = {
    ("data", "kind"): ("sphere", "digits"),
    ("data", "target"): ("teacher", "noise", "sign"),
    ("problem", "loss"): ("mse", "logistic", "cross_entropy"),
    ("network", "activation"): ("linear", "relu", "tanh", "erf"),
    ("compare", "method"): ("gd", "flow"),
    ("solver", "kind"): tuple(SOLVERS),
}
_DEMO = {
    "data": {"P": 16, "P_test": 4, "D": 20},
    "network": {"depth": 2, "activation": "relu"},
    "problem": {"gamma0": 1.0, "t_max": 10.0, "n_steps": 30},
    "solver": {"kind": "monte_carlo", "n_samples": 8192},
    "compare": {"widths": [256, 1024, 4096], "seeds": 4},
}
_QUICK = {"problem": {"n_steps": 20}, "solver": {"n_samples": 4096}, "compare": {"widths": [128, 512], "seeds": 2}}
# `dmft demo --task digits`: binary classification of two digits (3 vs 5) by a two-layer tanh network
# trained on the logistic loss; test loss and accuracy against networks of growing width.
_DIGITS = {
    "data": {"kind": "digits", "P": 64, "P_test": 128, "classes": [3, 5]},
    "network": {"depth": 1, "activation": "tanh"},
    "problem": {"gamma0": 1.0, "t_max": 20.0, "n_steps": 80, "loss": "logistic"},
    "solver": {"kind": "monte_carlo", "n_samples": 4096},
    "compare": {"widths": [256, 1024, 4096], "seeds": 8},
}
_DIGITS_QUICK = {"data": {"P_test": 32}, "problem": {"n_steps": 20}, "compare": {"widths": [128, 512], "seeds": 2}}
# `dmft demo --task fluctuations`: the predicted 1/N seed-to-seed spread and mean shift (`dmft.fluctuations`)
# against 64 seeds per width, on a two-layer network (deep nonlinear ones are covered only on small grids).
_FLUCTUATIONS = {
    "data": {"P": 16, "P_test": 4, "D": 20},
    "network": {"depth": 1, "activation": "tanh"},
    "problem": {"gamma0": 1.0, "t_max": 10.0, "n_steps": 30},
    # the DMFT's own Monte Carlo error (~0.15% of the final loss here) below the 1/N shifts to be resolved
    "solver": {"kind": "monte_carlo", "n_samples": 65536},
    "compare": {"widths": [128, 512, 2048], "seeds": 64},
}
_FLUCTUATIONS_QUICK = {
    "problem": {"n_steps": 10},
    "solver": {"n_samples": 8192},
    "compare": {"widths": [64, 256], "seeds": 16},
}
_TASKS = {
    "regression": (_DEMO, _QUICK),
    "digits": (_DIGITS, _DIGITS_QUICK),
    "fluctuations": (_FLUCTUATIONS, _FLUCTUATIONS_QUICK),
}


class ConfigError(ValueError):
    """A configuration or usage error (exit code 2)."""


def _signature_defaults(fn, skip=()):
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty and name not in skip
    }


def _solver_class(kind):
    import dmft

    return getattr(dmft, SOLVERS[kind])


def _solver_fields(kind):
    """`{name: (default, type annotation)}` of the solver class of `kind`."""
    return {f.name: (f.default, str(f.type)) for f in dataclasses.fields(_solver_class(kind)) if f.init}


def defaults() -> dict:
    """The default of every section except [solver] (whose defaults are its class's fields)."""
    import dmft

    return {
        "data": dict(_DATA),
        "network": _signature_defaults(dmft.MLP.__init__),
        "problem": _signature_defaults(dmft.Problem.__init__),
        "compare": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in _signature_defaults(dmft.compare, skip=("key", "center", "progress")).items()
        },
    }


def _line(key, value, comment):
    return f"{key} = {value}".ljust(33) + f" # {comment}"


def example_config() -> str:
    """The demo problem written out in full: every key, its value and its default (printed by --help).
    The keys of the solvers other than monte_carlo are commented out."""
    demo = demo_config()
    lines = ["# dmft configuration (TOML): every key is optional except [solver] kind."]
    for section, body in defaults().items():
        lines.append(f"\n[{section}]" + ("  # used by `dmft compare`" if section == "compare" else ""))
        for key, default in body.items():
            value = demo.get(section, {}).get(key, default)
            prefix, text = ("# ", "omit for None") if value is None else ("", _toml(value))
            lines.append(_line(prefix + key, text, f"default {_toml(default)}"))
    lines.append("\n[solver]")
    lines.append(_line("kind", '"monte_carlo"', "required: " + ", ".join(SOLVERS)))
    lines.append(_line("seed", "0", "default 0: the key of solvers that sample"))
    for kind in SOLVERS:
        for name, (default, annotation) in _solver_fields(kind).items():
            value = demo["solver"].get(name, default) if kind == "monte_carlo" else default
            text = "omit for None" if value is None else _toml(value)
            prefix = "" if kind == "monte_carlo" and value is not None else "# "
            lines.append(_line(prefix + name, text, f"{kind}: {annotation}, default {_toml(default)}"))
    return "\n".join(lines) + "\n"


def _toml(v):
    if v is None:
        return "None"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


def _check(section, key, value, default, annotation=None):
    if (section, key) == ("data", "classes"):
        if not (isinstance(value, list) and len(value) >= 2 and all(isinstance(c, int) for c in value)):
            raise ConfigError(f"data.classes must be a list of two or more digits, got {value!r}")
        return
    choices = _CHOICES.get((section, key))
    if choices is not None:
        if value not in choices:
            raise ConfigError(f"{section}.{key} = {value!r} is not allowed; use one of {list(choices)}")
        return
    # The default's type, or any TOML-expressible type of the annotation (`float | str | None`).
    kinds = [type(default).__name__] if default is not None else [k.strip() for k in (annotation or "").split("|")]
    checks = {
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "list": lambda v: isinstance(v, list) and v and all(isinstance(x, int) and x > 0 for x in v),
        "tuple": lambda v: isinstance(v, list) and v and all(isinstance(x, int) and x > 0 for x in v),
    }
    kinds = [k for k in kinds if k in checks]
    if kinds and not any(checks[k](value) for k in kinds):
        widths = "a non-empty list of positive integers"
        what = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}
        raise ConfigError(f"{section}.{key} must be {' or '.join(what.get(k, widths) for k in kinds)}, got {value!r}")


def validate_config(config: dict) -> dict:
    """Check every section, key and value type; the library checks the values themselves."""
    known = defaults()
    for section, body in config.items():
        if section not in (*known, "solver"):
            raise ConfigError(f"unknown section [{section}]; allowed: {sorted((*known, 'solver'))}")
        if not isinstance(body, dict):
            raise ConfigError(f"[{section}] must be a table")
    solver = dict(config.get("solver", {}))
    if "kind" not in solver:
        raise ConfigError(f"[solver] kind is required; use one of {list(SOLVERS)}")
    _check("solver", "kind", solver.pop("kind"), None)
    fields = _solver_fields(config["solver"]["kind"]) | {"seed": (0, "int")}
    for key, value in solver.items():
        if key not in fields:
            raise ConfigError(
                f"unknown key solver.{key} for kind {config['solver']['kind']!r}; allowed keys: {sorted(fields)}"
            )
        _check("solver", key, value, *fields[key])
    for section, body in known.items():
        for key, value in config.get(section, {}).items():
            if key not in body:
                raise ConfigError(f"unknown key {section}.{key}; allowed keys: {sorted(body)}")
            _check(section, key, value, body[key])
    return config


def read_config(path) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, "rb") as fh:
            return validate_config(tomllib.load(fh))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None


def _section(config, name):
    return defaults()[name] | config.get(name, {})


def build(config: dict):
    """`(problem, solver, seed)` from a validated config (values checked again by the library)."""
    import dmft

    d = _section(config, "data")
    if d["kind"] == "sphere":
        data = dmft.datasets.sphere(d["P"], d["D"], d["seed"], P_test=d["P_test"], target=d["target"])
    else:
        data = dmft.datasets.digits(d["P"], d["seed"], P_test=d["P_test"], classes=tuple(d["classes"]))
    problem = dmft.Problem(data, dmft.MLP(**_section(config, "network")), **_section(config, "problem"))
    options = dict(config["solver"])
    kind, seed = options.pop("kind"), options.pop("seed", 0)
    return problem, _solver_class(kind)(**options), seed


def _out_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create output directory {path}: {err.strerror}") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"output directory {path} is not writable")
    return path


def _atomic(path, write):
    """`write(tmp)` then rename onto `path`: an interrupted run never leaves a half-written file."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path, payload):
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(payload, fh, indent=2)

    _atomic(path, write)


def _solution_summary(sol):
    import dmft

    summary = {
        "final_loss": float(sol.loss[-1]),
        "initial_loss": float(sol.loss[0]),
        "iterations": int(sol.iterations),
        "converged": bool(sol.result == dmft.RESULTS.successful),
    }
    if sol.stderr is not None:
        summary["final_loss_stderr"] = float(sol.stderr["loss"][-1])
    return summary


def _comparison_report(comp, runtime):
    err = [float(e) for e in comp.max_loss_error]
    return (
        {
            "widths": list(comp.widths),
            "seeds": int(comp.runs[0].loss.shape[0]),
            "dmft": _solution_summary(comp.dmft),
            "lazy_final_loss": float(comp.lazy.loss[-1]),
            "max_loss_error_over_initial_loss": dict(zip(map(str, comp.widths), err)),
            "largest_width_loss_error_over_initial_loss": err[-1],
            "fitted_exponent_error_vs_width": float(comp.exponent),
            "runtime_seconds": round(runtime, 1),
        }
        | _accuracy_report(comp)
        | _fluctuation_report(comp)
    )


def _fluctuation_report(comp):
    """Per width, the predicted (`dmft.fluctuations`) and measured seed-to-seed standard deviations of
    the final loss, the seeds the networks' mean needs for its standard error (max over time) to be
    0.1% of the initial loss and, where the fluctuations have one (`Fluctuations.loss_bias`), the
    predicted and measured 1/N mean shift of the final loss (with its standard error) and the seeds that
    resolve it (None where the DMFT's own standard error is half the shift or more: solve with more
    samples first). Without them, where they were asked for: why not (`Comparison.fluctuations_note`)."""
    fl = comp.fluctuations
    if fl is None:
        note = comp.fluctuations_note
        return {"fluctuations": {"not_computed": note}} if note else {}
    L0 = float(comp.dmft.loss[0])
    dmft_se = 0.0 if comp.dmft.stderr is None else float(comp.dmft.stderr["loss"][-1])
    per_width = {}
    for i, (N, run) in enumerate(zip(comp.widths, comp.runs)):
        sd = comp.seed_sd(N)
        row = {
            "predicted_final_loss_sd": float(sd[-1]),
            "measured_final_loss_sd": float(run.loss[:, -1].std(ddof=1)),
            "seeds_for_0.1%_standard_error": math.ceil((float(sd.max()) / (1e-3 * L0)) ** 2),
        }
        if fl.loss_bias is not None:
            bias = float(fl.loss_bias[-1]) / N
            row["predicted_final_loss_bias"] = bias
            row["measured_final_loss_bias"] = float(run.loss[:, -1].mean() - comp.dmft.loss[-1])
            # the seed mean's standard error and the DMFT's own (Monte Carlo) one
            row["measured_final_loss_bias_stderr"] = math.hypot(float(comp.loss_se[i, -1]), dmft_se)
            # the measured shift resolves the predicted one at 2 standard errors: 4 (sd^2 / seeds + dmft_se^2)
            # <= bias^2; no number of seeds does while the DMFT's own error is half the shift or more
            room = bias**2 - 4 * dmft_se**2
            row["seeds_to_resolve_the_bias"] = math.ceil(4 * float(sd[-1]) ** 2 / room) if room > 0 else None
        per_width[str(N)] = row
    return {"fluctuations": per_width}


def _accuracy_report(comp):
    """Final test (or train) accuracies of the DMFT, the lazy limit and each width's seed mean, for a
    classification loss; empty otherwise."""
    field = "accuracy_test" if comp.dmft.accuracy_test is not None else "accuracy"
    if getattr(comp.dmft, field) is None:
        return {}
    final = lambda x: float(getattr(x, field)[-1])
    networks = {str(N): float(getattr(r, field)[:, -1].mean()) for N, r in zip(comp.widths, comp.runs)}
    return {f"final_{field}": {"dmft": final(comp.dmft), "lazy": final(comp.lazy), "networks": networks}}


def _dmft_samples(problem, comp, seed, out):
    """DMFT preactivation samples `h (L, S, Pa)` for the histograms, saved to `samples.npz` so that
    `dmft plot` redraws them without the data; None when the solution has no fields to sample
    (lazy, perturbative: no responses) or several outputs (`field_samples` takes scalar targets)."""
    import numpy as np

    import dmft

    sol = comp.dmft
    if sol.iterations == 0 or (problem.depth > 1 and sol.A is None) or problem.C > 1:
        return None
    h = np.asarray(dmft.field_samples(problem, sol, n_samples=4096, key=seed + 1).h, np.float32)
    _atomic(os.path.join(out, "samples.npz"), lambda tmp: np.savez_compressed(tmp, h=h))
    return h


def _figure(comp, y, out, samples=None):
    import matplotlib

    matplotlib.use("Agg")
    from . import plotting

    if comp.dmft.accuracy is not None:
        fig = plotting.classification_figure(comp)
    else:
        fig = plotting.comparison_figure(comp, y, samples)
    for ext in ("png", "pdf"):
        _atomic(os.path.join(out, f"comparison.{ext}"), lambda tmp: fig.savefig(tmp, dpi=150))


def run_compare(config, out, progress=True):
    import numpy as np

    import dmft

    problem, solver, seed = build(config)
    c = _section(config, "compare")
    start = time.perf_counter()
    comp = dmft.compare(
        problem,
        solver,
        c["widths"],
        c["seeds"],
        key=seed,
        method=c["method"],
        mesh=c["mesh"],
        fluctuations=c["fluctuations"],
        progress=progress,
    )
    report = _comparison_report(comp, time.perf_counter() - start)
    # The targets travel with the result: re-plotting must not depend on regenerating the data.
    meta = {"config": config, "y": np.asarray(problem.data.y).tolist()}
    dmft.io.save(os.path.join(out, "comparison.npz"), comp, metadata=meta)
    samples = _dmft_samples(problem, comp, seed, out)
    _figure(comp, problem.data.y, out, samples)
    _write_json(os.path.join(out, "report.json"), report)
    return comp, report


def demo_config(quick=False, task="regression") -> dict:
    """The embedded default problem of `dmft demo` (a complete, validated config): `task="regression"`
    (the default), `"digits"` (classification of two digits with the logistic loss) or `"fluctuations"`
    (a two-layer network against 64 seeds per width, with the predicted 1/N spread and mean shift)."""
    base, smaller = _TASKS[task]
    config = {k: dict(v) for k, v in base.items()}
    for k, v in (smaller if quick else {}).items():
        config[k].update(v)
    return validate_config(config)


def _parser():
    epilog = "example config:\n\n" + example_config()
    parser = argparse.ArgumentParser(
        prog="dmft",
        description="Solve the DMFT of wide networks and compare with finite networks.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    quiet_help = "no progress bars on stderr (DMFT iterations, finite widths)"
    debug_help = "on an error, show the full Python traceback"
    demo = sub.add_parser("demo", help="DMFT vs lazy vs finite widths on the embedded default problem (float64)")
    demo.add_argument("--quick", action="store_true", help="smaller sizes (about 30 s)")
    demo.add_argument(
        "--task",
        choices=tuple(_TASKS),
        default="regression",
        help="regression on the sphere by a deep network (default), classification of two scikit-learn digits "
        "(logistic loss), or the predicted finite-width fluctuations of a two-layer network against 64 seeds per width",
    )
    demo.add_argument("--out", default="dmft_out")
    for name, helptext in (
        ("solve", "solve a configured problem"),
        ("compare", "solve and compare with finite networks"),
    ):
        p = sub.add_parser(name, help=helptext, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config")
        p.add_argument("--out", required=True)
        p.add_argument("--x64", action="store_true", help="compute in float64 (default: JAX's float32)")
    plot = sub.add_parser("plot", help="re-draw the figure of an output directory")
    plot.add_argument("dir")
    for p in sub.choices.values():
        p.add_argument("--quiet", action="store_true", help=quiet_help)
        p.add_argument("--debug", action="store_true", help=debug_help)
    return parser


def _plot(directory):
    import numpy as np

    import dmft

    path = os.path.join(directory, "comparison.npz")
    if not os.path.isfile(path):
        raise ConfigError(f"{directory} has no comparison.npz (written by `dmft compare` or `dmft demo`)")
    comp, meta = dmft.io.load(path, with_metadata=True)
    samples_path = os.path.join(directory, "samples.npz")
    samples = np.load(samples_path)["h"] if os.path.isfile(samples_path) else None
    _figure(comp, meta["y"], directory, samples)
    print(f"wrote {directory}/comparison.png and comparison.pdf")


def _run(args):
    import jax

    if args.command == "plot":
        _plot(args.dir)
        return 0
    # Scoped, not global: `main` may be called from a process (a test, a notebook) with its own setting.
    with jax.enable_x64(args.command == "demo" or args.x64):
        return _compute(args)


def _compute(args):
    if args.command == "demo":
        out = _out_dir(args.out)
        _, report = run_compare(demo_config(args.quick, args.task), out, progress=not args.quiet)
        print(json.dumps(report, indent=2))
        print(f"wrote {out}/comparison.png, comparison.pdf, report.json, comparison.npz, samples.npz")
        return 0
    config = read_config(args.config)
    out = _out_dir(args.out)
    if args.command == "compare":
        _, report = run_compare(config, out, progress=not args.quiet)
        print(json.dumps(report, indent=2))
        return 0
    import dmft

    problem, solver, seed = build(config)
    sol = dmft.solve(problem, solver, key=seed, throw=False, progress=not args.quiet)
    dmft.io.save(os.path.join(out, "solution.npz"), sol, metadata={"config": config})
    summary = _solution_summary(sol)
    _write_json(os.path.join(out, "summary.json"), summary)
    print(json.dumps(summary, indent=2))
    if not summary["converged"]:
        print(f"dmft: the solver did not succeed: {sol.result}", file=sys.stderr)
        return 1
    return 0


def _compilation_cache():
    """Keep compiled functions in JAX's persistent compilation cache, `$XDG_CACHE_HOME/dmft/jax`
    (`~/.cache/dmft/jax`), unless `JAX_COMPILATION_CACHE_DIR` names another place (empty: none): a
    later run of the same shapes loads them instead of compiling again (the solve only with `--quiet`:
    a progress bar is a host callback, which the cache does not store)."""
    import jax

    if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # JAX reads it itself
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    jax.config.update("jax_compilation_cache_dir", os.path.join(base, "dmft", "jax"))


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if argv is None:  # the command line; a caller's process (a test, a notebook) keeps its JAX settings
        _compilation_cache()
    try:
        return _run(args)
    except ValueError as err:  # configuration errors and the library's own validation
        if args.debug:
            raise
        print(f"dmft: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # failures inside the computation (non-convergence raised by JAX, ...)
        if args.debug:
            raise
        print(
            f"dmft: the computation failed: {type(err).__name__}: {err} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
