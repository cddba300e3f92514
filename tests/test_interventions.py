"""Declarative interventions against plain-PyTorch forward hooks, in float64, on every family.

Each joint set of `patchlab.interventions` values, run by patchlab's engine (nnsight traces,
batched rows, vectorised writes, skipped lower layers), is compared with `tests.reference`,
which applies the same edits with ``register_forward_hook`` calls, one forward pass per row:
setting interventions first, then scale, steer and user functions, each as its own hook.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

import patchlab as pl
from patchlab.components import Site
from patchlab.interventions import from_json
from patchlab.metrics import Metric, Targets
from patchlab.runner import derangement

from .precision import exact_atol
from .reference import RefPatch, reference_cache, reference_patched_logits
from .test_patching_exact import random_pairs
from .tiny_models import ALL_FAMILIES, tiny_patch_model

C = pl.Component


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def setup(request):
    model = tiny_patch_model(request.param)
    dataset = random_pairs(model.hf.config.vocab_size)
    return model, dataset, dataset.tokenize(model.tokenizer)


def ref_pos(pos, names, n_pos):
    """The test's own resolution of names and offsets from the end."""
    if pos is None:
        return None
    return tuple(sorted({names[p] if isinstance(p, str) else p % n_pos for p in pos}))


def halve_and_flip(x):
    return x.flip(-1) * 0.5


def reference_rows(model, tokens, rows, base="corrupted", metric=Metric.LOGIT_DIFF) -> torch.Tensor:
    """Metric per (row, prompt): one plain-hook forward pass per joint set."""
    hf = model.hf
    sites = sorted({(i.component.site.value, i.component.layer) for row in rows for i in row})
    runs = {"clean": reference_cache(hf, tokens.clean_ids, sites),
            "corrupted": reference_cache(hf, tokens.corrupted_ids, sites)}
    base_ids = tokens.corrupted_ids if base == "corrupted" else tokens.clean_ids
    with torch.no_grad():
        clean_logits = hf(tokens.clean_ids).logits[:, -1]
    targets = Targets(correct=tokens.correct_ids, incorrect=tokens.incorrect_ids,
                      clean_logprobs=torch.log_softmax(clean_logits, -1))
    out = []
    for row in rows:
        stages = {pl.Patch: [], pl.Ablate: [], pl.Freeze: [], pl.ProjectOut: [], pl.Scale: [], pl.Steer: [], pl.At: []}
        for i in sorted(row, key=lambda i: i.digest if isinstance(i, pl.ProjectOut) else ""):  # directions by digest
            c = i.component
            key = (c.site.value, c.layer)
            spot = dict(site=c.site.value, layer=c.layer, head=c.head, pos=ref_pos(c.pos, dict(tokens.positions),
                                                                                  tokens.n_pos))
            if isinstance(i, pl.Patch):
                patch = RefPatch(**spot, value=runs[i.source.value][key])
            elif isinstance(i, pl.Freeze):
                patch = RefPatch(**spot, value=runs[base][key])
            elif isinstance(i, pl.Ablate):
                corrupted = runs["corrupted"][key]
                value = {"zero": torch.zeros_like(corrupted),
                         "mean": corrupted.mean(0, keepdim=True).expand_as(corrupted).contiguous(),
                         "resample": corrupted if i.seed is None else corrupted[derangement(len(corrupted), i.seed)]}
                patch = RefPatch(**spot, value=value[i.how.value])
            elif isinstance(i, pl.Scale):
                patch = RefPatch(**spot, fn=lambda x, f=i.factor: x * f)
            elif isinstance(i, pl.Steer):
                patch = RefPatch(**spot, fn=lambda x, v=i.vector, s=i.scale: x + s * v)
            elif isinstance(i, pl.ProjectOut):  # the unit direction, from the raw one given
                r = i.direction / i.direction.norm()
                patch = RefPatch(**spot, fn=lambda x, r=r: x - (x @ r)[..., None] * r)
            else:
                patch = RefPatch(**spot, fn=i.fn)
            stages[type(i)].append(patch)
        patches = [p for stage in stages.values() for p in stage]
        out.append(metric(reference_patched_logits(hf, base_ids, patches), targets))
    return torch.stack(out)


