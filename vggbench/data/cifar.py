"""CIFAR-100 on disk: checking, downloading and reading it (safely) through torchvision's ``CIFAR100``."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from torchvision.datasets import CIFAR100
from torchvision.datasets.utils import check_md5, download_and_extract_archive
from torchvision.datasets.vision import VisionDataset

from vggbench.data.safe_pickle import ForbiddenGlobal, load_data

NUM_CLASSES = 100
HOMEPAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
FOLDER = CIFAR100.base_folder
CHECKSUMS: dict[str, str] = {
    **dict(CIFAR100.train_list + CIFAR100.test_list),
    CIFAR100.meta["filename"]: CIFAR100.meta["md5"],
}
FILES = tuple(CHECKSUMS)  # ("train", "test", "meta")

# What reading a damaged pickle (or one with unexpected contents) can raise.
_READ_ERRORS = (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, ImportError)


class DataError(RuntimeError):
    """The dataset is missing, damaged or could not be downloaded; the message says what to do."""


class CIFAR100Files(CIFAR100):
    """torchvision's ``CIFAR100`` read without running code a file carries; ``DataError`` names a bad file.

    ``CIFAR100.__init__`` and ``_load_meta`` read the files with ``pickle.load``, which runs any code a
    crafted file carries; this class does their small load with ``safe_pickle.load_data`` instead and keeps
    the rest of torchvision's dataset (items, transforms, class names). It checks no MD5 sums:
    ``prepare_cifar100`` verifies them once, when asked to, and this also admits custom data written in the
    official format.
    """

    def __init__(self, root: str | Path, train: bool = True):
        VisionDataset.__init__(self, root)  # not CIFAR100.__init__: it would pickle.load the files
        self.train = train
        entry = _unpickle(self.data_path)
        try:
            # as CIFAR10.__init__: rows of CHW bytes to HWC images; CIFAR-100's labels are the fine ones
            self.data = np.asarray(entry["data"]).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
            self.targets = list(entry["fine_labels"])
        except _READ_ERRORS as exc:
            raise _corrupt(self.data_path, f"it could not be read ({exc!r})") from exc
        self._load_meta()

    @property
    def data_path(self) -> Path:
        """The ``train`` or ``test`` file this dataset reads."""
        return Path(self.root) / FOLDER / (self.train_list if self.train else self.test_list)[0][0]

    def _load_meta(self) -> None:
        path = Path(self.root) / FOLDER / self.meta["filename"]
        try:
            self.classes = list(_unpickle(path)[self.meta["key"]])
        except _READ_ERRORS as exc:
            raise _corrupt(path, f"it could not be read ({exc!r})") from exc
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


def _unpickle(path: Path) -> Any:
    """The contents of the pickle ``path``, refusing any that would import or run code."""
    try:
        with open(path, "rb") as file:
            return load_data(file)
    except ForbiddenGlobal as exc:
        raise DataError(
            f"CIFAR-100 file {path} was refused: it refers to {exc.global_name}, which the CIFAR format never "
            "holds (a pickle naming it can run code). Use the official files (--download) or write your own "
            "with plain dicts, lists, bytes and numpy arrays."
        ) from exc
    except _READ_ERRORS as exc:
        raise _corrupt(path, f"it could not be read ({exc!r})") from exc


def _corrupt(path: Path, reason: str) -> DataError:
    return DataError(
        f"CIFAR-100 file {path} is corrupt: {reason}. Delete {path.parent} and download the dataset again "
        f"(--download, or cifar-100-python.tar.gz from {HOMEPAGE})."
    )


def cifar100_available(data_dir: str | Path) -> bool:
    """Whether the CIFAR-100 ``train``, ``test`` and ``meta`` files exist under ``data_dir``."""
    folder = Path(data_dir) / FOLDER
    return all((folder / name).is_file() for name in FILES)


def _file_problem(data_dir: Path, verify_checksums: bool) -> DataError | None:
    """The error describing what is wrong with the files on disk, or None when they are usable."""
    folder = data_dir / FOLDER
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        return DataError(
            f"CIFAR-100 not found: expected the files {', '.join(FILES)} in {folder} (missing: {', '.join(missing)}). "
            f"Run with --download (download=True) to fetch it, or download cifar-100-python.tar.gz "
            f"from {HOMEPAGE} and extract it into {data_dir}."
        )
    if verify_checksums:
        for name, md5 in CHECKSUMS.items():
            if not check_md5(folder / name, md5):
                reason = (
                    f"its MD5 checksum does not match the official one ({md5}); "
                    "for custom data in the CIFAR-100 format, disable checksum verification "
                    "(--no-verify-checksums, or verify_checksums=False)"
                )
                return _corrupt(folder / name, reason)
    return None


def _download(data_dir: Path) -> None:
    try:
        download_and_extract_archive(CIFAR100.url, str(data_dir), filename=CIFAR100.filename, md5=CIFAR100.tgz_md5)
    except (OSError, RuntimeError, tarfile.TarError) as exc:
        raise DataError(
            f"Downloading CIFAR-100 from {CIFAR100.url} into {data_dir} failed ({exc!r}); is the network reachable? "
            f"Alternatively download cifar-100-python.tar.gz from {HOMEPAGE} by hand and extract it into {data_dir}."
        ) from exc


def prepare_cifar100(data_dir: str | Path, *, download: bool = False, verify_checksums: bool = True) -> Path:
    """Make sure usable CIFAR-100 files are in ``data_dir`` (downloading them if asked); return ``data_dir``.

    Raises:
        DataError: the files are missing, fail the MD5 check, or the download failed.
    """
    root = Path(data_dir)
    problem = _file_problem(root, verify_checksums)
    if problem is not None and download:
        _download(root)
        problem = _file_problem(root, verify_checksums)
    if problem is not None:
        raise problem
    return root


def read_cifar100(data_dir: str | Path, *, train: bool) -> CIFAR100Files:
    """Read the train or test part of CIFAR-100 (no transform) from files checked by ``prepare_cifar100``.

    Raises:
        DataError: a file cannot be unpickled or holds arrays or labels of the wrong shape or range.
    """
    dataset = CIFAR100Files(data_dir, train=train)
    _validate(dataset)
    return dataset


def _validate(dataset: CIFAR100Files) -> None:
    """Check what torchvision does not: image dtype, label count and range, number of classes."""
    path = dataset.data_path
    targets = np.asarray(dataset.targets)
    if dataset.data.dtype != np.uint8:
        raise _corrupt(path, f"images have dtype {dataset.data.dtype}, expected uint8")
    if len(targets) != len(dataset.data):
        raise _corrupt(path, f"it holds {len(dataset.data)} images but {len(targets)} labels")
    if len(targets) and (targets.min() < 0 or targets.max() >= NUM_CLASSES):
        raise _corrupt(path, f"labels must lie in 0..{NUM_CLASSES - 1}, found {targets.min()}..{targets.max()}")
    if len(dataset.classes) != NUM_CLASSES:
        raise _corrupt(path.parent / "meta", f"it names {len(dataset.classes)} classes, expected {NUM_CLASSES}")
