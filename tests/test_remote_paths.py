"""Path patching and iterative path patching through nnsight's in-process remote simulation
equal the local runs exactly, in the documented number of programs (requests).

``remote="local"`` serializes the session and the kernels (by value) and runs them with
the local modules hidden, so a kernel that reaches for patchlab or for ``model.hf`` fails
here. Correctness against the independent reference is `tests.test_paths_exact`'s job.
"""

from __future__ import annotations


import pytest
import torch
import xarray as xr

import patchlab as pl
import patchlab.path_runner as path_runner
from patchlab.graph import Node, NodeKind
from patchlab.iterative_paths import iterative_path_patching
from patchlab.paths import path_patch_heads

from .test_patching_exact import random_pairs
from .tiny_models import tiny_model, tiny_patch_model, tiny_tokenizer



@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request):
    model = tiny_patch_model(request.param)
    hf = model.hf
    return model, random_pairs(hf.config.vocab_size)


@pytest.fixture
def programs(monkeypatch):
    """The kernel programs run through `patchlab.remote.execute` by the path runner, with
    whether each was given precomputed caches: ``[(program name, cached), ...]``."""
    calls, execute = [], path_runner.execute

    def counted(model, program, *args, remote=None):
        calls.append((program.__name__, len(args) == 3 and args[2] is not None))
        return execute(model, program, *args, remote=remote)

    monkeypatch.setattr(path_runner, "execute", counted)
    return calls


def assert_same(local: xr.Dataset, remote: xr.Dataset) -> None:
    """Every data variable and coordinate identical (attrs hold times and versions)."""
    xr.testing.assert_identical(local.drop_attrs(), remote.drop_attrs())
    for key in ("receivers", "via", "freeze_mlps", "metric", "direction"):
        assert local.attrs[key] == remote.attrs[key], key


@pytest.mark.parametrize("case", [
    dict(),
    dict(freeze_mlps=True, metric="kl", direction="denoising"),
    dict(receivers=[Node(NodeKind.HEAD, 2, 1), Node(NodeKind.HEAD, 2, 3)]),
    dict(receivers=[Node(NodeKind.HEAD, 2, 1), Node(NodeKind.HEAD, 2, 3)], freeze_mlps=True, channels=("k", "v")),
    dict(via=[(Node(NodeKind.HEAD, 1, 2), "q")]),
    dict(via=[(Node(NodeKind.HEAD, 1, 2), "q")], receivers=[Node(NodeKind.HEAD, 2, 0)], freeze_mlps=True),
], ids=["logits", "logits-frozen-kl", "qkv", "kv-frozen", "via-q", "via-q-to-head-frozen"])
def test_remote_path_patch_heads_equals_local_in_one_program(setup, programs, case):
    model, dataset = setup
    local = path_patch_heads(model, dataset, progress=False, memory_mb=0.3, **case)
    assert programs == [("path_program", False)]
    remote = path_patch_heads(model, dataset, progress=False, memory_mb=0.3, remote="local", **case)
    assert programs == [("path_program", False)] * 2
    assert_same(local, remote)


def test_remote_multihop_via_a_key_value_head_equals_local():
    hf = tiny_model("llama")  # grouped-query attention: the hop is a key/value head's v input
    model = pl.load_model(hf, tokenizer=tiny_tokenizer(hf.config.vocab_size), dtype=torch.float64,
                          model_id="tiny-llama")
    dataset = random_pairs(hf.config.vocab_size)
    via = [(Node(NodeKind.KV_HEAD, 1, 1), "v")]
    assert_same(path_patch_heads(model, dataset, via=via, progress=False),
                path_patch_heads(model, dataset, via=via, progress=False, remote="local"))


def test_remote_iterative_path_patching_equals_local(setup, programs):
    model, dataset = setup
    walk = dict(threshold=0.0, max_depth=2, max_receivers_per_step=2, progress=False)
    local = iterative_path_patching(model, dataset, **walk)
    # here: the runs are cached once, then every sweep reuses them
    assert programs == [("cache_runs", False)] + [("path_program", True)] * 3
    programs.clear()
    remote = iterative_path_patching(model, dataset, remote="local", **walk)
    # remotely: one request for step 0 and one per receiver swept at step 1, each caching its own runs
    assert programs == [("path_program", False)] * 3
    assert remote.edges == local.edges
    xr.testing.assert_identical(local.scores.drop_attrs(), remote.scores.drop_attrs())
    for key in ("clean_mean", "corrupted_mean", "threshold", "max_depth"):
        assert local.scores.attrs[key] == remote.scores.attrs[key], key
