"""Write small fake CIFAR-100 files in the exact on-disk format of the official python version.

The official ``cifar-100-python`` files were written by Python 2 ``cPickle`` (protocol 2):
dictionary keys and file names are Python 2 ``str`` objects, which Python 3 reads back as ``str``
when unpickling with ``encoding="latin1"`` (as torchvision does).  Python 3 ``bytes`` pickled
with protocol 2 would come back as ``bytes`` instead, so this module emits Python 2 string
opcodes for ``bytes`` objects.  The ``data`` array refers to ``numpy.core.multiarray._reconstruct``
like the original files do.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

FOLDER = "cifar-100-python"
NUM_CLASSES = 100
NUM_COARSE_CLASSES = 20
IMAGE_BYTES = 3 * 32 * 32

_reconstruct = np.ndarray.__reduce__(np.zeros(1, np.uint8))[0]


class _Python2Pickler(pickle._Pickler):
    """Pure-Python pickler writing ``bytes`` as Python 2 ``str`` and numpy 1.x global names."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is _reconstruct:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def dump_python2_pickle(obj: Any, path: Path) -> None:
    """Pickle ``obj`` to ``path`` the way Python 2 ``cPickle.dump(obj, f, 2)`` would."""
    with open(path, "wb") as f:
        _Python2Pickler(f, protocol=2).dump(obj)


def fake_part(per_class: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Random uint8 image rows (n, 3072) in CHW order and shuffled, balanced fine labels."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(NUM_CLASSES), per_class))
    data = rng.integers(0, 256, size=(len(labels), IMAGE_BYTES), dtype=np.uint8)
    return data, [int(label) for label in labels]


def part_dict(data: np.ndarray, fine_labels: list[int], batch_label: str) -> dict[bytes, Any]:
    """The contents of a ``train`` or ``test`` file holding ``data`` rows and their ``fine_labels``."""
    return {
        b"filenames": [f"fake_image_s_{i:06d}.png".encode() for i in range(len(fine_labels))],
        b"batch_label": batch_label.encode(),
        b"fine_labels": fine_labels,
        b"coarse_labels": [label % NUM_COARSE_CLASSES for label in fine_labels],
        b"data": data,
    }


def write_cifar100(root: str | Path, per_class_train: int = 30, per_class_test: int = 5, seed: int = 0) -> Path:
    """Write fake ``train``, ``test`` and ``meta`` files under ``root/cifar-100-python``; return that folder.

    Train images come from ``fake_part(per_class_train, seed)``, test images from
    ``fake_part(per_class_test, seed + 1)``, so tests can recompute what was written.
    """
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    train = part_dict(*fake_part(per_class_train, seed), "training batch 1 of 1")
    test = part_dict(*fake_part(per_class_test, seed + 1), "testing batch 1 of 1")
    meta = {
        b"fine_label_names": [f"fine_{i:02d}".encode() for i in range(NUM_CLASSES)],
        b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(NUM_COARSE_CLASSES)],
    }
    for name, content in (("train", train), ("test", test), ("meta", meta)):
        dump_python2_pickle(content, folder / name)
    return folder
