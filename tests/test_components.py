"""Component addresses: validation, labels, forward order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from patchlab import Component, Site

HEAD_SITES = [s for s in Site if s.per_head]


def test_labels():
    assert Component(site="head", layer=9, head=6).label == "L9H6"
    assert Component(site="q", layer=9, head=6).label == "L9H6.q"
    assert Component(site="mlp_out", layer=3, pos=5).label == "L3.mlp_out@5"
    assert Component(site="resid_pre", layer=0, pos=[4, 2, 4]).label == "L0.resid_pre@2,4"


@pytest.mark.parametrize("kwargs,match", [
    (dict(site="head", layer=1), "per head"),
    (dict(site="mlp_out", layer=1, head=0), "no heads"),
    (dict(site="resid_pre", layer=-1), "layer"),
    (dict(site="resid_pre", layer=0, pos=[]), "empty"),
    (dict(site="resid_pre", layer=0, pos=""), "non-empty"),
])
def test_bad_addresses_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Component(**kwargs)


def test_named_and_end_relative_positions_resolve_per_dataset():
    c = Component(site="resid_pre", layer=3, pos=["END", -1, 2, "S2"])
    assert c.label == "L3.resid_pre@2,-1,END,S2" and c.symbolic
    assert c.resolve({"S2": 9, "END": 14}, 15) == Component(site="resid_pre", layer=3, pos=[2, 9, 14])
    assert Component(site="head", layer=0, head=1).resolve({}, 4).pos is None
    with pytest.raises(ValueError, match=r"'S2' is not a named position.*'END'"):
        c.resolve({"END": 14}, 15)
    with pytest.raises(ValueError, match="offset -1 from the end"):
        Component(site="resid_pre", layer=0, pos=-1).resolve({}, 0)


def test_unknown_site_is_refused():
    with pytest.raises(ValueError):
        Component(site="hook_z", layer=0)


def test_frozen_and_hashable():
    c = Component(site="k", layer=2, head=1, pos=3)
    assert c == Component(site=Site.K, layer=2, head=1, pos=(3,)) and len({c, Component(site="k", layer=2, head=1, pos=3)}) == 1
    with pytest.raises(AttributeError):
        c.layer = 3


components = st.builds(
    lambda site, layer, head, pos: Component(site=site, layer=layer, head=head if site.per_head else None, pos=pos),
    st.sampled_from(list(Site)), st.integers(0, 40), st.integers(0, 15),
    st.one_of(st.none(), st.integers(0, 30)))


@given(st.lists(components, min_size=2, max_size=20))
def test_sorting_is_forward_order(cs):
    ordered = sorted(cs)
    for a, b in zip(ordered, ordered[1:]):
        assert (a.layer, a.site.order) <= (b.layer, b.site.order)


def test_sites_within_a_layer_follow_the_forward_pass():
    names = [s.value for s in sorted(Site, key=lambda s: s.order)]
    assert names == ["resid_pre", "q", "k", "v", "pattern", "head", "attn_out", "resid_mid", "mlp_out", "resid_post"]
