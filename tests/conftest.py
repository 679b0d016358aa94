import gc

import jax
import pytest

# Tests run in float64 (DESIGN: float64 is the user's choice; the tests choose it).
jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    # One pytest process compiles hundreds of XLA programs, some holding large constants; dropping
    # them after each test module keeps the process's memory flat (the full suite once died with a
    # segmentation fault inside an XLA compilation late in the run).
    yield
    jax.clear_caches()
    gc.collect()


def pytest_collection_modifyitems(items):
    # The two longest tests (a 4-device subprocess; the README's examples, 1.5-2 min each) first: collected
    # near the end, one of them would run alone while the other xdist worker idles.
    first = {"test_mesh.py", "test_readme.py"}
    items.sort(key=lambda item: item.nodeid.split("::")[0].rsplit("/", 1)[-1] not in first)
