"""Reading pickled data files without running code: an unpickler that admits only plain data and numpy arrays.

A pickle names the callables that rebuild its objects (``module.name`` globals); ``pickle.load`` imports and
calls whatever a file names, so a crafted file can run any code. The CIFAR format only holds builtin
containers, bytes, str, numbers and numpy arrays, so every other global is refused before anything is called.
"""

from __future__ import annotations

import pickle
from typing import IO, Any

# The globals the CIFAR format (official Python 2 files and files written by Python 3 with any protocol) refers to.
ALLOWED_GLOBALS = frozenset({
    # numpy arrays: the constructor (numpy 1.x and 2.x module names), protocol-5 buffers, their class and dtype
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # bytes pickled by Python 3 with protocols 0-2 (as latin-1 text re-encoded)
    ("_codecs", "encode"),
    # containers without an opcode of their own before protocol 4 (Python 2 names them __builtin__)
    *((module, name) for module in ("builtins", "__builtin__") for name in ("set", "frozenset")),
})


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle refers to a global outside ``ALLOWED_GLOBALS``; nothing it names was imported or called."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.global_name = f"{module}.{name}"


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise ForbiddenGlobal(module, name)
        return super().find_class(module, name)


def load_data(file: IO[bytes], encoding: str = "latin1") -> Any:
    """Unpickle ``file`` like ``pickle.load(file, encoding=encoding)``, admitting only data and numpy arrays.

    Raises:
        ForbiddenGlobal: the file refers to any other global (a pickle that would import or run code).
        pickle.UnpicklingError, EOFError, ...: as ``pickle.load`` for damaged files.
    """
    return _DataUnpickler(file, encoding=encoding).load()
