"""Edge attribution patching: first-order scores for every edge of the graph at once.

**EAP** (Syed et al. 2023, "Attribution Patching Outperforms Automated Circuit
Discovery", arXiv 2310.10348) estimates the effect of patching edge ``s -> r.c``
(the definition in `patchlab.graph_runner`) by a first-order Taylor expansion
around the base run:

    score(s -> r.c) = sum over pos of (out_s(source) - out_s(base)) . d m / d x_{r,c}

averaged over prompts, where ``x_{r,c}`` is the residual stream that channel ``c``
of receiver ``r`` reads (before its norm): the gradient reaches it only through
that receiver's own norm and q/k/v slice (or MLP, or unembedding). One cached
forward pass (the source run) and one forward+backward pass (also the base run)
score every edge, in one program (`patchlab.kernels.attribution`; one request
remotely).

**EAP-IG** (Hanna et al. 2024, "Have Faith in Faithfulness", arXiv 2403.17806)
replaces the gradient by its mean over ``steps`` points on the straight line from
the base run's embeddings towards the source run's, ``alpha = k / steps`` for
``k = 0 .. steps-1`` (so ``steps=1`` is EAP).

Scores are estimates of ``m(patched) - m(base)`` in the metric's units, the same
quantity as `patchlab.exact_edge_scores`; the default direction is noising (base =
clean, source = corrupted). Attribution is known to fail where attention saturates
and where direct and indirect effects cancel (Kramar et al. 2024, AtP*); compare
with exact scores (`patchlab.agreement`).
"""

from __future__ import annotations

from types import SimpleNamespace

import xarray as xr

from .circuit import edge_scores, score_attrs
from .data import PromptPairDataset
from .graph import Channel, Graph, NodeKind
from .kernels import attribution as kattribution
from .metrics import Direction, Metric, check_gap, get_metric
from .models import PatchModel, takes_model
from .patching import length_groups, tokenize_for
from .remote import execute

__all__ = ["eap", "eap_ig"]


@takes_model
def eap(model: PatchModel, dataset: PromptPairDataset, *, metric: Metric | str = Metric.LOGIT_DIFF,
        direction: Direction | str = Direction.NOISING, per_position: bool = False,
        seed: int | None = None, remote=None) -> xr.Dataset:
    """Edge attribution patching (EAP) scores of every edge.

    Args:
        metric: what the gradient is taken of (default logit difference, nats). KL to
            the clean run has zero gradient at the clean run: with noising it scores 0.
        direction: noising (base clean, source corrupted; default) or denoising.
        per_position: score token-specific edges (``Graph.from_model(model, n_pos=...)``)
            instead of all-token edges.
        seed: recorded in attrs (EAP is deterministic).
        remote: see `patchlab.remote`; this costs 1 request (source cache, gradient pass
            and scores in one program).

    Returns:
        Edge scores (`patchlab.circuit.edge_scores`): ``score`` (edge), estimated
        ``m(patched) - m(base)`` in the metric's units; attrs ``method="eap"``,
        metric, direction, baselines and provenance.
    """
    return _attribute(model, dataset, steps=1, method="eap", metric=metric, direction=direction,
                      per_position=per_position, seed=seed, remote=remote)


@takes_model
def eap_ig(model: PatchModel, dataset: PromptPairDataset, *, steps: int = 5, metric: Metric | str = Metric.LOGIT_DIFF,
           direction: Direction | str = Direction.NOISING, per_position: bool = False,
           seed: int | None = None, remote=None) -> xr.Dataset:
    """EAP with integrated gradients (EAP-IG, Hanna et al. 2024): the gradient is averaged
    over `steps` interpolations of the input embeddings from the base towards the source run.

    Args:
        steps: interpolation steps ``m`` (5 is typical; 1 equals `eap`). The batch holds
            ``steps * n_prompts`` sequences.
        metric, direction, per_position, seed: as in `eap`.
        remote: see `patchlab.remote`; this costs 1 request (all steps in one gradient pass).

    Returns:
        Edge scores as in `eap`, with attrs ``method="eap_ig"`` and ``ig_steps``.

    Raises:
        ValueError: steps < 1.
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: EAP-IG needs at least one interpolation step")
    return _attribute(model, dataset, steps=steps, method="eap_ig", metric=metric, direction=direction,
                      per_position=per_position, seed=seed, remote=remote)


def _attribute(model, dataset, *, steps, method, metric, direction, per_position, seed, remote) -> xr.Dataset:
    tokens = tokenize_for(model, dataset, paired=method)
    metric, direction = get_metric(metric), Direction(direction)
    noising = direction is Direction.NOISING
    base_ids, source_ids = (tokens.clean_ids, tokens.corrupted_ids) if noising else (tokens.corrupted_ids, tokens.clean_ids)
    graph = Graph.from_model(model, n_pos=tokens.n_pos if per_position else None)
    # The gradient pass is also the base run (its alpha = 0 rows): two forward passes in all.
    spec = {"arch": model.arch(), "base_ids": base_ids, "source_ids": source_ids, "steps": steps,
            "metric": metric.spec, "targets": {"correct": tokens.correct_ids, "incorrect": tokens.incorrect_ids},
            "clean_is_base": noising, "receivers": _program_order(graph),
            "reach": [len(graph.senders_into(node)) for node, _ in graph.receivers], "per_position": per_position,
            "groups": length_groups(tokens)}
    result = execute(model, kattribution.attribution_program, spec, remote=remote)
    check_gap(result["runs"]["clean"], result["runs"]["corrupted"], metric)
    runs = SimpleNamespace(metric=metric, direction=direction,
                           baselines={name: value.cpu() for name, value in result["runs"].items()})
    attrs = score_attrs(model, dataset, runs, method=method, seed=seed, **tokens.pad_attrs(),
                        per_position=int(per_position),
                        **({"ig_steps": steps} if method == "eap_ig" else {}))
    return edge_scores(list(graph.edges()), result["values"].cpu().double().numpy(), graph=graph, attrs=attrs)


def _program_order(graph: Graph) -> list[int]:
    """Index of each of `graph.receivers` in the program's receiver order (per layer: the q
    channels of the heads, the k and v channels of the key/value heads, the MLP; then the logits)."""
    n_q, n_kv = graph.n_heads, graph.n_kv_heads
    per_layer = n_q + 2 * n_kv + 1
    offset = {Channel.Q: 0, Channel.K: n_q, Channel.V: n_q + n_kv}

    def index(node, channel) -> int:
        if node.kind is NodeKind.LOGITS:
            return graph.n_layers * per_layer
        if node.kind is NodeKind.MLP:
            return node.layer * per_layer + per_layer - 1
        return node.layer * per_layer + offset[channel] + node.head

    return [index(node, channel) for node, channel in graph.receivers]
