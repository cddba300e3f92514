"""Real prompt sets through the public API: pairs of different lengths, clean and corrupted of
different lengths within a pair, named positions per pair.

The core invariant, on tiny random models of every family in float64: every value a sweep reports
for a prompt of a left-padded, mixed-length dataset equals that prompt run alone, unpadded, through
plain forward hooks (`tests.reference`), where the test resolves each position itself: a name to
the pair's own index (the corrupted prompt's from ``corrupted_positions``), an offset ``-k`` to the
prompt's ``k``-th token from the end. Means are over the prompts, at each prompt's own token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import patchlab as pl
from patchlab.data import DatasetError
from patchlab.metrics import Metric, Targets
from patchlab.runner import derangement

from .precision import exact_atol
from .test_interventions import halve_and_flip
from .reference import RefPatch, reference_cache, reference_patched_logits
from .tiny_models import ALL_FAMILIES, tiny_patch_model

C = pl.Component
LENGTHS = ((5, 5), (8, 9), (11, 10))  # (clean, corrupted) tokens per pair
X_AT = ((1, 1), (3, 2), (6, 7))       # the named position "X" in each (not aligned from the end)


def mixed_pairs(vocab: int, seed: int = 0) -> pl.PromptPairDataset:
    g = torch.Generator().manual_seed(seed)
    words = lambda n: [f"w{int(t)}" for t in torch.randint(0, vocab - 8, (n,), generator=g)]  # noqa: E731
    pairs = []
    for (n_clean, n_corrupted), (x_clean, x_corrupted) in zip(LENGTHS, X_AT):
        clean, corrupted = words(n_clean), words(n_corrupted)
        pairs.append(pl.PromptPair(
            clean=" ".join(clean), corrupted=" ".join(corrupted), correct=f" w{vocab - 6}", incorrect=f" w{vocab - 5}",
            positions={"X": x_clean, "END": n_clean - 1},
            corrupted_positions={"X": x_corrupted, "END": n_corrupted - 1}))
    return pl.PromptPairDataset(pairs=pairs, name="mixed")


def prompts_alone(tokens) -> dict[str, list[torch.Tensor]]:
    """Each run's prompts without their padding, ``{run: [[1, pos] per prompt]}``."""
    return {run: [ids[mask][None] for ids, mask in zip(getattr(tokens, f"{run}_ids"), getattr(tokens, f"{run}_mask"))]
            for run in ("clean", "corrupted")}


def loaded(family: str, make) -> tuple:
    """A tiny model of `family`, a dataset `make(vocab)`, its tokens and its prompts alone."""
    model = tiny_patch_model(family)
    dataset = make(model.hf.config.vocab_size)
    tokens = dataset.tokenize(model.tokenizer)
    return model, dataset, tokens, prompts_alone(tokens)


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def setup(request):
    return loaded(request.param, mixed_pairs)


def own(tokens, run: str, p: int, position) -> int:
    """The test's own resolution: prompt p's token index of `position` in `run`."""
    n = len(getattr(tokens, f"{run}_tokens")[p])
    if isinstance(position, str):
        return getattr(tokens, f"{run}_positions")[p][position]
    return n + position if position < 0 else position