def sites_of(model):
    """Every node site but the pattern (tested with its own reference below)."""
    return [s for s in Site if s is not Site.PATTERN and (s is not Site.RESID_MID
                                                          or model.adapter.has_resid_mid(model.hf.config))]


def one_of_each(model, site: Site, layer: int) -> list:
    """Every kind of intervention on one site, at a mix of position forms."""
    head = 1 if site.per_head else None
    width = model.layout.d_head if site.per_head else model.layout.d_model
    vector = torch.linspace(-1, 1, width, dtype=torch.float64)
    at = lambda pos: C(site=site, layer=layer, head=head, pos=pos)  # noqa: E731
    return [pl.Patch(at(None)), pl.Patch(at("A"), source="corrupted"), pl.Ablate(at(-1), how="zero"),
            pl.Ablate(at(None), how="mean"), pl.Ablate(at([0, "END"]), how="resample", seed=3),
            pl.Steer(at(-2), vector, scale=2.5), pl.Scale(at(None), 0.25), pl.Freeze(at(2)),
            pl.At(at([1, -1]), halve_and_flip), pl.ProjectOut(at([0, -1]), vector.flip(0) + 0.3)]


def test_each_kind_on_each_site_equals_hooks(setup):
    model, dataset, tokens = setup
    rows = {}
    for site in sites_of(model):
        for layer in range(model.layout.n_layers):
            for i in one_of_each(model, site, layer):
                rows[i.label] = [i]
    ds = pl.sweep_interventions(model, dataset, rows, progress=False)
    assert list(ds.row.values) == list(rows)
    expected = reference_rows(model, tokens, list(rows.values()))
    got = torch.from_numpy(ds.patched.values)
    assert torch.allclose(got, expected, atol=exact_atol(model, expected), rtol=0), (got - expected).abs().max()
    # the interventions change the metric at all (a no-op engine cannot pass)
    assert (got - torch.from_numpy(ds.corrupted.values)).abs().max() > 1e-3


def joint(model):
    last = model.layout.n_layers - 1
    v = torch.arange(model.layout.d_model, dtype=torch.float64) / model.layout.d_model
    return [
        pl.Patch(C(site="resid_pre", layer=0, pos="A")),                     # upstream patch ...
        pl.Freeze(C(site="head", layer=last, head=0)),                       # ... a frozen head downstream
        pl.Patch(C(site="mlp_out", layer=0, pos=[2, 3])),                    # set, scaled and steered:
        pl.Scale(C(site="mlp_out", layer=0, pos=[3, 4]), -0.5),              # the fixed order matters
        pl.Steer(C(site="mlp_out", layer=0, pos=3), v, scale=3.0),
        pl.ProjectOut(C(site="mlp_out", layer=0, pos=[1, 3]), v.flip(0) - 0.4),  # after the set, before the scale
        pl.Ablate(C(site="k", layer=last, head=0, pos=-1), how="mean"),
        pl.Scale(C(site="head", layer=last, head=1), 0.0),
        pl.At(C(site="resid_post", layer=last, pos="END"), halve_and_flip),
    ]


@pytest.mark.parametrize("base", ["corrupted", "clean"])
def test_joint_sets_in_any_declared_order_equal_hooks(setup, base):
    model, dataset, tokens = setup
    interventions = joint(model)
    expected = reference_rows(model, tokens, [interventions], base=base)[0]
    tol = exact_atol(model, expected)
    orders = [interventions, interventions[::-1], interventions[3:] + interventions[:3]]
    for order in orders:
        ds = pl.run_interventions(model, dataset, order, base=base)
        assert torch.allclose(torch.from_numpy(ds.patched.values), expected, atol=tol, rtol=0)
    with pl.trace(model, dataset, base=base) as t:  # the context form, scrambled again
        for i in orders[2][::-1]:
            t.add(i)
    assert torch.allclose(torch.from_numpy(t.result.patched.values), expected, atol=tol, rtol=0)
    assert json.loads(t.result.attrs["labels"]) == [i.label for i in orders[2][::-1]]
    clean, corrupted = t.result.clean.mean(), t.result.corrupted.mean()
    m = t.result.patched.mean()
    formula = (m - corrupted) / (clean - corrupted) if base == "corrupted" else (clean - m) / (clean - corrupted)
    assert abs(float(t.result.score) - float(formula)) < 1e-12


