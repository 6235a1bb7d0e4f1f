"""Tests of vggbench.data: splits, transforms, the CIFAR-100 reader and its errors, synthetic data, loaders."""

from __future__ import annotations

import urllib.error
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

from tests.cifar_files import dump_python2_pickle, fake_part, part_dict, write_cifar100
from vggbench.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    DataError,
    SyntheticCIFAR,
    build_loader,
    build_splits,
    cifar,
    cifar100_available,
    class_balanced_split,
)

TRAIN_PER_CLASS, TEST_PER_CLASS, VAL_SIZE = 30, 5, 500


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory holding fake CIFAR-100 (3,000 train / 500 test images); do not modify it."""
    root = tmp_path_factory.mktemp("data")
    write_cifar100(root, TRAIN_PER_CLASS, TEST_PER_CLASS)
    return root


@pytest.fixture(scope="module")
def splits(cifar_root: Path):
    return build_splits("cifar100", cifar_root, verify_checksums=False, val_size=VAL_SIZE)


def view_labels(view) -> list[int]:
    return [view.base.targets[i] for i in view.indices]


def normalised(chw_uint8: np.ndarray) -> torch.Tensor:
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
    return (torch.from_numpy(chw_uint8).float() / 255 - mean) / std


# --- splits ---------------------------------------------------------------------------------------


def test_split_sizes_and_class_balance(splits):
    assert (splits.kind, splits.num_classes) == ("cifar100", 100)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2500, 500, 500)
    assert set(Counter(view_labels(splits.train)).values()) == {TRAIN_PER_CLASS - VAL_SIZE // 100}
    assert set(Counter(view_labels(splits.val)).values()) == {VAL_SIZE // 100}


def test_train_and_val_are_disjoint_views_of_one_base(splits):
    assert splits.train.base is splits.val.base
    train, val = set(splits.train.indices), set(splits.val.indices)
    assert not train & val
    assert train | val == set(range(100 * TRAIN_PER_CLASS))


def test_full_size_split_arithmetic():
    targets = [label for label in range(100) for _ in range(500)]
    train, val = class_balanced_split(targets, 2500)
    assert (len(train), len(val)) == (47_500, 2_500)
    assert set(Counter(targets[i] for i in val).values()) == {25}
    assert not set(train) & set(val)


def test_split_is_deterministic_and_depends_on_seed():
    targets = np.random.default_rng(1).permutation(np.repeat(np.arange(100), 20))
    assert class_balanced_split(targets, 500, seed=3) == class_balanced_split(targets, 500, seed=3)
    assert class_balanced_split(targets, 500, seed=3) != class_balanced_split(targets, 500, seed=4)


def test_train_limit_is_balanced_and_keeps_validation():
    targets = np.repeat(np.arange(100), 20)
    full_train, val = class_balanced_split(targets, 500)
    limited_train, same_val = class_balanced_split(targets, 500, train_limit=1000)
    assert same_val == val
    assert set(limited_train) <= set(full_train)
    assert set(Counter(targets[limited_train].tolist()).values()) == {10}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_size": 250}, "val_size must be a multiple"),
        ({"val_size": -100}, "val_size must be a multiple"),
        ({"val_size": 2000}, "every class needs at least 21"),
        ({"val_size": 500, "train_limit": 150}, "train_limit must be a multiple"),
        ({"val_size": 500, "train_limit": 0}, "train_limit must be a multiple"),
        ({"val_size": 500, "train_limit": 1600}, "every class needs at least 21"),
    ],
)
def test_bad_split_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        class_balanced_split(np.repeat(np.arange(100), 20), **kwargs)


def test_split_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match="labels must lie in 0..99"):
        class_balanced_split([0, 1, 100], 0)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        build_splits("mnist")


# --- transforms -----------------------------------------------------------------------------------


def test_eval_images_are_normalised_and_deterministic(splits):
    data, _ = fake_part(TRAIN_PER_CLASS, seed=0)
    index = splits.val.indices[0]
    image, _ = splits.val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    torch.testing.assert_close(image, normalised(data[index].reshape(3, 32, 32)))
    assert torch.equal(splits.val[0][0], image)
    assert torch.equal(splits.test[0][0], splits.test[0][0])


def test_train_images_are_augmented_per_epoch(splits):
    images = []
    for epoch in range(8):
        splits.train.set_epoch(epoch)
        images.append(splits.train[0][0])
        assert torch.equal(splits.train[0][0], images[-1])  # (seed, epoch, index) alone decide
    assert images[0].shape == (3, 32, 32)
    assert any(not torch.equal(images[0], other) for other in images[1:])


def test_augmentation_can_be_switched_off(cifar_root):
    plain = build_splits("cifar100", cifar_root, verify_checksums=False, val_size=VAL_SIZE, augment=False)
    index = plain.train.indices[0]
    written = fake_part(TRAIN_PER_CLASS, seed=0)[0][index].reshape(3, 32, 32)
    torch.testing.assert_close(plain.train[0][0], normalised(written))


# --- the CIFAR-100 reader -------------------------------------------------------------------------


def test_reader_returns_the_written_images_and_labels(splits):
    test_base = splits.test.base
    data, labels = fake_part(TEST_PER_CLASS, seed=1)
    assert isinstance(test_base, cifar.CIFAR100Files)
    np.testing.assert_array_equal(test_base.data, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert test_base.targets == labels
    assert test_base.classes[:2] == ["fine_00", "fine_01"]
    image, label = test_base[7]
    assert isinstance(image, Image.Image) and label == labels[7]
    assert torch.equal((to_tensor(image) * 255).round().to(torch.uint8), torch.from_numpy(data[7].reshape(3, 32, 32)))


def test_missing_data_says_where_and_how(tmp_path):
    assert not cifar100_available(tmp_path)
    with pytest.raises(DataError) as error:
        build_splits("cifar100", tmp_path)
    message = str(error.value)
    for expected in (str(tmp_path / "cifar-100-python"), "train, test, meta", "--download",
                     "cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar.html", f"into {tmp_path}"):
        assert expected in message


def test_available_when_files_exist(cifar_root):
    assert cifar100_available(cifar_root)


def test_download_failure_is_reported(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="Downloading CIFAR-100 .* failed .*network"):
        build_splits("cifar100", tmp_path, download=True)


def test_download_skipped_when_files_are_usable(cifar_root, monkeypatch):
    monkeypatch.setattr(cifar, "download_and_extract_archive", pytest.fail)
    splits = build_splits("cifar100", cifar_root, download=True, verify_checksums=False, val_size=VAL_SIZE)
    assert len(splits.test) == 500


def test_checksum_mismatch_names_file_and_option(cifar_root):
    with pytest.raises(DataError) as error:
        build_splits("cifar100", cifar_root, val_size=VAL_SIZE)
    message = str(error.value)
    assert str(cifar_root / "cifar-100-python" / "train") in message
    assert "MD5" in message and "verify_checksums=False" in message and "download" in message


def truncate(folder: Path) -> None:
    path = folder / "train"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def rewrite_train(folder: Path, data: np.ndarray, labels: list[int]) -> None:
    dump_python2_pickle(part_dict(data, labels, "training batch 1 of 1"), folder / "train")


def bad_labels(folder: Path) -> None:
    data, labels = fake_part(TRAIN_PER_CLASS, seed=0)
    rewrite_train(folder, data, [*labels[:-1], 100])


def short_rows(folder: Path) -> None:
    data, labels = fake_part(TRAIN_PER_CLASS, seed=0)
    rewrite_train(folder, data[:, :3000], labels)


def few_images(folder: Path) -> None:
    data, labels = fake_part(TRAIN_PER_CLASS, seed=0)
    rewrite_train(folder, data[:-2], labels)


def garbage_meta(folder: Path) -> None:
    (folder / "meta").write_bytes(b"not a pickle")


@pytest.mark.parametrize(
    ("damage", "bad_file", "reason"),
    [
        (truncate, "train", "could not be read"),
        (bad_labels, "train", "labels must lie in 0..99"),
        (short_rows, "train", "could not be read"),
        (few_images, "train", "2998 images but 3000 labels"),
        (garbage_meta, "meta", "could not be read"),
    ],
)
def test_corrupt_files_are_named(tmp_path, damage, bad_file, reason):
    folder = write_cifar100(tmp_path, TRAIN_PER_CLASS, TEST_PER_CLASS)
    damage(folder)
    with pytest.raises(DataError) as error:
        build_splits("cifar100", tmp_path, verify_checksums=False, val_size=VAL_SIZE)
    message = str(error.value)
    assert f"{folder / bad_file} is corrupt" in message and reason in message
    assert "download the dataset again" in message


# --- synthetic data -------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_balanced():
    first, again = SyntheticCIFAR(500, seed=1), SyntheticCIFAR(500, seed=1)
    assert first.data.shape == (500, 32, 32, 3) and first.data.dtype == np.uint8
    assert first.data.tobytes() == again.data.tobytes() and first.targets == again.targets
    assert not np.array_equal(first.data, SyntheticCIFAR(500, seed=2).data)
    assert not np.array_equal(first.data, SyntheticCIFAR(500, train=False, seed=1).data)
    assert set(Counter(first.targets).values()) == {5}
    assert len(first) == 500 and first.classes[7] == "synthetic-class-07" and len(first.classes) == 100


def test_synthetic_item_is_like_torchvision():
    dataset = SyntheticCIFAR(100, transform=to_tensor)
    image, label = dataset[3]
    assert isinstance(label, int) and label == dataset.targets[3]
    assert torch.equal((image * 255).round().to(torch.uint8), torch.from_numpy(dataset.data[3]).permute(2, 0, 1))


def test_synthetic_is_learnable_but_not_trivial():
    """A nearest-class-mean classifier fitted on the train part does far better than chance on the test part."""
    train, test = SyntheticCIFAR(2000, seed=0), SyntheticCIFAR(1000, train=False, seed=0)
    features = train.data.reshape(len(train), -1).astype(np.float32)
    means = np.stack([features[np.asarray(train.targets) == label].mean(0) for label in range(100)])
    test_features = test.data.reshape(len(test), -1).astype(np.float32)
    distances = (means**2).sum(1) - 2 * test_features @ means.T  # squared distance minus a per-row constant
    accuracy = (distances.argmin(1) == np.asarray(test.targets)).mean()
    assert 0.3 < accuracy < 0.98


@pytest.mark.parametrize("size", [0, 150, -100])
def test_synthetic_size_must_be_a_multiple_of_100(size):
    with pytest.raises(ValueError, match="multiple of 100"):
        SyntheticCIFAR(size)


def test_synthetic_splits():
    splits = build_splits("synthetic", val_size=500, synthetic_train_size=2000, synthetic_test_size=300)
    assert (splits.kind, splits.num_classes) == ("synthetic", 100)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1500, 500, 300)
    assert splits.val[0][0].shape == (3, 32, 32)


# --- loaders --------------------------------------------------------------------------------------


def test_train_loader_is_shuffled_reproducibly_and_keeps_the_last_batch(splits):
    def first_epoch_labels(seed: int) -> torch.Tensor:
        loader = build_loader(splits.train, 64, train=True, workers=0, device=torch.device("cpu"),
                              generator=torch.Generator().manual_seed(seed))
        return torch.cat([labels for _, labels in loader])

    labels = first_epoch_labels(0)
    assert len(labels) == len(splits.train)
    assert torch.equal(labels, first_epoch_labels(0))
    assert not torch.equal(labels, first_epoch_labels(1))
    assert not torch.equal(labels, torch.tensor(view_labels(splits.train)))


def test_eval_loader_keeps_order(splits):
    loader = build_loader(splits.val, 64, train=False, workers=0, device=torch.device("cpu"))
    images, _ = next(iter(loader))
    assert images.shape == (64, 3, 32, 32)
    assert torch.equal(torch.cat([labels for _, labels in loader]), torch.tensor(view_labels(splits.val)))
    assert not loader.pin_memory


def test_loader_options():
    loader = build_loader(list(range(10)), 4, train=False, workers=2, device=torch.device("cuda"))
    assert loader.pin_memory and loader.num_workers == 2 and not loader.drop_last


def test_worker_augmentation_is_reproducible(splits):
    def first_batch(seed: int) -> torch.Tensor:
        loader = build_loader(splits.train, 16, train=True, workers=2, device=torch.device("cpu"),
                              generator=torch.Generator().manual_seed(seed))
        return next(iter(loader))[0]

    assert torch.equal(first_batch(5), first_batch(5))
