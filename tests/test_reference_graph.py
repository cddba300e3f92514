"""Tests of the graph-level reference (tests/reference_graph.py) on every tiny family.

Edge and path patching are checked against closed forms that a wrong sender
decomposition, a wrong receiver input, a wrong head slice or a wrong freezing rule
break: node-level patches from tests/reference.py, the source run itself, exact
linearity once the receiver's norm is removed, and edge/path agreement where the
two quantities coincide.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

if __package__:
    from .reference import RefPatch, is_parallel, reference_cache, reference_patched_logits
    from .reference_graph import (
        RefEdge, edges_into, feeds, graph_receivers, graph_senders, reference_contributions,
        reference_edge_patched_logits, reference_multihop_path_patched_logits, reference_path_patched_logits,
    )
    from .precision import FLOAT32_ULPS
    from .tiny_models import ALL_FAMILIES, N_HEADS, N_KV_HEADS, N_LAYERS, VOCAB_SIZE, tiny_model
else:
    from reference import RefPatch, is_parallel, reference_cache, reference_patched_logits
    from reference_graph import (
        RefEdge, edges_into, feeds, graph_receivers, graph_senders, reference_contributions,
        reference_edge_patched_logits, reference_multihop_path_patched_logits, reference_path_patched_logits,
    )
    from precision import FLOAT32_ULPS
    from tiny_models import ALL_FAMILIES, N_HEADS, N_KV_HEADS, N_LAYERS, VOCAB_SIZE, tiny_model

GQA = {"llama", "mistral", "qwen2", "gemma2", "gemma3"}
GEMMA = {"gemma2", "gemma3"}
BATCH, SEQ = 2, 8
LAST = N_LAYERS - 1
CLOSE = dict(atol=1e-9, rtol=1e-9)
FLOAT32_CLOSE = dict(atol=FLOAT32_ULPS * torch.finfo(torch.float32).eps,
                     rtol=FLOAT32_ULPS * torch.finfo(torch.float32).eps)


def close(fam: str) -> dict:
    """`CLOSE` in float64; for Gemma, whose RMSNorm computes in float32 even in a float64 model
    and whose post-attention norm the graph splits over heads, float32 precision relative to
    the magnitude (tests/precision.py)."""
    return FLOAT32_CLOSE if fam in GEMMA else CLOSE
LOGITS = ("logits",)

# Module paths written out here, independently of reference_graph.py.
FINAL_NORM = {"gpt2": "transformer.ln_f", "gpt_neo": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}
FINAL_NORM["gpt_neox_seq"] = FINAL_NORM["gpt_neox"]
OUT_PROJ = {"gpt2": "transformer.h.{}.attn.c_proj", "gpt_neo": "transformer.h.{}.attn.attention.out_proj"}
OUT_PROJ["gpt_neox"] = OUT_PROJ["gpt_neox_seq"] = "gpt_neox.layers.{}.attention.dense"
for _f in GQA:
    FINAL_NORM[_f], OUT_PROJ[_f] = "model.norm", "model.layers.{}.self_attn.o_proj"

family = pytest.mark.parametrize("fam", ALL_FAMILIES)


@functools.lru_cache(maxsize=None)
def model(fam: str):
    return tiny_model(fam).double()  # float64: the invariants below hold to ~1e-15 on any CPU


@functools.lru_cache(maxsize=None)
def variant(fam: str, *, final_norm: bool = True, gemma_post_attn: bool = True, double: bool = False) -> nn.Module:
    """``fam``, optionally without its final norm (and Gemma2's logit soft-capping: then the
    logits are linear in the final residual), without Gemma's post-attention norms (then the
    attention branch is the plain sum of head outputs), or in float64."""
    m = copy.deepcopy(model(fam))
    paths = [] if final_norm else [FINAL_NORM[fam]]
    if fam in GEMMA and not gemma_post_attn:
        paths += [f"model.layers.{L}.post_attention_layernorm" for L in range(N_LAYERS)]
    for path in paths:
        parent, _, name = path.rpartition(".")
        setattr(m.get_submodule(parent), name, nn.Identity())
    if not final_norm and getattr(m.config, "final_logit_softcapping", None) is not None:
        m.config.final_logit_softcapping = None
    return m.double() if double else m


def ids(seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB_SIZE, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


BASE, SOURCE = ids(1), ids(2)


def logits(m: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(input_ids, use_cache=False).logits[:, -1]


def edge(m, edges):
    return reference_edge_patched_logits(m, BASE, SOURCE, edges)


def n_kv(fam: str) -> int:
    return N_KV_HEADS if fam in GQA else N_HEADS


def assert_differs(a: torch.Tensor, b: torch.Tensor, by: float = 1e-3) -> None:
    assert (a - b).abs().max() > by, "the patch changed nothing: the invariant would hold vacuously"


# --------------------------------------------------------------------------- the graph


@family
def test_graph_shape(fam):
    m = model(fam)
    senders, receivers = graph_senders(m), graph_receivers(m)
    assert len(senders) == 1 + N_LAYERS * (N_HEADS + 1)
    assert len(receivers) == N_LAYERS * (N_HEADS + 2 * n_kv(fam) + 1) + 1
    same_layer = feeds(m, ("head", 1, 0), ("mlp", 1))
    assert same_layer == (not is_parallel(m))
    assert not feeds(m, ("head", 1, 0), ("head", 1, 1)) and not feeds(m, ("mlp", 1), ("mlp", 1))
    assert {e.sender for e in edges_into(m, LOGITS, "in")} == set(senders)


@family
def test_contributions_sum_to_branches_and_residual(fam):
    """Heads of a layer plus the out-proj bias sum to the attention branch (Gemma: after its
    post-norm); embed plus every branch plus the biases is the last block's output."""
    m = model(fam)
    contrib = reference_contributions(m, BASE)
    sites = [("attn_out", L) for L in range(N_LAYERS)] + [("mlp_out", L) for L in range(N_LAYERS)]
    cache = reference_cache(m, BASE, sites + [("resid_post", LAST), ("resid_pre", 0)])
    total = contrib[("embed",)].clone()
    torch.testing.assert_close(total, cache[("resid_pre", 0)], atol=0, rtol=0)
    for L in range(N_LAYERS):
        bias = m.get_submodule(OUT_PROJ[fam].format(L)).bias
        attn = sum(contrib[("head", L, h)] for h in range(N_HEADS)) + (0 if bias is None else bias)
        torch.testing.assert_close(attn, cache[("attn_out", L)], **close(fam))
        torch.testing.assert_close(contrib[("mlp", L)], cache[("mlp_out", L)], atol=0, rtol=0)
        total = total + attn + contrib[("mlp", L)]
    torch.testing.assert_close(total, cache[("resid_post", LAST)], **close(fam))