def test_trace_methods_and_the_escape_hatch(setup):
    model, dataset, tokens = setup
    seen = []

    def keep(x):
        seen.append(x.clone())
        x[..., 0] = 0.0  # in place

    comp = C(site="attn_out", layer=0, pos=[1, 2])
    with pl.trace(model, dataset) as t:
        t.at(comp, keep)
        t.patch(C(site="resid_pre", layer=0, pos=1), source="clean")
        t.ablate(C(site="mlp_out", layer=0), how="resample")
        t.scale(C(site="head", layer=0, head=0), 2.0)
        t.steer(C(site="q", layer=0, head=1, pos=0), torch.ones(model.layout.d_head))
        t.freeze(C(site="resid_post", layer=0, pos=4))
    zero_first = lambda x: x.index_fill(-1, torch.tensor([0]), 0.0)  # noqa: E731
    expected = reference_rows(model, tokens, [t.interventions[1:] + [pl.At(comp, zero_first)]])[0]
    assert torch.allclose(torch.from_numpy(t.result.patched.values), expected, atol=exact_atol(model, expected),
                          rtol=0)
    (value,) = seen
    assert value.shape == (tokens.n_prompts, 2, model.layout.d_model)
    assert (value[..., 0] != 0).all()


def test_patch_components_takes_joint_rows(setup):
    model, dataset, tokens = setup
    rows = [C(site="head", layer=0, head=0), [C(site="head", layer=0, head=0), C(site="resid_pre", layer=1, pos="A")],
            (C(site="mlp_out", layer=0, pos=-1),)]
    ds = pl.patch_components(model, dataset, rows, progress=False)
    assert list(ds.component.values) == ["L0H0", "L0H0+L1.resid_pre@A", "L0.mlp_out@-1"]
    expected = reference_rows(model, tokens, [[pl.Patch(c) for c in (r if isinstance(r, (list, tuple)) else [r])]
                                              for r in rows])
    assert torch.allclose(torch.from_numpy(ds.patched.values), expected, atol=exact_atol(model, expected), rtol=0)


def test_sweeps_are_patch_rows_on_the_engine(setup):
    """patch_layer_pos and patch_heads equal the same rows given to sweep_interventions (one engine),
    to the last bit."""
    model, dataset, _ = setup
    ds = pl.patch_layer_pos(model, dataset, site="resid_pre", progress=False)
    rows = {f"{layer},{p}": [pl.Patch(C(site="resid_pre", layer=int(layer), pos=int(p)))]
            for layer in ds.layer for p in ds.pos}
    same = pl.sweep_interventions(model, dataset, rows, progress=False)
    assert (same.patched.values.reshape(ds.patched.shape) == ds.patched.values).all()
    heads = pl.patch_heads(model, dataset, site="v", direction="noising", progress=False)
    rows = {f"{layer},{h}": [pl.Patch(C(site="v", layer=int(layer), head=int(h)), source="corrupted")]
            for layer in heads.layer for h in heads["head"]}
    same = pl.sweep_interventions(model, dataset, rows, base="clean", progress=False)
    assert (same.patched.values.reshape(heads.patched.shape) == heads.patched.values).all()


# ---- metrics ----------------------------------------------------------------------------

def answer_set_pairs(vocab: int) -> pl.PromptPairDataset:
    pairs = random_pairs(vocab).pairs
    return pl.PromptPairDataset(pairs=[
        pl.PromptPair(clean=p.clean, corrupted=p.corrupted, correct=("w5", "w6", "w7")[:1 + i], incorrect=("w8", "w9"),
                      positions=p.positions) for i, p in enumerate(pairs)], name="sets")


