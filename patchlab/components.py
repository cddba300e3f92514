"""Typed addresses of model components.

A `Component` is a small frozen, hashable, ordered value naming one place in a
transformer's forward pass: a `Site` (what kind of activation), a `layer`, an
optional `head` and the token positions it covers. Sorting components gives
forward-pass order. Its `label` ("L9H6", "L3.mlp_out@5") is the coordinate value
used in results.

Dimension vocabulary used across patchlab results:

- ``layer``: decoder block index, 0-based.
- ``head``: attention head index within a layer (query heads; for the ``k`` and
  ``v`` sites of grouped-query models, key/value heads).
- ``pos``: token position, 0-based from the left of the prompt.
- ``prompt``: index of the prompt pair in the dataset.
- ``component``: a `Component` label, for sweeps over arbitrary component lists.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ._choices import Choice

__all__ = ["Site", "Component", "Positions", "as_index"]


def as_index(value, what: str) -> int:
    """`value` as a Python ``int`` (a layer, head or position), refusing what ``int()`` would
    silently truncate or reinterpret.

    Accepts ints and integer scalars of numpy, torch and xarray (e.g. a value of a result's
    ``layer`` coordinate).

    Raises:
        TypeError: a bool, a float (even 2.0), a string or anything else; the message names `what`.
    """
    if type(value) is int:
        return value
    dtype = getattr(value, "dtype", None)
    if isinstance(value, (bool, np.bool_)) or str(dtype) in ("bool", "torch.bool"):
        raise TypeError(f"{what} must be an integer, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        pass
    if dtype is not None and getattr(value, "ndim", None) == 0 and np.issubdtype(np.asarray(value).dtype, np.integer):
        return int(np.asarray(value))
    raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__}); "
                    "patchlab does not round or truncate indices: pass an int")


class Site(Choice):
    """Kind of activation. Members are listed in forward order within a layer."""

    RESID_PRE = "resid_pre"
    """Residual stream entering the block (the block's input), ``[batch, pos, d_model]``."""
    Q = "q"
    """Query input of a head: the query projection's output before rotary, ``[batch, pos, n_heads, d_head]``."""
    K = "k"
    """Key input of a head: the key projection's output, ``[batch, pos, n_kv_heads, d_head]``."""
    V = "v"
    """Value input of a head: the value projection's output, ``[batch, pos, n_kv_heads, d_head]``."""
    HEAD = "head"
    """Attention head output ("z"): the input of the output projection, ``[batch, pos, n_heads, d_head]``."""
    ATTN_OUT = "attn_out"
    """Attention branch output as added to the residual stream, ``[batch, pos, d_model]``."""
    RESID_MID = "resid_mid"
    """Residual stream between attention and MLP (sequential-residual models only)."""
    MLP_OUT = "mlp_out"
    """MLP branch output as added to the residual stream, ``[batch, pos, d_model]``."""
    RESID_POST = "resid_post"
    """Residual stream leaving the block (the block's output), ``[batch, pos, d_model]``."""

    @property
    def order(self) -> int:
        return _SITE_ORDER[self]

    @property
    def per_head(self) -> bool:
        """Whether components of this site are addressed per head."""
        return self in (Site.Q, Site.K, Site.V, Site.HEAD)


_SITE_ORDER = {site: i for i, site in enumerate(Site)}

Positions = tuple[int, ...] | None
"""Token positions a component covers: a sorted tuple of indices, or None for all."""


@dataclass(frozen=True, kw_only=True)
class Component:
    """One activation at one layer (and head), at some or all token positions.

    Args:
        site: the kind of activation.
        layer: 0-based decoder block index.
        head: head index for per-head sites (`Site.Q`, `Site.K`, `Site.V`,
            `Site.HEAD`); must be None for the others.
        pos: the token positions covered: an int, an iterable of ints, or None
            for all positions. Stored as a sorted tuple (or None).

    Raises:
        ValueError: an unknown site (the message lists the sites), a negative
            layer/head/position, a head on a non-head site, a missing head on a head
            site, or an empty set of positions.
        TypeError: a layer, head or position that is not an integer (``1.5``, ``True``,
            ``"S2"``): nothing is truncated.
    """

    site: Site
    layer: int
    head: int | None = None
    pos: Positions = None

    def __init__(self, *, site: Site | str, layer: int, head: int | None = None,
                 pos: int | Iterable[int] | None = None) -> None:
        site = Site(site)
        layer = as_index(layer, "Component layer")
        head = None if head is None else as_index(head, "Component head")
        if layer < 0:
            raise ValueError(f"layer must be >= 0, got {layer}")
        if site.per_head and head is None:
            raise ValueError(f"site {site.value!r} is per head: give head=")
        if not site.per_head and head is not None:
            raise ValueError(f"site {site.value!r} has no heads: drop head={head}")
        if head is not None and head < 0:
            raise ValueError(f"head must be >= 0, got {head}")
        if pos is not None:
            if isinstance(pos, str):
                raise TypeError(f"Component pos must be an int, an iterable of ints or None, got {pos!r}; a named "
                                "position is a dataset's: look it up with dataset.tokenize(tokenizer).positions[name]")
            single = not isinstance(pos, Iterable) or getattr(pos, "ndim", None) == 0  # 0-d arrays are iterable
            pos = tuple(sorted({as_index(p, "Component pos") for p in ([pos] if single else pos)}))
            if not pos:
                raise ValueError("pos is an empty set; use None for all positions")
            if pos[0] < 0:
                raise ValueError(f"positions must be >= 0 (count from the left), got {pos[0]}")
        object.__setattr__(self, "site", site)
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "head", head)
        object.__setattr__(self, "pos", pos)

    @property
    def sort_key(self) -> tuple:
        return (self.layer, self.site.order, -1 if self.head is None else self.head,
                () if self.pos is None else self.pos)

    def __lt__(self, other: "Component") -> bool:
        if not isinstance(other, Component):
            return NotImplemented
        return self.sort_key < other.sort_key

    @property
    def label(self) -> str:
        """Short label used as a coordinate value: "L9H6", "L9H6.q", "L3.mlp_out@5"."""
        if self.site is Site.HEAD:
            base = f"L{self.layer}H{self.head}"
        elif self.site.per_head:
            base = f"L{self.layer}H{self.head}.{self.site.value}"
        else:
            base = f"L{self.layer}.{self.site.value}"
        if self.pos is None:
            return base
        return base + "@" + ",".join(str(p) for p in self.pos)

    def at(self, pos: int | Iterable[int] | None) -> "Component":
        """The same component at other positions."""
        return Component(site=self.site, layer=self.layer, head=self.head, pos=pos)

    def __repr__(self) -> str:
        return f"Component({self.label})"