@pytest.mark.parametrize("fam", sorted(GEMMA))
def test_gemma_head_contributions_follow_the_post_norm_eps(fam):
    """A large eps in post_attention_layernorm: head shares must use the module's own eps."""
    m = copy.deepcopy(model(fam))
    for L in range(N_LAYERS):
        m.get_submodule(f"model.layers.{L}.post_attention_layernorm").eps = 1.0
    contrib = reference_contributions(m, BASE)
    cache = reference_cache(m, BASE, [("attn_out", L) for L in range(N_LAYERS)])
    for L in range(N_LAYERS):
        heads = sum(contrib[("head", L, h)] for h in range(N_HEADS))
        torch.testing.assert_close(heads, cache[("attn_out", L)], **close(fam))


# --------------------------------------------------------------------------- edge patching


@family
def test_no_edges_is_the_base_run(fam):
    assert torch.equal(edge(model(fam), []), logits(model(fam), BASE))


@family
def test_all_edges_into_logits_give_source_logits(fam):
    """x = x(current) + sum_s (out_s(src) - out_s(current)) = source's final residual."""
    m = model(fam)
    torch.testing.assert_close(edge(m, edges_into(m, LOGITS, "in")), logits(m, SOURCE), **close(fam))


@family
def test_every_edge_patched_gives_source_logits(fam):
    """With every edge patched each receiver reads the source residual; this needs the
    *current* sender outputs (correcting by out_s(base) would double-count changes)."""
    m = model(fam)
    every = [e for r, c in graph_receivers(m) for e in edges_into(m, r, c)]
    torch.testing.assert_close(edge(m, every), logits(m, SOURCE), **close(fam))
    # Without the logits' edges every head and MLP still computes its source output; only
    # the embedding, which is no receiver's output, must be carried by its own edge.
    internal = [e for e in every if e.receiver != LOGITS] + [RefEdge(("embed",), LOGITS, "in")]
    torch.testing.assert_close(edge(m, internal), logits(m, SOURCE), **close(fam))


