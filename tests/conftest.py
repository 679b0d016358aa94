import gc
import os

import jax
import pytest

# Tests run in float64 (DESIGN: float64 is the user's choice; the tests choose it).
jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    # One pytest process compiles hundreds of XLA programs, some holding large constants; dropping
    # them after each test module keeps the process's memory and its memory mappings flat (the full
    # suite once died with a segmentation fault inside an XLA compilation late in the run; a process
    # past vm.max_map_count dies there, `dmft._maps`).
    yield
    jax.clear_caches()
    gc.collect()


def pytest_configure(config):
    # The default suite's problems are small: compiling them takes most of its time. Without LLVM's
    # optimisation of the generated CPU code, and with XLA's older CPU emitters of fused computations
    # (which compile about twice as fast at that level), the suite takes 40% less (benchmarks/RESULTS.md).
    # The programs (XLA's own passes included) and the results, up to rounding, are the same; float32's
    # transcendental functions may round differently by an ulp. The slow validations keep XLA's
    # defaults: their time is spent running large programs. Set before JAX starts its backend
    # (collection imports dmft).
    flags = os.environ.get("XLA_FLAGS", "")
    if config.getoption("markexpr") == "not slow" and "xla_backend_optimization_level" not in flags:
        fast = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
        os.environ["XLA_FLAGS"] = f"{flags} {fast}".strip()


def pytest_collection_modifyitems(items):
    # The two longest tests (a 4-device subprocess; the README's examples, 40-90 s each) first: collected
    # near the end, one of them would run alone while the other xdist worker idles.
    first = {"test_mesh.py", "test_readme.py"}
    items.sort(key=lambda item: item.nodeid.split("::")[0].rsplit("/", 1)[-1] not in first)