def reference(model, tokens, alone, rows, base="corrupted"):
    """Metric per (row, prompt), each prompt alone and unpadded, with plain hooks."""
    hf = model.hf
    sites = sorted({(i.component.site.value, i.component.layer) for row in rows for i in row})
    caches = {run: [reference_cache(hf, ids, sites) for ids in seqs] for run, seqs in alone.items()}
    n = tokens.n_prompts
    out = torch.zeros(len(rows), n, dtype=torch.float64)
    for r, row in enumerate(rows):
        for p in range(n):
            sets, edits = [], []
            for i in row:
                c = i.component
                key = (c.site.value, c.layer)
                pick = (lambda v, s, h=c.head: v[:, [s]] if h is None else v[:, [s], h])

                def at(q, fn, into):
                    into.append(RefPatch(site=c.site.value, layer=c.layer, head=c.head,
                                         pos=(own(tokens, base, p, q),), fn=fn))
                for q in (c.pos if c.pos is not None else range(-len(alone[base][p][0]), 0)):
                    if isinstance(i, pl.Patch):
                        src = i.source.value
                        value = pick(caches[src][p][key], own(tokens, src, p, q))
                        at(q, lambda x, v=value: v, sets)
                    elif isinstance(i, pl.Ablate) and i.how.value == "mean":
                        value = torch.stack([pick(caches["corrupted"][o][key], own(tokens, "corrupted", o, q))
                                             for o in range(n)]).mean(0)
                        at(q, lambda x, v=value: v, sets)
                    elif isinstance(i, pl.Ablate) and i.how.value == "resample":
                        o = int(derangement(n, i.seed)[p]) if i.seed is not None else p
                        value = pick(caches["corrupted"][o][key], own(tokens, "corrupted", o, q))
                        at(q, lambda x, v=value: v, sets)
                    elif isinstance(i, pl.Ablate):
                        at(q, torch.zeros_like, sets)
                    elif isinstance(i, pl.Scale):
                        at(q, lambda x, f=i.factor: x * f, edits)
                    elif isinstance(i, pl.At):
                        at(q, i.fn, edits)
                    elif isinstance(i, pl.ProjectOut):  # before the edits (it follows the sets)
                        unit = i.direction / i.direction.norm()
                        at(q, lambda x, u=unit: x - (x @ u)[..., None] * u, sets)
                    else:
                        at(q, lambda x, v=i.vector, s=i.scale: x + s * v, edits)
            logits = reference_patched_logits(hf, alone[base][p], sets + edits)
            t = Targets(correct=tokens.correct_ids[p:p + 1], incorrect=tokens.incorrect_ids[p:p + 1])
            out[r, p] = Metric.LOGIT_DIFF(logits, t)[0]
    return out


def baselines(model, tokens, alone):
    return {run: torch.stack([Metric.LOGIT_DIFF(model.hf(ids).logits[:, -1].detach(),
                                                Targets(correct=tokens.correct_ids[p:p + 1],
                                                        incorrect=tokens.incorrect_ids[p:p + 1]))[0]
                              for p, ids in enumerate(seqs)]) for run, seqs in alone.items()}


def close(model, got, expected):
    tol = exact_atol(model, expected, padded=True)
    return torch.allclose(torch.as_tensor(got, dtype=torch.float64), expected, atol=tol, rtol=0), \
        float((torch.as_tensor(got, dtype=torch.float64) - expected).abs().max())


def test_patch_layer_pos_by_name_and_from_the_end_equals_each_prompt_alone(setup):
    model, dataset, tokens, alone = setup
    layers = [0, model.layout.n_layers - 1]
    positions = [-2, -1, "X"]
    ds = pl.patch_layer_pos(model, dataset, site="resid_pre", layers=layers, positions=positions, progress=False)
    rows = [[pl.Patch(C(site="resid_pre", layer=layer, pos=q))] for layer in layers for q in positions]
    expected = reference(model, tokens, alone, rows).reshape(len(layers), len(positions), -1)
    ok, err = close(model, ds["patched"].values, expected)
    assert ok, err
    base = baselines(model, tokens, alone)
    for run in ("clean", "corrupted"):
        assert close(model, ds[run].values, base[run])[0], run
    assert list(ds["pos"].values) == ["-2", "-1", "X"] and ds.attrs["padding"] == "left"
    assert ds["pos_index"].sel(pos="X").values.tolist() == [x for _, x in X_AT]
    assert ds["pos_index"].sel(pos="-1").values.tolist() == [n - 1 for _, n in LENGTHS]
    assert ds.attrs["pad_token_id"] == tokens.pad_token_id


def test_default_positions_are_the_offsets_every_prompt_reaches(setup):
    model, dataset, tokens, alone = setup
    ds = pl.patch_layer_pos(model, dataset, site="mlp_out", layers=[0], progress=False)
    assert ds["pos"].values.tolist() == [-5, -4, -3, -2, -1]
    rows = [[pl.Patch(C(site="mlp_out", layer=0, pos=q))] for q in range(-5, 0)]
    assert close(model, ds["patched"].values[0], reference(model, tokens, alone, rows))[0]