@family
@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_all_edges_into_mlp_equal_node_patch_of_its_input(fam, layer):
    """The MLP then reads the source's residual, so its branch output is the source's."""
    m = model(fam)
    src = reference_cache(m, SOURCE, [("mlp_out", layer)])[("mlp_out", layer)]
    expected = reference_patched_logits(m, BASE, [RefPatch("mlp_out", layer, None, None, src)])
    torch.testing.assert_close(edge(m, edges_into(m, ("mlp", layer), "in")), expected, **close(fam))
    assert_differs(expected, logits(m, BASE))


@family
@pytest.mark.parametrize("layer", range(N_LAYERS))
@pytest.mark.parametrize("channel", ["q", "k", "v"])
def test_all_edges_into_head_channel_equal_node_patch(fam, layer, channel):
    m = model(fam)
    h = (layer + 1) % (N_HEADS if channel == "q" else n_kv(fam))
    src = reference_cache(m, SOURCE, [(channel, layer)])[(channel, layer)]
    expected = reference_patched_logits(m, BASE, [RefPatch(channel, layer, h, None, src)])
    got = edge(m, edges_into(m, ("head", layer, h), channel))
    torch.testing.assert_close(got, expected, **close(fam))
    assert_differs(expected, logits(m, BASE), by=1e-5)


@family
def test_token_specific_edges(fam):
    m = model(fam)
    last, everywhere = SEQ - 1, edge(m, [RefEdge(("embed",), LOGITS, "in")])
    torch.testing.assert_close(edge(m, [RefEdge(("embed",), LOGITS, "in", last)]), everywhere, atol=0, rtol=0)
    assert torch.equal(edge(m, [RefEdge(("embed",), LOGITS, "in", 2)]), logits(m, BASE))
    # Into head (0, 1).q, whose only sender is embed: only q at position p takes the source value.
    src = reference_cache(m, SOURCE, [("q", 0)])[("q", 0)]
    for p in (2, last):
        got = edge(m, [RefEdge(("embed",), ("head", 0, 1), "q", p)])
        expected = reference_patched_logits(m, BASE, [RefPatch("q", 0, 1, (p,), src)])
        torch.testing.assert_close(got, expected, **close(fam))
    assert_differs(edge(m, [RefEdge(("embed",), ("head", 0, 1), "q", 2)]),
                   edge(m, [RefEdge(("embed",), ("head", 0, 1), "q")]), by=1e-5)
    # Every position of an edge, one at a time, sums to the all-position edge.
    per_pos = [RefEdge(("mlp", 0), ("head", 1, 2), "q", p) for p in range(SEQ)]
    torch.testing.assert_close(edge(m, per_pos), edge(m, [RefEdge(("mlp", 0), ("head", 1, 2), "q")]), **close(fam))


@family
def test_edges_into_logits_are_linear_without_the_final_norm(fam):
    a, b = 5, 7  # logit difference of tokens a and b
    e1, e2 = RefEdge(("head", 1, 2), LOGITS, "in"), RefEdge(("mlp", 0), LOGITS, "in", SEQ - 1)

    def change(m, edges):
        out = edge(m, edges) - logits(m, BASE)
        return out[:, a] - out[:, b]

    lin = variant(fam, final_norm=False, double=True)  # float64: exactness is not blurred by rounding
    both, one, two = change(lin, [e1, e2]), change(lin, [e1]), change(lin, [e2])
    torch.testing.assert_close(both, one + two, atol=1e-9, rtol=0)
    assert one.abs().min() > 1e-3 and two.abs().min() > 1e-3
    full = model(fam)  # with the norm the same check must fail, or it tests nothing
    assert (change(full, [e1, e2]) - change(full, [e1]) - change(full, [e2])).abs().max() > 1e-4


