"""The loopback NDIF server (tests/ndif_server.py) against the unmodified nnsight client.

Every remote result is compared, exactly, with a local trace of an identical model.
The client and the server host separate copies of one seeded tiny GPT-2, so a
value can only be equal if it really made the round trip.
"""

from __future__ import annotations

import copy
import io
import pickle
import sys
import time

import cloudpickle
import httpx
import nnsight
import pytest
import torch
import transformers
import websocket
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError
from nnsight.modeling.transformers import TransformersModel
from nnsight.schema.request import RequestModel

import patchlab
from patchlab.metrics import normalised_score

from .ndif_server import (
    ALLOWED_MODULE_ROOTS,
    INJECTED_FAILURE,
    AllowlistUnpickler,
    LoopbackNDIF,
    closed_port_url,
)
from .tiny_models import tiny_tokenizer

REPO_ID = "loopback/tiny-gpt2"
KEY = (
    "nnsight.modeling.transformers.TransformersModel:"
    '{"repo_id": "loopback/tiny-gpt2", "revision": null, "task": "text-generation"}'
)
IDS = torch.tensor([[1, 2, 3, 4]])
IDS_B = torch.tensor([[5, 6, 7, 8]])


def _tiny_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=32,
        bos_token_id=1, eos_token_id=1,
    )
    config._name_or_path = REPO_ID
    return transformers.GPT2LMHeadModel(config).eval()


def _wrap(module: torch.nn.Module) -> TransformersModel:
    return TransformersModel(module, tokenizer=tiny_tokenizer(50), task="text-generation")


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    """(client model, hosted model): two nnsight wrappers of identical weights."""
    module = _tiny_gpt2()
    return _wrap(module), _wrap(copy.deepcopy(module))


@pytest.fixture(scope="module")
def server(models):
    _, hosted = models
    with LoopbackNDIF({KEY: hosted}) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _quiet_and_clean(request, monkeypatch):
    monkeypatch.setattr(nnsight.CONFIG.APP, "REMOTE_LOGGING", False)
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").reset()


@pytest.fixture
def client(models, server):
    server.reset()
    return models[0]


def backend(server, client, **kwargs) -> RemoteBackend:
    """The backend `client.trace(remote=...)` would build, with our key (no Hub lookup)."""
    return RemoteBackend(KEY, host=server.url, env=client._remoteable_get_env(), **kwargs)


