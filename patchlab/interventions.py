"""Intervention values: what to do to one component of the base run.

Plain, frozen, printable data, addressed by `Component`. A *joint set* (a tuple of
interventions) is applied in one forward pass of the base run; a sweep evaluates many joint
sets (rows) in one program (see `patchlab.intervene` and `patchlab.runner`).

- `Patch`: the component takes its value from the clean or corrupted run (activation patching;
  Heimersheim & Nanda 2024, arXiv 2404.15255).
- `Ablate`: zero, mean (over the dataset's corrupted prompts, per position, as in circuit
  evaluation; Wang et al. 2022, arXiv 2211.00593) or resample (from the corrupted prompt of the
  same pair, or with ``seed=`` from another pair's corrupted prompt; Chan et al. 2022).
- `Steer`: add ``scale * vector`` (activation addition; Turner et al. 2023, arXiv 2308.10248).
- `Scale`: multiply by ``factor`` (e.g. an attention-head knock-down).
- `ProjectOut`: remove a direction, ``x - (x . r) r`` with ``r`` of unit norm (directional
  ablation; Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single Direction",
  arXiv 2406.11717).
- `Freeze`: keep the base run's own value, whatever changed upstream (path-style experiments).
- `At`: a user function of the component's value, inside the same trace (the escape hatch).
- `PatchEdge`: one sender -> receiver edge of the computational graph (`patchlab.graph`) carries
  the source run's value (Wang et al. 2022's path patching building block; run by
  `patchlab.graph_runner`). A joint set is either node-level or edge-level.

How a joint set combines on one component, in this fixed order (so the order in which the
interventions are declared never matters):

1. at most one *setting* intervention (`Patch`, `Ablate`, `Freeze`) per element: two that cover the
   same element conflict (`ValueError`);
2. every `ProjectOut` removes its direction (several: one after the other, in the order of their
   direction digests; linear, so it commutes with `Scale`);
3. every `Scale` factor multiplies the value;
4. every `Steer` adds its ``scale * vector``;
5. every `At` function runs last.

Each value has a short ``label`` (``patch(L10.resid_pre@S2<-clean)``, ``ablate(L23H3, mean)``),
recorded in result attrs, and ``to_json`` / `from_json` round-trip every kind but `At`.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import torch

from ._choices import Choice
from .components import Component
from .graph import Edge

__all__ = ["Run", "Ablation", "Intervention", "Patch", "Ablate", "Steer", "ProjectOut", "Scale", "Freeze", "At",
           "PatchEdge",
           "from_json",
           "joint_set", "SETTING"]


class Run(Choice):
    """The runs of a prompt-pair dataset."""

    CLEAN = "clean"
    CORRUPTED = "corrupted"


class Ablation(Choice):
    """How `Ablate` replaces a component's value."""

    ZERO = "zero"
    """Set it to 0."""
    MEAN = "mean"
    """Its mean over the dataset's corrupted prompts, per position."""
    RESAMPLE = "resample"
    """Its value on a corrupted prompt: the same pair's, or with ``seed=`` another pair's."""


def _component(value, kind: str) -> Component:
    if not isinstance(value, Component):
        raise TypeError(f"{kind} takes a Component (e.g. pl.Component(site='head', layer=9, head=6)), "
                        f"got {value!r} ({type(value).__name__})")
    return value


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{what} must be a finite real number, got {value!r}")
    return float(value)


class Intervention:
    """Base of the intervention values; each has a ``component``, a ``label`` and ``to_json``."""

    kind: ClassVar[str]
    component: Component

    @property
    def label(self) -> str:
        raise NotImplementedError

    def to_json(self) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.label


@dataclass(frozen=True, repr=False)
class Patch(Intervention):
    """The component takes its value from the `source` run (``"clean"`` or ``"corrupted"``).

    Raises:
        TypeError: `component` is not a `Component`.
        ValueError: an unknown source (the message lists the runs).
    """

    component: Component
    source: Run | str = Run.CLEAN
    kind: ClassVar[str] = "patch"

    def __post_init__(self) -> None:
        _component(self.component, "Patch")
        object.__setattr__(self, "source", Run(self.source))

    @property
    def label(self) -> str:
        return f"patch({self.component.label}<-{self.source.value})"

    def to_json(self) -> dict:
        return {"kind": self.kind, "component": _component_json(self.component), "source": self.source.value}