def test_per_position_head_sweep_and_noising(setup):
    model, dataset, tokens, alone = setup
    ds = pl.patch_heads(model, dataset, site="v", per_position=True, positions=["X", -1], layers=[0],
                        direction="noising", progress=False)
    heads = range(model.layout.n_kv_heads)
    rows = [[pl.Patch(C(site="v", layer=0, head=h, pos=q), source="corrupted")] for h in heads for q in ("X", -1)]
    expected = reference(model, tokens, alone, rows, base="clean").reshape(1, len(heads), 2, -1)
    ok, err = close(model, ds["patched"].values, expected)
    assert ok, err
    assert ds["pos_index"].sel(pos="X").values.tolist() == [x for x, _ in X_AT]  # the clean run's own index


def test_interventions_align_by_name_and_mean_over_each_prompts_own_token(setup):
    model, dataset, tokens, alone = setup
    last = model.layout.n_layers - 1
    v = torch.linspace(-1, 1, model.layout.d_model, dtype=torch.float64)
    rows = {
        "mean by name": [pl.Ablate(C(site="attn_out", layer=0, pos=["X", "END"]), how="mean")],
        "mean from the end": [pl.Ablate(C(site="resid_post", layer=0, pos=[-3, -1]), how="mean")],
        "resample by name": [pl.Ablate(C(site="head", layer=last, head=1, pos="X"), how="resample", seed=3)],
        "joint": [pl.Patch(C(site="q", layer=last, head=0, pos="X")), pl.Scale(C(site="mlp_out", layer=0), 0.5),
                  pl.Steer(C(site="resid_pre", layer=last, pos=-2), v, scale=2.0),
                  pl.Ablate(C(site="head", layer=0, head=0), how="zero"),
                  pl.At(C(site="mlp_out", layer=last, pos=["X", -1]), halve_and_flip)],  # per prompt, by group
        "project out": [pl.ProjectOut(C(site="resid_pre", layer=last, pos=["X", -1]), v + 0.5),
                        pl.Steer(C(site="resid_pre", layer=last, pos=-1), v, scale=-1.0)],
    }
    ds = pl.sweep_interventions(model, dataset, rows, progress=False)
    expected = reference(model, tokens, alone, list(rows.values()))
    ok, err = close(model, ds["patched"].values, expected)
    assert ok, err


def test_an_all_position_patch_across_different_lengths_is_refused(setup):
    model, dataset, _, _ = setup
    with pytest.raises(ValueError, match=r"prompt 1 has 9 tokens in the corrupted run and its source has 8.*"
                                         r"offsets from the end.*corrupted_positions"):
        pl.patch_heads(model, dataset, layers=[0], progress=False)
    with pytest.raises(ValueError, match="reads every position"):
        pl.run_interventions(model, dataset, [pl.Patch(C(site="resid_pre", layer=0))])


def test_bad_positions_are_clear_errors(setup):
    model, dataset, _, _ = setup
    with pytest.raises(ValueError, match=r"offset -6 from the end is beyond corrupted prompt 0, which has 5 tokens"):
        pl.patch_layer_pos(model, dataset, layers=[0], positions=[-6], progress=False)
    with pytest.raises(ValueError, match=r"'Y' is not a named position.*\['END', 'X'\]"):
        pl.patch_layer_pos(model, dataset, layers=[0], positions=["Y"], progress=False)
    with pytest.raises(ValueError, match=r"position 7 is beyond corrupted prompt 0, which has 5 tokens"):
        pl.run_interventions(model, dataset, [pl.Patch(C(site="resid_pre", layer=0, pos=7))])
    with pytest.raises(DatasetError, match=r"eap patches every position of a sender.*pair 1 has 8 and 9 tokens"):
        pl.eap(model, dataset)


def test_equal_lengths_keep_index_coordinates(setup):
    """A dataset whose prompts share one length keeps token-index coordinates and no padding."""
    model, _, _, _ = setup
    vocab = model.hf.config.vocab_size
    dataset = pl.PromptPairDataset(pairs=[pl.PromptPair(clean="w1 w2 w3 w4", corrupted="w5 w2 w3 w4",
                                                        correct=f" w{vocab - 6}", incorrect=f" w{vocab - 5}")])
    ds = pl.patch_layer_pos(model, dataset, layers=[0], progress=False)
    assert ds["pos"].values.tolist() == [0, 1, 2, 3] and "pos_index" not in ds.coords
    assert ds.attrs["padding"] == "none" and np.isfinite(ds["patched"].values).all()


