"""The one weight loader of the ``tpp`` commands: the model to prune, built by name and given its weights.

``--weights`` is a state_dict file (a ``{"state_dict": ...}`` wrapper and DataParallel/DDP ``module.`` prefixes
are accepted), ``torchvision[:ENUM]`` (torchvision's published weights; one download per node, the other processes
read its cache), ``none`` (random initialization) or absent (``tpp prune`` then pretrains it). Every way it can go
wrong — an unknown model, a missing or unreadable file, a run checkpoint given as weights, weights of another
architecture, inputs the model cannot take — is a :class:`~tpp.arguments.UsageError` naming the flag and the fix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .arguments import UsageError

__all__ = ["check_model_name", "model_kwargs", "build", "load_weights", "torchvision_name"]


def torchvision_name(model: str) -> Optional[str]:
    """The torchvision classifier ``model`` names (``torchvision:<name>`` or one of the plain aliases), else None."""
    from .models import TORCHVISION_ALIASES

    if model.startswith("torchvision:"):
        return model.removeprefix("torchvision:")
    return model if model in TORCHVISION_ALIASES else None


def check_model_name(model: str) -> None:
    """:class:`UsageError` listing the allowed names unless ``model`` is a registry or torchvision classifier."""
    from .models import list_models

    if model.startswith("torchvision:"):
        import torchvision

        name = model.removeprefix("torchvision:")
        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            raise UsageError(f"unknown model {model!r}: {name!r} is not a torchvision classifier; "
                             f"available: {', '.join(available)}")
    elif model not in list_models():
        raise UsageError(f"unknown model {model!r}; allowed: {', '.join(list_models())}, or torchvision:<name>")


def model_kwargs(model: str, sample) -> dict:
    """Constructor arguments a model needs from its data: ``in_features`` of the MLP (the flattened input)."""
    return {"in_features": int(sample.numel())} if model == "mlp7" else {}


def build(model: str, num_classes: int, kwargs: dict):
    """``build_model(model, num_classes=..., **kwargs)`` with bad arguments as :class:`UsageError`."""
    from .models import build_model

    try:
        return build_model(model, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--model {model}: {err}") from None


def load_weights(model_name: str, weights: Optional[str], num_classes: int, kwargs: dict, sample, data: str,
                 env=None):
    """``(model, where its weights came from)``; the model is checked to take ``sample`` and return logits."""
    import torch

    if weights in (None, "", "none"):
        model, source = build(model_name, num_classes, kwargs), "random initialization"
    elif weights == "torchvision" or weights.startswith("torchvision:"):
        model, source = _torchvision(model_name, weights, num_classes, env)
    else:
        model, source = _state_dict(model_name, weights, num_classes, kwargs), f"state_dict {weights}"
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample.unsqueeze(0))
    except Exception as err:  # noqa: BLE001 - whatever the forward raises, the inputs do not fit
        raise UsageError(f"--model {model_name} cannot take --data {data} inputs of shape {tuple(sample.shape)}: "
                         f"{type(err).__name__}: {err}") from None
    if out.dim() != 2:
        raise UsageError(f"--model {model_name} returns shape {tuple(out.shape)}, expected [batch, classes]")
    return model, source


def _torchvision(model_name: str, weights: str, num_classes: int, env):
    from .train import distributed as D

    name = torchvision_name(model_name)
    if name is None:
        raise UsageError(f"--weights {weights}: {model_name!r} is not a torchvision model")
    enum = weights.split(":", 1)[1] if ":" in weights else "DEFAULT"
    import torchvision

    error, model = None, None
    local_rank = env.local_rank if env is not None else 0
    for turn in (0, 1):            # one download per node (local rank 0 first), the others read the cache
        if (local_rank == 0) == (turn == 0):
            try:
                model = torchvision.models.get_model(name, weights=enum)
            except Exception as err:  # noqa: BLE001 - no network, unknown enum, ...
                error = f"{type(err).__name__}: {err}"
        if turn == 0 and env is not None:
            D.barrier(env)
    if error is not None:
        raise UsageError(f"--weights {weights} for {name}: {error}. Without network access, save the weights with "
                         "torch.save(model.state_dict(), 'w.pt') elsewhere and pass --weights w.pt")
    out = model.fc.out_features if hasattr(model, "fc") else None
    if out is not None and out != num_classes:
        raise UsageError(f"--weights {weights}: {name} has {out} classes, the data has {num_classes}")
    return model, f"torchvision {name} weights {enum}"


def _state_dict(model_name: str, weights: str, num_classes: int, kwargs: dict):
    import torch

    path = Path(weights)
    if not path.is_file():
        raise UsageError(f"--weights {weights}: no such file (expected a state_dict saved with torch.save)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - not a torch file, or not loadable without pickled code
        raise UsageError(f"--weights {weights}: cannot be read as a state_dict ({type(err).__name__}: {err})") \
            from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict) and "format" not in state:
        state = state["state_dict"]
    if isinstance(state, dict) and "signature" in state and "model" in state:
        raise UsageError(f"--weights {weights} is a run checkpoint; continue its run with --resume")
    if isinstance(state, dict) and state.get("format") == "tpp-pruned":
        raise UsageError(f"--weights {weights} is a pruned model (tpp.load_pruned reads it), not the unpruned "
                         "weights to prune")
    if isinstance(state, dict) and state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}     # saved from DataParallel/DDP
    model = build(model_name, num_classes, kwargs)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, AttributeError) as err:
        first = str(err).strip().splitlines()
        raise UsageError(f"--weights {weights} was written for another architecture than --model {model_name} "
                         f"with {num_classes} classes: {' '.join(first[:3])[:600]}") from None
    return model
