"""Save and load `Solution`, `networks.Run` and `Comparison` objects.

One `.npz` file per object: every array under a path-like name, plus `__manifest__`, a JSON string
holding the format version, the library version, the object's structure (which field is an array,
None, a result code, a nested object) and the user's metadata (problem, solver settings, keys).
Writes are atomic (temporary file in the same directory, then `os.replace`): an interrupted save
never leaves a file that loads. Files of an unknown format version, and truncated or corrupt files,
are refused with a `ValueError`.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile

import jax.numpy as jnp
import numpy as np

from .compare import Comparison
from .fluctuations import Fluctuations
from .networks import Run
from .solution import RESULTS, Solution

__all__ = ["save", "load", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_CLASSES = {"Solution": Solution, "Run": Run, "Comparison": Comparison, "Fluctuations": Fluctuations}
_RESULT_NAMES = ("successful", "max_iters_reached", "nonfinite")


def _result_name(result):
    index = int(np.asarray(result._value))
    return next(n for n in _RESULT_NAMES if int(np.asarray(getattr(RESULTS, n)._value)) == index)


def _encode(obj, name, arrays):
    """JSON description of `obj`; arrays go into `arrays` under their path `name`."""
    if obj is None:
        return None
    if type(obj).__name__ in _CLASSES and isinstance(obj, _CLASSES[type(obj).__name__]):
        fields = {f: _encode(getattr(obj, f), f"{name}/{f}", arrays) for f in obj.__dataclass_fields__}
        return {"__class__": type(obj).__name__, "fields": fields}
    if isinstance(obj, type(RESULTS.successful)):
        return {"__result__": _result_name(obj)}
    if isinstance(obj, dict):
        return {"__dict__": {k: _encode(v, f"{name}/{k}", arrays) for k, v in obj.items()}}
    if isinstance(obj, (tuple, list)):
        return {"__tuple__": [_encode(v, f"{name}/{i}", arrays) for i, v in enumerate(obj)]}
    if isinstance(obj, (int, float, str, bool)):
        return {"__scalar__": obj}
    arrays[name] = np.asarray(obj)
    return {"__array__": name}


def _decode(desc, arrays):
    if desc is None:
        return None
    if "__class__" in desc:
        cls = _CLASSES[desc["__class__"]]
        fields = {k: _decode(v, arrays) for k, v in desc["fields"].items()}
        if cls is Comparison:
            fields["widths"] = tuple(fields["widths"])
        obj = object.__new__(cls)  # fields are restored verbatim, not re-validated
        for k, v in fields.items():
            object.__setattr__(obj, k, v)
        return obj
    if "__result__" in desc:
        return getattr(RESULTS, desc["__result__"])
    if "__dict__" in desc:
        return {k: _decode(v, arrays) for k, v in desc["__dict__"].items()}
    if "__tuple__" in desc:
        return tuple(_decode(v, arrays) for v in desc["__tuple__"])
    if "__scalar__" in desc:
        return desc["__scalar__"]
    return jnp.asarray(arrays[desc["__array__"]])


def save(path, obj, *, metadata: dict | None = None) -> None:
    """Save `obj` (Solution, networks.Run or Comparison) with JSON-serialisable `metadata` to `path`."""
    if type(obj).__name__ not in _CLASSES:
        raise ValueError(f"can only save {sorted(_CLASSES)}, got {type(obj).__name__}")
    from . import __version__

    arrays = {}
    manifest = {
        "format_version": FORMAT_VERSION,
        "dmft_version": __version__,
        "object": _encode(obj, "obj", arrays),
        "metadata": metadata or {},
    }
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".dmft-", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, __manifest__=np.array(json.dumps(manifest)), **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load(path, *, with_metadata: bool = False):
    """Load what `save` wrote; with `with_metadata=True` return `(obj, metadata)`."""
    try:
        with np.load(os.fspath(path), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path} is not a readable dmft file (truncated or corrupt?): {err}") from None
    if "__manifest__" not in arrays:
        raise ValueError(f"{path} has no dmft manifest: not written by dmft.io.save")
    manifest = json.loads(str(arrays.pop("__manifest__")))
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has dmft format version {version!r}; this dmft reads version {FORMAT_VERSION}. "
            "Load it with the dmft release that wrote it."
        )
    obj = _decode(manifest["object"], arrays)
    return (obj, manifest["metadata"]) if with_metadata else obj
