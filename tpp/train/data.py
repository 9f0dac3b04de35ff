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
exactly :mod:`tpp.data`'s; the small datasets come from :func:`tpp.data.build_dataset`.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..data import IMAGENET_STATS, build_dataset, num_classes_of

__all__ = ["sample_seed", "SeededSamples", "ResumableDistributedSampler", "ShardSampler", "build_datasets",
           "num_classes_of", "build_loaders"]

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


def _imagefolder(root: Path, train: bool, image_size: int) -> Dataset:
    from torchvision import datasets
    from torchvision import transforms as T

    layout = "expected root/train/<class>/<image> and root/val/<class>/<image> (the ImageNet layout)"
    split = root / ("train" if train else "val")
    if not split.is_dir():
        raise FileNotFoundError(f"imagefolder split folder {split} does not exist; {layout}")
    if train:
        steps = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size)]
    return datasets.ImageFolder(str(split), transform=T.Compose(steps + [T.ToTensor(), T.Normalize(*IMAGENET_STATS)]))


def build_datasets(data: str, root: Optional[str], image_size: Optional[int] = None, download: bool = False,
                   seed: int = 0) -> tuple[Dataset, Dataset]:
    """``(train, val)`` of ``data``; imagefolder at ``image_size`` (default 224)."""
    if data == "imagefolder":
        if root is None:
            raise ValueError("imagefolder is read from a local folder: pass --data-root <folder with train/ and val/>")
        if download:
            raise ValueError("imagefolder cannot be downloaded")
        size = image_size or 224
        return _imagefolder(Path(root), True, size), _imagefolder(Path(root), False, size)
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
    and evaluation loader (:class:`ShardSampler`, ``eval_batch_size`` per rank)."""
    sampler = ResumableDistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    common = {"num_workers": workers, "pin_memory": pin_memory, "persistent_workers": workers > 0}
    if workers > 0:
        common["prefetch_factor"] = 4
    train_loader = DataLoader(SeededSamples(train_set), batch_size=batch_size, sampler=sampler, drop_last=True,
                              generator=torch.Generator().manual_seed(seed + rank), **common)
    val_loader = DataLoader(val_set, batch_size=eval_batch_size, sampler=ShardSampler(len(val_set), world_size, rank),
                            generator=torch.Generator().manual_seed(seed), **common)   # never draws global RNG
    return train_loader, val_loader
