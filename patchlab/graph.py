"""The model as a computational graph of senders and receivers.

Nodes are the token embeddings, every attention head, every MLP and the logits.
The residual stream is the sum of the earlier nodes' outputs, so every node reads
a sum over its senders: an **edge** goes from a sender to one input **channel**
of a later node (Wang et al. 2022, arXiv 2211.00593; Conmy et al. 2023, arXiv
2304.14997). A head has three channels (q, k, v); an MLP and the logits have one
("in").

Grouped-query attention (Llama family, SmolLM2, Gemma): the keys and values of
a group of query heads are computed once, from one projection slice. Edges into
k and v therefore go to the **key/value head** (node kind `NodeKind.KV_HEAD`,
label "L9KV2"), and patching one changes the keys or values seen by every query
head of its group; edges into q go to each query head. In models without GQA the
key/value head *is* the head, so k and v edges go to the head node ("L9H6.k").

Edges can be token-specific (sender at position p into the receiver at position
p): build the graph with ``n_pos``. All values here are small frozen data with
labels that serve as xarray coordinates ("L2H3->L9H6.q", "embed->logits@4").
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Iterator

from ._choices import Choice
from .components import Site, as_index

__all__ = ["NodeKind", "Channel", "Node", "Edge", "Graph"]


class NodeKind(Choice):
    """Kind of graph node, in forward order within a layer."""

    EMBED = "embed"
    """Token (and position) embeddings: the residual stream entering block 0. Sender only."""
    HEAD = "head"
    """An attention (query) head: sender through its output, receiver through q (and k, v without GQA)."""
    KV_HEAD = "kv_head"
    """A key/value head of a grouped-query model: receiver of k and v edges only."""
    MLP = "mlp"
    """An MLP block: sender and receiver ("in")."""
    LOGITS = "logits"
    """The unembedding of the final residual stream. Receiver only."""


class Channel(Choice):
    """Input channel of a receiver."""

    Q = "q"
    K = "k"
    V = "v"
    IN = "in"
    """The single input of an MLP or of the logits."""

    @property
    def site(self) -> Site | None:
        """The head input site this channel reads (q, k, v), None for "in"."""
        return None if self is Channel.IN else Site(self.value)


_NODE_LABEL = re.compile(r"L(\d+)(\.mlp|H|KV)(\d+)?")
_EDGE_LABEL = re.compile(r"([^-]+)->([^.@]+(?:\.mlp)?)(?:\.([qkv]))?(?:@(\d+))?")
_KIND_ORDER = {NodeKind.EMBED: 0, NodeKind.KV_HEAD: 1, NodeKind.HEAD: 2, NodeKind.MLP: 3, NodeKind.LOGITS: 4}
_CHANNEL_ORDER = {Channel.Q: 0, Channel.K: 1, Channel.V: 2, Channel.IN: 3}
_UNLAYERED = (NodeKind.EMBED, NodeKind.LOGITS)
_HEADED = (NodeKind.HEAD, NodeKind.KV_HEAD)


@dataclass(frozen=True)
class Node:
    """A graph node. `layer` is None for embed and logits; `head` only for head kinds."""

    kind: NodeKind
    layer: int | None = None
    head: int | None = None

    def __post_init__(self) -> None:  # kept cheap: graphs of big models build ~10^5 nodes
        kind = self.kind if type(self.kind) is NodeKind else NodeKind(self.kind)
        layered, headed = kind not in _UNLAYERED, kind in _HEADED
        if layered != (self.layer is not None) or headed != (self.head is not None):
            raise ValueError(f"a {kind.value} node has {'a' if layered else 'no'} layer and "
                             f"{'a' if headed else 'no'} head, got layer={self.layer!r}, head={self.head!r}")
        for name, value in (("layer", self.layer), ("head", self.head)):
            if value is not None:
                if type(value) is not int:
                    value = as_index(value, f"Node {name}")
                    object.__setattr__(self, name, value)
                if value < 0:
                    raise ValueError(f"Node {name} must be >= 0, got {value}")
        object.__setattr__(self, "kind", kind)

    @property
    def sort_key(self) -> tuple:
        layer = -1 if self.kind is NodeKind.EMBED else (1 << 30) if self.kind is NodeKind.LOGITS else self.layer
        return (layer, _KIND_ORDER[self.kind], -1 if self.head is None else self.head)

    def __lt__(self, other: "Node") -> bool:
        return self.sort_key < other.sort_key

    @functools.cached_property
    def label(self) -> str:
        if self.kind in (NodeKind.EMBED, NodeKind.LOGITS):
            return self.kind.value
        if self.kind is NodeKind.MLP:
            return f"L{self.layer}.mlp"
        return f"L{self.layer}{'H' if self.kind is NodeKind.HEAD else 'KV'}{self.head}"

    def __repr__(self) -> str:
        return f"Node({self.label})"

    def __hash__(self) -> int:  # computed once: edge sets of big models hash nodes millions of times
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash((self.kind, self.layer, self.head))

    @classmethod
    def from_label(cls, label: str) -> "Node":
        """The node with this label ("embed", "logits", "L3.mlp", "L9H6", "L9KV2").

        Raises:
            ValueError: a label that names no node.
        """
        if label in ("embed", "logits"):
            return cls(NodeKind(label))
        match = _NODE_LABEL.fullmatch(label)
        if match is None:
            raise ValueError(f"{label!r} is not a node label (expected embed, logits, L3.mlp, L9H6 or L9KV2)")
        layer, kind, head = match.groups()
        if kind == ".mlp":
            return cls(NodeKind.MLP, int(layer))
        return cls(NodeKind.HEAD if kind == "H" else NodeKind.KV_HEAD, int(layer), int(head))


@dataclass(frozen=True)
class Edge:
    """Sender -> receiver's `channel`, at all positions (`pos` None) or at one position."""

    sender: Node
    receiver: Node
    channel: Channel
    pos: int | None = None

    def __post_init__(self) -> None:
        for name in ("sender", "receiver"):
            if not isinstance(getattr(self, name), Node):
                raise TypeError(f"Edge {name} must be a Node, got {getattr(self, name)!r}")
        if type(self.channel) is not Channel:
            object.__setattr__(self, "channel", Channel(self.channel))
        if self.pos is not None:
            pos = as_index(self.pos, "Edge pos")
            if pos < 0:
                raise ValueError(f"Edge pos must be >= 0 (count from the left), got {pos}")
            object.__setattr__(self, "pos", pos)

    @property
    def sort_key(self) -> tuple:
        return (self.receiver.sort_key, _CHANNEL_ORDER[self.channel], self.sender.sort_key,
                -1 if self.pos is None else self.pos)

    def __lt__(self, other: "Edge") -> bool:
        return self.sort_key < other.sort_key

    @functools.cached_property
    def label(self) -> str:
        into = self.receiver.label + ("" if self.channel is Channel.IN else f".{self.channel.value}")
        return f"{self.sender.label}->{into}" + ("" if self.pos is None else f"@{self.pos}")

    def __repr__(self) -> str:
        return f"Edge({self.label})"

    def __hash__(self) -> int:
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash((self.sender, self.receiver, self.channel, self.pos))

    def with_pos(self, pos: int | None) -> "Edge":
        """The same edge at position `pos` (None: all positions)."""
        return dataclasses.replace(self, pos=pos)

    @classmethod
    def from_label(cls, label: str) -> "Edge":
        """The edge with this label ("L2H3->L9H6.q", "embed->logits@4"); inverse of `label`.

        Raises:
            ValueError: a label that names no edge.
        """
        match = _EDGE_LABEL.fullmatch(label)
        if match is None:
            raise ValueError(f"{label!r} is not an edge label (expected e.g. L2H3->L9H6.q or embed->logits@4)")
        sender, receiver, channel, pos = match.groups()
        receiver = Node.from_label(receiver)
        if (channel is None) != (receiver.kind in (NodeKind.MLP, NodeKind.LOGITS)):
            raise ValueError(f"{label!r}: heads receive through .q/.k/.v, MLPs and logits through no channel suffix")
        return cls(Node.from_label(sender), receiver, Channel(channel) if channel else Channel.IN,
                   None if pos is None else int(pos))


