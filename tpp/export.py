"""``tpp export RUN_DIR --format torchscript|onnx``: a run's pruned model for use outside PyTorch's eager mode,
checked against PyTorch's own output before the command succeeds.

The model is rebuilt from ``RUN_DIR/pruned.pt`` alone (:func:`tpp.load_pruned`) and run in eval mode on a random
batch of the run's input shape (stored in the file, else the dataset's, else ``--input-shape``). TorchScript is
traced, saved, reloaded with ``torch.jit.load`` and compared; ONNX is exported with ``torch.onnx.export`` (batch
axis dynamic) and compared through onnxruntime — it needs ``pip install "tpp[export]"`` (onnx, onnxruntime).

Exit status: 0 written and matching; 1 written but the outputs differ beyond ``--atol``/``--rtol`` (the file is
kept, the largest difference printed); 2 bad input or a missing optional package.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Optional, Sequence

from .arguments import UsageError, count, number

__all__ = ["add_arguments", "cmd_export", "export", "input_shape", "FORMATS"]

FORMATS = {"torchscript": "pruned.torchscript.pt", "onnx": "pruned.onnx"}
_DATA_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32),
                "imagefolder": (3, 224, 224)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder holding pruned.pt, or a pruned.pt file")
    p.add_argument("--format", required=True, choices=tuple(FORMATS), help="torchscript, or onnx (tpp[export])")
    p.add_argument("--out", help="file to write (default: <run>/pruned.torchscript.pt or <run>/pruned.onnx)")
    p.add_argument("--input-shape", help="one sample's shape, e.g. 3,32,32 (default: the run's)")
    p.add_argument("--batch", type=count, default=2, help="batch of the comparison (and of the traced example)")
    p.add_argument("--opset", type=count, default=17, help="ONNX opset")
    p.add_argument("--atol", type=number, default=1e-4, help="absolute tolerance of the comparison")
    p.add_argument("--rtol", type=number, default=1e-4, help="relative tolerance of the comparison")


def input_shape(checkpoint, given: Optional[str]) -> tuple[int, ...]:
    """One sample's shape: ``--input-shape``, else the file's ``extra["input_shape"]``, else its dataset's."""
    if given:
        try:
            shape = tuple(int(t) for t in given.split(",") if t.strip())
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            raise UsageError(f"--input-shape {given!r}: expected positive integers like 3,32,32")
        return shape
    extra = checkpoint.get("extra") or {}
    if extra.get("input_shape"):
        return tuple(int(v) for v in extra["input_shape"])
    if extra.get("data") in _DATA_SHAPES:
        return _DATA_SHAPES[extra["data"]]
    raise UsageError("the pruned model does not record its input shape: pass --input-shape, e.g. 3,32,32")


def export(model, example, fmt: str, out: Path, opset: int = 17):
    """Write ``model`` (eval mode) traced on ``example`` to ``out``; returns a function running the written file."""
    import torch

    if fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(out))
        loaded = torch.jit.load(str(out), map_location="cpu")
        return lambda x: loaded(x)
    import onnxruntime
    with torch.no_grad():
        torch.onnx.export(model, (example,), str(out), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def _missing(modules: Sequence[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def cmd_export(args, argv: Sequence[str], prog: str = "tpp export") -> int:
    run = Path(args.run)
    path = run / "pruned.pt" if run.is_dir() else run
    if not path.is_file():
        raise UsageError(f"{args.run}: no pruned.pt (a tpp prune / tpp train run folder, or a pruned.pt file)")
    missing = _missing(("onnx", "onnxruntime")) if args.format == "onnx" else []
    if missing:
        raise UsageError(f"--format onnx needs {' and '.join(missing)} (not installed): pip install \"tpp[export]\"")
    import torch

    from .files import load_verified
    from .pruned_files import load_pruned

    try:
        checkpoint = load_verified(path)
        model = load_pruned(checkpoint)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise UsageError(f"{path}: {err}") from None
    except Exception as err:  # noqa: BLE001 - not a torch file
        raise UsageError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None
    model.eval()
    shape = input_shape(checkpoint, args.input_shape)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(max(args.batch, 1), *shape, generator=generator)
    try:
        with torch.no_grad():
            expected = model(example)
    except Exception as err:  # noqa: BLE001 - the shape does not fit
        raise UsageError(f"the pruned model cannot take inputs of shape {tuple(example.shape)}: "
                         f"{type(err).__name__}: {err}") from None
    out = Path(args.out) if args.out else path.with_name(FORMATS[args.format])
    run_exported = export(model, example, args.format, out, args.opset)
    check = torch.randn(max(args.batch, 1), *shape, generator=generator)     # a batch the export has not seen
    with torch.no_grad():
        got, want = run_exported(check), model(check)
    diff = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
    ok = got.shape == want.shape and torch.allclose(got, want, rtol=args.rtol, atol=args.atol)
    print(f"wrote {out} ({args.format}); outputs {tuple(got.shape)} vs PyTorch: max |diff| {diff:.3g} "
          f"({'ok' if ok else 'MISMATCH'} at atol {args.atol:g}, rtol {args.rtol:g}); traced output "
          f"{tuple(expected.shape)}")
    if not ok:
        print(f"{prog}: the exported model's outputs differ from PyTorch's beyond the tolerance", file=sys.stderr)
        return 1
    return 0
