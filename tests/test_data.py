"""tpp.data: the embedded digits split, MNIST/ImageFolder on generated files, loaders, and missing-data errors."""
import sys

import numpy as np
import pytest
import torch

from tpp.data import build_dataset, build_loader, list_datasets, load_digits_split

DIGITS_COUNTS = np.array([178, 182, 177, 183, 181, 182, 181, 179, 174, 180])  # sklearn's 1797 images per class


def test_digits_shapes_and_normalization():
    train, test = load_digits_split()
    (x, y), (xt, yt) = train.tensors, test.tensors
    assert x.shape == (1437, 1, 8, 8) and xt.shape == (360, 1, 8, 8)
    assert x.dtype == xt.dtype == torch.float32 and y.dtype == yt.dtype == torch.int64
    assert abs(x.mean().item()) < 1e-5 and abs(x.std(correction=0).item() - 1) < 1e-5
    flat_train, _ = load_digits_split(flatten=True)
    torch.testing.assert_close(flat_train.tensors[0], x.flatten(1), rtol=0, atol=0)


def test_digits_stratified_and_complete():
    train, test = load_digits_split(test_fraction=0.25)
    train_counts = np.bincount(train.tensors[1].numpy(), minlength=10)
    test_counts = np.bincount(test.tensors[1].numpy(), minlength=10)
    np.testing.assert_array_equal(train_counts + test_counts, DIGITS_COUNTS)
    assert np.all(np.abs(test_counts - 0.25 * DIGITS_COUNTS) <= 1)


def test_digits_deterministic_per_seed():
    a, b = load_digits_split(seed=3)[1], load_digits_split(seed=3)[1]
    assert all(torch.equal(s, t) for s, t in zip(a.tensors, b.tensors))
    other = load_digits_split(seed=4)[1]
    assert not torch.equal(a.tensors[0], other.tensors[0])
    via_dispatch = build_dataset("digits", train=False, seed=3)
    assert torch.equal(via_dispatch.tensors[0], a.tensors[0])


def test_digits_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(test_fraction=1.0)


def test_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="scikit-learn"):
        load_digits_split()


@pytest.fixture
def image_root(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.jpg")
    return tmp_path


@pytest.mark.parametrize("train", [True, False])
def test_imagefolder(image_root, train):
    dataset = build_dataset("imagefolder", image_root, train=train)
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 4
    images, labels = next(iter(build_loader(dataset, batch_size=4, train=train, seed=0)))
    assert images.shape == (4, 3, 224, 224) and images.dtype == torch.float32
    assert sorted(labels.tolist()) == [0, 0, 1, 1]


def _write_idx(path, array):
    """An MNIST idx file: magic (0, 0, 0x08 = ubyte, ndim), big-endian int32 dims, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("image_size", [28, 32])
def test_mnist_from_local_files(tmp_path, image_size):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 3), ("t10k", 2)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n))
    dataset = build_dataset("mnist", tmp_path, train=False, image_size=image_size)
    image, label = dataset[1]
    assert len(dataset) == 2 and label == 1
    assert image.shape == (1, image_size, image_size) and image.dtype == torch.float32


def test_loader_shuffles_reproducibly():
    dataset = torch.utils.data.TensorDataset(torch.arange(50))
    order = lambda loader: torch.cat([b for (b,) in loader]).tolist()  # noqa: E731
    assert order(build_loader(dataset, 8, train=False)) == list(range(50))
    shuffled = order(build_loader(dataset, 8, train=True, seed=1))
    assert shuffled != list(range(50)) and sorted(shuffled) == list(range(50))
    assert order(build_loader(dataset, 8, train=True, seed=1)) == shuffled


def test_unknown_dataset():
    assert list_datasets() == ["cifar10", "cifar100", "digits", "imagefolder", "mnist"]
    with pytest.raises(ValueError, match="unknown dataset 'svhn'.*cifar10.*digits.*mnist"):
        build_dataset("svhn", "/data")


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "imagefolder"])
def test_missing_root(name, tmp_path):
    with pytest.raises(ValueError, match="root="):
        build_dataset(name, None)
    missing = tmp_path / "nowhere"
    fix = "root/train" if name == "imagefolder" else "download=True"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*{fix}"):
        build_dataset(name, missing)
    assert not missing.exists()


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_root_without_files(name, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{name} files not found .*{tmp_path}.*download=True"):
        build_dataset(name, tmp_path, train=False)


def test_imagefolder_errors(image_root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty / 'val'}.*root/val/<class>"):
        build_dataset("imagefolder", empty, train=False)
    with pytest.raises(ValueError, match="cannot be downloaded"):
        build_dataset("imagefolder", image_root, download=True)
