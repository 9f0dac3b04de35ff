"""Byte-traffic model of the plan's tiles against the roofline floor, without a GPU.

    python benchmarks/traffic.py [--set resnet50-2.31x]

For every program of a :class:`tpp_kernels.plan.PenaltyPlan` built with the GPU launch configurations, the bytes
it reads and writes in global memory (operand tiles re-read by other programs counted again; index and metadata
tables left out), summed per launch, against the floor — every input read once, every output written once:

* forward with the loss (``penalty()``): read every gram tensor and the squares' pruned entries, write R;
* in-place path (``apply_gradients()``: forward without the loss, then the backward adding into ``.grad``): the
  forward's floor (read W, write R) plus read W and R, read and write every gradient entry the penalty touches.

Also the balance: the longest program's bytes over the mean (``max/mean``) of each launch.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torchvision  # noqa: E402

from tpp import GrowingSchedule, TPPRegularizer  # noqa: E402
from tpp_kernels import kernels  # noqa: E402
from tpp_kernels import plan as plan_module  # noqa: E402

SETS = {"resnet50-2.31x": ("resnet50", "*layer[1-3]*conv[1-2]:0.6,*layer4*conv[1-2]:0.21"),
        "resnet50-3.06x": ("resnet50", "*layer[1-3]*conv[1-2]:0.68,*layer4*conv[1-2]:0.5")}


def program_bytes(launch, tiles, cfg, accumulate: bool) -> list[int]:
    """Bytes each program of ``tiles`` reads plus writes (forward and backward tile kinds)."""
    out = []
    for kind, i, a0, b, d0 in tiles.tolist():
        if kind in (kernels.R_TILE, kernels.PRUNED_ROWS, kernels.KEPT_ROWS, kernels.GRAM_SQUARES):
            rows = launch.grams[i]
        else:
            rows = launch.squares[i]
        es, n, p, length = rows.tensor.element_size(), rows.units, rows.pruned.numel(), rows.length
        if kind == kernels.R_TILE:
            m, cols = min(cfg.block_rows, p - a0), min(cfg.block_cols, n - b)
            out.append((m + cols) * rows.segments * length * es + m * cols * 4)
        elif kind in (kernels.SQUARES, kernels.GRAM_SQUARES):
            m = min(cfg.block_rows, p - a0)
            out.append(m * length * es * (3 if kind == kernels.SQUARES and accumulate else 1))
        elif kind == kernels.PRUNED_ROWS:
            m, d = min(cfg.block_rows, p - a0), min(cfg.block_cols, length - d0)
            out.append(m * n * 4 + n * d * es + m * d * es * (3 if accumulate else 2))
        else:
            m, d = min(cfg.block_rows, n - a0), min(cfg.block_cols, length - d0)
            out.append(p * m * 4 + p * d * es + m * d * es * (2 if accumulate else 1))
    return out


def floors(plan) -> dict:
    w = sum(r.tensor.numel() * r.tensor.element_size() for launch in plan.launches for r in launch.grams)
    r = sum(4 * r.units * r.pruned.numel() for launch in plan.launches for r in launch.grams)
    x = sum(r.pruned.numel() * r.segments * r.length * r.tensor.element_size()
            for launch in plan.launches for r in launch.squares)
    wp = sum(r.pruned.numel() * r.segments * r.length * r.tensor.element_size()
             for launch in plan.launches for r in launch.grams)
    return {"forward": w + r + x + wp, "in_place": (w + r) + (w + r + 2 * w) + 3 * x}


def model(name: str, configs: dict | None = None) -> dict:
    arch, spec = SETS[name]
    torch.manual_seed(0)
    reg = TPPRegularizer(getattr(torchvision.models, arch)(), spec, schedule=GrowingSchedule.imagenet(),
                         backend="torch")
    grams = [plan_module.Rows(s.param, idx, s.segments, s.segment_length)
             for n, idx in reg.pruned.items() for s in reg.slots(n) if s.role == "gram"]
    squares = [plan_module.Rows(s.param, idx, s.segments, s.segment_length)
               for n, idx in reg.pruned.items() for s in reg.slots(n) if s.role in ("l2", "bn")]
    configs = configs or plan_module.GPU_CONFIGS
    plan = plan_module.PenaltyPlan(grams, squares, gram_weight=1.0, l2_weight=1.0, mean=True, configs=configs)
    fwd_loss = [b for launch in plan.launches
                for b in program_bytes(launch, launch.fwd_tiles_loss, configs["fwd"], False)]
    fwd = [b for launch in plan.launches for b in program_bytes(launch, launch.fwd_tiles, configs["fwd"], False)]
    bwd = [b for launch in plan.launches for b in program_bytes(launch, launch.bwd_tiles, configs["bwd"], True)]
    floor = floors(plan)
    return {"set": name, "configs": {k: tuple(v) for k, v in configs.items()},
            "forward_bytes": sum(fwd_loss), "forward_floor": floor["forward"],
            "forward_ratio": sum(fwd_loss) / floor["forward"],
            "in_place_bytes": sum(fwd) + sum(bwd), "in_place_floor": floor["in_place"],
            "in_place_ratio": (sum(fwd) + sum(bwd)) / floor["in_place"],
            "forward_programs": len(fwd_loss), "backward_programs": len(bwd),
            "forward_max_over_mean": max(fwd_loss) / (sum(fwd_loss) / len(fwd_loss)),
            "backward_max_over_mean": max(bwd) / (sum(bwd) / len(bwd))}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=sorted(SETS), action="append")
    args = parser.parse_args(argv)
    rows = [model(name) for name in args.set or sorted(SETS)]
    print("| set | forward ÷ floor | in-place ÷ floor | programs fwd/bwd | longest ÷ mean fwd/bwd |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['set']} | {r['forward_ratio']:.2f} | {r['in_place_ratio']:.2f} | {r['forward_programs']}/"
              f"{r['backward_programs']} | {r['forward_max_over_mean']:.1f}/{r['backward_max_over_mean']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