@dataclass(frozen=True, repr=False)
class Ablate(Intervention):
    """Replace the component's value: ``how="zero"``, ``"mean"`` or ``"resample"`` (see `Ablation`).

    Args:
        seed: resample only: draw, seeded, another pair's corrupted prompt for each pair (a random
            derangement of the prompts); None: the same pair's corrupted prompt.

    Raises:
        ValueError: an unknown `how` (the message lists them), or a seed with zero or mean ablation.
    """

    component: Component
    how: Ablation | str = Ablation.ZERO
    seed: int | None = None
    kind: ClassVar[str] = "ablate"

    def __post_init__(self) -> None:
        _component(self.component, "Ablate")
        object.__setattr__(self, "how", Ablation(self.how))
        if self.seed is not None and self.how is not Ablation.RESAMPLE:
            raise ValueError(f"Ablate(how={self.how.value!r}) takes no seed; a seed chooses the prompts of "
                             "how='resample'")

    @property
    def label(self) -> str:
        extra = "" if self.seed is None else f", seed={self.seed}"
        return f"ablate({self.component.label}, {self.how.value}{extra})"

    def to_json(self) -> dict:
        return {"kind": self.kind, "component": _component_json(self.component), "how": self.how.value,
                "seed": self.seed}


@dataclass(frozen=True, repr=False)
class Steer(Intervention):
    """Add ``scale * vector`` to the component's value at each of its positions (and head).

    Args:
        vector: ``[d_model]`` for ``resid_*``, ``attn_out`` and ``mlp_out``; ``[d_head]`` for the
            per-head sites (``head``, ``q``, ``k``, ``v``). Stored as a float64 CPU tensor;
            the run checks its size against the model.
        scale: a finite real number.

    Raises:
        TypeError: a vector that is not 1-d numbers, or a non-finite scale.
    """

    component: Component
    vector: torch.Tensor
    scale: float = 1.0
    kind: ClassVar[str] = "steer"
    digest: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        _component(self.component, "Steer")
        vector = _vector(self.vector, "Steer")
        object.__setattr__(self, "vector", vector)
        object.__setattr__(self, "scale", _number(self.scale, "Steer scale"))
        object.__setattr__(self, "digest", hashlib.sha256(vector.numpy().tobytes()).hexdigest()[:8])

    def __eq__(self, other) -> bool:
        return isinstance(other, Steer) and (self.component, self.scale, self.digest) == \
            (other.component, other.scale, other.digest) and torch.equal(self.vector, other.vector)

    def __hash__(self) -> int:
        return hash((self.component, self.scale, self.digest))

    @property
    def label(self) -> str:
        return f"steer({self.component.label}, {self.scale:g} * v#{self.digest})"

    def to_json(self) -> dict:
        return {"kind": self.kind, "component": _component_json(self.component), "vector": self.vector.tolist(),
                "scale": self.scale}


def _vector(value, kind: str) -> torch.Tensor:
    """A 1-d finite vector as a float64 CPU tensor."""
    vector = torch.as_tensor(value).detach().cpu()
    if vector.dim() != 1 or vector.dtype.is_complex or vector.dtype == torch.bool:
        raise TypeError(f"{kind} vector must be 1-d ([d_model] or [d_head]), got shape {tuple(vector.shape)}")
    vector = vector.double()
    if not torch.isfinite(vector).all():
        raise TypeError(f"{kind} vector has non-finite entries")
    return vector


