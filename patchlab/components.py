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
- ``pattern``'s values are ``[query pos, head, key pos]`` per prompt: ``pos`` addresses query positions.
- ``pos``: token position, 0-based from the left of the prompt. A `Component` may also name
  positions symbolically: a dataset's position name (``"S2"``) or an offset from the end (``-1``
  is the last token). They resolve per prompt when the component runs (`patchlab.positions`:
  with prompts of different lengths, an index counts from each prompt's start).
- ``prompt``: index of the prompt pair in the dataset.
- ``component``: a `Component` label, for sweeps over arbitrary component lists.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Iterable, Mapping

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
    PATTERN = "pattern"
    """Attention pattern of a head (softmax probabilities), ``[batch, query pos, n_heads, key pos]``; a
    component's ``pos`` are query positions. Needs eager attention
    (``load_model(..., attn_implementation="eager")``)."""
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
        return self in (Site.Q, Site.K, Site.V, Site.PATTERN, Site.HEAD)


_SITE_ORDER = {site: i for i, site in enumerate(Site)}

Positions = tuple[int | str, ...] | None
"""Token positions a component covers: a sorted tuple (indices >= 0 from the left, offsets < 0 from
the end, position names), or None for all."""


def _pos_key(p: int | str) -> tuple:
    """Order within a position tuple: indices from the left, then offsets from the end, then names."""
    return (2, p) if isinstance(p, str) else (0, p) if p >= 0 else (1, p)


@dataclass(frozen=True, kw_only=True)
class Component:
    """One activation at one layer (and head), at some or all token positions.

    Args:
        site: the kind of activation.
        layer: 0-based decoder block index.
        head: head index for per-head sites (`Site.Q`, `Site.K`, `Site.V`,
            `Site.HEAD`); must be None for the others.
        pos: the token positions covered: one position or an iterable of them, or None
            for all positions. A position is an index from the left (``0``), an offset from
            the end (``-1``: the last token), or a position name of the dataset (``"S2"``),
            resolved per prompt when the component runs (`patchlab.positions`; `resolve` for one
            shared length). Stored as a sorted tuple (or None).

    Raises:
        ValueError: an unknown site (the message lists the sites), a negative
            layer/head, a head on a non-head site, a missing head on a head
            site, an empty set of positions or an empty position name.
        TypeError: a layer, head or position that is not an integer or a name (``1.5``,
            ``True``): nothing is truncated.
    """

    site: Site
    layer: int
    head: int | None = None
    pos: Positions = None

    def __init__(self, *, site: Site | str, layer: int, head: int | None = None,
                 pos: int | str | Iterable[int | str] | None = None) -> None:
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
            single = isinstance(pos, str) or not isinstance(pos, Iterable) or getattr(pos, "ndim", None) == 0
            pos = tuple(sorted({_position(p) for p in ([pos] if single else pos)}, key=_pos_key))
            if not pos:
                raise ValueError("pos is an empty set; use None for all positions")
        object.__setattr__(self, "site", site)
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "head", head)
        object.__setattr__(self, "pos", pos)

    @property
    def sort_key(self) -> tuple:
        return (self.layer, self.site.order, -1 if self.head is None else self.head,
                () if self.pos is None else tuple(_pos_key(p) for p in self.pos))

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

    def at(self, pos: int | str | Iterable[int | str] | None) -> "Component":
        """The same component at other positions."""
        return Component(site=self.site, layer=self.layer, head=self.head, pos=pos)

    @property
    def symbolic(self) -> bool:
        """Whether some position is a name or an offset from the end (see `resolve`)."""
        return self.pos is not None and any(isinstance(p, str) or p < 0 for p in self.pos)

    def resolve(self, names: Mapping[str, int], n_pos: int) -> "Component":
        """The same component with every position as an index from the left.

        Args:
            names: the dataset's named positions (``TokenizedPairs.positions``).
            n_pos: tokens per prompt; offset ``-k`` is index ``n_pos - k``.

        Raises:
            ValueError: a name the dataset does not have (the message lists its names), or a
                position outside ``0..n_pos-1`` / ``-n_pos..-1``.
        """
        if not self.symbolic:
            return self
        out = []
        for p in self.pos:
            if isinstance(p, str):
                if p not in names:
                    raise ValueError(f"{self.label}: {p!r} is not a named position of this dataset; its names are "
                                     f"{dict(names)} (or give an index 0..{n_pos - 1}, or -1 for the last token)")
                p = names[p]
            elif p < 0:
                if p < -n_pos:
                    raise ValueError(f"{self.label}: offset {p} from the end is out of range for {n_pos}-token "
                                     f"prompts (offsets -{n_pos}..-1)")
                p = n_pos + p
            out.append(p)
        return self.at(out)

    def __repr__(self) -> str:
        return f"Component({self.label})"


def _position(p) -> int | str:
    """One position as an int (from the left if >= 0, from the end if < 0) or a non-empty name."""
    if isinstance(p, str):
        if not p:
            raise ValueError("a position name must be a non-empty string")
        return p
    return as_index(p, "Component pos")