@family
def test_invalid_edges_raise(fam):
    m = model(fam)
    bad = [
        RefEdge(("head", 1, 0), ("head", 1, 2), "q"),  # same layer
        RefEdge(("mlp", 1), ("head", 0, 0), "k"),  # backwards
        RefEdge(("mlp", 1), ("mlp", 1), "in"),
        RefEdge(("mlp", 0), ("mlp", 1), "q"),  # MLPs have one channel
        RefEdge(("embed",), ("head", 0, 0), "in"),
        RefEdge(("embed",), ("head", 0, n_kv(fam)), "k"),  # key/value head out of range
        RefEdge(("head", N_LAYERS, 0), LOGITS, "in"),
        RefEdge(("embed",), LOGITS, "in", SEQ),
    ]
    if is_parallel(m):
        bad.append(RefEdge(("head", 1, 0), ("mlp", 1), "in"))
    for e in bad:
        with pytest.raises(ValueError):
            edge(m, [e])
    with pytest.raises(ValueError, match="twice"):
        edge(m, [RefEdge(("embed",), LOGITS, "in"), RefEdge(("embed",), LOGITS, "in", 3)])
    edge(m, [RefEdge(("embed",), ("head", 0, N_HEADS - 1), "q"), RefEdge(("head", 0, 0), ("mlp", 1), "in")])


# --------------------------------------------------------------------------- path patching


@family
def test_path_with_no_senders_is_the_base_run(fam):
    m = model(fam)
    receivers = [(("head", 1, 0), "q"), (("head", 2, 1), "v"), (("mlp", 1), "in"), (LOGITS, "in")]
    for freeze in (False, True):
        torch.testing.assert_close(
            reference_path_patched_logits(m, BASE, SOURCE, [], receivers, freeze_mlps=freeze),
            logits(m, BASE), atol=0, rtol=0,
        )


@family
def test_path_all_heads_to_logits_with_frozen_mlps_closed_form(fam):
    """Final residual = base's + sum_L (attn_out_L(source) - attn_out_L(base)): every head
    is at its source value and every MLP at its base value."""
    m = model(fam)
    sites = [("attn_out", L) for L in range(N_LAYERS)] + [("resid_post", LAST)]
    base, src = reference_cache(m, BASE, sites), reference_cache(m, SOURCE, sites)
    resid = base[("resid_post", LAST)] + sum(src[("attn_out", L)] - base[("attn_out", L)] for L in range(N_LAYERS))
    expected = reference_patched_logits(m, BASE, [RefPatch("resid_post", LAST, None, None, resid)])
    heads = [("head", L, h) for L in range(N_LAYERS) for h in range(N_HEADS)]
    got = reference_path_patched_logits(m, BASE, SOURCE, heads, "logits", freeze_mlps=True)
    torch.testing.assert_close(got, expected, **close(fam))
    assert_differs(got, reference_path_patched_logits(m, BASE, SOURCE, heads, "logits"))


def _pairs(fam: str):
    mlp_rcv = ("mlp", 2) if fam == "gpt_neox" else ("mlp", 1)
    return [
        (("head", 0, 1), LOGITS, "in"),
        (("head", LAST, 3), LOGITS, "in"),
        (("mlp", 0), LOGITS, "in"),
        (("head", 0, 2), ("head", 2, 1), "q"),
        (("head", 0, 2), ("head", 1, 1), "k"),
        (("mlp", 0), ("head", 1, 0), "v"),
        (("head", 1, 3), mlp_rcv, "in"),
        (("mlp", 0), ("mlp", 2), "in"),
    ]


@family
def test_single_path_with_frozen_mlps_equals_single_edge(fam):
    """With every other node frozen, sender -> receiver flows only along the direct edge.
    Gemma's post-attention norm makes the two differ, so it is removed there."""
    m = variant(fam, gemma_post_attn=False)
    for sender, receiver, channel in _pairs(fam):
        path = reference_path_patched_logits(m, BASE, SOURCE, [sender], [(receiver, channel)], freeze_mlps=True)
        torch.testing.assert_close(path, edge(m, [RefEdge(sender, receiver, channel)]), **close(fam))
        assert_differs(path, logits(m, BASE), by=1e-6)
    lin = variant(fam, final_norm=False, gemma_post_attn=False)  # direct effects, nothing normalising them
    path = reference_path_patched_logits(lin, BASE, SOURCE, [("head", 1, 0)], "logits", freeze_mlps=True)
    torch.testing.assert_close(path, edge(lin, [RefEdge(("head", 1, 0), LOGITS, "in")]), **close(fam))


