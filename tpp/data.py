"""Datasets: the embedded 8×8 digits (no download), MNIST, CIFAR-10/100 and ImageFolder (ImageNet layout).

``build_dataset(name, root, train, download)`` returns one split as a map-style dataset of ``(image, label)``;
``build_loader`` wraps it in a DataLoader. File-based datasets are read from ``root`` and downloaded only when
``download=True``; a missing root or missing files raise ``FileNotFoundError`` naming the path and the fix.

* ``digits``: scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes), split by
  ``load_digits_split``; needs scikit-learn (``pip install "tpp[demo]"``). ``root``/``download`` are ignored.
* ``mnist``: 1×28×28, or 1×``image_size``² (``image_size=32`` gives MLP-7-Linear's 1024 inputs).
* ``cifar10``/``cifar100``: 3×32×32; training split augmented with 4-pixel-padded random crops and flips.
* ``imagefolder``: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>`` with the standard ImageNet
  transforms (train: RandomResizedCrop 224 + flip; val: Resize 256 + CenterCrop 224).

torchvision is imported on first use of a file-based dataset, so the digits path stays quick to import.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["load_digits_split", "build_dataset", "build_loader", "list_datasets", "num_classes_of", "IMAGENET_STATS"]

PathLike = Union[str, os.PathLike]

_MNIST_STATS = ((0.1307,), (0.3081,))
_CIFAR = {  # torchvision class, (mean, std)
    "cifar10": ("CIFAR10", ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
    "cifar100": ("CIFAR100", ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def load_digits_split(
    seed: int = 0, test_fraction: float = 0.2, flatten: bool = False
) -> tuple[TensorDataset, TensorDataset]:
    """Stratified, seeded train/test split of scikit-learn's 8×8 digits as ``(train, test)`` TensorDatasets.

    Images are float32 ``[n, 1, 8, 8]`` (``[n, 64]`` with ``flatten``), scaled to [0, 1] and then standardized
    with the training split's mean and standard deviation (one scalar each); labels are int64 in 0..9.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError(
            'the embedded digits dataset needs scikit-learn: pip install "tpp[demo]" (or pip install scikit-learn)'
        ) from err
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # pixel values are 0..16
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    mean, std = images[train_idx].mean(), images[train_idx].std()
    x = torch.from_numpy((images - mean) / std)
    x = x.flatten(1) if flatten else x.unsqueeze(1)
    y = torch.from_numpy(labels)
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


def _digits(root: Optional[PathLike], train: bool, download: bool, **kwargs) -> Dataset:
    return load_digits_split(**kwargs)[0 if train else 1]


def _require_root(name: str, root: Optional[PathLike], download: bool, fix: str) -> Path:
    """``root`` as a Path; it must exist unless it is about to be downloaded into. ``fix`` says how to repair."""
    if root is None:
        raise ValueError(f"dataset {name!r} is read from a local folder: pass root=<folder>; {fix}")
    root = Path(root)
    if not root.is_dir() and not download:
        raise FileNotFoundError(f"{name} root {root} does not exist; {fix}")
    return root


def _download_fix(name: str) -> str:
    return f"pass download=True to fetch {name} there, or point root at the folder that holds it"


def _torchvision_dataset(
    name: str, cls: Callable, root: Optional[PathLike], train: bool, download: bool, transform
) -> Dataset:
    root = _require_root(name, root, download, _download_fix(name))
    try:
        return cls(str(root), train=train, download=download, transform=transform)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        if download:
            raise
        raise FileNotFoundError(f"{name} files not found (or corrupted) under {root}; {_download_fix(name)}") from err


def _mnist(root: Optional[PathLike], train: bool, download: bool, image_size: int = 28) -> Dataset:
    from torchvision import datasets
    from torchvision import transforms as T

    steps = [] if image_size == 28 else [T.Resize(image_size)]
    transform = T.Compose(steps + [T.ToTensor(), T.Normalize(*_MNIST_STATS)])
    return _torchvision_dataset("mnist", datasets.MNIST, root, train, download, transform)


def _cifar(name: str, root: Optional[PathLike], train: bool, download: bool) -> Dataset:
    from torchvision import datasets
    from torchvision import transforms as T

    cls_name, stats = _CIFAR[name]
    augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    transform = T.Compose(augment + [T.ToTensor(), T.Normalize(*stats)])
    return _torchvision_dataset(name, getattr(datasets, cls_name), root, train, download, transform)


def _imagefolder(root: Optional[PathLike], train: bool, download: bool) -> Dataset:
    from torchvision import datasets
    from torchvision import transforms as T

    layout = "expected root/train/<class>/<image> and root/val/<class>/<image> (the ImageNet layout)"
    if download:
        raise ValueError(f"imagefolder cannot be downloaded; {layout}")
    split_dir = _require_root("imagefolder", root, download, layout) / ("train" if train else "val")
    if not split_dir.is_dir():
        raise FileNotFoundError(f"imagefolder split folder {split_dir} does not exist; {layout}")
    if train:
        steps = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(256), T.CenterCrop(224)]
    transform = T.Compose(steps + [T.ToTensor(), T.Normalize(*IMAGENET_STATS)])
    return datasets.ImageFolder(str(split_dir), transform=transform)


_DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": _digits,
    "mnist": _mnist,
    "cifar10": partial(_cifar, "cifar10"),
    "cifar100": partial(_cifar, "cifar100"),
    "imagefolder": _imagefolder,
}


def list_datasets() -> list[str]:
    """Names ``build_dataset`` accepts."""
    return sorted(_DATASETS)


def num_classes_of(name: str, dataset: Dataset) -> int:
    """Number of classes of dataset ``name`` (``dataset``: one of its splits, read for imagefolder)."""
    if name == "cifar100":
        return 100
    if name == "imagefolder":
        return len(dataset.classes)
    return 10


def build_dataset(
    name: str, root: Optional[PathLike] = None, train: bool = True, download: bool = False, **kwargs
) -> Dataset:
    """The ``train`` (else test/val) split of dataset ``name``; ``kwargs`` go to its builder.

    Builder options: digits — ``seed``, ``test_fraction``, ``flatten`` (see ``load_digits_split``);
    mnist — ``image_size``. Unknown names raise ``ValueError`` listing the available ones.
    """
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    return _DATASETS[name](root, train, download, **kwargs)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    seed: Optional[int] = None,
    drop_last: bool = False,
) -> DataLoader:
    """DataLoader that shuffles when ``train`` and pins memory on CUDA. With ``seed``, the order of pass ``e`` is a
    function of ``(seed, e)`` (``loader.sampler.set_epoch(e)``, which the training loops call), so a resumed run
    sees the batches the uninterrupted one saw."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    sampler = None
    if train and seed is not None:
        from .train.data import ResumableDistributedSampler

        sampler = ResumableDistributedSampler(dataset, shuffle=True, seed=seed, seeded=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