@dataclass(frozen=True, repr=False)
class ProjectOut(Intervention):
    """Remove a direction from the component's value at each of its positions (and head):
    ``x - (x . r) r`` with ``r = direction / |direction|`` (directional ablation; Arditi et al.
    2024, arXiv 2406.11717). Its projection on ``r`` becomes 0; what is orthogonal to ``r`` stays.

    Args:
        direction: ``[d_model]`` for ``resid_*``, ``attn_out`` and ``mlp_out``; ``[d_head]`` for the
            per-head sites (``head``, ``q``, ``k``, ``v``); any non-zero length (it is normalised).
            Stored, normalised, as a float64 CPU tensor.

    Raises:
        TypeError: a direction that is not 1-d finite numbers.
        ValueError: a zero direction.
    """

    component: Component
    direction: torch.Tensor
    kind: ClassVar[str] = "project_out"
    digest: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        _component(self.component, "ProjectOut")
        direction = _vector(self.direction, "ProjectOut")
        norm = direction.norm()
        if norm == 0:
            raise ValueError("ProjectOut direction is the zero vector; give a non-zero direction (e.g. the difference "
                             "in means of the harmful and harmless runs)")
        direction = direction / norm
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "digest", hashlib.sha256(direction.numpy().tobytes()).hexdigest()[:8])

    def __eq__(self, other) -> bool:
        return isinstance(other, ProjectOut) and (self.component, self.digest) == (other.component, other.digest) \
            and torch.equal(self.direction, other.direction)

    def __hash__(self) -> int:
        return hash((self.component, self.digest))

    @property
    def label(self) -> str:
        return f"project_out({self.component.label}, r#{self.digest})"

    def to_json(self) -> dict:
        return {"kind": self.kind, "component": _component_json(self.component), "direction": self.direction.tolist()}


@dataclass(frozen=True, repr=False)
class Scale(Intervention):
    """Multiply the component's value by `factor` (0 is zero ablation, 0.5 a knock-down)."""

    component: Component
    factor: float
    kind: ClassVar[str] = "scale"

    def __post_init__(self) -> None:
        _component(self.component, "Scale")
        object.__setattr__(self, "factor", _number(self.factor, "Scale factor"))

    @property
    def label(self) -> str:
        return f"scale({self.component.label}, {self.factor:g})"

    def to_json(self) -> dict:
        return {"kind": self.kind, "component": _component_json(self.component), "factor": self.factor}


@dataclass(frozen=True, repr=False)
class Freeze(Intervention):
    """Keep the base run's own value of the component, whatever changes upstream."""

    component: Component
    kind: ClassVar[str] = "freeze"

    def __post_init__(self) -> None:
        _component(self.component, "Freeze")

    @property
    def label(self) -> str:
        return f"freeze({self.component.label})"

    def to_json(self) -> dict:
        return {"kind": self.kind, "component": _component_json(self.component)}


@dataclass(frozen=True, repr=False)
class At(Intervention):
    """Call ``fn(value)`` on the component's value inside the trace (the escape hatch).

    ``value`` is a tensor ``[batch, n_pos, d]`` (``d`` is ``d_model``, or ``d_head`` for a per-head
    component) holding the component's positions (all of them for ``pos=None``), after every other
    intervention on it; ``batch`` is ``row * prompt`` (row-major). ``fn`` may edit it in place or
    return a tensor of the same shape; what it leaves is written back. It may also keep (clone)
    values. It runs here only: ``remote=`` refuses it (a server does not have the function).

    Raises:
        TypeError: `fn` is not callable.
    """

    component: Component
    fn: Callable[[torch.Tensor], torch.Tensor | None]
    kind: ClassVar[str] = "at"

    def __post_init__(self) -> None:
        _component(self.component, "At")
        if not callable(self.fn):
            raise TypeError(f"At takes a function of the component's value, got {self.fn!r}")

    @property
    def label(self) -> str:
        return f"at({self.component.label}, {getattr(self.fn, '__qualname__', repr(self.fn))})"

    def to_json(self) -> dict:
        return {"kind": self.kind, "component": _component_json(self.component),
                "function": f"{getattr(self.fn, '__module__', '?')}.{getattr(self.fn, '__qualname__', '?')}"}