@dataclass(frozen=True, kw_only=True)
class Graph:
    """The computational graph of a decoder-only transformer.

    Args:
        n_layers, n_heads, n_kv_heads: the model's layout.
        parallel_residual: the MLP reads the block input (GPT-NeoX/Pythia), so
            heads of the same layer do not send to it.
        n_pos: build token-specific edges for positions ``0..n_pos-1`` (None:
            edges cover all positions).

    Use `Graph.from_model(model)` for a loaded `PatchModel`.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel_residual: bool = False
    n_pos: int | None = None

    def __post_init__(self) -> None:
        if min(self.n_layers, self.n_heads, self.n_kv_heads) < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"bad layout: {self.n_layers} layers, {self.n_heads} heads, {self.n_kv_heads} kv heads")

    @classmethod
    def from_model(cls, model, *, n_pos: int | None = None) -> "Graph":
        """The graph of a `patchlab.PatchModel`.

        Raises:
            TypeError: `model` is not a `PatchModel` (e.g. a Hugging Face model: load it first).
        """
        from .models import check_patch_model

        lay = check_patch_model(model).layout
        return cls(n_layers=lay.n_layers, n_heads=lay.n_heads, n_kv_heads=lay.n_kv_heads,
                   parallel_residual=not model.adapter.has_resid_mid(model.hf.config), n_pos=n_pos)

    @property
    def gqa(self) -> bool:
        return self.n_kv_heads != self.n_heads

    # ---- nodes ---------------------------------------------------------------
    @functools.cached_property
    def senders(self) -> tuple[Node, ...]:
        """Embed, heads and MLPs, in topological order."""
        out = [Node(NodeKind.EMBED)]
        for layer in range(self.n_layers):
            out += [Node(NodeKind.HEAD, layer, h) for h in range(self.n_heads)] + [Node(NodeKind.MLP, layer)]
        return tuple(out)

    @functools.cached_property
    def receivers(self) -> tuple[tuple[Node, Channel], ...]:
        """Every (node, channel) that reads the residual stream, in topological order."""
        out = []
        for layer in range(self.n_layers):
            out += [(Node(NodeKind.HEAD, layer, h), Channel.Q) for h in range(self.n_heads)]
            kv = NodeKind.KV_HEAD if self.gqa else NodeKind.HEAD
            for channel in (Channel.K, Channel.V):
                out += [(Node(kv, layer, g), channel) for g in range(self.n_kv_heads)]
            out.append((Node(NodeKind.MLP, layer), Channel.IN))
        out.append((Node(NodeKind.LOGITS), Channel.IN))
        return tuple(sorted(out, key=lambda rc: (rc[0].sort_key, _CHANNEL_ORDER[rc[1]])))

    @functools.cached_property
    def nodes(self) -> tuple[Node, ...]:
        """All nodes in topological order."""
        return tuple(sorted(set(self.senders) | {node for node, _ in self.receivers}))

    # ---- edges -----------------------------------------------------------------
    def senders_into(self, receiver: Node) -> tuple[Node, ...]:
        """The senders whose output the receiver reads (topological order).

        Raises:
            ValueError: a node that receives nothing (embed) or is not in this graph.
        """
        try:
            return self._senders_into[receiver]
        except KeyError:
            raise ValueError(f"{receiver.label} is not a receiver of this graph") from None

    @functools.cached_property
    def _senders_into(self) -> dict[Node, tuple[Node, ...]]:
        """Every receiver's senders: always a prefix of `senders` (topological order)."""
        out = {}
        for receiver in {node for node, _ in self.receivers}:
            if receiver.kind is NodeKind.LOGITS:
                out[receiver] = self.senders
                continue
            reads_layer_heads = receiver.kind is NodeKind.MLP and not self.parallel_residual
            out[receiver] = tuple(s for s in self.senders
                                  if s.kind is NodeKind.EMBED or s.layer < receiver.layer
                                  or (reads_layer_heads and s.kind is NodeKind.HEAD and s.layer == receiver.layer))
        return out

    def edges(self) -> Iterator[Edge]:
        """Every edge, in topological order (by receiver, channel, sender, position)."""
        return iter(_all_edges(self))

    @functools.cached_property
    def n_edges(self) -> int:
        return sum(len(self.senders_into(r)) for r, _ in self.receivers) * (self.n_pos or 1)

    def to_networkx(self):
        """A ``networkx.MultiDiGraph``: nodes keyed by label (attrs kind, layer, head),
        one edge per (sender, receiver, channel[, pos]) keyed by the channel (and position)."""
        import networkx as nx

        graph = nx.MultiDiGraph()
        for node in self.nodes:
            graph.add_node(node.label, kind=node.kind.value, layer=node.layer, head=node.head)
        for edge in self.edges():
            key = edge.channel.value if edge.pos is None else f"{edge.channel.value}@{edge.pos}"
            graph.add_edge(edge.sender.label, edge.receiver.label, key=key, channel=edge.channel.value,
                           pos=edge.pos, label=edge.label)
        return graph


@functools.lru_cache(maxsize=8)
def _all_edges(graph: Graph) -> tuple[Edge, ...]:
    """The edges of a graph, built once per layout (a pure function of the frozen graph),
    so that repeated sweeps reuse the same Edge objects with their cached labels and hashes."""
    positions = [None] if graph.n_pos is None else range(graph.n_pos)
    return tuple(Edge(sender, receiver, channel, pos) for receiver, channel in graph.receivers
                 for sender in graph.senders_into(receiver) for pos in positions)