def test_answer_sets_and_log_odds_equal_closed_forms():
    model = tiny_patch_model("llama")
    dataset = answer_set_pairs(model.hf.config.vocab_size)
    tokens = dataset.tokenize(model.tokenizer)
    ids = lambda *words: [model.tokenizer.convert_tokens_to_ids(w) for w in words]  # noqa: E731
    assert tokens.correct_ids.tolist() == [ids("w5") + [-1, -1], ids("w5", "w6") + [-1], ids("w5", "w6", "w7")]
    with torch.no_grad():
        logits = model.hf(tokens.clean_ids).logits[:, -1].double()
    correct = [ids("w5", "w6", "w7")[:1 + i] for i in range(3)]
    wrong = ids("w8", "w9")
    lse = lambda row, s: torch.logsumexp(row[s], 0)  # noqa: E731
    p = torch.stack([logits[i].softmax(-1)[correct[i]].sum() for i in range(3)])
    closed = {"logit_diff": torch.stack([lse(logits[i], correct[i]) - lse(logits[i], wrong) for i in range(3)]),
              "prob": p, "logprob": p.log(), "log_odds": p.log() - (1 - p).log()}
    for name, expected in closed.items():
        ds = pl.patch_components(model, dataset, [C(site="head", layer=0, head=0)], metric=name, progress=False)
        assert torch.allclose(torch.from_numpy(ds.clean.values), expected, atol=1e-9, rtol=0), name
        assert "correct" in ds.attrs["metric_formula"] and ds.attrs["metric"] == name


def test_user_metric_equals_closed_form_and_hooks(setup):
    model, dataset, tokens = setup

    def margin(logits, targets):
        """Logit of token 5 minus the mean logit."""
        return logits[:, 5] - logits.mean(-1)

    with torch.no_grad():
        clean = model.hf(tokens.clean_ids).logits[:, -1]
    rows = {"a": [pl.Ablate(C(site="mlp_out", layer=0), how="mean")]}
    ds = pl.sweep_interventions(model, dataset, rows, metric=margin, progress=False)
    assert torch.allclose(torch.from_numpy(ds.clean.values), clean[:, 5] - clean.mean(-1), atol=1e-9, rtol=0)
    expected = reference_rows(model, tokens, list(rows.values()), metric=pl.MetricFunction(margin))
    assert torch.allclose(torch.from_numpy(ds.patched.values), expected, atol=exact_atol(model, expected), rtol=0)
    assert ds.attrs["metric"] == "margin" and "Logit of token 5" in ds.attrs["metric_formula"]


# ---- values, labels, JSON ---------------------------------------------------------------

def test_labels_and_json_round_trip():
    v = torch.tensor([0.1, -2.0, 1 / 3], dtype=torch.float64)
    values = [pl.Patch(C(site="resid_pre", layer=10, pos="S2")), pl.Ablate(C(site="head", layer=23, head=3), "mean"),
              pl.Ablate(C(site="v", layer=1, head=0, pos=[-1, 2]), "resample", seed=7),
              pl.Steer(C(site="resid_pre", layer=12, pos="END"), v, scale=4.0), pl.Scale(C(site="head", layer=2, head=1), 0.5),
              pl.Freeze(C(site="mlp_out", layer=3, pos=-1)),
              pl.ProjectOut(C(site="resid_post", layer=4, pos=-1), 2 * v)]
    assert [i.label for i in values[:3]] == ["patch(L10.resid_pre@S2<-clean)", "ablate(L23H3, mean)",
                                             "ablate(L1H0.v@2,-1, resample, seed=7)"]
    assert values[3].label.startswith("steer(L12.resid_pre@END, 4 * v#")
    assert values[-1].label.startswith("project_out(L4.resid_post@-1, r#") and values[-1].direction.norm() == 1
    assert values[-1] == pl.ProjectOut(C(site="resid_post", layer=4, pos=-1), v)  # the direction, not its length
    for i in values:
        back = from_json(json.loads(json.dumps(i.to_json())))
        assert back == i and back.label == i.label
    with pytest.raises(ValueError, match="function"):
        from_json(pl.At(C(site="head", layer=0, head=0), halve_and_flip).to_json())


# ---- bad input --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    model = tiny_patch_model("llama")
    return model, random_pairs(model.hf.config.vocab_size)