@dataclass(frozen=True, repr=False)
class PatchEdge(Intervention):
    """The edge `edge` carries the `source` run's value: its receiver reads the sender's output of
    that run along this edge, and every other input as in the base run (`patchlab.graph`).

    Args:
        mean: carry the mean of the source run over prompts, per position, instead (mean ablation
            of the edge, as in circuit evaluation).

    Raises:
        TypeError: `edge` is not an `patchlab.graph.Edge`.
        ValueError: an unknown source.
    """

    edge: Edge
    source: Run | str = Run.CLEAN
    mean: bool = False
    kind: ClassVar[str] = "patch_edge"

    def __post_init__(self) -> None:
        if not isinstance(self.edge, Edge):
            raise TypeError(f"PatchEdge takes an Edge (e.g. pl.Edge.from_label('L2H3->L5H1.q')), got {self.edge!r}")
        object.__setattr__(self, "source", Run(self.source))
        object.__setattr__(self, "mean", bool(self.mean))

    @property
    def component(self):
        raise AttributeError("PatchEdge addresses an edge (.edge), not a component")

    @property
    def label(self) -> str:
        return f"patch_edge({self.edge.label}<-{self.source.value}{', mean' if self.mean else ''})"

    def to_json(self) -> dict:
        return {"kind": self.kind, "edge": self.edge.label, "source": self.source.value, "mean": self.mean}


SETTING = (Patch, Ablate, Freeze)
"""The kinds that set a value; two on the same element of one joint set conflict."""

_KINDS = {cls.kind: cls for cls in (Patch, Ablate, Steer, ProjectOut, Scale, Freeze, PatchEdge)}


def _component_json(c: Component) -> dict:
    return {"site": c.site.value, "layer": c.layer, "head": c.head, "pos": None if c.pos is None else list(c.pos)}


def from_json(data: dict) -> Intervention:
    """The intervention `to_json` wrote.

    Raises:
        ValueError: an unknown kind, or ``"at"`` (a function does not round-trip).
    """
    kind = data.get("kind")
    if kind == "at":
        raise ValueError(f"an At intervention ({data.get('function')}) holds a function and cannot be rebuilt "
                         "from JSON; pass the function again")
    if kind not in _KINDS:
        raise ValueError(f"unknown intervention kind {kind!r}; known: {sorted(_KINDS)}")
    if kind == "patch_edge":
        return PatchEdge(Edge.from_label(data["edge"]), source=data["source"], mean=data["mean"])
    args = {k: v for k, v in data.items() if k not in ("kind", "component")}
    if kind == "steer":
        args["vector"] = torch.tensor(args["vector"], dtype=torch.float64)
    if kind == "project_out":
        args["direction"] = torch.tensor(args["direction"], dtype=torch.float64)
    return _KINDS[kind](Component(**data["component"]), **args)


def joint_set(interventions) -> tuple[Intervention, ...]:
    """`interventions` (one or an ordered collection) as a tuple, refusing what is not one.

    Raises:
        TypeError: an item that is not an `Intervention` (a bare `Component` gets a hint).
        ValueError: no interventions.
    """
    if isinstance(interventions, Intervention):
        interventions = (interventions,)
    if isinstance(interventions, (set, frozenset, dict, str)) or not isinstance(interventions, Sequence):
        raise TypeError(f"a joint set of interventions is a list or tuple, got a {type(interventions).__name__}")
    out = tuple(interventions)
    if not out:
        raise ValueError("a joint set has no interventions; give at least one (e.g. pl.Patch(component))")
    for i, item in enumerate(out):
        if isinstance(item, Component):
            raise TypeError(f"item {i} is the Component {item!r}, not an intervention: wrap it, e.g. "
                            f"pl.Patch({item!r}, source='clean') or pl.Ablate({item!r}, how='mean')")
        if not isinstance(item, Intervention):
            raise TypeError(f"item {i} is a {type(item).__name__} ({item!r}), not an intervention "
                            "(pl.Patch, pl.Ablate, pl.Steer, pl.ProjectOut, pl.Scale, pl.Freeze, pl.At, pl.PatchEdge)")
    return out
