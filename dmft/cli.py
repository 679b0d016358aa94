"""The `dmft` command: parse, build the Problem and solver, solve / compare, save, plot.

Exit codes: 0 success, 1 the solver failed (non-convergence, non-finite), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib

EXAMPLE_CONFIG = """\
# dmft configuration (TOML). Every section and key is optional except [solver] kind.
[data]
kind = "sphere"        # "sphere" (inputs on the sphere of radius sqrt(D)) or "digits" (scikit-learn)
P = 16                 # training points
P_test = 4             # test points
D = 20                 # input dimension (sphere only)
target = "teacher"     # "teacher" or "noise" (sphere only)
seed = 0

[network]
depth = 2              # hidden layers L
activation = "relu"    # "linear", "relu", "tanh", "erf"

[problem]
gamma0 = 1.0
t_max = 10.0
n_steps = 50
eta0 = 1.0

[solver]
kind = "monte_carlo"   # "lazy", "linear", "monte_carlo"
n_samples = 4096       # monte_carlo: n_samples, damping, rtol, max_iters, chunk_size, responses,
                       # sampling ("plain", "antithetic", "sobol"), control_variates (true / false)
seed = 0

[compare]              # used by `dmft compare`
widths = [256, 1024, 4096]
seeds = 4
method = "gd"          # "gd" or "flow"
"""

DEMO_CONFIG = {
    "data": {"kind": "sphere", "P": 16, "P_test": 4, "D": 20, "target": "teacher", "seed": 0},
    "network": {"depth": 2, "activation": "relu"},
    "problem": {"gamma0": 1.0, "t_max": 10.0, "n_steps": 50, "eta0": 1.0},
    # rtol 3e-2: relu's common-random-number map is only piecewise continuous, so the residual stalls
    # at a Monte Carlo floor ~ S^-1/2 (1.1-1.5% at S = 4096-8192 with the causal Stein responses).
    "solver": {"kind": "monte_carlo", "n_samples": 8192, "chunk_size": 2048, "rtol": 3e-2, "seed": 0},
    "compare": {"widths": [256, 1024, 4096], "seeds": 4, "method": "gd"},
}
QUICK_OVERRIDES = {
    "problem": {"n_steps": 30},
    "solver": {"n_samples": 4096, "chunk_size": 1024},
    "compare": {"widths": [128, 512], "seeds": 2},
}

_SCHEMA = {
    "data": {
        "kind": ("sphere", "digits"),
        "P": int,
        "P_test": int,
        "D": int,
        "target": ("teacher", "noise"),
        "seed": int,
    },
    "network": {"depth": int, "activation": ("linear", "relu", "tanh", "erf")},
    "problem": {"gamma0": float, "t_max": float, "n_steps": int, "eta0": float},
    "solver": {
        "kind": ("lazy", "linear", "monte_carlo"),
        "n_samples": int,
        "damping": float,
        "rtol": float,
        "max_iters": int,
        "chunk_size": int,
        "responses": ("stein", "jacobian", "none"),
        "seed": int,
    },
    "compare": {"widths": list, "seeds": int, "method": ("gd", "flow")},
}


class ConfigError(ValueError):
    """A configuration or usage error (exit code 2)."""


def validate_config(config: dict) -> dict:
    """Check every section, key and value against the schema; return the config unchanged."""
    for section, body in config.items():
        if section not in _SCHEMA:
            raise ConfigError(f"unknown section [{section}]; allowed: {sorted(_SCHEMA)}")
        if not isinstance(body, dict):
            raise ConfigError(f"[{section}] must be a table")
        for key, value in body.items():
            allowed = _SCHEMA[section].get(key)
            if allowed is None:
                raise ConfigError(f"unknown key {section}.{key}; allowed keys: {sorted(_SCHEMA[section])}")
            if isinstance(allowed, tuple):
                if value not in allowed:
                    raise ConfigError(f"{section}.{key} = {value!r} is not allowed; use one of {list(allowed)}")
            elif allowed is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{section}.{key} must be a number, got {value!r}")
            elif allowed is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"{section}.{key} must be an integer, got {value!r}")
            elif allowed is list:
                if not (isinstance(value, list) and value and all(isinstance(v, int) and v > 0 for v in value)):
                    raise ConfigError(f"{section}.{key} must be a non-empty list of positive integers, got {value!r}")
    if "kind" not in config.get("solver", {}):
        raise ConfigError("[solver] kind is required; use one of ['lazy', 'linear', 'monte_carlo']")
    return config


def read_config(path) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, "rb") as fh:
            return validate_config(tomllib.load(fh))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None


def build(config: dict):
    """`(problem, solver, key)` from a validated config (numbers checked again by the library)."""
    import dmft

    d = {"kind": "sphere", "P": 16, "P_test": 0, "D": 20, "target": "teacher", "seed": 0} | config.get("data", {})
    if d["kind"] == "sphere":
        data = dmft.datasets.sphere(d["P"], d["D"], d["seed"], P_test=d["P_test"], target=d["target"])
    else:
        data = dmft.datasets.digits(d["P"], d["seed"], P_test=d["P_test"])
    net = dmft.MLP(**({"depth": 1, "activation": "relu"} | config.get("network", {})))
    problem = dmft.Problem(data, net, **config.get("problem", {}))
    options = dict(config["solver"])
    kind, seed = options.pop("kind"), options.pop("seed", 0)
    if kind == "lazy":
        solver = dmft.Lazy()
    elif kind == "linear":
        solver = dmft.LinearClosure(**{k: v for k, v in options.items() if k in ("damping", "rtol", "max_iters")})
    else:
        solver = dmft.MonteCarlo(**options)
    return problem, solver, seed


def _out_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create output directory {path}: {err.strerror}") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"output directory {path} is not writable")
    return path


def _write_json(path, payload):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2)
    os.replace(tmp, path)


def _solution_summary(sol):
    import dmft

    return {
        "final_loss": float(sol.loss[-1]),
        "initial_loss": float(sol.loss[0]),
        "iterations": int(sol.iterations),
        "converged": bool(sol.result == dmft.RESULTS.successful),
    }


def _comparison_report(comp, runtime):
    err = [float(e) for e in comp.max_loss_error]
    return {
        "widths": list(comp.widths),
        "seeds": int(comp.runs[0].loss.shape[0]),
        "dmft": _solution_summary(comp.dmft),
        "lazy_final_loss": float(comp.lazy.loss[-1]),
        "max_loss_error_over_initial_loss": dict(zip(map(str, comp.widths), err)),
        "largest_width_loss_error_over_initial_loss": err[-1],
        "fitted_exponent_error_vs_width": float(comp.exponent),
        "runtime_seconds": round(runtime, 1),
    }


def _dmft_samples(problem, comp, kind, seed, out):
    """DMFT preactivation samples `h (L, S, Pa)` for the histograms, saved to `samples.npz` so that
    `dmft plot` redraws them without the data; None for the lazy solver (no feature learning)."""
    import numpy as np

    import dmft

    if kind == "lazy":
        return None
    h = np.asarray(dmft.field_samples(problem, comp.dmft, n_samples=4096, key=seed + 1).h, np.float32)
    np.savez_compressed(os.path.join(out, "samples.npz"), h=h)
    return h


def _figure(comp, y, out, samples=None):
    import matplotlib

    matplotlib.use("Agg")
    from . import plotting

    fig = plotting.comparison_figure(comp, y, samples)
    for ext in ("png", "pdf"):
        fig.savefig(os.path.join(out, f"comparison.{ext}"), dpi=150)


def run_compare(config, out, progress=True):
    import dmft

    problem, solver, seed = build(config)
    c = {"widths": [256, 1024], "seeds": 4, "method": "gd"} | config.get("compare", {})
    start = time.perf_counter()
    comp = dmft.compare(problem, solver, c["widths"], c["seeds"], key=seed, method=c["method"], progress=progress)
    report = _comparison_report(comp, time.perf_counter() - start)
    # The targets travel with the result: re-plotting must not depend on regenerating the data.
    meta = {"config": config, "y": [float(v) for v in problem.data.y]}
    dmft.io.save(os.path.join(out, "comparison.npz"), comp, metadata=meta)
    samples = _dmft_samples(problem, comp, config["solver"]["kind"], seed, out)
    _figure(comp, problem.data.y, out, samples)
    _write_json(os.path.join(out, "report.json"), report)
    return comp, report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="dmft",
        description="Solve the DMFT of wide networks and compare with finite networks.",
        epilog="example config:\n\n" + EXAMPLE_CONFIG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="DMFT vs lazy vs finite widths on the embedded default problem")
    demo.add_argument("--quick", action="store_true", help="smaller sizes (under a minute)")
    demo.add_argument("--out", default="dmft_out")
    quiet_help = "no progress bars on stderr (DMFT iterations, finite widths)"
    demo.add_argument("--quiet", action="store_true", help=quiet_help)
    for name, helptext in (
        ("solve", "solve a configured problem"),
        ("compare", "solve and compare with finite networks"),
    ):
        p = sub.add_parser(
            name,
            help=helptext,
            epilog="example config:\n\n" + EXAMPLE_CONFIG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("config")
        p.add_argument("--out", required=True)
        p.add_argument("--x64", action="store_true", help="compute in float64")
        p.add_argument("--quiet", action="store_true", help=quiet_help)
    plot = sub.add_parser("plot", help="re-draw the figure of an output directory")
    plot.add_argument("dir")
    args = parser.parse_args(argv)

    import jax

    try:
        if args.command == "demo":
            jax.config.update("jax_enable_x64", True)
            config = {k: dict(v) for k, v in DEMO_CONFIG.items()}
            if args.quick:
                for k, v in QUICK_OVERRIDES.items():
                    config[k].update(v)
            out = _out_dir(args.out)
            _, report = run_compare(config, out, progress=not args.quiet)
            print(json.dumps(report, indent=2))
            print(f"wrote {out}/comparison.png, comparison.pdf, report.json, comparison.npz, samples.npz")
            return 0
        if args.command == "plot":
            import numpy as np

            import dmft

            path = os.path.join(args.dir, "comparison.npz")
            if not os.path.isfile(path):
                raise ConfigError(f"{args.dir} has no comparison.npz (written by `dmft compare` or `dmft demo`)")
            comp, meta = dmft.io.load(path, with_metadata=True)
            samples_path = os.path.join(args.dir, "samples.npz")
            samples = np.load(samples_path)["h"] if os.path.isfile(samples_path) else None
            _figure(comp, meta["y"], args.dir, samples)
            print(f"wrote {args.dir}/comparison.png and comparison.pdf")
            return 0
        if args.x64:
            jax.config.update("jax_enable_x64", True)
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
    except ConfigError as err:
        print(f"dmft: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # invalid values caught by the library's own validation
        print(f"dmft: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # solver failures raised inside JAX (non-convergence, non-finite)
        print(f"dmft: the computation failed: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
