"""Data for `tpp train`: datasets at a chosen image size, samplers whose order is a function of (seed, pass), and
per-sample seeded augmentation — so a resumed run sees exactly the batches and crops the uninterrupted one saw.

* :class:`ResumableDistributedSampler` is a ``DistributedSampler`` (shuffled with ``seed + epoch`` by
  ``set_epoch``, padded to equal shards) that can start a pass part-way (``set_epoch(epoch, start)``) and hands out
  ``(index, sample_seed)`` pairs.
* :class:`SeededSamples` wraps a dataset: ``ds[(index, seed)]`` loads ``index`` with the CPU torch RNG and Python's
  ``random`` seeded from ``seed`` (the caller's RNG states are restored), so random crops and flips depend on
  ``(seed, pass, index)`` only — not on the worker process, the number of workers, or where a run was resumed.
* :class:`ShardSampler` splits the evaluation set without padding (every sample counted once over all ranks).

ImageFolder (ImageNet layout ``root/train/<class>/*``, ``root/val/<class>/*``) uses the standard ImageNet transforms
at ``image_size`` (train: RandomResizedCrop + flip; val: Resize(⌊size·256/224⌋) + CenterCrop), which at 224 are
exactly :mod:`tpp.data`'s; the small datasets come from :func:`tpp.data.build_dataset`. For `tpp train` its images
are shipped as uint8 (``pixels="uint8"``: :func:`image_transform`, :func:`collate`, channels_last batches, 4× less
to copy) and normalized on the device by the dataset's ``normalize`` (:mod:`tpp.train.prefetch`), bitwise as the CPU
did; ``pixels="tensor"`` and ``"jpeg"`` decode and crop the training images as tensors, in the workers or on the
device (:mod:`tpp.train.decode`).
"""
from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from ..data import IMAGENET_STATS, build_dataset, num_classes_of
from .prefetch import Normalize

__all__ = ["sample_seed", "SeededSamples", "ResumableDistributedSampler", "ShardSampler", "build_datasets",
           "num_classes_of", "build_loaders", "image_transform", "pil_to_uint8", "load_rgb", "collate", "PIXELS",
           "normalizer_of", "model_input", "default_workers"]

_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` in pass ``epoch`` of a run seeded ``seed`` (splitmix64 mixing)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class SeededSamples(Dataset):
    """``dataset[(index, seed)]`` is ``dataset[index]`` loaded with the torch CPU RNG and ``random`` seeded by
    ``seed``; a plain ``index`` passes through unseeded."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        generator = torch.random.default_generator
        torch_state, py_state = generator.get_state(), random.getstate()
        generator.manual_seed(seed)
        random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(torch_state)
            random.setstate(py_state)


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` whose pass can start at sample ``start`` of this rank's shard, yielding
    ``(index, sample_seed(seed, epoch, index))`` pairs for :class:`SeededSamples` (plain indices with
    ``seeded=False``). ``len()`` is the full shard, whatever the start."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, seeded: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start, self.seeded = 0, seeded

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Pass ``epoch`` (its permutation is ``seed + epoch``), from sample ``start`` of this rank's shard on."""
        super().set_epoch(epoch)
        self.start = int(start)

    def __iter__(self) -> Iterator:
        indices = list(super().__iter__())[self.start:]
        if not self.seeded:
            return iter(indices)
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in indices])


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...`` of a dataset of ``size``: disjoint shards covering it exactly once."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0):
        self.size, self.num_replicas, self.rank = size, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        return max(0, math.ceil((self.size - self.rank) / self.num_replicas))


def image_transform(train: bool, image_size: int, pixels: str = "uint8"):
    """The standard ImageNet transform at ``image_size`` (train: RandomResizedCrop + flip; val:
    Resize(⌊size·256/224⌋) + CenterCrop) on PIL images. ``pixels="uint8"`` ends in a uint8 ``[3, H, W]`` view of
    HWC pixels (:func:`collate` stacks those into channels_last batches without a transposition; the device
    normalizes them, :class:`~tpp.train.prefetch.Normalize`); ``"float"`` ends in ``ToTensor`` + ``Normalize`` on
    the CPU (what the loaders shipped before). The crops, flips and resampling are torchvision's on PIL images either
    way, so both give the same pixels for the same RNG state."""
    from torchvision import transforms as T

    if train:
        steps = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size)]
    if pixels == "float":
        return T.Compose(steps + [T.ToTensor(), T.Normalize(*IMAGENET_STATS)])
    return T.Compose(steps + [pil_to_uint8])


