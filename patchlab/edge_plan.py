"""Planning edge patching: how each row's edge set becomes the kernel's receiver keys.

`patchlab.graph_runner.edge_patch_rows` patches one edge set per row. Per receiver
channel, a row's incoming edges are either patched directly (a correction term per
patched edge) or, when more than half are patched, in complement form (the source
residual, with terms for the unpatched edges); see `patchlab.graph_runner`. The plan of
a row is the set of those receiver keys (plain dicts, `patchlab.kernels.edges`) and the
earliest layer that a row changes.

An `EdgePlanner` remembers the plan of the last one-row call per receiver channel, so a
search that changes a few edges between calls (ACDC: one edge per step) replans only the
channels whose incoming edges changed: a step costs set differences over the row (in C)
plus the changed channels, not a Python pass over every edge of the graph.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Sequence

import torch

from .graph import Channel, Edge, Graph, Node, NodeKind
from .models import PatchModel

__all__ = ["EdgePlanner"]

Key = tuple[Node, Channel]


class EdgePlanner:
    """Plans `patchlab.graph_runner.edge_patch_rows` rows for one model, graph and prompt width.

    Pass the same planner to successive calls (``edge_patch_rows(..., planner=)``) whose rows
    differ by a few edges: each call then replans only the receiver channels whose edges changed.

    Raises:
        ValueError: (from `check`) an edge that is not in the graph.
    """

    def __init__(self, model: PatchModel, graph: Graph, n_pos: int):
        self.graph, self.n_pos = graph, n_pos
        self.n_layers, self.n_heads = model.layout.n_layers, model.layout.n_heads
        self._order = {key: i for i, key in enumerate(graph.receivers)}
        self._last: frozenset[Edge] | None = None
        self._groups: dict[Key, frozenset[Edge]] = {}
        self._memo: dict[Key, tuple[frozenset[Edge], tuple[int, bool, int], dict | None]] = {}

    def matches(self, graph: Graph, n_pos: int) -> bool:
        """Whether this planner plans rows of `graph` over `n_pos` positions."""
        return graph == self.graph and n_pos == self.n_pos

    def check(self, row: Sequence[Edge]) -> frozenset[Edge]:
        """The row as a frozenset of edges of the graph (at positions ``0..n_pos-1``).

        Raises:
            ValueError: an edge that is not an edge of the graph, or one given both at one position
                and at all positions.
        """
        graph, n_pos = self.graph, self.n_pos
        row = frozenset(row)
        if row <= _edges(graph) and (graph.n_pos is None or graph.n_pos == n_pos):
            return row
        for edge in row:
            key = (edge.receiver, edge.channel)
            if key not in _receivers(graph) or edge.sender not in _senders(graph, edge.receiver) \
                    or (edge.pos is not None and not 0 <= edge.pos < n_pos):
                raise ValueError(f"edge {edge.label} is not an edge of this model's graph")
            if edge.pos is not None and edge.with_pos(None) in row:
                raise ValueError(f"edge {edge.label} is given both at one position and at all positions")
        return row

    def summary(self, row: frozenset[Edge]) -> tuple[int, frozenset[Key], int]:
        """(start layer, receiver channels in complement form, number of correction terms) of one row;
        it becomes the remembered row."""
        groups = self._grouped(row)
        parts = [self._part(key, edges) for key, edges in groups.items()]
        start = min([self.n_layers - 1] + [layer for layer, _, _ in parts])
        flipped = frozenset(key for key, (_, flip, _) in zip(groups, parts) if flip)
        return start, flipped, sum(n for _, _, n in parts)

    def keys(self, rows: Sequence[frozenset[Edge]], flipped: Sequence[frozenset[Key]]) -> list[dict]:
        """The receiver keys of a chunk of rows (per row of the chunk; see `patchlab.kernels.edges`),
        in the graph's receiver order; `flipped` as `summary` gave them."""
        if len(rows) == 1 and rows[0] is self._last:  # the remembered row: reuse its channels' keys
            keys = []
            for key in sorted(self._groups, key=self._order.__getitem__):
                edges, part, plan = self._memo[key]
                if plan is None:
                    plan = self._key_plan(key, [(0, e) for e in edges], [part[1]])
                    self._memo[key] = (edges, part, plan)
                keys.append(plan)
            return keys
        entries: dict[Key, list[tuple[int, Edge]]] = defaultdict(list)
        for r, row in enumerate(rows):
            for e in row:
                entries[(e.receiver, e.channel)].append((r, e))
        return [self._key_plan(key, entries[key], [key in f for f in flipped])
                for key in sorted(entries, key=self._order.__getitem__)]

    def _grouped(self, row: frozenset[Edge]) -> dict[Key, frozenset[Edge]]:
        """The row's edges by receiver channel, updated from the remembered row when few edges differ."""
        last = self._last
        if last is not None:
            added, dropped = row - last, last - row
            if len(added) + len(dropped) <= max(8, len(row) // 8):
                groups = self._groups
                changed = defaultdict(list)
                for e in added:
                    changed[(e.receiver, e.channel)].append((e, True))
                for e in dropped:
                    changed[(e.receiver, e.channel)].append((e, False))
                for key, items in changed.items():
                    edges = set(groups.get(key, ()))
                    for e, add in items:
                        (edges.add if add else edges.discard)(e)
                    if edges:
                        groups[key] = frozenset(edges)
                    else:
                        groups.pop(key, None)
                self._last = row
                return groups
        grouped: dict[Key, list[Edge]] = defaultdict(list)
        for e in row:
            grouped[(e.receiver, e.channel)].append(e)
        self._groups = {key: frozenset(edges) for key, edges in grouped.items()}
        self._last = row
        return self._groups

    def _part(self, key: Key, edges: frozenset[Edge]) -> tuple[int, bool, int]:
        """(earliest layer, complement form, correction terms) of one receiver channel's edges."""
        memo = self._memo.get(key)
        if memo is not None and (memo[0] is edges or memo[0] == edges):
            return memo[1]
        n, n_pos = self.n_layers, self.n_pos
        senders = _senders(self.graph, key[0])
        patched = sum(n_pos if e.pos is None else 1 for e in edges)
        if 2 * patched > len(senders) * n_pos:  # complement form: terms for the unpatched edges
            covered = defaultdict(int)
            for e in edges:
                covered[e.sender] += n_pos if e.pos is None else 1
            kept = [s for s in senders if covered[s] < n_pos]
            part = (min([_layer(s, n) for s in kept] + [_layer(key[0], n)]), True, int(bool(kept)))
        else:
            part = (min(_layer(e.sender, n) for e in edges), False, 1)
        self._memo[key] = (edges, part, None)
        return part

    def _key_plan(self, key: Key, items: Sequence[tuple[int, Edge]], flip_rows: Sequence[bool]) -> dict:
        """One receiver channel's key for the chunk's rows (`items`: (row, edge) pairs)."""
        n_rows, n_pos, n_layers, n_heads = len(flip_rows), self.n_pos, self.n_layers, self.n_heads
        column = _sender_columns(n_layers, n_heads)
        r, p, s = torch.tensor([(row, -1 if e.pos is None else e.pos, column[e.sender]) for row, e in items]).T
        mask = torch.zeros(n_rows, n_pos, len(column))
        every_pos = p < 0
        mask[r[every_pos], :, s[every_pos]] = 1.0
        mask[r[~every_pos], p[~every_pos], s[~every_pos]] = 1.0
        valid = torch.zeros(len(column))
        valid[[column[s] for s in _senders(self.graph, key[0])]] = 1.0
        flip = torch.tensor(list(flip_rows))
        coef = torch.where(flip[:, None, None], mask - valid, mask)  # complement: -1 on unpatched edges
        patched = (mask > 0).flatten(1).sum(1)
        full = patched == valid.sum() * n_pos
        partial = (patched > 0) & ~full
        node, channel = key
        if node.kind in (NodeKind.HEAD, NodeKind.KV_HEAD):
            flip = flip & ~full  # fully patched heads take the source projection directly
        used = coef.abs().sum((0, 1))  # [sender]: which columns carry a term
        per_layer = coef[..., 1:].unflatten(-1, (n_layers, n_heads + 1))  # [row, pos, layer, head + mlp]
        used_layers = used[1:].view(n_layers, n_heads + 1)
        return {  # slices are cloned: a remote request ships a view's whole base tensor
            "kind": node.kind.value, "layer": node.layer, "head": node.head, "site": channel.value,
            "flip": flip.float()[:, None, None], "full": full, "partial": partial,
            "embed": coef[..., :1].clone() if used[0] > 0 else None,
            "heads": {layer: per_layer[:, :, layer, :n_heads].clone()
                      for layer in used_layers[:, :n_heads].sum(1).nonzero().flatten().tolist()},
            "mlps": {layer: per_layer[:, :, layer, n_heads:].clone()
                     for layer in used_layers[:, n_heads].nonzero().flatten().tolist()}}


@functools.lru_cache(maxsize=8)
def _edges(graph: Graph) -> frozenset[Edge]:
    return frozenset(graph.edges())


@functools.lru_cache(maxsize=8)
def _receivers(graph: Graph) -> frozenset[Key]:
    return frozenset(graph.receivers)


@functools.lru_cache(maxsize=4096)
def _senders(graph: Graph, receiver: Node) -> frozenset[Node]:
    return frozenset(graph.senders_into(receiver))


def _layer(node: Node, n_layers: int) -> int:
    return 0 if node.kind is NodeKind.EMBED else n_layers - 1 if node.kind is NodeKind.LOGITS else node.layer


@functools.lru_cache(maxsize=16)
def _sender_columns(n_layers: int, n_heads: int) -> dict[Node, int]:
    """Column of each sender in the dense coefficient matrix: embed, then per layer its heads and MLP."""
    columns = {Node(NodeKind.EMBED): 0}
    for layer in range(n_layers):
        for h in range(n_heads):
            columns[Node(NodeKind.HEAD, layer, h)] = 1 + layer * (n_heads + 1) + h
        columns[Node(NodeKind.MLP, layer)] = 1 + layer * (n_heads + 1) + n_heads
    return columns