def poll(be: RemoteBackend, seconds: float = 10.0):
    """Poll a non-blocking backend until it returns a result dict (or time runs out)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = be()
        if result is not None:
            return result
        time.sleep(0.02)
    return None


# -- the allowlist, without a server -------------------------------------------------


def _unpickle(data: bytes):
    return AllowlistUnpickler(io.BytesIO(data), {}).load()


def test_allowlist_unpickler_refuses_modules_outside_the_list():
    assert "patchlab" not in ALLOWED_MODULE_ROOTS and "torch" in ALLOWED_MODULE_ROOTS
    # A global from a module outside the list (find_class).
    with pytest.raises(pickle.UnpicklingError, match="Module patchlab.metrics is not whitelisted"):
        _unpickle(pickle.dumps(normalised_score))
    with pytest.raises(pickle.UnpicklingError, match="Module subprocess is not whitelisted"):
        _unpickle(pickle.dumps(__import__("subprocess").run))
    # A module *reference*, rebuilt by cloudpickle's subimport().
    with pytest.raises(pickle.UnpicklingError, match="Module patchlab is not whitelisted"):
        _unpickle(cloudpickle.dumps(patchlab))
    with pytest.raises(pickle.UnpicklingError, match="Module subprocess is not whitelisted"):
        _unpickle(cloudpickle.dumps(__import__("subprocess")))
    # Allowed roots load.
    assert _unpickle(cloudpickle.dumps(torch)) is torch
    assert torch.equal(_unpickle(cloudpickle.dumps(torch.arange(3))), torch.arange(3))


# -- blocking traces -----------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False], ids=["zstd", "raw"])
@pytest.mark.parametrize("result_via", ["frame", "url"])
def test_trace_matches_local(client, server, monkeypatch, compress, result_via):
    monkeypatch.setattr(nnsight.CONFIG.API, "COMPRESS", compress)
    monkeypatch.setattr(server, "result_via", result_via)
    with client.trace(IDS):
        h_local = client.transformer.h[0].output.save()
        logits_local = client.lm_head.output.save()

    with client.trace(IDS, backend=backend(server, client)):
        h = client.transformer.h[0].output.save()
        unsaved = client.transformer.h[1].output  # noqa: F841 -- must not come back
        logits = client.lm_head.output.save()

    assert torch.equal(h, h_local) and torch.equal(logits, logits_local)
    [record] = server.requests
    assert record.status == "COMPLETED" and record.error is None
    assert record.saved == ["h", "logits"]
    assert record.compress is compress
    assert record.delivered_via == result_via
    assert record.downloads == (1 if result_via == "url" else 0)
    assert record.payload_bytes > 0 and record.result_bytes > 0 and record.elapsed > 0


def test_remote_url_with_the_models_own_key(client, server, monkeypatch):
    """`remote="http://..."` with the key the client builds itself (Hub lookup primed)."""
    from nnsight.modeling import huggingface

    monkeypatch.setitem(huggingface._ID_CACHE, REPO_ID, REPO_ID)
    assert client.to_model_key() == KEY

    with client.trace(IDS):
        local = client.transformer.h[1].output.save()
    with client.trace(IDS, remote=server.url):
        remote = client.transformer.h[1].output.save()
    assert torch.equal(remote, local)
    assert [r.status for r in server.requests] == ["COMPLETED"]


def test_session_is_one_request_and_values_flow_without_save(client, server):
    def run(be):
        with client.session(backend=be):
            with client.trace(IDS_B):
                donor = client.transformer.h[0].output  # not saved: flows to trace 2 only
            with client.trace(IDS):
                client.transformer.h[0].output[:] = donor
                out = client.lm_head.output.save()
        return out, "donor" in locals()

    local, local_has_donor = run(None)
    remote, remote_has_donor = run(backend(server, client))

    with client.trace(IDS):
        unpatched = client.lm_head.output.save()
    assert not torch.equal(local, unpatched)  # the donor value really changed trace 2
    assert torch.equal(remote, local)
    assert not local_has_donor and not remote_has_donor
    [record] = server.requests
    assert record.status == "COMPLETED" and record.saved == ["out"]


def test_session_via_remote_url(client, server, monkeypatch):
    from nnsight.modeling import huggingface

    monkeypatch.setitem(huggingface._ID_CACHE, REPO_ID, REPO_ID)
    with client.session(remote=server.url):
        with client.trace(IDS):
            a = client.transformer.h[1].output.save()
        with client.trace(IDS_B):
            b = client.transformer.h[1].output.save()
    with client.trace(IDS):
        a_local = client.transformer.h[1].output.save()
    with client.trace(IDS_B):
        b_local = client.transformer.h[1].output.save()
    assert torch.equal(a, a_local) and torch.equal(b, b_local)
    assert len(server.requests) == 1


def test_gradients(client, server):
    def run(be):
        with client.trace(IDS, backend=be):
            act = client.transformer.h[0].output
            metric = client.lm_head.output[0, -1, 3]
            with metric.backward():
                grad = act.grad.save()
        return grad

    local = run(None)
    remote = run(backend(server, client))
    assert local.abs().sum() > 0
    assert torch.equal(remote, local)


# -- non-blocking (submit / poll) ----------------------------------------------------


@pytest.mark.parametrize("compress", [True, False], ids=["zstd", "raw"])
def test_non_blocking_submit_then_poll(client, server, monkeypatch, compress):
    monkeypatch.setattr(nnsight.CONFIG.API, "COMPRESS", compress)
    be = backend(server, client, blocking=False)
    with client.trace(IDS, backend=be):
        h = client.transformer.h[0].output.save()  # noqa: F841 -- arrives via poll
    assert be.job_id is not None
    result = poll(be)
    with client.trace(IDS):
        local = client.transformer.h[0].output.save()
    assert set(result) == {"h"} and torch.equal(result["h"], local)
    [record] = server.requests
    assert record.session_id == "" and record.downloads == 1 and record.compress is compress


def test_response_is_404_before_any_status(server):
    with httpx.Client() as http:
        assert http.get(f"{server.url}/response/no-such-job").status_code == 404
        assert http.get(f"{server.url}/download/no-such-job").status_code == 404


# -- errors --------------------------------------------------------------------------


def test_server_exception_becomes_remote_error(client, server):
    with pytest.raises(RemoteError, match=r"IndexError: index 99 is out of bounds"):
        with client.trace(IDS, backend=backend(server, client)):
            x = client.transformer.h[0].output[0, 99].save()  # noqa: F841
    [record] = server.requests
    assert record.status == "ERROR" and record.error.startswith("IndexError")
    # The server is still healthy afterwards.
    with client.trace(IDS, backend=backend(server, client)):
        ok = client.lm_head.output.save()
    assert ok.shape == (1, 4, 50)


def test_patchlab_function_in_trace_is_not_whitelisted(client, server):
    with pytest.raises(RemoteError, match="Module patchlab.metrics is not whitelisted"):
        with client.trace(IDS, backend=backend(server, client)):
            logits = client.lm_head.output
            score = normalised_score(logits, logits, logits, "higher").save()  # noqa: F841
    assert server.requests[-1].status == "ERROR"


def _torch_only_helper(x):
    return torch.tanh(x) * 2


def _helper_reaching_patchlab(x):
    return x * len(patchlab.__name__)


def test_functions_shipped_by_value(client, server):
    """A test-module function ships by value: torch-only works; one using patchlab
    is refused by the guarded cloudpickle subimport, not by find_class."""
    nnsight.register(sys.modules[__name__])

    with client.trace(IDS):
        local = _torch_only_helper(client.transformer.h[0].output).save()
    with client.trace(IDS, backend=backend(server, client)):
        remote = _torch_only_helper(client.transformer.h[0].output).save()
    assert torch.equal(remote, local)

    with pytest.raises(RemoteError, match=r"Module patchlab is not whitelisted"):
        with client.trace(IDS, backend=backend(server, client)):
            y = _helper_reaching_patchlab(client.transformer.h[0].output).save()  # noqa: F841
    assert [r.status for r in server.requests] == ["COMPLETED", "ERROR"]


def test_api_key_is_checked(models, monkeypatch):
    client, hosted = models
    with LoopbackNDIF({KEY: hosted}, api_keys={"secret"}) as srv:
        with pytest.raises(RemoteError, match="Invalid API key"):
            with client.trace(IDS, backend=RemoteBackend(KEY, host=srv.url, api_key="wrong")):
                h = client.lm_head.output.save()  # noqa: F841
        with pytest.raises(RemoteError, match="Missing API key"):
            with client.trace(IDS, backend=RemoteBackend(KEY, host=srv.url)):
                h = client.lm_head.output.save()  # noqa: F841
        with client.trace(IDS, backend=RemoteBackend(KEY, host=srv.url, api_key="secret")):
            h = client.lm_head.output.save()
        assert h.shape == (1, 4, 50)
        assert [r.status for r in srv.requests] == ["REJECTED", "REJECTED", "COMPLETED"]


def test_unknown_model_key(client, server):
    with pytest.raises(RemoteError, match="is not hosted on this server; hosted keys: .*loopback/tiny-gpt2"):
        with client.trace(IDS, backend=RemoteBackend("some.Model:{}", host=server.url)):
            h = client.lm_head.output.save()  # noqa: F841
    assert [r.status for r in server.requests] == ["REJECTED"]


def test_injected_failure_mid_session(client, server):
    server.fail_on_forward = 2
    with pytest.raises(RemoteError, match=INJECTED_FAILURE):
        with client.session(backend=backend(server, client)):
            with client.trace(IDS):
                a = client.lm_head.output.save()  # noqa: F841 -- forward 1 runs
            with client.trace(IDS_B):
                b = client.lm_head.output.save()  # noqa: F841 -- forward 2 fails
    [record] = server.requests
    assert record.status == "ERROR" and INJECTED_FAILURE in record.error
    assert server.fail_on_forward is None  # consumed by that job
    # The hook is gone: the same session now succeeds.
    with client.session(backend=backend(server, client)):
        with client.trace(IDS):
            a = client.lm_head.output.save()
        with client.trace(IDS_B):
            b = client.lm_head.output.save()
    assert a.shape == b.shape == (1, 4, 50)


def test_connection_refused(client):
    url = closed_port_url()
    # Blocking: the websocket connect fails first; nnsight does not wrap that error.
    with pytest.raises(ConnectionRefusedError):
        with client.trace(IDS, backend=RemoteBackend(KEY, host=url)):
            h = client.lm_head.output.save()  # noqa: F841
    # Non-blocking: the POST fails; nnsight wraps it in RemoteError.
    with pytest.raises(RemoteError, match="Failed to send request"):
        with client.trace(IDS, backend=RemoteBackend(KEY, host=url, blocking=False)):
            h = client.lm_head.output.save()  # noqa: F841


def test_hang_then_poll_sees_no_result(client, server):
    server.hang = True
    be = backend(server, client, blocking=False)
    with client.trace(IDS, backend=be):
        h = client.lm_head.output.save()  # noqa: F841
    assert poll(be, seconds=1.0) is None
    assert be.status.value == "RUNNING"
    assert [r.status for r in server.requests] == ["RUNNING"]
    server.reset()  # releases the hung job; the worker takes the next one
    be = backend(server, client, blocking=False)
    with client.trace(IDS, backend=be):
        h = client.lm_head.output.save()  # noqa: F841
    assert poll(be)["h"].shape == (1, 4, 50)


def test_stop_is_clean_with_a_hung_job_and_an_open_socket(models):
    _, hosted = models
    srv = LoopbackNDIF({KEY: hosted}).start()
    ws = websocket.create_connection(srv.url.replace("http", "ws") + "/subscribe")
    try:
        assert "session_id" in ws.recv()
        srv.hang = True
        be = RemoteBackend(KEY, host=srv.url, blocking=False)
        client = _wrap(_tiny_gpt2())
        with client.trace(IDS, backend=be):
            h = client.lm_head.output.save()  # noqa: F841
        assert poll(be, seconds=0.3) is None
        threads = [srv._worker, srv._loop_thread]
        start = time.monotonic()
        srv.stop()
        assert time.monotonic() - start < 5
        assert not any(t.is_alive() for t in threads)
    finally:
        ws.close()
    with pytest.raises(RemoteError, match="Failed to send request"):  # nothing listens any more
        RemoteBackend(KEY, host=srv.url)._post(RequestModel(model_key=KEY), b"")