@pytest.mark.parametrize("rows,error,match", [
    ([pl.Steer(C(site="resid_pre", layer=0), torch.ones(3))], ValueError, r"3 entries.*\[d_model\]"),
    ([pl.Steer(C(site="head", layer=0, head=0), torch.ones(64))], ValueError, r"\[d_head\]"),
    ([pl.Patch(C(site="resid_pre", layer=0, pos="S2"))], ValueError, r"'S2' is not a named position.*'A'"),
    ([pl.Patch(C(site="resid_pre", layer=0, pos=-99))], ValueError, "offset -99 from the end"),
    ([pl.Patch(C(site="head", layer=0, head=0)), pl.Ablate(C(site="head", layer=0, head=0, pos=2))], ValueError,
     r"patch\(L0H0<-clean\) and ablate\(L0H0@2, zero\) both set"),
    ([C(site="head", layer=0, head=0)], TypeError, r"not an intervention: wrap it, e\.g\. pl\.Patch"),
    ([pl.ProjectOut(C(site="mlp_out", layer=0), torch.ones(5))], ValueError, r"5 entries.*\[d_model\]"),
    ([], ValueError, "no interventions"),
])
def test_bad_joint_sets_are_refused(llama, rows, error, match):
    model, dataset = llama
    with pytest.raises(error, match=match):
        pl.run_interventions(model, dataset, rows)


def test_bad_metrics_and_remote_functions_are_refused(llama):
    model, dataset = llama
    row = [pl.Scale(C(site="head", layer=0, head=0), 0.5)]
    with pytest.raises(ValueError, match=r"returned \(2, 1\).*\[batch\] = \(2,\)"):
        pl.run_interventions(model, dataset, row, metric=lambda logits, t: logits[:, :1])
    with pytest.raises(ValueError, match="failed on logits"):
        pl.run_interventions(model, dataset, row, metric=lambda logits, t: logits["x"])
    with pytest.raises(ValueError, match="cannot travel with remote="):
        pl.run_interventions(model, dataset, [pl.At(C(site="head", layer=0, head=0), halve_and_flip)], remote="local")
    with pytest.raises(ValueError, match="takes no seed"):
        pl.Ablate(C(site="head", layer=0, head=0), how="mean", seed=1)
    with pytest.raises(ValueError, match="'resample'"):
        pl.Ablate(C(site="head", layer=0, head=0), how="resampel")
    with pytest.raises(TypeError, match="1-d"):
        pl.Steer(C(site="head", layer=0, head=0), torch.ones(2, 2))
    with pytest.raises(ValueError, match="two rows have the label"):
        pl.sweep_interventions(model, dataset, [row, row])


def test_derangements_move_every_prompt():
    for n in (2, 3, 7):
        for seed in range(5):
            perm = derangement(n, seed)
            assert sorted(perm.tolist()) == list(range(n)) and not (perm == torch.arange(n)).any()
    assert torch.equal(derangement(7, 1), derangement(7, 1))


# ---- edge level ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_edge_interventions_equal_the_graph_reference(family):
    from .reference_graph import reference_edge_patched_logits
    from .test_edges_exact import ref_edge, some_edge_sets

    model = tiny_patch_model(family)
    dataset = random_pairs(model.hf.config.vocab_size)
    tokens = dataset.tokenize(model.tokenizer)
    sets = [s for s in some_edge_sets(pl.Graph.from_model(model), tokens.n_pos) if s][:8]
    rows = {f"set {k}": [pl.PatchEdge(e, source="corrupted") for e in s] for k, s in enumerate(sets)}
    ds = pl.sweep_interventions(model, dataset, rows, base="clean", progress=False)
    targets = Targets(correct=tokens.correct_ids, incorrect=tokens.incorrect_ids)
    expected = torch.stack([Metric.LOGIT_DIFF(reference_edge_patched_logits(
        model.hf, tokens.clean_ids, tokens.corrupted_ids, [ref_edge(e) for e in s]), targets) for s in sets]).double()
    got = torch.from_numpy(ds.patched.values)
    assert torch.allclose(got, expected, atol=exact_atol(model, expected, edges=True), rtol=0)
    assert json.loads(ds.attrs["interventions"])["set 0"][0]["kind"] == "patch_edge"
    edge = pl.PatchEdge(sets[0][0], source="corrupted", mean=True)
    assert from_json(json.loads(json.dumps(edge.to_json()))) == edge
    with pytest.raises(ValueError, match="from the corrupted run"):
        pl.sweep_interventions(model, dataset, {"x": [pl.PatchEdge(sets[0][0], source="clean")]}, base="clean")
    with pytest.raises(ValueError, match="mix edge interventions"):
        pl.run_interventions(model, dataset, [pl.PatchEdge(sets[0][0], source="corrupted"),
                                              pl.Patch(C(site="head", layer=0, head=0))], base="clean")