@pytest.mark.parametrize("fam", sorted(GEMMA))
def test_gemma_single_path_differs_from_edge(fam):
    m = model(fam)
    path = reference_path_patched_logits(m, BASE, SOURCE, [("head", 0, 1)], "logits", freeze_mlps=True)
    assert_differs(path, edge(m, [RefEdge(("head", 0, 1), LOGITS, "in")]), by=1e-4)


@family
def test_path_from_last_layer_head_recomputes_its_mlp(fam):
    """A last-layer head reaches the logits directly and (sequential residual) through the
    last MLP, which path patching recomputes: the edge patch of all its outgoing edges."""
    m = variant(fam, gemma_post_attn=False)
    sender = ("head", LAST, 2)
    out_edges = [RefEdge(sender, r, c) for r, c in graph_receivers(m) if feeds(m, sender, r)]
    assert len(out_edges) == (1 if is_parallel(m) else 2)
    path = reference_path_patched_logits(m, BASE, SOURCE, [sender], "logits")
    torch.testing.assert_close(path, edge(m, out_edges), **close(fam))
    frozen = reference_path_patched_logits(m, BASE, SOURCE, [sender], "logits", freeze_mlps=True)
    if not is_parallel(m):
        assert_differs(path, frozen, by=1e-5)
    else:
        torch.testing.assert_close(path, frozen, **close(fam))


@family
def test_path_sender_mlp_keeps_its_source_value_when_frozen(fam):
    m = model(fam)
    src = reference_cache(m, SOURCE, [("mlp_out", LAST)])[("mlp_out", LAST)]
    expected = reference_patched_logits(m, BASE, [RefPatch("mlp_out", LAST, None, None, src)])
    for freeze in (False, True):
        got = reference_path_patched_logits(m, BASE, SOURCE, [("mlp", LAST)], "logits", freeze_mlps=freeze)
        torch.testing.assert_close(got, expected, **close(fam))


@family
def test_path_receivers_must_come_after_senders(fam):
    m = model(fam)
    with pytest.raises(ValueError, match="receivers must come after senders"):
        reference_path_patched_logits(m, BASE, SOURCE, [("head", LAST, 0)], [(("head", 0, 1), "q")])
    with pytest.raises(ValueError, match="receivers must come after senders"):
        reference_path_patched_logits(m, BASE, SOURCE, [("head", 1, 0)], [(("head", 1, 1), "k")])
    with pytest.raises(ValueError, match="receivers must come after senders"):
        reference_path_patched_logits(m, BASE, SOURCE, [("mlp", 1)], [(("mlp", 1), "in")])
    with pytest.raises(ValueError):
        reference_path_patched_logits(m, BASE, SOURCE, [("embed",)], "logits")
    with pytest.raises(ValueError):
        reference_path_patched_logits(m, BASE, SOURCE, [("head", 0, 0)], "resid")


# --------------------------------------------------------------------------- multi-hop path patching

HOP_FAMILIES = pytest.mark.parametrize("fam", ["gpt2", "gpt_neox", "llama", "gemma2"])


@HOP_FAMILIES
def test_multihop_with_no_hops_is_single_hop_path_patching(fam):
    m = model(fam)
    cases = [
        ([("head", 0, 1)], "logits"),
        ([("head", 0, 2), ("mlp", 0)], [(("head", 2, 1), "q"), (("head", 1, 1), "k"), (("mlp", 1), "in")]),
        ([("mlp", 0), ("head", 1, 3)], [(("head", 2, 0), "v"), (LOGITS, "in")]),
    ]
    for senders, receivers in cases:
        for freeze in (False, True):
            want = reference_path_patched_logits(m, BASE, SOURCE, senders, receivers, freeze_mlps=freeze)
            got = reference_multihop_path_patched_logits(m, BASE, SOURCE, senders, [], receivers, freeze_mlps=freeze)
            assert torch.equal(got, want)