# ---- graph level: pairs of different lengths from each other, clean and corrupted of one length ----

PAIRED = ((5, 5), (8, 8), (11, 11))


def paired_pairs(vocab: int, seed: int = 1) -> pl.PromptPairDataset:
    g = torch.Generator().manual_seed(seed)
    words = lambda n: " ".join(f"w{int(t)}" for t in torch.randint(0, vocab - 8, (n,), generator=g))  # noqa: E731
    return pl.PromptPairDataset(pairs=[pl.PromptPair(clean=words(n), corrupted=words(n), correct=f" w{vocab - 6}",
                                                     incorrect=f" w{vocab - 5}") for n, _ in PAIRED], name="paired")


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def paired(request):
    return loaded(request.param, paired_pairs)


def reference_edges(model, tokens, alone, edge_sets, direction):
    """Each prompt alone through `tests.reference_graph`; a token-specific edge's batch column is
    the prompt's own token at the same offset from the end (absent from a shorter prompt)."""
    from .reference_graph import reference_edge_patched_logits
    from .test_edges_exact import ref_edge
    base, source = ("clean", "corrupted") if direction == "noising" else ("corrupted", "clean")
    out = torch.zeros(len(edge_sets), tokens.n_prompts, dtype=torch.float64)
    for p in range(tokens.n_prompts):
        n = alone[base][p].shape[1]
        shift = tokens.n_pos - n
        t = Targets(correct=tokens.correct_ids[p:p + 1], incorrect=tokens.incorrect_ids[p:p + 1])
        for r, edges in enumerate(edge_sets):
            own_edges = [ref_edge(e if e.pos is None else e.with_pos(e.pos - shift)) for e in edges
                         if e.pos is None or e.pos >= shift]
            logits = reference_edge_patched_logits(model.hf, alone[base][p], alone[source][p], own_edges)
            out[r, p] = Metric.LOGIT_DIFF(logits, t)[0]
    return out


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_edge_patching_of_padded_prompts_equals_each_prompt_alone(paired, direction):
    from .test_edges_exact import large_edge_sets, some_edge_sets
    model, dataset, tokens, alone = paired
    graph = pl.Graph.from_model(model)
    edge_sets = some_edge_sets(graph, tokens.n_pos) + large_edge_sets(graph, tokens.n_pos)
    ds = pl.patch_edges(model, dataset, edge_sets, direction=direction, progress=False)
    expected = reference_edges(model, tokens, alone, edge_sets, direction)
    tol = exact_atol(model, expected, edges=True, padded=True)
    got = torch.from_numpy(ds.patched.values)
    assert torch.allclose(got, expected, atol=tol, rtol=0), (got - expected).abs().max()
    assert ds.attrs["padding"] == "left"


def test_graph_level_work_refuses_pairs_of_different_lengths(setup):
    model, dataset, _, _ = setup
    edge = next(iter(pl.Graph.from_model(model).edges()))
    with pytest.raises(DatasetError, match=r"pair 1 has 8 and 9 tokens.*match_lengths=True"):
        pl.patch_edges(model, dataset, [[edge]], progress=False)


