"""Baselines the paper compares TPP with (tpp-method.md §9), each runnable through :func:`tpp.pipeline.run_pruning`.

Every method is the same four-step flow — optional regularization before removal, choice of the pruned filters
(L1, :func:`tpp.select_filters`), physical removal (:func:`tpp.prune_model`), finetuning — and differs only in
what it plugs into those steps. ``METHODS`` maps each name to a :class:`Method` describing exactly that:

=============  ==============================================  =================  ===========================
name           regularizer before removal                      filters chosen     after removal
=============  ==============================================  =================  ===========================
tpp            TPP (decorrelate + BN + weight L2), growing r   at the start (L1)  —
l1             none                                            at the start (L1)  —
greg           growing (r/2)‖W_P‖² only (GReg-2 style)         at the start (L1)  —
diagonal       TPP with ``variant="diagonal"`` (Fig. 2b)       at the start (L1)  —
no-bn          TPP without the BN γ/β term                     at the start (L1)  —
kernorth       KernOrth λ‖WWᵀ − I‖² on every layer, constant   after it (L1)      —
orthconv       OrthConv λ‖Conv(K, K) − I_δ‖ on every layer     after it (L1)      —
orthp          none                                            at the start (L1)  QR-orthogonalize (OrthP)
scratch        none                                            at the start (L1)  re-initialize, then train
l1-kernorth    none (KernOrth during finetuning instead)       at the start (L1)  —
l1-orthconv    none (OrthConv during finetuning instead)       at the start (L1)  —
=============  ==============================================  =================  ===========================

The growing-schedule methods (tpp, greg, diagonal, no-bn) regularize for ``schedule.total_iters`` iterations and
zero the pruned W, b, γ, β layer by layer during the stabilize phase, so removal does not change the function.
KernOrth/OrthConv "+ L1" (paper Tab. 1-2) regularize for the same number of iterations at a constant weight and
then prune the smallest-L1 filters of the regularized weights; "L1 +" KernOrth/OrthConv prune first and
regularize the small model while finetuning.

Losses (``W ∈ R^{N×D}`` a layer's weight reshaped to its filters):

* KernOrth (Xie et al., CVPR 2017): ``‖G − I‖_F²`` on the smaller gram, ``G = WWᵀ`` (N ≤ D) or ``WᵀW`` (N > D).
* OrthConv (Wang et al., CVPR 2020, "Orthogonal Convolutional Neural Networks"), for a conv kernel
  ``K ∈ R^{N×C×kh×kw}`` with stride ``s``: ``‖Conv(K, K; stride s, padding p) − I_δ‖_F`` with
  ``p = ⌊(k − 1)/s⌋·s`` per spatial dim. ``Conv(K, K)[a, b, u, v] = Σ_{c,i,j} K[a,c,i+su−p,j+sv−p]·K[b,c,i,j]``
  is the inner product of filter ``a`` with filter ``b`` shifted by ``(su − p, sv − p)``, i.e. the rows of the
  doubly block-Toeplitz matrix of the convolution multiplied with each other; ``I_δ`` is the identity at the zero
  shift (spatial centre ``p/s``) and 0 elsewhere. It is 0 exactly when the convolution's rows are orthonormal.
  Linear layers and 1×1 kernels use the matrix form on the smaller gram, ``‖G − I‖_F``. The published code uses
  the plain norm (not squared); ``squared=True`` gives the smooth squared form.
* OrthP (Wang et al. 2021, "Dynamical isometry: the missing ingredient for neural network pruning"): after
  removal, each weight matrix is replaced by the orthonormal factor of its QR decomposition (rows orthonormal when
  N ≤ D, columns when N > D, signs fixed so that R has a non-negative diagonal). A linear MLP whose widths never
  grow from input to output then has ``J Jᵀ = I``: every Jacobian singular value is exactly 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .regularizer import TPPRegularizer, unwrap_model
from .schedule import GrowingSchedule
from .selection import RatioSpec

__all__ = [
    "Method",
    "METHODS",
    "list_methods",
    "get_method",
    "kernorth_loss",
    "orthconv_loss",
    "OrthRegularizer",
    "orthogonalize_",
    "reinitialize_",
    "make_regularizer",
    "DEFAULT_ORTH_WEIGHTS",
]

ORTH_KINDS = ("kernorth", "orthconv")
DEFAULT_ORTH_WEIGHTS = {"kernorth": 1e-3, "orthconv": 1e-2}  # λ; tpp's defaults, not values from the papers


# ---------------------------------------------------------------------------------------------------- losses
def _rows(weight: Tensor) -> Tensor:
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() < 2:
        raise TypeError(f"expected a floating-point weight with >= 2 dims, got {getattr(weight, 'shape', weight)!r}")
    return weight.reshape(weight.shape[0], -1)


def _gram_distance(weight: Tensor, squared: bool) -> Tensor:
    w = _rows(weight)
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    diff = gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    sq = diff.square().sum()
    return sq if squared else sq.sqrt()


def kernorth_loss(weight: Tensor, squared: bool = True) -> Tensor:
    """KernOrth: ``‖G − I‖_F²`` with ``G`` the smaller of ``WWᵀ``/``WᵀW`` (``squared=False``: ``‖G − I‖_F``)."""
    return _gram_distance(weight, squared)


def orthconv_loss(weight: Tensor, stride: int | tuple[int, int] = 1, squared: bool = False) -> Tensor:
    """OrthConv: ``‖Conv(K, K; stride, padding ⌊(k−1)/s⌋·s) − I_δ‖_F`` for a 4-D kernel with a spatial extent > 1;
    the matrix form ``‖G − I‖_F`` (smaller gram) for 2-D weights and 1×1 kernels. See the module docstring."""
    if weight.dim() != 4 or weight.shape[-1] * weight.shape[-2] == 1:
        return _gram_distance(weight, squared)
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
    kh, kw = weight.shape[-2:]
    ph, pw = (kh - 1) // sh * sh, (kw - 1) // sw * sw
    out = F.conv2d(weight, weight, stride=(sh, sw), padding=(ph, pw))   # [N, N, 2ph/sh + 1, 2pw/sw + 1]
    target = torch.zeros_like(out)  # I_δ: the identity at the centre tap (no cancellation: Σ(out − I_δ)² directly)
    target[:, :, ph // sh, pw // sw] = torch.eye(weight.shape[0], dtype=out.dtype, device=out.device)
    sq = (out - target).square().sum()
    return sq if squared else sq.sqrt()


def _orth_layers(model: nn.Module, layers: Optional[Iterable[str]]) -> list[tuple[str, nn.Module]]:
    """Conv2d (groups = 1) and Linear layers of ``model``: all of them, or those named in ``layers``."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]
    if layers is None:
        return found
    wanted = list(layers)
    names = {n for n, _ in found}
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise ValueError(f"layers {unknown} are not Conv2d (groups=1)/Linear layers of the model; "
                         f"available: {sorted(names)}")
    return [(n, m) for n, m in found if n in set(wanted)]


