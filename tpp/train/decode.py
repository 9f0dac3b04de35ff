"""Decoding and cropping training JPEGs as tensors (``--decode cpu-tensor`` in the loader workers, ``--decode gpu`` on
the device) instead of with PIL (``--decode cpu``, the default: exactly the old pixels).

* The crop and flip are drawn by :class:`CropDraw` with the RNG calls of ``RandomResizedCrop`` +
  ``RandomHorizontalFlip`` on the image size read from the file header, so a sample seed gives the same crop and flip
  on every path. The pixels differ from PIL's by resampling rounding only: the JPEG decode is libjpeg's (CPU,
  bitwise PIL's) or nvJPEG's (GPU), and the antialiased bilinear resize of uint8 tensors rounds its two passes apart
  from PIL's (at most 1 level per pass, so ≤ 2 levels).
* ``cpu-tensor``: :class:`TensorCrops` decodes (``torchvision.io.decode_jpeg``) and crops in the worker: faster than
  PIL on the CPU.
* ``gpu``: :class:`EncodedCrops` only reads the file and draws the crop in the worker; :func:`collate` gathers the
  files into :class:`EncodedImages`, whose :meth:`~EncodedImages.decode` gives the uint8 ``[N, 3, size, size]``
  channels_last batch on the device (``decode_jpeg(device=...)``, batched). Files nvJPEG would not take (not JPEG,
  or CMYK) are decoded by PIL in the worker and shipped as pixels.
* :func:`resolve_decode`: the requested decoder if it can run, else ``"cpu"`` with the reason logged. Evaluation
  images are always decoded with PIL (4% of a run's images).
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = ["CropDraw", "TensorCrops", "EncodedCrops", "EncodedImages", "collate", "resolve_decode", "DECODERS",
           "PIXELS_OF"]

DECODERS = ("cpu", "cpu-tensor", "gpu")
PIXELS_OF = {"cpu": "uint8", "cpu-tensor": "tensor", "gpu": "jpeg"}    # build_datasets(pixels=) of each decoder
log = logging.getLogger(__name__)


class CropDraw:
    """``RandomResizedCrop(size)``'s box and ``RandomHorizontalFlip()``'s coin, drawn as they draw them, from the
    header of an encoded image: ``(PIL image opened lazily, [top, left, height, width, flip])``."""

    def __init__(self, size: int):
        from torchvision import transforms as T

        self.size, self.crop = size, T.RandomResizedCrop(size)

    def __call__(self, data: bytes):
        from PIL import Image

        header = Image.open(io.BytesIO(data))           # reads the header only: size, mode
        top, left, height, width = self.crop.get_params(header, self.crop.scale, self.crop.ratio)
        flip = int(torch.rand(1) < 0.5)
        return header, torch.tensor([top, left, height, width, flip])


def resized_crop(image: Tensor, box, size: int) -> Tensor:
    """``image`` (uint8 ``[3, H, W]``, any device) cropped to ``box`` (top, left, height, width, flip), resized to
    ``size``² (bilinear, antialiased) and flipped when ``box[4]``."""
    from torchvision.transforms.v2 import functional as F

    top, left, height, width, flip = (int(v) for v in box)
    image = F.resized_crop(image, top, left, height, width, [size, size], antialias=True)
    return F.horizontal_flip(image) if flip else image


def _nvjpeg_takes(header) -> bool:
    """Whether the file is one ``decode_jpeg`` gets (the others are decoded by PIL on every path, alike)."""
    return header.format == "JPEG" and header.mode in ("RGB", "L")


def _pil_pixels(header) -> Tensor:
    """The RGB pixels of a lazily opened PIL image as a uint8 ``[3, H, W]`` view of HWC storage."""
    from .data import pil_to_uint8

    return pil_to_uint8(header.convert("RGB"))


class TensorCrops:
    """Dataset transform of ``--decode cpu-tensor``: file ``bytes`` → the uint8 ``[3, size, size]`` crop."""

    def __init__(self, size: int):
        self.draw = CropDraw(size)

    def __call__(self, data: bytes) -> Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        header, box = self.draw(data)
        if _nvjpeg_takes(header):
            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        else:
            image = _pil_pixels(header)
        return resized_crop(image, box, self.draw.size)


class EncodedCrops:
    """Dataset transform of ``--decode gpu``: file ``bytes`` → ``(payload, [top, left, height, width, flip], size)``;
    the payload is the file as a 1-D uint8 tensor, or the decoded ``[3, H, W]`` pixels of a file nvJPEG would not
    take."""

    def __init__(self, size: int):
        self.draw = CropDraw(size)

    def __call__(self, data: bytes) -> tuple[Tensor, Tensor, int]:
        header, box = self.draw(data)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if _nvjpeg_takes(header) else _pil_pixels(header)
        return payload, box, self.draw.size


@dataclass
class EncodedImages:
    """A batch of files with their crop boxes (``boxes``: ``[N, 5]`` top, left, height, width, flip) and the output
    size. ``payload`` holds the files one after the other (one storage: one shared-memory segment per batch between
    processes, however many images); ``shapes[i]`` is ``(length, 0, 0)`` for a JPEG file, ``(3, H, W)`` for decoded
    pixels (stored HWC)."""

    payload: Tensor
    shapes: Tensor
    boxes: Tensor
    size: int

    def __len__(self) -> int:
        return len(self.shapes)

    def pin_memory(self) -> "EncodedImages":
        """Called by a DataLoader with ``pin_memory=True``: the payload in page-locked memory."""
        return replace(self, payload=self.payload.pin_memory())

    def items(self) -> list[Tensor]:
        """Each file as a 1-D uint8 tensor, or its pixels as ``[3, H, W]`` (views of ``payload``)."""
        out, start = [], 0
        for a, h, w in self.shapes.tolist():
            length = a if h == 0 else a * h * w
            item = self.payload[start:start + length]
            out.append(item if h == 0 else item.view(h, w, a).permute(2, 0, 1))
            start += length
        return out

    def decode(self, device: torch.device) -> Tensor:
        """The uint8 ``[N, 3, size, size]`` channels_last batch on ``device``."""
        from torchvision.io import ImageReadMode, decode_jpeg

        images = self.items()
        encoded = [i for i, item in enumerate(images) if item.dim() == 1]
        images = [item.to(device, non_blocking=True) if item.dim() == 3 else item for item in images]
        if encoded:
            decoded = decode_jpeg([images[i] for i in encoded], mode=ImageReadMode.RGB, device=device)
            for i, image in zip(encoded, decoded):
                images[i] = image
        out = torch.empty((len(images), self.size, self.size, 3), dtype=torch.uint8, device=device)
        out = out.permute(0, 3, 1, 2)
        for i, (image, box) in enumerate(zip(images, self.boxes.tolist())):
            out[i] = resized_crop(image, box, self.size)
        return out


def collate(samples: list) -> list:
    """``[EncodedImages, labels]`` of ``((payload, box, size), label)`` samples."""
    payloads = [s[0][0] for s in samples]
    shapes = torch.tensor([[len(p), 0, 0] if p.dim() == 1 else list(p.shape) for p in payloads])
    flat = torch.cat([p if p.dim() == 1 else p.permute(1, 2, 0).reshape(-1) for p in payloads])
    boxes = torch.stack([s[0][1] for s in samples])
    return [EncodedImages(flat, shapes, boxes, samples[0][0][2]), torch.tensor([s[1] for s in samples])]


def resolve_decode(requested: str, device: torch.device) -> str:
    """``requested`` (one of :data:`DECODERS`) if it can run on ``device``, else ``"cpu"`` (the reason logged)."""
    if requested not in DECODERS:
        raise ValueError(f"decode must be one of {DECODERS}, got {requested!r}")
    if requested == "cpu":
        return "cpu"
    device = torch.device(device) if requested == "gpu" else torch.device("cpu")
    if requested == "gpu" and device.type != "cuda":
        reason = f"the run's device is {device}, not a CUDA GPU"
    else:
        reason = _decode_problem(device)
    if reason is None:
        return requested
    log.warning("--decode %s is not available (%s): decoding JPEGs with PIL on the CPU", requested, reason)
    return "cpu"


def _decode_problem(device: torch.device):
    """Why a JPEG cannot be decoded by ``torchvision.io.decode_jpeg`` on ``device`` (None: it can)."""
    try:
        from PIL import Image
        from torchvision.io import decode_jpeg

        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
        decode_jpeg(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8), device=device)
    except (ImportError, RuntimeError, TypeError) as err:
        return f"torchvision.io.decode_jpeg on {device} failed: {err}"
    return None