# ---- attention patterns -------------------------------------------------------------------

def _attention(hf, layer):
    from .reference import _block, _family

    return _block(hf, layer).get_submodule(_family(hf)[1])


def reference_pattern(hf, ids, layer) -> torch.Tensor:
    """The attention probabilities of block `layer`, ``[batch, head, query, key]`` (plain hook)."""
    seen = {}
    handle = _attention(hf, layer).register_forward_hook(lambda m, a, out: seen.update(p=out[1].clone()))
    with torch.no_grad():
        hf(ids)
    handle.remove()
    return seen["p"]


@contextmanager
def pattern_edits(hf, edits):
    """Edit attention probabilities where Hugging Face's eager attention uses them: the input of the
    attention dropout (identity in eval), inside block ``layer``'s attention only.
    `edits`: ``{layer: [(head, query positions or None, fn of [b, n_q, key])]}``."""
    original = torch.nn.functional.dropout
    active = {}

    def dropout(x, *args, **kwargs):
        layer = active.get("layer")
        if layer is not None and x.dim() == 4:
            x = x.clone()
            for head, pos, fn in edits[layer]:
                q = slice(None) if pos is None else list(pos)
                x[:, head, q] = fn(x[:, head, q].clone())
        return original(x, *args, **kwargs)

    handles = []
    for layer in edits:
        attn = _attention(hf, layer)
        handles.append(attn.register_forward_pre_hook(lambda m, a, layer=layer: active.update(layer=layer)))
        handles.append(attn.register_forward_hook(lambda m, a, o: active.update(layer=None)))
    torch.nn.functional.dropout = dropout
    try:
        yield
    finally:
        torch.nn.functional.dropout = original
        for h in handles:
            h.remove()


def reference_pattern_rows(model, tokens, rows, base="corrupted"):
    """Like `reference_rows`, for rows whose pattern interventions are edited by `pattern_edits`."""
    hf = model.hf
    base_ids = tokens.corrupted_ids if base == "corrupted" else tokens.clean_ids
    targets = Targets(correct=tokens.correct_ids, incorrect=tokens.incorrect_ids)
    out = []
    for row in rows:
        edits, others = {}, []
        for i in row:
            c = i.component
            if c.site is not Site.PATTERN:
                others.append(i)
                continue
            pattern = lambda ids, layer=c.layer: reference_pattern(hf, ids, layer).transpose(0, 1)  # noqa: E731
            pos = ref_pos(c.pos, dict(tokens.positions), tokens.n_pos)
            q = slice(None) if pos is None else list(pos)
            if isinstance(i, pl.Patch) or isinstance(i, pl.Freeze):
                ids = base_ids if isinstance(i, pl.Freeze) else getattr(tokens, f"{i.source.value}_ids")
                value = pattern(ids)[c.head][:, q]
                fn = lambda x, value=value: value  # noqa: E731
            elif isinstance(i, pl.Ablate):
                corrupted = pattern(tokens.corrupted_ids)[c.head][:, q]
                value = {"zero": torch.zeros_like(corrupted), "mean": corrupted.mean(0, keepdim=True).expand_as(corrupted),
                         "resample": corrupted if i.seed is None else corrupted[derangement(len(corrupted), i.seed)]}
                fn = lambda x, value=value[i.how.value]: value  # noqa: E731
            elif isinstance(i, pl.Scale):
                fn = lambda x, f=i.factor: x * f  # noqa: E731
            else:
                fn = lambda x, v=i.vector, s=i.scale: x + s * v  # noqa: E731
            edits.setdefault(c.layer, []).append((c.head, pos, fn, type(i)))
        for layer in edits:  # set, then scale, then steer, as the engine combines them
            rank = {pl.Patch: 0, pl.Ablate: 0, pl.Freeze: 0, pl.Scale: 1, pl.Steer: 2}
            edits[layer] = [e[:3] for e in sorted(edits[layer], key=lambda e: rank[e[3]])]
        with pattern_edits(hf, edits):
            logits = reference_rows_logits(model, tokens, others, base_ids, base)
        out.append(Metric.LOGIT_DIFF(logits, targets))
    return torch.stack(out)