# ----------------------------------------------------------------------------------------------- regularizer
class OrthRegularizer:
    """KernOrth or OrthConv as a constant-weight regularizer, with the interface the pipeline drives.

    ``penalty() = λ · Σ_layers loss(W_layer)`` over every Conv2d (groups = 1) and Linear layer (or ``layers``).
    ``apply_gradients()`` adds its gradients into ``.grad`` (autograd on the penalty); ``step()`` counts
    iterations. ``pruned`` is empty: the filters are chosen afterwards by L1.
    """

    def __init__(self, model: nn.Module, kind: str = "kernorth", weight: Optional[float] = None,
                 layers: Optional[Iterable[str]] = None, squared: Optional[bool] = None):
        if kind not in ORTH_KINDS:
            raise ValueError(f"orthogonality regularizer kind must be one of {ORTH_KINDS}, got {kind!r}")
        weight = DEFAULT_ORTH_WEIGHTS[kind] if weight is None else weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"{kind} weight must be a number >= 0, got {weight!r}")
        self.model = unwrap_model(model)
        self.kind, self.weight = kind, float(weight)
        self.squared = (kind == "kernorth") if squared is None else bool(squared)
        self.layers = _orth_layers(self.model, layers)
        if not self.layers:
            raise ValueError(f"{kind}: the model has no Conv2d (groups=1) or Linear layer to regularize")
        self.iteration = 0
        self.pruned: dict[str, Tensor] = {}

    @property
    def strength(self) -> float:
        return self.weight

    @property
    def phase(self) -> str:
        return "constant"

    def layer_loss(self, module: nn.Module) -> Tensor:
        w = module.weight
        w = w.float() if w.dtype in (torch.float16, torch.bfloat16) else w   # half precision: accumulate in fp32
        if self.kind == "kernorth":
            return kernorth_loss(w, self.squared)
        return orthconv_loss(w, module.stride if isinstance(module, nn.Conv2d) else 1, self.squared)

    def penalty(self) -> Tensor:
        """``λ · Σ loss(W)``: a differentiable scalar."""
        total = sum(self.layer_loss(m) for _, m in self.layers)
        return self.weight * total

    def apply_gradients(self) -> None:
        """Add ∂penalty()/∂W into the weights' ``.grad``."""
        if self.weight:
            self.penalty().backward()

    def step(self) -> None:
        self.iteration += 1

    def state_dict(self) -> dict:
        return {"kind": self.kind, "weight": self.weight, "squared": self.squared, "iteration": self.iteration}

    def load_state_dict(self, state: Mapping) -> None:
        for key in ("kind", "weight", "squared"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"state_dict {key} {state.get(key)!r} differs from this regularizer's "
                                 f"{getattr(self, key)!r}")
        self.iteration = int(state["iteration"])


