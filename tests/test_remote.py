"""patchlab against a real NDIF-protocol server on loopback (tests/ndif_server.py).

The client and the server hold separate copies of the same tiny random models, so
a remote result can only equal the local one if the whole program made the round
trip: serialization of the session and of the kernels (by value), execution the
way the hosted service executes it (allowlisted modules only: no patchlab there),
and the result download. The server counts requests, so a regression to one
request per component fails here.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import nnsight
import numpy as np
import pytest
import torch
import xarray as xr
from nnsight.modeling.transformers import TransformersModel

import patchlab as pl
from patchlab.remote import model_key, resolve_remote

from .ndif_server import INJECTED_FAILURE, LoopbackNDIF, closed_port_url
from .tiny_models import tiny_model, tiny_tokenizer

FAMILIES = ("gpt2", "llama")


def _load(family: str) -> pl.PatchModel:
    hf = tiny_model(family)
    return pl.load_model(hf, tokenizer=tiny_tokenizer(hf.config.vocab_size), model_id=f"tiny-{family}",
                         hub_id=f"loopback/tiny-{family}")


@pytest.fixture(scope="module")
def models() -> dict[str, pl.PatchModel]:
    return {family: _load(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def server(models):
    hosted = {model_key(m): TransformersModel(copy.deepcopy(m.hf), tokenizer=m.tokenizer, task="text-generation")
              for m in models.values()}
    with LoopbackNDIF(hosted) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _quiet(server, monkeypatch):
    monkeypatch.setattr(nnsight.CONFIG.APP, "REMOTE_LOGGING", False)
    server.reset()
    yield
    server.reset()


def pairs(model: pl.PatchModel, n: int = 3, n_pos: int = 5, seed: int = 0) -> pl.PromptPairDataset:
    """Random clean prompts; corrupted = clean with one position resampled."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.layout.vocab_size
    out = []
    for _ in range(n):
        clean = torch.randint(5, vocab - 3, (n_pos,), generator=g)
        corrupted = clean.clone()
        corrupted[1] = torch.randint(5, vocab - 3, (1,), generator=g)
        a, b = torch.randperm(vocab - 8, generator=g)[:2].add(5).tolist()
        out.append(pl.PromptPair(clean=" ".join(f"w{i}" for i in clean.tolist()),
                                 corrupted=" ".join(f"w{i}" for i in corrupted.tolist()),
                                 correct=f"w{a}", incorrect=f"w{b}"))
    return pl.PromptPairDataset(pairs=out, name="random", corruption="resample")


def assert_same_results(local: xr.Dataset, remote: xr.Dataset) -> None:
    """Every data variable and coordinate identical (attrs hold times and versions)."""
    xr.testing.assert_identical(local.drop_attrs(), remote.drop_attrs())


def requests(server) -> list:
    return [r for r in server.requests if r.status == "COMPLETED"]


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_patching_is_one_request_and_equals_local(models, server, family):
    model, data = models[family], pairs(models[family])
    for sweep in (lambda **kw: pl.patch_heads(model, data, progress=False, **kw),
                  lambda **kw: pl.patch_layer_pos(model, data, site="resid_mid", direction="noising",
                                                  progress=False, memory_mb=0.01, **kw)):
        server.reset()
        local = sweep()
        remote = sweep(remote=server.url)
        assert_same_results(local, remote)
        assert len(server.requests) == 1 and requests(server), server.requests