def pil_to_uint8(image) -> torch.Tensor:
    """An RGB PIL image as a uint8 ``[3, H, W]`` view of its HWC pixels (no transposition)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def load_rgb(path: str):
    """The image at ``path`` as an RGB PIL image (torchvision's loader without its copy of images already RGB)."""
    from PIL import Image

    with open(path, "rb") as f:
        image = Image.open(f)
        if image.mode == "RGB":
            image.load()
            return image
        return image.convert("RGB")


def collate(samples: list) -> list:
    """``default_collate`` of ``(image, label, ...)`` samples whose uint8 images are :func:`pil_to_uint8` views:
    the HWC pixels are stacked (in shared memory inside a worker) and the batch is their ``[N, 3, H, W]``
    channels_last view; other images are collated as ``default_collate`` does."""
    if not (isinstance(samples[0][0], torch.Tensor) and samples[0][0].dtype == torch.uint8
            and samples[0][0].dim() == 3):
        return default_collate(samples)
    images = default_collate([s[0].permute(1, 2, 0) for s in samples]).permute(0, 3, 1, 2)
    return [images, *default_collate([s[1:] for s in samples])]


PIXELS = ("float", "uint8", "tensor", "jpeg")


def _imagefolder(root: Path, train: bool, image_size: int, pixels: str) -> Dataset:
    from .file_list import ListedImageFolder

    layout = "expected root/train/<class>/<image> and root/val/<class>/<image> (the ImageNet layout)"
    split = root / ("train" if train else "val")
    if not split.is_dir():
        raise FileNotFoundError(f"imagefolder split folder {split} does not exist; {layout}")
    if pixels in ("tensor", "jpeg") and train:
        from . import decode

        transform = decode.TensorCrops(image_size) if pixels == "tensor" else decode.EncodedCrops(image_size)
        dataset = ListedImageFolder(str(split), transform=transform, loader=read_bytes)
        if pixels == "jpeg":
            dataset.collate = decode.collate
    elif pixels == "float":
        return ListedImageFolder(str(split), transform=image_transform(train, image_size, "float"))
    else:
        dataset = ListedImageFolder(str(split), transform=image_transform(train, image_size), loader=load_rgb)
    dataset.normalize = Normalize(*IMAGENET_STATS)
    return dataset


def read_bytes(path: str) -> bytes:
    """The file at ``path`` (the loader of the datasets whose transform decodes)."""
    with open(path, "rb") as f:
        return f.read()


def normalizer_of(dataset: Dataset) -> Optional[Normalize]:
    """How ``dataset``'s uint8 images become model inputs (None: its images are already float)."""
    return getattr(dataset, "normalize", None)


def model_input(dataset: Dataset) -> torch.Tensor:
    """Sample 0 of ``dataset`` as the model takes it (uint8 images normalized, on the CPU)."""
    image, normalize = dataset[0][0], normalizer_of(dataset)
    return normalize(image) if normalize is not None else image


def build_datasets(data: str, root: Optional[str], image_size: Optional[int] = None, download: bool = False,
                   seed: int = 0, pixels: str = "float") -> tuple[Dataset, Dataset]:
    """``(train, val)`` of ``data``; imagefolder at ``image_size`` (default 224) with ``pixels`` (one of
    :data:`PIXELS`): ``"float"`` normalized on the CPU, ``"uint8"`` normalized on the device (the datasets'
    ``normalize``); training images decoded and cropped as tensors: ``"tensor"`` in the workers, ``"jpeg"`` on the
    device (:mod:`tpp.train.decode`). The small datasets are float whatever ``pixels`` (digits is standardized, the
    others are a few KiB per image)."""
    if pixels not in PIXELS:
        raise ValueError(f"pixels must be one of {PIXELS}, got {pixels!r}")
    if data == "imagefolder":
        if root is None:
            raise ValueError("imagefolder is read from a local folder: pass --data-root <folder with train/ and val/>")
        if download:
            raise ValueError("imagefolder cannot be downloaded")
        size = image_size or 224
        return _imagefolder(Path(root), True, size, pixels), _imagefolder(Path(root), False, size, pixels)
    kwargs: dict = {}
    if data == "digits":
        kwargs["seed"] = seed
    elif data == "mnist" and image_size:
        kwargs["image_size"] = image_size
    elif image_size not in (None, 32) and data in ("cifar10", "cifar100"):
        raise ValueError(f"{data} images are 32×32; image_size {image_size} is not supported for it")
    return (build_dataset(data, root, train=True, download=download, **kwargs),
            build_dataset(data, root, train=False, download=download, **kwargs))


def build_loaders(train_set: Dataset, val_set: Dataset, batch_size: int, eval_batch_size: int, *, rank: int,
                  world_size: int, seed: int, workers: int, pin_memory: bool) -> tuple[DataLoader, DataLoader]:
    """Training loader (``batch_size`` per rank, :class:`ResumableDistributedSampler`, seeded samples, drop_last)
    and evaluation loader (:class:`ShardSampler`, ``eval_batch_size`` per rank); uint8 images are collated into
    channels_last batches (:func:`collate`)."""
    sampler = ResumableDistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    common = {"num_workers": workers, "pin_memory": pin_memory, "persistent_workers": workers > 0}
    if workers > 0:
        common["prefetch_factor"] = 4
    train_loader = DataLoader(SeededSamples(train_set), batch_size=batch_size, sampler=sampler, drop_last=True,
                              generator=torch.Generator().manual_seed(seed + rank),
                              collate_fn=getattr(train_set, "collate", collate), **common)
    val_loader = DataLoader(val_set, batch_size=eval_batch_size, sampler=ShardSampler(len(val_set), world_size, rank),
                            generator=torch.Generator().manual_seed(seed),     # never draws global RNG
                            collate_fn=getattr(val_set, "collate", collate), **common)
    return train_loader, val_loader


def default_workers(device: torch.device, local_processes: int) -> int:
    """Loader workers per process when ``--workers`` is not given: on GPUs the CPUs this process may run on
    (``os.sched_getaffinity``) shared by the node's ``local_processes``, less one for the process itself; 0 on the
    CPU (the training process needs the cores)."""
    if torch.device(device).type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, local_processes) - 1)