def test_mean_ablated_edges_average_real_tokens_only(paired):
    """Edges carrying the corrupted run's mean: the mean at each offset from the end is over the
    prompts that reach it (real tokens only). The reference averages each sender's contribution
    over the prompts alone; for Gemma the kernel takes the contribution of the mean head output
    (its post-norm is not linear), so Gemma is left to the node-level mean tests."""
    from .reference_graph import _edge_run, reference_contributions
    from .test_edges_exact import ref_edge, some_edge_sets
    from patchlab.graph_runner import edge_patch_rows
    model, dataset, tokens, alone = paired
    if model.hf.config.model_type.startswith("gemma"):
        pytest.skip("Gemma's head contributions are not linear in the head output")
    graph = pl.Graph.from_model(model)
    edge_sets = [s for s in some_edge_sets(graph, tokens.n_pos) if all(e.pos is None for e in s)]
    result = edge_patch_rows(model, graph, tokens=tokens, rows=edge_sets, metric=Metric.LOGIT_DIFF,
                             ablation="mean", progress=False)
    contributions = [reference_contributions(model.hf, ids) for ids in alone["corrupted"]]
    expected = torch.zeros(len(edge_sets), tokens.n_prompts, dtype=torch.float64)
    for p in range(tokens.n_prompts):
        n = alone["clean"][p].shape[1]
        # token j of this prompt is offset j - n from the end; the mean is over the prompts that reach it
        mean = {node: torch.stack([torch.stack([c[node][0, c[node].shape[1] - n + j] for c in contributions
                                                if c[node].shape[1] >= n - j]).mean(0) for j in range(n)])[None]
                for node in contributions[0]}
        t = Targets(correct=tokens.correct_ids[p:p + 1], incorrect=tokens.incorrect_ids[p:p + 1])
        for r, edges in enumerate(edge_sets):
            logits = _edge_run(model.hf, alone["clean"][p], [ref_edge(e) for e in edges], mean)[0]
            expected[r, p] = Metric.LOGIT_DIFF(logits, t)[0]
    tol = exact_atol(model, expected, edges=True, padded=True)
    assert torch.allclose(result.values.double(), expected, atol=tol, rtol=0), (result.values - expected).abs().max()


@pytest.mark.parametrize("per_position", [False, True])
def test_eap_of_mixed_lengths_is_the_mean_of_each_prompts_derivative(paired, per_position):
    """EAP runs each length unpadded and sums in: a score is the mean over prompts of the derivative
    of edge patching on each prompt alone (`tests.test_attribution.derivative`, finite differences
    of the plain-hook reference); a token-specific edge at batch column c is each prompt's own token
    at the same offset from the end (absent from a shorter prompt: 0)."""
    from .test_attribution import TOL, derivative, sample_edges, score
    model, dataset, tokens, _ = paired
    ds = pl.eap(model, dataset, per_position=per_position)
    alone = [pl.PromptPairDataset(pairs=[pair]).tokenize(model.tokenizer) for pair in dataset]
    graph = pl.Graph.from_model(model)
    for edge in sample_edges(graph, 1, seed=5)[::4]:
        if not per_position:
            expected = np.mean([derivative(model, t, edge) for t in alone])
        else:
            column = tokens.n_pos - 4
            edge = edge.with_pos(column)
            expected = np.mean([derivative(model, t, edge.with_pos(t.n_pos - 4)) for t in alone])
        assert score(ds, edge) == pytest.approx(expected, **TOL), edge.label