def _chain_expected(m, sender_head: int, chain: list[tuple[int, int, str]]) -> torch.Tensor:
    """Head (0, sender_head) -> chain of single-head hops (layer, head, channel) -> logits with
    frozen MLPs, by node patches alone: each hop's input is read in a run with the previous
    patch (and every MLP at base); the last hop's head then changes the final residual only by
    the change of its layer's attention branch (everything after it frozen)."""
    sites = [("mlp_out", L) for L in range(N_LAYERS)] + [("head", 0), ("resid_post", LAST)]
    base, src = reference_cache(m, BASE, sites), reference_cache(m, SOURCE, [("head", 0)])
    mlps = [RefPatch("mlp_out", L, None, None, base[("mlp_out", L)]) for L in range(N_LAYERS)]
    patch = RefPatch("head", 0, sender_head, None, src[("head", 0)])
    for layer, head, channel in chain:
        value = reference_cache(m, BASE, [(channel, layer)], patches=[patch] + mlps)[(channel, layer)]
        patch = RefPatch(channel, layer, head, None, value)
    layer = chain[-1][0]
    changed = reference_cache(m, BASE, [("attn_out", layer)], patches=[patch])[("attn_out", layer)]
    plain = reference_cache(m, BASE, [("attn_out", layer)])[("attn_out", layer)]
    assert_differs(changed, plain, by=1e-6)
    resid = base[("resid_post", LAST)] + (changed - plain)
    return reference_patched_logits(m, BASE, [RefPatch("resid_post", LAST, None, None, resid)])


@HOP_FAMILIES
@pytest.mark.parametrize("channel", ["q", "k", "v"])
def test_multihop_frozen_mlps_closed_form(fam, channel):
    """sender -> hop(s) -> logits with frozen MLPs equals the chain of node patches: pins the
    hop's recorded input, that the hop head (k/v: every query head of its group) computes
    freely in the next pass, and that every other head and every MLP stays at base."""
    m = model(fam)
    hop1 = (1, 1, channel)  # k/v on GQA: key/value head 1 = query heads 2, 3
    for chain in ([hop1], [hop1, (2, 0, "q")]):
        hops = [[(("head", L, h), c)] for L, h, c in chain]
        got = reference_multihop_path_patched_logits(m, BASE, SOURCE, [("head", 0, 1)], hops, "logits", freeze_mlps=True)
        torch.testing.assert_close(got, _chain_expected(m, 1, chain), **close(fam))
        assert_differs(got, logits(m, BASE), by=1e-6)
    # Recomputed MLPs carry the hop head's change further: a different quantity.
    free = reference_multihop_path_patched_logits(m, BASE, SOURCE, [("head", 0, 1)], [[(("head", 1, 1), channel)]], "logits")
    assert_differs(free, got, by=1e-6)


@HOP_FAMILIES
def test_multihop_order_is_validated(fam):
    m = model(fam)
    s = [("head", 0, 1)]
    q = lambda L, h=0: (("head", L, h), "q")  # noqa: E731
    call = lambda senders, hops, receivers="logits": reference_multihop_path_patched_logits(  # noqa: E731
        m, BASE, SOURCE, senders, hops, receivers)
    for senders, hops, receivers in [
        (s, [[q(0)]], "logits"),  # hop in the sender's layer
        ([("mlp", 1)], [[q(1)]], "logits"),
        (s, [[q(1)], [q(1, 2)]], "logits"),  # second hop in the first hop's layer
        (s, [[q(2)], [q(1)]], "logits"),  # backwards
        (s, [[q(1), q(2)], [q(2, 1)]], "logits"),  # one head of hop 1 is not before hop 2
        (s, [[q(2)]], [q(1)]),  # receiver before the hop
        (s, [[q(2)]], [q(2, 1)]),  # receiver in the hop's layer
    ]:
        with pytest.raises(ValueError, match="must come after"):
            call(senders, hops, receivers)
    for hops in ([[]], [[(("mlp", 1), "in")]], [[(("head", 1, 0), "in")]], [[(("head", 1, N_HEADS), "q")]]):
        with pytest.raises(ValueError):
            call(s, hops)
    call(s, [[q(1), (("head", 1, n_kv(fam) - 1), "v")]], [(("head", 2, n_kv(fam) - 1), "k"), (LOGITS, "in")])
    call(s, [[q(1)], [q(2)]], "logits")