# ------------------------------------------------------------------------------------- post-removal transforms
@torch.no_grad()
def orthogonalize_(model: nn.Module, layers: Optional[Iterable[str]] = None, gain: float = 1.0) -> list[str]:
    """OrthP: replace each Conv2d (groups = 1)/Linear weight, reshaped to ``[N, D]``, by ``gain ×`` the orthonormal
    QR factor (rows orthonormal if N ≤ D, columns if N > D; signs make R's diagonal non-negative). Biases are kept.
    Works in float64 and writes back in the weight's dtype. Returns the names of the layers changed."""
    done = []
    for name, m in _orth_layers(model, layers):
        w = m.weight
        w2 = w.detach().reshape(w.shape[0], -1).double()
        tall = w2.shape[0] > w2.shape[1]
        q, r = torch.linalg.qr(w2 if tall else w2.T)
        signs = torch.sign(torch.diagonal(r))
        signs[signs == 0] = 1
        q = q * signs
        w.copy_((gain * (q if tall else q.T)).reshape(w.shape).to(w.dtype))
        done.append(name)
    return done


@torch.no_grad()
def reinitialize_(model: nn.Module, seed: Optional[int] = None) -> nn.Module:
    """Scratch: re-initialize every submodule that has ``reset_parameters`` (PyTorch's default initialization;
    BatchNorm also resets its running statistics) and every ``nn.MultiheadAttention`` (incl. head-pruned ones) as
    PyTorch initializes it: Xavier-uniform packed in-projection, zero biases. ``seed`` makes it reproducible."""
    generator_state = torch.random.get_rng_state() if seed is not None else None
    if seed is not None:
        torch.manual_seed(seed)
    try:
        for m in model.modules():
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
        for m in model.modules():
            if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
                nn.init.xavier_uniform_(m.in_proj_weight)
                for bias in (m.in_proj_bias, m.out_proj.bias):
                    if bias is not None:
                        nn.init.zeros_(bias)
    finally:
        if generator_state is not None:
            torch.random.set_rng_state(generator_state)
    return model


