"""What is benchmarked: single layers of the sweep, the paper's layer sets, the training steps, and two suites.

* Sweep: one ``N×D`` weight (``randn/√D``) with the ``⌈ratio·N⌉`` smallest-L1 filters pruned (tpp-method.md §5).
* Layer sets: the paper's settings (tpp-method.md §5, §8), filters chosen by :func:`tpp.select_filters` on the
  seeded initial weights: ResNet50 at its four FLOPs targets, ResNet56 ``*layer*.conv1`` and VGG19 (every
  ``features`` conv but the first) at each of the paper's ratios. Weights are float32, as in training (AMP keeps
  float32 master weights), and keep their conv shape ``[N, C, kh, kw]``.
* Steps: one SGD training step of ResNet50 (ImageNet shapes, GPU only) or ResNet56 (CIFAR shapes).

``quick`` is the CPU subset ``make bench`` runs anywhere in a few minutes; ``full`` is everything (``make bench`` on
a GPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from timing import Policy

from tpp import select_filters
from tpp.models import build_model
from tpp.selection import filter_scores, num_pruned

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SWEEP_N = (64, 128, 256, 512, 1024, 2048)
SWEEP_D = (576, 1152, 2304, 4608)
SWEEP_RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class LayerSet:
    """The layers one paper setting prunes: ``model`` (a :func:`tpp.models.build_model` name), ratio ``spec``,
    ``skip`` patterns, and the one ratio of the setting when it has one (the x axis of the speedup plot)."""

    name: str
    model: str
    spec: str
    skip: tuple[str, ...] = ()
    ratio: float | None = None


RESNET50_SETTINGS = {  # FLOPs speedup -> ratio spec (tpp-method.md §5)
    "1.49x": "*layer[1-3]*conv[1-2]:0.3,*layer4*conv[1-2]:0.14",
    "2.31x": "*layer[1-3]*conv[1-2]:0.6,*layer4*conv[1-2]:0.21",
    "2.56x": "*layer[1-2]*conv[1-2]:0.74,*layer3*conv[1-2]:0.6,*layer4*conv[1-2]:0.21",
    "3.06x": "*layer[1-3]*conv[1-2]:0.68,*layer4*conv[1-2]:0.5",
}
RESNET56_RATIOS = (0.3, 0.5, 0.7, 0.9, 0.95)
VGG19_RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)

LAYER_SETS = {
    **{f"resnet50-{k}": LayerSet(f"resnet50-{k}", "resnet50", spec) for k, spec in RESNET50_SETTINGS.items()},
    **{f"resnet56-{r}": LayerSet(f"resnet56-{r}", "resnet56", f"*layer*.conv1:{r}", ratio=r) for r in RESNET56_RATIOS},
    **{f"vgg19-{r}": LayerSet(f"vgg19-{r}", "vgg19", f"features.*:{r}", ("features.0",), r) for r in VGG19_RATIOS},
}
HEADLINE = "resnet50-2.31x"


@dataclass(frozen=True)
class StepCase:
    """One training step: ``model`` on a batch of ``batch`` random ``image``×``image`` inputs, regularized on
    ``layer_set``'s layers; ``cuda_only`` cases are left out on CPU."""

    model: str
    batch: int
    image: int
    num_classes: int
    layer_set: str
    cuda_only: bool = False


STEP_RESNET50 = StepCase("resnet50", 256, 224, 1000, HEADLINE, cuda_only=True)


@dataclass(frozen=True)
class Suite:
    """A benchmark set: the sweep grid, the modes, the layer sets and the steps, with timing policies per device."""

    name: str
    sweep_n: tuple[int, ...]
    sweep_d: tuple[int, ...]
    sweep_ratios: tuple[float, ...]
    sweep_dtypes: tuple[str, ...]
    modes: tuple[str, ...]
    layer_sets: tuple[str, ...]
    steps: tuple[StepCase, ...]

    def policy(self, device: torch.device, kind: str) -> Policy:
        """Warm-up calls and the measuring budget of one case of ``kind`` ("sweep", "layer_set" or "step")."""
        if device.type == "cuda":
            return {"sweep": Policy(5, 0.05, 10, 50), "layer_set": Policy(5, 0.1, 10, 100),
                    "step": Policy(5, 3.0, 10, 30)}[kind]
        return {"sweep": Policy(2, 0.3, 5, 20), "layer_set": Policy(2, 0.5, 5, 20), "step": Policy(2, 5.0, 5, 12)}[kind]


SUITES = {
    "quick": Suite("quick", (256, 1024), (1152,), SWEEP_RATIOS, ("fp32",), ("fwd", "fwd+bwd", "in-place"),
                   (HEADLINE, *(f"resnet56-{r}" for r in RESNET56_RATIOS)),
                   (STEP_RESNET50, StepCase("resnet56", 32, 32, 10, "resnet56-0.9"))),
    "full": Suite("full", SWEEP_N, SWEEP_D, SWEEP_RATIOS, tuple(DTYPES), ("fwd", "fwd+bwd", "in-place"),
                  tuple(LAYER_SETS), (STEP_RESNET50, StepCase("resnet56", 128, 32, 10, "resnet56-0.9"))),
}


@lru_cache(maxsize=None)
def sweep_layer(n: int, d: int, ratio: float, dtype: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded ``N×D`` weight (``randn/√D``, a leaf that requires grad) and the sorted indices of its
    ``⌈ratio·N⌉`` smallest-L1 filters, on ``device``."""
    gen = torch.Generator().manual_seed(n * 100_003 + d)
    w = (torch.randn(n, d, generator=gen) / d**0.5).to(DTYPES[dtype])
    order = torch.sort(filter_scores(w), stable=True).indices
    pruned = order[: num_pruned(ratio, n)].sort().values
    return w.to(device).requires_grad_(True), pruned.to(device)


@lru_cache(maxsize=None)
def layer_set(name: str, device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Float32 weights (leaves, require grad) and pruned indices of every layer ``LAYER_SETS[name]`` prunes."""
    spec = LAYER_SETS[name]
    torch.manual_seed(0)
    model = build_model(spec.model)
    pruned = {k: v for k, v in select_filters(model, spec.spec, spec.skip).items() if v.numel()}
    weights = [model.get_submodule(k).weight.detach().to(device).requires_grad_(True) for k in pruned]
    return weights, [v.to(device) for v in pruned.values()]
