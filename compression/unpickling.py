"""Unpickling that cannot run code: a file may name only the globals its kind of file is known to hold.

A pickle can call any function it names while it loads (``os.system`` as easily as ``numpy.dtype``).
Files that people share (data batches, agent checkpoints, replay buffers) are therefore read with
``restricted_loads``, which admits a fixed set of globals and, where given, the classes under a few
packages that derive from known bases (for example gymnasium's spaces). Anything else is refused
with ``UnpicklingError`` naming the global, before it is imported or called.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Collection
from typing import Any

__all__ = ["NUMPY_GLOBALS", "restricted_loads"]

NUMPY_GLOBALS = frozenset({
    ("_codecs", "encode"),  # how protocol-2 pickles spell bytes
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    *((f"numpy.{core}.multiarray", n) for core in ("core", "_core") for n in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
})
"""What pickled numpy arrays, dtypes and scalars refer to (numpy 1 and 2 spell their module apart)."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, allowed: Collection[tuple[str, str]], packages: tuple[str, ...],
                 bases: tuple[type, ...], what: str, **kwargs: Any):
        super().__init__(file, **kwargs)
        self.allowed, self.packages, self.bases, self.what = allowed, packages, bases, what

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        if any(module == p or module.startswith(p + ".") for p in self.packages):
            found = super().find_class(module, name)  # importing an installed package's module runs no file's code
            if isinstance(found, type) and issubclass(found, self.bases):
                return found
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in {self.what}")


def restricted_loads(data: bytes, *, what: str, allowed: Collection[tuple[str, str]] = NUMPY_GLOBALS,
                     packages: tuple[str, ...] = (), bases: tuple[type, ...] = (), encoding: str = "ASCII") -> Any:
    """``pickle.loads(data)`` admitting only the globals in ``allowed`` (``(module, name)`` pairs) and the
    classes defined under ``packages`` that subclass one of ``bases``. ``what`` names the file in the
    error. Raises ``pickle.UnpicklingError`` for any other global."""
    return _RestrictedUnpickler(io.BytesIO(data), allowed, packages, bases, what, encoding=encoding).load()