# -------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Method:
    """How one method fills the pipeline's steps.

    ``regularizer``: ``"tpp"`` (a :class:`TPPRegularizer` with ``tpp_options``, growing schedule and zero-out),
    ``"kernorth"``/``"orthconv"`` (an :class:`OrthRegularizer`) or ``None`` — run before removal.
    ``select``: ``"start"`` (L1 on the weights the run starts from, fixed) or ``"after-regularization"``.
    ``post_removal``: ``None``, ``"orthp"`` (:func:`orthogonalize_`) or ``"reinit"`` (:func:`reinitialize_`).
    ``finetune_regularizer``: ``None`` or ``"kernorth"``/``"orthconv"`` added while finetuning the small model.
    """

    name: str
    description: str
    regularizer: Optional[str] = None
    tpp_options: Mapping[str, object] = field(default_factory=dict)
    select: str = "start"
    post_removal: Optional[str] = None
    finetune_regularizer: Optional[str] = None

    @property
    def regularizes(self) -> bool:
        return self.regularizer is not None

    @property
    def zero_out(self) -> bool:
        """Whether the pruned parameters are zeroed before removal (lossless removal)."""
        return self.regularizer == "tpp"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("tpp", "TPP: growing decorrelation + BN γ/β + weight-L2 penalty on the pruned filters, zero-out, remove",
           regularizer="tpp"),
    Method("l1", "L1: remove the smallest-L1 filters of the given weights, finetune (no regularization)"),
    Method("greg", "GReg-style: growing (r/2)‖W_P‖² on the pruned filters only, zero-out, remove",
           regularizer="tpp", tpp_options={"gram_weight": 0.0, "bn": False, "weight_l2": True}),
    Method("diagonal", "TPP-diagonal (paper Fig. 2b): ‖WWᵀ − T‖², kept filters pushed to orthonormality",
           regularizer="tpp", tpp_options={"variant": "diagonal"}),
    Method("no-bn", "TPP without the BN γ/β term (paper Tab. 5)", regularizer="tpp", tpp_options={"bn": False}),
    Method("kernorth", "KernOrth + L1: λ‖WWᵀ − I‖² (smaller gram) on every layer, then L1 pruning",
           regularizer="kernorth", select="after-regularization"),
    Method("orthconv", "OrthConv + L1: λ‖Conv(K,K) − I_δ‖ on every layer, then L1 pruning",
           regularizer="orthconv", select="after-regularization"),
    Method("orthp", "L1 + OrthP: L1 pruning, then QR-orthogonalize every weight (exact isometry, linear MLP)",
           post_removal="orthp"),
    Method("scratch", "Scratch: the L1-pruned architecture re-initialized and trained with the finetune recipe",
           post_removal="reinit"),
    Method("l1-kernorth", "L1 + KernOrth: L1 pruning, KernOrth on the small model during finetuning",
           finetune_regularizer="kernorth"),
    Method("l1-orthconv", "L1 + OrthConv: L1 pruning, OrthConv on the small model during finetuning",
           finetune_regularizer="orthconv"),
)}


def list_methods() -> list[str]:
    return list(METHODS)


def get_method(method: "str | Method") -> Method:
    """``METHODS[name]`` (a :class:`Method` passes through); ``ValueError`` naming the allowed names otherwise."""
    if isinstance(method, Method):
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    return METHODS[method]


def make_regularizer(method: "str | Method", model: nn.Module, pruning_ratio: RatioSpec, skip=(), *,
                     schedule: Optional[GrowingSchedule] = None, orth_weight: Optional[float] = None,
                     bn_map=None, **tpp_overrides):
    """The regularizer ``method`` runs before removal (``None`` if it runs none).

    ``"tpp"``-family methods get ``TPPRegularizer(model, pruning_ratio, skip, schedule=schedule, **options)`` with
    the method's options (``tpp_overrides`` on top, e.g. ``backend``); KernOrth/OrthConv an :class:`OrthRegularizer`
    with weight ``orth_weight`` (default :data:`DEFAULT_ORTH_WEIGHTS`)."""
    method = get_method(method)
    if method.regularizer is None:
        return None
    if method.regularizer == "tpp":
        options = {**method.tpp_options, **tpp_overrides}
        return TPPRegularizer(model, pruning_ratio, skip, schedule=schedule, bn_map=bn_map, **options)
    return OrthRegularizer(model, method.regularizer, orth_weight)
