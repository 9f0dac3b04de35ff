"""The paper's models and a registry that also names torchvision classifiers.

``build_model(name)`` knows:

* tpp's own models: ``resnet20/32/44/56/110`` (CIFAR, option-A shortcuts), ``vgg19`` (VGG19_C), ``mlp7``
  (MLP-7-Linear) and, for the 8×8 digits, ``digits_cnn``, ``digits_resnet`` (residual groups) and ``digits_vit``
  (attention heads);
* torchvision classifiers as ``"torchvision:<name>"`` (any name in ``torchvision.models.list_models``), and the
  ones the paper and tests use by their plain name: resnet18, resnet34, resnet50, vgg11_bn, mobilenet_v2;
* timm models as ``"timm:<name>"`` (the optional extra ``pip install "tpp[timm]"``), randomly initialised offline.

``pretrained`` is ``False``, a path to a local state_dict (loaded with ``torch.load(weights_only=True)``), or
``True`` for torchvision's or timm's published weights (downloaded by them; tpp's models have none).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from .digits import DigitsResNet, DigitsViT, digits_resnet, digits_vit
from .mlp import MLP, mlp7
from .resnet_cifar import BasicBlock, PadShortcut, ResNetCifar, resnet20, resnet32, resnet44, resnet56, resnet110
from .vgg_cifar import VGGCifar, digits_cnn, vgg19

__all__ = [
    "build_model",
    "list_models",
    "input_shape",
    "MLP",
    "ResNetCifar",
    "BasicBlock",
    "PadShortcut",
    "VGGCifar",
    "mlp7",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "vgg19",
    "digits_cnn",
    "DigitsResNet",
    "DigitsViT",
    "digits_resnet",
    "digits_vit",
    "TORCHVISION_ALIASES",
]

_TPP_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "vgg19": vgg19,
    "mlp7": mlp7,
    "digits_cnn": digits_cnn,
    "digits_resnet": digits_resnet,
    "digits_vit": digits_vit,
}
_TORCHVISION_ALIASES = ("resnet18", "resnet34", "resnet50", "vgg11_bn", "mobilenet_v2")
TORCHVISION_ALIASES = _TORCHVISION_ALIASES  # public: torchvision classifiers build_model knows by their plain name
_TORCHVISION_PREFIX = "torchvision:"
_TIMM_PREFIX = "timm:"

Pretrained = Union[bool, str, os.PathLike]


def input_shape(name: str) -> tuple[int, ...]:
    """The shape of one input ``name`` is built for: the embedded 8×8 digits, 32×32 CIFAR images for the paper's
    CIFAR models and MLP-7-Linear's 32×32 MNIST, 3×224×224 for torchvision and timm models."""
    if name.startswith("digits_"):
        return (1, 8, 8)
    if name == "mlp7":
        return (1, 32, 32)
    if name in _TPP_MODELS:
        return (3, 32, 32)
    return (3, 224, 224)


def list_models() -> list[str]:
    """Names ``build_model`` accepts directly (plus ``"torchvision:<name>"`` and ``"timm:<name>"``)."""
    return sorted(_TPP_MODELS) + sorted(_TORCHVISION_ALIASES)


def build_model(name: str, num_classes: Optional[int] = None, pretrained: Pretrained = False, **kwargs) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs (``None``: the model's default) and optional weights.

    ``kwargs`` go to the model's constructor (e.g. ``in_features``/``width``/``depth`` for ``mlp7``).
    Raises ``ValueError`` for an unknown name or weights that do not fit, ``FileNotFoundError`` for a missing
    weights file.
    """
    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise TypeError(f"pretrained must be a bool or a path to a state_dict, got {type(pretrained).__name__}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if name in _TPP_MODELS:
        if pretrained is True:
            raise ValueError(
                f"tpp ships no weights for {name!r}; pass pretrained='path/to/state_dict.pt' to load your own"
            )
        model = _TPP_MODELS[name](**kwargs)
    elif name in _TORCHVISION_ALIASES or name.startswith(_TORCHVISION_PREFIX):
        model = _build_torchvision(name.removeprefix(_TORCHVISION_PREFIX), pretrained is True, kwargs)
    elif name.startswith(_TIMM_PREFIX):
        model = _build_timm(name.removeprefix(_TIMM_PREFIX), pretrained is True, kwargs)
    else:
        raise ValueError(
            f"unknown model {name!r}; available: {', '.join(list_models())}, "
            f"or '{_TORCHVISION_PREFIX}<name>' for any torchvision classifier, '{_TIMM_PREFIX}<name>' for timm's"
        )
    if not isinstance(pretrained, bool):
        _load_state_dict(model, Path(pretrained), name)
    return model


def _build_torchvision(name: str, download_weights: bool, kwargs: dict) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(f"unknown torchvision classifier {name!r}; available: {', '.join(available)}")
    return torchvision.models.get_model(name, weights="DEFAULT" if download_weights else None, **kwargs)


def _build_timm(name: str, download_weights: bool, kwargs: dict) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ImportError(f"model 'timm:{name}' needs timm: pip install \"tpp[timm]\" (or pip install timm)") from None
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models()")
    return timm.create_model(name, pretrained=download_weights, **kwargs)


def _load_state_dict(model: nn.Module, path: Path, name: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights for {name!r} not found: {path} (expected a state_dict file)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state_dict (a dict of tensors)")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"weights in {path} do not fit model {name!r}: {err}") from err
