"""Recipes: every setting of a run — the generic ``cifar``/``imagenet``/``demo`` defaults of ``tpp prune`` and the
paper's named settings of ``tpp train`` — as ONE frozen type, :class:`Recipe`, with the paper's expected results
beside the named ones.

Hyper-parameters (tpp-method.md §4, §10; the reference code's scripts):

* pruning phase — SGD lr 1e-3 (constant), momentum 0.9, weight decay on every parameter; strength Δ = 1e-4 every
  K_u iterations up to 1 (K_u = 10 on CIFAR, 5 on ImageNet), then 10k (CIFAR) / 40k (ImageNet) stabilize iterations
  with the layer-wise zero-out 100 iterations apart; c = 1000, gram term averaged over N², weight-L2 and BN terms on.
* finetuning — SGD lr 1e-2 with step decay ×0.1: CIFAR at epochs 60, 90 of 120 (wd 5e-4; batch 128 ResNet56, 256
  VGG19); ImageNet at 30, 60, 75 of 90 (wd 1e-4, batch 256, the standard ImageNet augmentation).
* ImageNet base models are torchvision's ``IMAGENET1K_V1`` weights (ResNet34 73.31%, ResNet50 76.13% top-1 — the
  bases of the paper's Table 3; torchvision's newer ``DEFAULT`` weights are another base). CIFAR base models are
  your own (``--weights path.pt``): the paper's were trained to 93.78% (ResNet56) and 74.02% (VGG19).

A generic recipe (``cifar``, ``imagenet``, ``demo``) leaves ``model``/``data``/``ratio`` empty: the command line gives
them. Batch sizes are global: with ``torchrun --nproc_per_node 8`` each process takes 1/8 of it. ``expected`` holds
the paper's numbers for a named setting (Tables 1–3); `tpp train` reports its result beside them.

Pure Python (no torch import): ``tpp prune --help`` shows the recipes' values without loading the library.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping, Optional

from .schedule import GrowingSchedule

__all__ = ["Recipe", "RECIPES", "get_recipe", "list_recipes", "recipe_from_dict", "default_recipe",
           "RESNET50_SETTINGS"]


@dataclass(frozen=True)
class Recipe:
    """One run's settings. Every field can be overridden from the command line (``tpp prune``/``tpp train``) or a
    ``--config`` JSON file; :meth:`complete` tells whether it names what to prune."""

    name: str
    model: str = ""                              # "" : given on the command line
    data: str = ""
    ratio: Any = None                            # float or "pattern:ratio,..." (tpp.selection)
    skip: tuple[str, ...] = ()
    method: str = "tpp"
    weights: str = ""                            # "torchvision:<WEIGHTS_ENUM>", a path, or "" (must be given)
    image_size: Optional[int] = None             # None: the dataset's own (224 for imagefolder)
    schedule: GrowingSchedule = field(default_factory=GrowingSchedule)
    reg_lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128                        # global, over all processes
    eval_batch_size: int = 256                   # global
    finetune_epochs: int = 120
    finetune_lr: float = 1e-2
    lr_schedule: str = "step"
    lr_milestones: tuple[int, ...] = (60, 90)
    lr_gamma: float = 0.1
    label_smoothing: float = 0.0
    pretrain_epochs: int = 0                     # `tpp prune` without --weights trains the model here first
    pretrain_lr: float = 0.1
    pretrain_milestones: tuple[int, ...] = ()
    expected: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def complete(self) -> bool:
        """Whether the recipe names a model, a dataset and a ratio (a paper setting), or only hyper-parameters."""
        return bool(self.model and self.data and self.ratio is not None)

    def run_kwargs(self) -> dict:
        """The keyword arguments of :func:`tpp.pipeline.run_pruning` this recipe sets."""
        return {"schedule": self.schedule, "reg_lr": self.reg_lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "finetune_epochs": self.finetune_epochs,
                "finetune_lr": self.finetune_lr, "lr_milestones": self.lr_milestones, "lr_gamma": self.lr_gamma,
                "lr_schedule": self.lr_schedule}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = self.schedule.state_dict()
        for key in ("skip", "lr_milestones", "pretrain_milestones"):
            d[key] = list(getattr(self, key))
        d["expected"] = dict(self.expected)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def recipe_from_dict(d: Mapping[str, Any], base: Optional[Recipe] = None) -> Recipe:
    """A recipe from a (JSON) mapping; with ``base``, only the given keys change. Unknown keys raise ValueError."""
    known = {f.name for f in fields(Recipe)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown recipe keys {unknown}; known: {sorted(known)}")
    values = dict(d)
    if "schedule" in values and not isinstance(values["schedule"], GrowingSchedule):
        start = base.schedule.state_dict() if base is not None else {}
        values["schedule"] = GrowingSchedule(**{**start, **values["schedule"]})
    for key in ("skip", "lr_milestones", "pretrain_milestones"):
        if key in values:
            v = values[key]
            values[key] = tuple(s.strip() for s in v.split(",") if s.strip()) if isinstance(v, str) else tuple(v)
    if base is not None:
        return replace(base, **values)
    if "name" not in values:
        raise ValueError("a recipe needs ['name']")
    return Recipe(**values)


# ----------------------------------------------------------------------------------------- generic settings
GENERIC = (
    Recipe(
        "cifar", schedule=GrowingSchedule(), weight_decay=5e-4, batch_size=128, finetune_epochs=120,
        lr_milestones=(60, 90), pretrain_lr=0.1, pretrain_milestones=(80, 120),
        description="paper, ResNet56/VGG19 on CIFAR: Δ=1e-4 every 10 iterations to 1, 10k stabilize iterations, "
                    "SGD lr 1e-3 momentum 0.9 wd 5e-4 bs 128 (VGG19: 256); finetune lr 1e-2 ×0.1 at 60, 90, 120 "
                    "epochs"),
    Recipe(
        "imagenet", schedule=GrowingSchedule.imagenet(), weight_decay=1e-4, batch_size=256, finetune_epochs=90,
        lr_milestones=(30, 60, 75), pretrain_lr=0.1, pretrain_milestones=(30, 60),
        description="paper, ResNet34/50 on ImageNet: Δ=1e-4 every 5 iterations to 1, 40k stabilize iterations, "
                    "SGD lr 1e-3 momentum 0.9 wd 1e-4 bs 256; finetune lr 1e-2 ×0.1 at 30, 60, 75, 90 epochs"),
    Recipe(
        "demo", schedule=GrowingSchedule(delta=0.0025, interval=1, ceiling=1.0, stabilize_iters=200,
                                         zero_out_interval=20),
        reg_lr=1e-2, weight_decay=5e-4, batch_size=64, finetune_epochs=10, finetune_lr=1e-2, lr_milestones=(5, 8),
        pretrain_epochs=30, pretrain_lr=0.05, pretrain_milestones=(20,),
        description="scaled down for the 8×8 digits on a CPU: Δ=0.0025 every iteration to 1 (400 iterations), "
                    "200 stabilize iterations (layers zeroed 20 apart), pruning-phase SGD lr 1e-2 (10× the paper, "
                    "for ~180× fewer iterations) momentum 0.9 wd 5e-4 bs 64; finetune 10 epochs lr 1e-2 ×0.1 at "
                    "5, 8; pretraining 30 epochs lr 0.05 ×0.1 at 20"),
)


# ------------------------------------------------------------------------------------------ paper settings
CIFAR_SCHEDULE = GrowingSchedule()                       # Δ 1e-4 / 10 its, 10k stabilize: 110k iterations
IMAGENET_SCHEDULE = GrowingSchedule.imagenet()           # Δ 1e-4 / 5 its, 40k stabilize: 90k iterations

# FLOPs speedup → layer ratios (tpp-method.md §5; the paper's Table 3)
RESNET50_SETTINGS = {
    "1.49x": ("*layer[1-3]*conv[1-2]:0.3,*layer4*conv[1-2]:0.14", 76.44),
    "2.31x": ("*layer[1-3]*conv[1-2]:0.6,*layer4*conv[1-2]:0.21", 75.60),
    "2.56x": ("*layer[1-2]*conv[1-2]:0.74,*layer3*conv[1-2]:0.6,*layer4*conv[1-2]:0.21", 75.12),
    "3.06x": ("*layer[1-3]*conv[1-2]:0.68,*layer4*conv[1-2]:0.5", 74.51),
}
# ResNet34 1.32× ("pruned-B" layer set of Li et al., as run by the authors' GReg/TPP code: the first conv of every
# block in layer1-3 at 0.5/0.6/0.4, the most sensitive blocks skipped)
RESNET34_RATIO = "*layer1.*.conv1:0.5,*layer2.*.conv1:0.6,*layer3.*.conv1:0.4"
RESNET34_SKIP = ("*layer1.0.conv1", "*layer2.0.conv1", "*layer2.3.conv1", "*layer3.0.conv1", "*layer3.5.conv1")

# paper Table 1 (ResNet56/CIFAR10, base 93.78) and Table 2 (VGG19/CIFAR100, base 74.02), finetuning lr 1e-2
RESNET56 = {0.3: (93.81, 1.45, 31.14), 0.5: (93.46, 1.99, 49.82), 0.7: (92.35, 3.59, 70.57),
            0.9: (89.63, 11.41, 90.39), 0.95: (85.86, 19.31, 95.19)}
RESNET56_L1 = {0.3: 93.79, 0.5: 93.51, 0.7: 92.26, 0.9: 86.75, 0.95: 83.03}
VGG19 = {0.1: (74.02, 1.23, 19.24), 0.3: (73.19, 1.97, 51.01), 0.5: (71.61, 3.60, 74.87),
         0.7: (67.78, 8.84, 90.98), 0.9: (57.70, 44.22, 98.96)}
VGG19_L1 = {0.1: 74.01, 0.3: 73.01, 0.5: 71.49, 0.7: 66.05, 0.9: 51.36}


def _cifar(name: str, model: str, data: str, ratio: str, skip: tuple[str, ...], batch_size: int, table: str,
           base_top1: float, scores: tuple, l1_top1: float, description: str) -> Recipe:
    top1, speedup, sparsity = scores
    return Recipe(name, model, data, ratio, skip=skip, schedule=CIFAR_SCHEDULE, weight_decay=5e-4,
                  batch_size=batch_size, finetune_epochs=120, lr_milestones=(60, 90),
                  expected={"source": f"paper {table} (TPP, finetuning lr 1e-2, mean of 3 runs)",
                            "base_top1": base_top1, "top1": top1, "l1_top1": l1_top1, "flops_speedup": speedup,
                            "param_sparsity_pct": sparsity},
                  description=description)


def _cifar_recipes() -> list[Recipe]:
    return [*(_cifar(f"resnet56-cifar10-{r}", "resnet56", "cifar10", f"*layer*.conv1:{r}", (), 128, "Table 1",
                     93.78, scores, RESNET56_L1[r], f"ResNet56 on CIFAR-10, first conv of every block pruned at {r}")
              for r, scores in RESNET56.items()),
            *(_cifar(f"vgg19-cifar100-{r}", "vgg19", "cifar100", f"features.*:{r}", ("features.0",), 256, "Table 2",
                     74.02, scores, VGG19_L1[r], f"VGG19 on CIFAR-100, every conv but the first pruned at {r}")
              for r, scores in VGG19.items())]


def _imagenet(name: str, model: str, ratio: str, skip: tuple[str, ...], expected: dict, description: str):
    return Recipe(
        name, model, "imagefolder", ratio, skip=skip, weights="torchvision:IMAGENET1K_V1", image_size=224,
        schedule=IMAGENET_SCHEDULE, weight_decay=1e-4, batch_size=256, eval_batch_size=512, finetune_epochs=90,
        lr_milestones=(30, 60, 75), expected=expected, description=description)


def _imagenet_recipes() -> list[Recipe]:
    out = [_imagenet("resnet34-imagenet-1.32x", "resnet34", RESNET34_RATIO, RESNET34_SKIP,
                     {"source": "paper Table 3 (TPP)", "base_top1": 73.31, "top1": 73.77, "flops_speedup": 1.32},
                     "ResNet34 on ImageNet at 1.32× fewer FLOPs (first conv of the blocks of layer1-3)")]
    for speedup, (ratio, top1) in RESNET50_SETTINGS.items():
        out.append(_imagenet(f"resnet50-imagenet-{speedup}", "resnet50", ratio, (),
                             {"source": "paper Table 3 (TPP)", "base_top1": 76.13, "top1": top1,
                              "flops_speedup": float(speedup[:-1])},
                             f"ResNet50 on ImageNet at {speedup[:-1]}× fewer FLOPs (conv1/conv2 of every bottleneck)"))
    return out


SMOKE = Recipe(
    "smoke", "resnet20", "imagefolder", "*layer*.conv1:0.5", image_size=32,
    schedule=GrowingSchedule(delta=0.25, interval=1, stabilize_iters=24, zero_out_interval=1),
    reg_lr=1e-2, batch_size=16, eval_batch_size=32, finetune_epochs=2, lr_milestones=(1,),
    description="a minutes-long check of a setup on any small ImageFolder: ResNet20 at 32×32, 28 regularization "
                "iterations, 2 finetuning epochs (not a result)")

RECIPES: dict[str, Recipe] = {r.name: r for r in (*GENERIC, *_cifar_recipes(), *_imagenet_recipes(), SMOKE)}


def list_recipes() -> list[str]:
    return list(RECIPES)


def get_recipe(name: str) -> Recipe:
    """``RECIPES[name]``; ``ValueError`` listing the names otherwise."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; allowed: {', '.join(RECIPES)} (or --config file.json)")
    return RECIPES[name]


def default_recipe(dataset: str, model: str = "") -> Recipe:
    """The generic recipe a dataset's runs default to: digits → demo, imagefolder → imagenet, the rest → cifar
    (batch 256 for VGG19, as in the paper)."""
    if dataset == "digits":
        return RECIPES["demo"]
    if dataset == "imagefolder":
        return RECIPES["imagenet"]
    recipe = RECIPES["cifar"]
    return replace(recipe, batch_size=256) if model == "vgg19" else recipe
