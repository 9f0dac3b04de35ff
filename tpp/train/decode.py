"""JPEG decoding on the GPU (``--decode gpu``): loader workers only read the file bytes and draw the crop; the device
decodes, crops, resizes and flips.

* Worker side, :class:`EncodedCrops` (the training dataset's transform): the JPEG bytes with the RandomResizedCrop
  box and the flip drawn by the same RNG calls as the CPU transform on the image size read from the JPEG header, so
  a sample seed gives the same crop and flip on either path (the resampled pixels differ by rounding: nvJPEG and an
  antialiased bilinear resize on tensors instead of libjpeg and PIL).
* :func:`collate` gathers those into :class:`EncodedImages`; :meth:`EncodedImages.decode` gives the uint8
  ``[N, 3, size, size]`` channels_last batch on the device (``torchvision.io.decode_jpeg(device=...)``, batched).
* :func:`resolve_decode`: ``"gpu"`` when a trial decode on the run's device works, else ``"cpu"`` with the reason
  logged. Evaluation images are always decoded on the CPU (4% of a run's images).
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["EncodedCrops", "EncodedImages", "collate", "resolve_decode", "DECODERS"]

DECODERS = ("cpu", "gpu")
log = logging.getLogger(__name__)


class EncodedCrops:
    """Dataset transform: JPEG ``bytes`` → ``(bytes as a uint8 tensor, [top, left, height, width, flip], size)`` with the
    crop of ``RandomResizedCrop(size)`` and the flip of ``RandomHorizontalFlip()`` drawn as they draw them."""

    def __init__(self, size: int):
        from torchvision import transforms as T

        self.size, self.crop = size, T.RandomResizedCrop(size)

    def __call__(self, data: bytes) -> tuple[Tensor, Tensor, int]:
        from PIL import Image

        header = Image.open(io.BytesIO(data))           # reads the header only: size, mode
        top, left, height, width = self.crop.get_params(header, self.crop.scale, self.crop.ratio)
        flip = int(torch.rand(1) < 0.5)
        box = torch.tensor([top, left, height, width, flip])
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), box, self.size


@dataclass
class EncodedImages:
    """A batch of JPEG files with their crop boxes (``[N, 5]``: top, left, height, width, flip) and output size."""

    data: list[Tensor]
    boxes: Tensor
    size: int

    def __len__(self) -> int:
        return len(self.data)

    def decode(self, device: torch.device) -> Tensor:
        """The uint8 ``[N, 3, size, size]`` channels_last batch on ``device``."""
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import functional as F

        images = decode_jpeg(self.data, mode=ImageReadMode.RGB, device=device)
        out = torch.empty((len(images), self.size, self.size, 3), dtype=torch.uint8, device=device)
        out = out.permute(0, 3, 1, 2)
        for i, (image, (top, left, height, width, flip)) in enumerate(zip(images, self.boxes.tolist())):
            image = F.resized_crop(image, top, left, height, width, [self.size, self.size], antialias=True)
            out[i] = F.horizontal_flip(image) if flip else image
        return out


def collate(samples: list) -> list:
    """``[EncodedImages, labels]`` of ``((data, box, size), label)`` samples."""
    size = samples[0][0][2]
    boxes = torch.stack([s[0][1] for s in samples])
    return [EncodedImages([s[0][0] for s in samples], boxes, size), torch.tensor([s[1] for s in samples])]


def resolve_decode(requested: str, device: torch.device) -> str:
    """``requested`` (one of :data:`DECODERS`) if it can run on ``device``, else ``"cpu"`` (the reason logged)."""
    if requested not in DECODERS:
        raise ValueError(f"decode must be one of {DECODERS}, got {requested!r}")
    if requested == "cpu":
        return "cpu"
    reason = _gpu_decode_problem(device)
    if reason is None:
        return "gpu"
    log.warning("--decode gpu is not available (%s): decoding JPEGs on the CPU", reason)
    return "cpu"


def _gpu_decode_problem(device: torch.device):
    """Why JPEGs cannot be decoded on ``device`` (None: they can)."""
    if device.type != "cuda":
        return f"the run's device is {device}, not a CUDA GPU"
    try:
        from PIL import Image
        from torchvision.io import decode_jpeg

        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
        decode_jpeg(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8), device=device)
    except (ImportError, RuntimeError, TypeError) as err:
        return f"torchvision.io.decode_jpeg on {device} failed: {err}"
    return None
