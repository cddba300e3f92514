"""The real SmolLM2-135M-Instruct through the loopback NDIF server (slow).

The server hosts its own copy of the weights; the client holds the model on the
meta device (no weights), as a researcher would hold a model that only NDIF has.
Results must equal a local run exactly, with one request per algorithm step.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nnsight
import pytest
import xarray as xr
from nnsight.modeling.transformers import TransformersModel

import patchlab as pl
from patchlab.remote import model_key

from .ndif_server import LoopbackNDIF

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(smollm2):
    # A second load, not a deepcopy: a copy's different memory alignment changes float
    # results in the last bits (measured: 2e-6 on logit differences), a fresh load does not.
    served = pl.load_model("smollm2-135m")
    hosted = TransformersModel(served.hf, tokenizer=served.tokenizer, task="text-generation")
    with LoopbackNDIF({model_key(smollm2): hosted}) as srv:
        yield srv


@pytest.fixture
def meta(server, monkeypatch):
    monkeypatch.setattr(nnsight.CONFIG.APP, "REMOTE_LOGGING", False)
    server.reset()
    return pl.load_model("smollm2-135m", remote=server.url)


def completed(server) -> int:
    assert all(r.status == "COMPLETED" for r in server.requests), server.requests
    return len(server.requests)


def test_head_patching_on_a_meta_model_equals_local(smollm2, meta, server):
    assert meta.is_meta and meta.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    data = pl.ioi_dataset(smollm2.tokenizer, n_prompts=2, seed=0)
    local = pl.patch_heads(smollm2, data, layers=[20, 23], progress=False)
    remote = pl.patch_heads(meta, data, layers=[20, 23], progress=False)
    xr.testing.assert_identical(local.drop_attrs(), remote.drop_attrs())
    assert completed(server) == 1


def test_causal_trace_is_one_request_per_fact(smollm2, meta, server):
    facts = pl.FactDataset(facts=pl.builtin_facts().facts[:2])
    local = pl.causal_trace(smollm2, facts, kinds=("hidden",), samples=2, progress=False)
    remote = pl.causal_trace(meta, facts, kinds=("hidden",), samples=2, progress=False)
    xr.testing.assert_identical(local.drop_attrs(), remote.drop_attrs())
    assert completed(server) == 1 + len(facts)  # the embedding std, then one per fact


def test_experiment_script_runs_remotely(smollm2, meta, server, tmp_path, monkeypatch):
    """experiments/ioi.py --remote URL: four sweeps, four requests, the local numbers."""
    spec = importlib.util.spec_from_file_location("ioi_experiment", ROOT / "experiments" / "ioi.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "ioi_experiment", script)
    spec.loader.exec_module(script)
    for remote in ("", server.url):
        script.main(script.Config(n_prompts=2, results=str(tmp_path / (remote and "remote" or "local")),
                                  remote=remote))
    assert completed(server) == 4
    for name in ("resid_pre", "attn_out", "mlp_out", "heads"):
        local, remote = (xr.load_dataset(next((tmp_path / where).rglob(f"{name}.nc"))) for where in ("local", "remote"))
        xr.testing.assert_identical(local.drop_attrs(), remote.drop_attrs())