@pytest.mark.parametrize("freeze_mlps", [False, True])
def test_path_patching_of_padded_prompts_equals_each_prompt_alone(paired, freeze_mlps):
    from .reference_graph import reference_path_patched_logits
    model, dataset, tokens, alone = paired
    lay = model.layout
    receivers = [pl.Node(pl.NodeKind.HEAD, 2, 1)]
    for target in ("logits", receivers):
        ds = pl.path_patch_heads(model, dataset, receivers=target, freeze_mlps=freeze_mlps, progress=False)
        channels = ["in"] if target == "logits" else ["q", "k", "v"]
        group = lay.n_heads // lay.n_kv_heads
        for channel in channels:
            ref_receivers = "logits" if target == "logits" else [(("head", 2, 1 if channel == "q" else 1 // group),
                                                                  channel)]
            for layer in range(2):
                for head in (0, lay.n_heads - 1):
                    got = ds.patched.sel(layer=layer, head=head)
                    got = got if target == "logits" else got.sel(channel=channel)
                    expected = torch.stack([Metric.LOGIT_DIFF(
                        reference_path_patched_logits(model.hf, alone["clean"][p], alone["corrupted"][p],
                                                      [("head", layer, head)], ref_receivers, freeze_mlps=freeze_mlps),
                        Targets(correct=tokens.correct_ids[p:p + 1], incorrect=tokens.incorrect_ids[p:p + 1]))[0]
                        for p in range(tokens.n_prompts)]).double()
                    ok, err = close(model, got.values, expected)
                    assert ok, (target, channel, layer, head, err)


def test_exact_scores_acdc_and_circuit_evaluation_take_padded_prompts(paired):
    """The discovery algorithms built on edge patching: exact scores equal each prompt alone through
    the reference; ACDC and circuit evaluation run on the padded batch and agree with each other
    (on two families: ACDC evaluates every edge, the slowest part of this file)."""
    model, dataset, tokens, alone = paired
    graph = pl.Graph.from_model(model)
    edges = sorted(graph.edges(), key=lambda e: e.label)[::29][:4]
    scores = pl.exact_edge_scores(model, dataset, edges=edges, progress=False)
    patched = reference_edges(model, tokens, alone, [[e] for e in edges], "noising")
    base = reference_edges(model, tokens, alone, [[]], "noising")
    expected = (patched - base).mean(1)
    ok, err = close(model, scores["score"].sel(edge=[e.label for e in edges]).values, expected)
    assert ok, err
    if model.hf.config.model_type not in ("gpt2", "llama"):
        return
    found = pl.acdc(model, dataset, tau=0.05, progress=False)
    evaluated = pl.evaluate_circuits(model, dataset, [found], metric="kl", progress=False)
    assert evaluated["metric"].values.mean() == pytest.approx(found.scores.attrs["metric_final"], abs=1e-9)
    mean = pl.evaluate_circuits(model, dataset, [pl.Circuit.top_k(scores, 2)], ablation="mean", progress=False)
    assert np.isfinite(mean["faithfulness"].values).all() and mean.attrs["padding"] == "left"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_each_adapter_states_its_position_encoding(family):
    """Learned absolute position embeddings exist exactly where the adapter says so (a module
    named ``wpe``); the others are rotary (a ``rotary_emb`` module)."""
    model = tiny_patch_model(family)
    names = [name.rsplit(".", 1)[-1] for name, _ in model.hf.named_modules()]
    assert model.adapter.positions == ("learned" if "wpe" in names else "rotary")
    assert ("wpe" in names) != any("rotary" in n for n in names)


def test_a_tokenizer_without_a_pad_token_pads_with_eos():
    from .tiny_models import tiny_tokenizer
    tok = tiny_tokenizer()
    tok.pad_token = None
    dataset = mixed_pairs(64)
    tokens = dataset.tokenize(tok)
    assert tokens.pad_token_id == tok.eos_token_id and tokens.pad_token == "EOS (no pad token)"
    assert (tokens.clean_ids[~tokens.clean_mask] == tok.eos_token_id).all()


def test_eap_ig_of_mixed_lengths_averages_each_prompts_derivatives_along_the_path(paired):
    from .test_attribution import TOL, derivative, sample_edges, score
    model, dataset, _, _ = paired
    steps = 2
    ds = pl.eap_ig(model, dataset, steps=steps)
    alone = [pl.PromptPairDataset(pairs=[pair]).tokenize(model.tokenizer) for pair in dataset]
    for edge in sample_edges(pl.Graph.from_model(model), 1, seed=7)[::5]:
        expected = np.mean([derivative(model, t, edge, alpha=k / steps) for t in alone for k in range(steps)])
        assert score(ds, edge) == pytest.approx(expected, **TOL), edge.label


def test_iterative_path_patching_takes_padded_prompts(paired):
    """Its direct effects (depth 1) are path patching into the logits, checked above against each
    prompt alone: the walk's scores equal `path_patch_heads` on the same padded batch."""
    model, dataset, _, _ = paired
    if model.hf.config.model_type not in ("gpt2", "llama"):
        pytest.skip("the walk composes path patching, tested on every family above")
    walk = pl.iterative_path_patching(model, dataset, threshold=0.0, max_depth=1, progress=False)
    direct = pl.path_patch_heads(model, dataset, freeze_mlps=True, progress=False)  # the walk's default
    base = float(direct["clean"].mean())
    for edge in [e for e in walk.edges if e.receiver.kind is pl.NodeKind.LOGITS][:5]:
        expected = float(direct["patched"].sel(layer=edge.sender.layer, head=edge.sender.head).mean()) - base
        assert float(walk.scores["score"].sel(edge=edge.label)) == pytest.approx(expected, abs=1e-9)
    assert walk.scores.attrs["padding"] == "left"