def reference_rows_logits(model, tokens, row, base_ids, base):
    """The final logits of `reference_rows`' computation for one row (node-level sites only)."""
    captured = {}
    metric = pl.MetricFunction(lambda logits, t: captured.setdefault("logits", logits)[:, 0])
    if row:
        reference_rows(model, tokens, [row], base=base, metric=metric)
        return captured["logits"]
    with torch.no_grad():
        return model.hf(base_ids).logits[:, -1]


def test_pattern_interventions_equal_hooks_inside_attention(setup):
    model, dataset, tokens = setup
    last, n = model.layout.n_layers - 1, tokens.n_pos
    P = lambda head, pos=None, layer=last: C(site="pattern", layer=layer, head=head, pos=pos)  # noqa: E731
    key_weights = torch.linspace(0.1, 0.6, n, dtype=torch.float64)
    rows = {
        "patch": [pl.Patch(P(1))], "patch@A": [pl.Patch(P(0, "A"))], "zero@-1": [pl.Ablate(P(1, -1), how="zero")],
        "mean": [pl.Ablate(P(0), how="mean")], "resample": [pl.Ablate(P(2, [0, -1]), how="resample", seed=2)],
        "scale": [pl.Scale(P(1), 0.5)], "steer": [pl.Steer(P(1, -1), key_weights, scale=2.0)],
        "freeze": [pl.Patch(C(site="resid_pre", layer=0)), pl.Freeze(P(0, layer=0)), pl.Freeze(P(1))],
        "joint": [pl.Scale(C(site="head", layer=last, head=1), 0.25), pl.Steer(P(1, -1), key_weights),
                  pl.Patch(P(1, [1, 2, 3])), pl.Scale(P(1, 3), -1.0), pl.Patch(C(site="v", layer=last, head=0))],
    }
    ds = pl.sweep_interventions(model, dataset, rows, progress=False)
    expected = reference_pattern_rows(model, tokens, list(rows.values()))
    got = torch.from_numpy(ds.patched.values)
    assert torch.allclose(got, expected, atol=exact_atol(model, expected), rtol=0), (got - expected).abs().max()
    assert (got - torch.from_numpy(ds.corrupted.values)).abs().max() > 1e-3
    heads = pl.patch_heads(model, dataset, site="pattern", layers=[last], progress=False)  # TransformerLens' sweep
    expected = reference_pattern_rows(model, tokens, [[pl.Patch(P(h))] for h in range(model.layout.n_heads)])
    got = torch.from_numpy(heads.patched.values[0])
    assert torch.allclose(got, expected, atol=exact_atol(model, expected), rtol=0)


def test_patterns_need_eager_attention_and_fit_their_shape():
    from .tiny_models import tiny_model, tiny_tokenizer

    hf = tiny_model("llama")
    hf.config._attn_implementation = "sdpa"
    model = pl.load_model(hf, tokenizer=tiny_tokenizer(hf.config.vocab_size), model_id="tiny-llama-sdpa")
    dataset = random_pairs(model.hf.config.vocab_size)
    with pytest.raises(ValueError, match=r"needs eager attention.*attn_implementation='eager'"):
        pl.run_interventions(model, dataset, [pl.Patch(C(site="pattern", layer=0, head=0))])
    eager = tiny_patch_model("llama")
    with pytest.raises(ValueError, match=r"\[key pos\] = \[6\]"):
        pl.run_interventions(eager, dataset, [pl.Steer(C(site="pattern", layer=0, head=0), torch.ones(4))])
    with pytest.raises(ValueError, match="cannot see a pattern"):
        pl.run_interventions(eager, dataset, [pl.At(C(site="pattern", layer=0, head=0), halve_and_flip)])
    with pytest.raises(ValueError, match="ProjectOut cannot see a pattern"):
        pl.run_interventions(eager, dataset, [pl.ProjectOut(C(site="pattern", layer=0, head=0), torch.ones(6))])
    with pytest.raises(ValueError, match="zero vector"):
        pl.ProjectOut(C(site="resid_pre", layer=0), torch.zeros(4))
