"""Where a value's channels sit among its dims, for the walk of :mod:`tpp.walk`: ranks and moves.

A walk's state is ``(layout, offset, total)``: the channels sit at ``[offset, offset + C)`` of ``total`` channels
in dim 1 of a 4-D value (``NCHW``) or a 3-D one (``NCL``), in the last dim (``LAST``) or flattened into blocks
(``FLAT``; :mod:`tpp.fxnodes`). :func:`ranks` tells each value's number of dims where the graph fixes it;
:func:`moved` the layout after a permute/transpose, a merge of the spatial dims, an index or an expand.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import fx, nn

from .fxnodes import FLAT, LAST, NCHW, NCL

__all__ = ["moved", "ranks"]


def ranks(nodes: Iterable[fx.Node], kinds: Mapping[fx.Node, tuple[str, object]],
          parameters: Mapping[str, int]) -> dict[fx.Node, int]:
    """The number of dims of each tensor value whose rank follows from the graph (absent where unknown).

    ``kinds``: :func:`tpp.fxnodes.classify` of every node; ``parameters``: the rank of each parameter read by a
    ``get_attr`` node that the walk follows (a producer)."""
    found: dict[fx.Node, int] = {}
    for node in nodes:
        kind, detail = kinds[node]
        first = found.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if node.op == "get_attr" and node.target in parameters:
            rank = parameters[node.target]
        elif kind in ("layer", "grouped", "depthwise"):
            rank = 4 if isinstance(detail, nn.Conv2d) else first
        elif kind in ("spatial", "mean", "merge", "flatten"):
            rank = {"spatial": 4, "mean": 4 if detail else 2, "merge": 3, "flatten": 2}[kind]
        elif kind == "permute":
            rank = len(detail[1]) if detail[0] == "dims" else first
        elif kind == "expand":
            rank = len(detail)
        elif kind == "index":
            rank = None if first is None else first - sum(isinstance(p, int) for p in detail)
        elif kind == "attention-output":
            rank = found.get(node.args[0].args[0]) if detail == 0 else None
        elif kind in ("cat", "join"):
            parts = node.args[0] if kind == "cat" and node.args else node.all_input_nodes
            rank = max((found[a] for a in parts if isinstance(a, fx.Node) and a in found), default=None)
        else:
            rank = first if kind in ("carry", "bn", "layernorm", "attention", "softmax") else None
        if rank is not None:
            found[node] = rank
    return found


def moved(state: tuple[str, int, int], kind: str, detail: object, rank: int | None) -> tuple[str, int, int] | None:
    """The channels' layout after a permute/transpose, a merge of the spatial dims, an index or an expand; None
    where they do not stay whole in one dim (or the walk cannot tell).

    ``state``: ``(layout, offset, total)`` of the value moved (see :class:`tpp.walk.ChannelWalk`); ``kind``,
    ``detail``: :func:`tpp.fxnodes.classify` of the move; ``rank``: the moved value's (:func:`ranks`), None where
    unknown (then 4 for NCHW, 3 otherwise)."""
    layout, offset, total = state
    if layout == FLAT or rank is None and layout == LAST and kind in ("permute", "index"):
        return None
    rank = rank if rank is not None else (4 if layout == NCHW else 3)
    channel = rank - 1 if layout == LAST else 1
    if kind == "merge":
        return (NCL, offset, total) if layout == NCHW and detail in (None, total) else None
    if kind == "expand":
        size = detail[channel - rank] if len(detail) >= rank - channel else None
        return state if size in (-1, total) else None
    if kind == "index":
        if layout != LAST and (len(detail) > 1 and detail[1] != slice(None) or any(
                isinstance(p, int) for p in detail)):
            return None
        return state if layout != LAST or len(detail) < rank or detail[-1] == slice(None) else None
    how, dims = detail
    if how == "swap":
        if not all(isinstance(d, int) and -rank <= d < rank for d in dims):
            return None
        a, b = (d % rank for d in dims)
        order = list(range(rank))
        order[a], order[b] = b, a
    elif len(dims) == rank and all(isinstance(d, int) for d in dims):
        order = [d % rank for d in dims]
    else:
        return None
    now = order.index(channel)
    if now == rank - 1:
        return LAST, offset, total
    return ({4: NCHW, 3: NCL}.get(rank), offset, total) if now == 1 and rank in (3, 4) else None

