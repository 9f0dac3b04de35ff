"""The table of issue 12: units tpp finds on today's networks, refusals, FLOPs reduction at ratio 0.5, exactness.

    python benchmarks/units_table.py [--models resnet50,vit_b_16] [--exact-size 64] [--allow-inexact]

Per torchvision model (random weights): the units of :mod:`tpp.graph` by kind, the refused Conv2d/Linear layers,
the FLOPs reduction by :func:`tpp.count_flops` at 224×224 after pruning every unit at ratio 0.5, and the largest
absolute difference between the pruned and the unpruned model's outputs in float64, eval mode, after the
regularizer's ``zero_pruned()`` (random BatchNorm statistics and affines, random LayerNorm affines and biases; ViT at
224×224, the CNNs at ``--exact-size``). Prints a Markdown table. ``--allow-inexact`` also prunes LayerNorm-coupled
channels (tpp-method.md §12): the error column is then the deviation removal causes, also relative to the largest
output.
"""
from __future__ import annotations

import argparse

import torch
import torchvision
from torch import nn

from tpp import TPPRegularizer, analyze_model, count_flops, prune_model, select_filters

MODELS = ("resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "densenet121",
          "vit_b_16", "swin_t")


@torch.no_grad()
def randomize(model: nn.Module, x: torch.Tensor) -> None:
    """Random BN statistics (one training-mode batch) and affines, LayerNorm affines, biases and well-scaled
    Linear weights (torchvision zero-initializes ViT's head)."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            m.weight.normal_()
            m.bias.normal_()
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
        if isinstance(m, nn.Linear):
            m.weight.normal_(0, m.in_features ** -0.5)
            if m.bias is not None:
                m.bias.normal_()
        if isinstance(m, nn.MultiheadAttention):
            m.in_proj_bias.normal_()
    model.train()(x)
    model.eval()


def row(name: str, exact_size: int, allow_inexact: bool = False) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.zeros(1, 3, 224, 224)
    graph = analyze_model(model, allow_inexact=allow_inexact)
    small = prune_model(model, select_filters(model, 0.5, graph=graph), graph=graph)
    speedup = count_flops(model, x) / count_flops(small, x)
    size = 224 if name.startswith(("vit", "swin")) else exact_size
    inputs = torch.randn(2, 3, size, size, dtype=torch.float64)
    model = model.double()
    randomize(model, inputs)
    reg = TPPRegularizer(model, 0.5, allow_inexact=allow_inexact, example_input=inputs)
    reg.zero_pruned()
    with torch.no_grad():
        output = model(inputs)
        error = (reg.prune()(inputs) - output).abs().max().item()
    units = list(reg.graph.units.values())
    kinds = {kind: sum(u.kind == kind for u in units) for kind in ("layer", "group", "heads")}
    return {"model": name, "layers": len(reg.graph.layers), **kinds, "members": sum(len(u.members) for u in units),
            "refused": len(reg.graph.refusals), "speedup": speedup, "error": error,
            "relative": error / output.abs().max().item(),
            "spacing": reg.schedule.zero_out_interval}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--exact-size", type=int, default=64)
    parser.add_argument("--allow-inexact", action="store_true", help="also prune LayerNorm-coupled channels")
    args = parser.parse_args()
    print("| model | Conv2d/Linear | private layers | groups (members) | heads units | refused | FLOPs ÷ at 0.5 | "
          "max abs error, float64 | zero-out spacing |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        r = row(name, args.exact_size, args.allow_inexact)
        error = f"{r['error']:.1e}" + (f" ({r['relative']:.2g} of max)" if args.allow_inexact else "")
        print(f"| {r['model']} | {r['layers']} | {r['layer']} | {r['group']} ({r['members'] - r['layer'] - r['heads']})"
              f" | {r['heads']} | {r['refused']} | {r['speedup']:.3f}× | {error} | {r['spacing']} |", flush=True)


if __name__ == "__main__":
    main()
