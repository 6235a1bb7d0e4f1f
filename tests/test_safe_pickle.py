"""CIFAR files are unpickled without running code: payloads are refused, plain data in any protocol loads."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cifar_files import NUM_CLASSES, write_cifar100
from vggbench.data import DataError, build_splits
from vggbench.data.safe_pickle import ForbiddenGlobal, load_data


class _SystemPayload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _OpenPayload:
    """Unpickling this creates ``marker`` through builtins.open."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize(("payload", "forbidden"), [(_SystemPayload, "posix.system"), (_OpenPayload, "io.open")])
@pytest.mark.parametrize("bad_file", ["train", "test", "meta"])
def test_a_pickle_carrying_code_is_refused_and_runs_nothing(tmp_path, bad_file, payload, forbidden, protocol):
    folder = write_cifar100(tmp_path / "data", per_class_train=2, per_class_test=1)
    marker = tmp_path / "payload-ran"
    # the payload in place of a value the reader uses (train/test: the images; meta: the class names)
    key = b"fine_label_names" if bad_file == "meta" else b"data"
    content = {key: payload(marker), b"fine_labels": list(range(NUM_CLASSES))}
    (folder / bad_file).write_bytes(pickle.dumps(content, protocol=protocol))

    with pytest.raises(DataError) as error:
        build_splits("cifar100", tmp_path / "data", verify_checksums=False, val_size=100)

    message = str(error.value)
    assert f"CIFAR-100 file {folder / bad_file} was refused: it refers to {forbidden}" in message
    assert "can run code" in message
    assert not marker.exists()


def test_the_refusal_comes_before_anything_is_imported(tmp_path):
    # a global of a module nothing here imports: refused by name, so the module is never imported
    assert "tabnanny" not in sys.modules
    with pytest.raises(ForbiddenGlobal, match=r"tabnanny\.check"):
        load(tmp_path, b"ctabnanny\ncheck\n.")
    assert "tabnanny" not in sys.modules


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_loads_in_every_protocol(tmp_path, protocol):
    images = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072) % 251
    content = {b"data": images, "labels": [1, 2], b"name": b"batch", "sizes": (1.5, 2**70, None, True),
               "tags": {"a"}, "frozen": frozenset({1})}
    loaded = load(tmp_path, pickle.dumps(content, protocol=protocol))
    assert loaded.keys() == content.keys()
    np.testing.assert_array_equal(loaded[b"data"], images)
    assert loaded[b"data"].dtype == np.uint8
    assert {k: v for k, v in loaded.items() if k != b"data"} == {k: v for k, v in content.items() if k != b"data"}


def load(tmp_path: Path, blob: bytes):
    """``load_data`` of a file holding ``blob``."""
    path = tmp_path / "blob.pickle"
    path.write_bytes(blob)
    with path.open("rb") as file:
        return load_data(file)