def top_minus_mean(logits, targets):
    """A user metric: the correct answer's logit minus the mean logit."""
    return logits.gather(-1, targets["correct"][:, None])[:, 0] - logits.mean(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_interventions_are_one_request_and_equal_local(models, server, family):
    """A sweep of joint sets (every plain-data kind, named and end-relative positions, a user
    metric that travels by value) is one request; one joint set is one request."""
    model, data = models[family], pairs(models[family])
    C = pl.Component
    v = torch.linspace(-1, 1, model.layout.d_model)
    rows = {"patch+freeze": [pl.Patch(C(site="resid_pre", layer=0, pos=1)), pl.Freeze(C(site="head", layer=1, head=0))],
            "ablations": [pl.Ablate(C(site="mlp_out", layer=0), how="mean"),
                          pl.Ablate(C(site="head", layer=1, head=1, pos=-1), how="resample", seed=0)],
            "steer+scale": [pl.Steer(C(site="resid_pre", layer=1, pos=-1), v, scale=2.0),
                            pl.Scale(C(site="attn_out", layer=1), 0.5)],
            "project out": [pl.ProjectOut(C(site="resid_post", layer=0), v)]}
    for metric in ("logit_diff", top_minus_mean):
        server.reset()
        local = pl.sweep_interventions(model, data, rows, metric=metric, progress=False)
        remote = pl.sweep_interventions(model, data, rows, metric=metric, progress=False, remote=server.url)
        assert_same_results(local, remote)
        assert len(server.requests) == 1 and requests(server), server.requests
    server.reset()
    one = pl.run_interventions(model, data, rows["ablations"], remote=server.url)
    assert len(requests(server)) == 1
    assert_same_results(pl.run_interventions(model, data, rows["ablations"]), one)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_is_one_request_and_equals_local(models, server, family):
    """A whole decode with interventions on the prompt and at every step is one request."""
    model, data = models[family], pairs(models[family])
    C = pl.Component
    v = torch.linspace(-1, 1, model.layout.d_model)
    joint = [pl.Patch(C(site="resid_pre", layer=1, pos=-1)), pl.ProjectOut(C(site="resid_pre", layer=0), v),
             pl.Steer(C(site="mlp_out", layer=1), v, scale=0.5)]
    server.reset()
    local = pl.generate(model, data, joint, max_new_tokens=4, run="corrupted")
    remote = pl.generate(model, data, joint, max_new_tokens=4, run="corrupted", remote=server.url)
    assert (local.tokens.values == remote.tokens.values).all()
    np.testing.assert_array_equal(local.logprob.values, remote.logprob.values)  # the same computation
    assert len(requests(server)) == 1, server.requests


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_of_different_lengths_travel_with_their_masks(models, server, family):
    """Left-padded prompts (pairs of 5, 8 and 11 tokens, corrupted prompts of other lengths, names at
    other indices per pair): the masks and position maps travel in the request; still one request
    per sweep, equal to local."""
    from .test_real_prompts import mixed_pairs, paired_pairs
    model = models[family]
    mixed, paired = mixed_pairs(model.layout.vocab_size), paired_pairs(model.layout.vocab_size)
    C = pl.Component
    rows = {"by name": [pl.Patch(C(site="resid_pre", layer=1, pos="X"))],
            "mean": [pl.Ablate(C(site="mlp_out", layer=0, pos=["X", -1]), how="mean")]}
    for call in (lambda **kw: pl.patch_layer_pos(model, mixed, positions=["X", -2, -1], progress=False, **kw),
                 lambda **kw: pl.sweep_interventions(model, mixed, rows, progress=False, **kw),
                 lambda **kw: pl.patch_edges(model, paired, [[next(iter(pl.Graph.from_model(model).edges()))]],
                                             progress=False, **kw),
                 lambda **kw: pl.path_patch_heads(model, paired, progress=False, **kw),
                 lambda **kw: pl.eap(model, paired, per_position=True, **kw)):
        server.reset()
        assert_same_results(call(), call(remote=server.url))
        assert len(requests(server)) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_attribution_is_one_request_and_equals_local(models, server, family):
    model, data = models[family], pairs(models[family])
    for method in (lambda **kw: pl.eap(model, data, **kw), lambda **kw: pl.eap_ig(model, data, steps=3, **kw)):
        server.reset()
        assert_same_results(method(), method(remote=server.url))
        assert len(requests(server)) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_edge_algorithms_equal_local_in_their_request_budget(models, server, family):
    model, data = models[family], pairs(models[family])
    graph = pl.Graph.from_model(model)
    every = list(graph.edges())
    node = pl.Node(pl.NodeKind.KV_HEAD if graph.gqa else pl.NodeKind.HEAD, 1, 0)
    scores = pl.eap(model, data)
    circuits = [pl.Circuit(graph, every[::5], scores), pl.Circuit.top_k(scores, 15)]
    one_request = {
        "patch_edges": lambda **kw: pl.patch_edges(model, data, [every[:3], every[1:]], progress=False, **kw),
        "patch_senders_into": lambda **kw: pl.patch_senders_into(model, data, node, "v", progress=False, **kw),
        "evaluate_circuits": lambda **kw: pl.evaluate_circuits(model, data, circuits, ablation="mean",
                                                               progress=False, **kw),
        "faithfulness_curve": lambda **kw: pl.faithfulness_curve(model, data, scores, sizes=[0, 10, 40],
                                                                 progress=False, **kw),
    }
    for name, call in one_request.items():
        server.reset()
        assert_same_results(call(), call(remote=server.url))
        assert len(requests(server)) == 1, name
    server.reset()
    edges = every[::9]
    exact = lambda **kw: pl.exact_edge_scores(model, data, edges=edges, block=4, progress=False, **kw)
    assert_same_results(exact(), exact(remote=server.url))
    assert len(requests(server)) == -(-len(edges) // 4)  # one per block
    server.reset()
    candidates = [e for e in every if e.receiver.kind is pl.NodeKind.LOGITS][-4:]
    search = lambda **kw: pl.acdc(model, data, tau=0.02, candidates=candidates, progress=False, **kw)
    local, remote = search(), search(remote=server.url)
    assert remote.edges == local.edges
    assert_same_results(local.scores, remote.scores)
    assert len(requests(server)) == 1 + remote.scores.attrs["n_evaluated"]


@pytest.mark.parametrize("family", FAMILIES)
def test_path_algorithms_equal_local_in_their_request_budget(models, server, family):
    model, data = models[family], pairs(models[family])
    receivers = [pl.Node(pl.NodeKind.HEAD, 2, 0), pl.Node(pl.NodeKind.HEAD, 2, 1)]
    for kw in (dict(), dict(receivers=receivers, freeze_mlps=True, memory_mb=0.05),
               dict(via=[(pl.Node(pl.NodeKind.HEAD, 1, 1), "q")])):
        server.reset()
        local = pl.path_patch_heads(model, data, progress=False, **kw)
        assert_same_results(local, pl.path_patch_heads(model, data, progress=False, remote=server.url, **kw))
        assert len(requests(server)) == 1
    server.reset()
    walk = dict(threshold=0.0, max_depth=2, max_receivers_per_step=2, progress=False)
    local = pl.iterative_path_patching(model, data, **walk)
    remote = pl.iterative_path_patching(model, data, remote=server.url, **walk)
    assert remote.edges == local.edges
    assert_same_results(local.scores, remote.scores)
    assert len(requests(server)) == 1 + 2  # the direct effects, then one per receiver swept at depth 1


def test_facts_and_causal_tracing_equal_local(models, server):
    model = models["llama"]

    def known(prompt: str, subject: str) -> pl.Fact:  # the random model's own top-1 answer
        with torch.no_grad():
            top = model.hf(model.tokenizer(prompt, return_tensors="pt").input_ids).logits[0, -1].argmax()
        return pl.Fact(prompt, subject, " " + model.tokenizer.decode(top))

    facts = pl.FactDataset(facts=(known("w1 w2 w3 w4", "w2"), known("w5 w6 w7", "w6")))
    kept, checked = pl.check_facts(model, facts, min_prob=0.0)
    assert len(kept) == 2
    assert len(requests(server)) == 0
    _, remote_checked = pl.check_facts(model, facts, min_prob=0.0, remote=server.url)
    xr.testing.assert_identical(checked.drop_attrs(), remote_checked.drop_attrs())
    assert len(requests(server)) == 1
    server.reset()
    kw = dict(samples=2, window=2, progress=False)
    local = pl.causal_trace(model, facts, **kw)
    remote = pl.causal_trace(model, facts, remote=server.url, **kw)
    assert_same_results(local, remote)
    assert len(requests(server)) == 1 + len(facts)


def test_kernels_import_only_what_a_server_has():
    """Kernels travel by value: they may import torch and math, and their siblings' functions
    by name (a module object would travel by value with its loader, which a server refuses)."""
    for path in sorted((Path(pl.__file__).parent / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in ("torch", "math") for a in node.names), (path.name, ast.dump(node))
            elif isinstance(node, ast.ImportFrom):
                assert (node.level == 1 and node.module) or node.module in ("torch", "math"), (path.name, ast.dump(node))


def test_server_side_error_surfaces_the_servers_message(models):
    """The server's model has fewer layers than the client believes: the job fails there."""
    model = models["gpt2"]
    short = tiny_model("gpt2")
    short.transformer.h = short.transformer.h[:1]
    with LoopbackNDIF({model_key(model): TransformersModel(short, tokenizer=model.tokenizer,
                                                           task="text-generation")}) as other:
        with pytest.raises(pl.RemoteJobError, match="the remote job .* failed on http://127.0.0.1") as info:
            pl.patch_heads(model, pairs(model), progress=False, remote=other.url)
        (record,) = other.requests
    assert info.value.job_id == record.job_id
    assert record.status == "ERROR" and record.error in str(info.value)  # the server's own message


def test_job_failing_mid_session(models, server):
    model, data = models["gpt2"], pairs(models["gpt2"])
    server.fail_on_forward = 2  # the cache pass runs, the first patched pass fails
    with pytest.raises(pl.RemoteJobError, match=INJECTED_FAILURE):
        pl.patch_heads(model, data, progress=False, remote=server.url)
    assert [r.status for r in server.requests] == ["ERROR"]
    # the server recovers; the next request completes
    pl.patch_heads(model, data, progress=False, remote=server.url)
    assert server.requests[-1].status == "COMPLETED"


def test_connection_refused_names_the_host(models):
    url = closed_port_url()
    with pytest.raises(pl.RemoteConnectionError, match=f"cannot reach the NDIF host {url}"):
        pl.patch_heads(models["gpt2"], pairs(models["gpt2"]), progress=False, remote=url)


def test_bad_api_key_is_refused_with_the_fix(models, monkeypatch):
    model = models["gpt2"]
    hosted = {model_key(model): TransformersModel(copy.deepcopy(model.hf), tokenizer=model.tokenizer,
                                                  task="text-generation")}
    with LoopbackNDIF(hosted, api_keys={"good-key"}) as keyed:
        with pytest.raises(pl.RemoteAuthError, match="refused the API key.*NDIF_API_KEY"):
            pl.patch_heads(model, pairs(model), progress=False, remote=pl.Remote(host=keyed.url, api_key="bad"))
        local = pl.patch_heads(model, pairs(model), progress=False)
        remote = pl.patch_heads(model, pairs(model), progress=False,
                                remote=pl.Remote(host=keyed.url, api_key="good-key"))
        assert_same_results(local, remote)
        # remote=True: host and key from nnsight's config (which NDIF_HOST / NDIF_API_KEY set)
        monkeypatch.setattr(nnsight.CONFIG.API, "HOST", keyed.url)
        monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", "good-key")
        assert_same_results(local, pl.patch_heads(model, pairs(model), progress=False, remote=True))
        assert [r.status for r in keyed.requests] == ["REJECTED", "COMPLETED", "COMPLETED"]


def test_result_that_does_not_arrive_times_out(models, server):
    server.hang = True
    with pytest.raises(pl.RemoteTimeoutError, match="no result from .* after 1 s") as info:
        pl.patch_heads(models["gpt2"], pairs(models["gpt2"]), progress=False,
                       remote=pl.Remote(host=server.url, timeout_s=1))
    assert info.value.job_id == server.requests[-1].job_id


def test_unknown_model_is_rejected_with_the_servers_message(models, server, tmp_path):
    model = models["gpt2"]
    other = pl.load_model(model.hf, tokenizer=model.tokenizer, hub_id="someone/not-hosted")
    with pytest.raises(pl.RemoteJobError, match="rejected the request.*not-hosted"):
        pl.patch_heads(other, pairs(other), progress=False, remote=server.url)


def test_meta_model_needs_no_local_weights(models, server, tmp_path):
    """A model that exists only on the server: built on the meta device from its config."""
    model = models["llama"]
    model.hf.save_pretrained(tmp_path / "tiny")
    model.tokenizer.save_pretrained(tmp_path / "tiny")
    meta = pl.load_model(tmp_path / "tiny", hub_id=model.hub_id, remote=server.url,
                         attn_implementation=model.hf.config._attn_implementation)
    assert meta.is_meta and all(p.device.type == "meta" for p in meta.hf.parameters())
    data = pairs(model)
    local = pl.patch_heads(model, data, progress=False)
    remote = pl.patch_heads(meta, data, progress=False)  # the model's default: remote
    assert_same_results(local, remote)
    assert len(requests(server)) == 1


def test_remote_argument_is_checked():
    with pytest.raises(ValueError, match="remote='nowhere': use False, True"):
        resolve_remote("nowhere")


@pytest.mark.parametrize("family", FAMILIES)
def test_float64_models_run_remotely_where_the_server_hosts_them(family, tmp_path):
    """``load_model(..., dtype=torch.float64, remote=...)`` builds a float64 meta-device client; a server
    hosting a float64 copy runs every program in float64 (noise, masks and coefficients follow the
    hosted model's dtype), so results equal the local float64 ones."""
    hf = tiny_model(family)
    local = pl.load_model(hf, tokenizer=tiny_tokenizer(hf.config.vocab_size), dtype=torch.float64,
                          model_id=f"tiny-{family}", hub_id=f"loopback/tiny-{family}-float64")
    local.hf.save_pretrained(tmp_path / "tiny")
    local.tokenizer.save_pretrained(tmp_path / "tiny")
    hosted = {model_key(local): TransformersModel(copy.deepcopy(local.hf), tokenizer=local.tokenizer,
                                                  task="text-generation")}
    facts = pl.FactDataset(facts=(pl.Fact("w1 w2 w3 w4 w5", "w2 w3", " w9"),))
    calls = {"patch_heads": lambda m, d: pl.patch_heads(m, d, progress=False),
             "patch_senders_into": lambda m, d: pl.patch_senders_into(m, d, pl.Node(pl.NodeKind.LOGITS), "in",
                                                                      progress=False),
             "eap": lambda m, d: pl.eap(m, d),
             "causal_trace": lambda m, d: pl.causal_trace(m, facts, samples=2, window=2, progress=False)}
    with LoopbackNDIF(hosted) as srv:
        meta = pl.load_model(tmp_path / "tiny", hub_id=local.hub_id, dtype=torch.float64, remote=srv.url,
                             attn_implementation=local.hf.config._attn_implementation)
        assert meta.is_meta and meta.dtype == torch.float64
        data = pairs(local)
        for name, call in calls.items():
            here, there = call(local, data), call(meta, data)
            assert all(v.dtype == "float64" for v in there.data_vars.values() if v.dtype.kind == "f"), name
            xr.testing.assert_allclose(here.drop_attrs(), there.drop_attrs(), atol=1e-12, rtol=0)
