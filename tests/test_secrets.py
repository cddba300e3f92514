"""The NDIF API key never reaches a repr, a log, an experiment folder, a result or an error message.

Each way of giving the key is tried against the loopback NDIF server (tests/ndif_server.py),
which only accepts requests that carry it, so a completed request proves that the key was
in play. Everything a run leaves behind is then searched for the key's text.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import subprocess
import sys
import textwrap
import traceback
import uuid
from pathlib import Path

import nnsight
import pytest
from nnsight.modeling.transformers import TransformersModel

import patchlab as pl
from patchlab.remote import model_key

from .ndif_server import LoopbackNDIF, closed_port_url
from .test_remote import _load, pairs

KEY = f"ndif-test-key-{uuid.uuid4().hex}"  # unique text: any occurrence is the key
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model() -> pl.PatchModel:
    return _load("gpt2")


def hosted(model: pl.PatchModel) -> dict:
    return {model_key(model): TransformersModel(copy.deepcopy(model.hf), tokenizer=model.tokenizer,
                                                task="text-generation")}


@pytest.fixture(scope="module")
def server(model):
    with LoopbackNDIF(hosted(model), api_keys={KEY}) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _fresh(server):
    server.reset()
    yield
    server.reset()


class EchoingNDIF(LoopbackNDIF):
    """A server whose refusal quotes the API key it was sent (some services do)."""

    async def _request(self, request):
        sent = request.headers.get("ndif-api-key", "")
        return self._error(401, f"Invalid API key {sent!r}: it is not registered with this server.")


def leaks(**texts: str) -> list[str]:
    """The names of the texts that contain the key."""
    return [name for name, text in texts.items() if KEY in text]


def folder_texts(folder: Path) -> dict[str, str]:
    return {p.name: p.read_bytes().decode("latin-1") for p in sorted(folder.iterdir())}


def test_repr_and_str_hide_the_key(model, server):
    remote = pl.Remote(host=server.url, api_key=KEY)
    assert repr(remote) == f"Remote(host={server.url!r}, api_key='***', timeout_s=21600, simulate=False)"
    assert str(remote) == repr(remote) and KEY not in f"{remote} {remote!r} {[remote]} {({'r': remote})}"
    assert "api_key=None" in repr(pl.Remote()) and remote.api_key == KEY  # hidden, not lost
    assert dataclasses.replace(remote, timeout_s=1).api_key == KEY
    loaded = pl.load_model(model.hf, tokenizer=model.tokenizer, model_id="tiny-gpt2", hub_id=model.hub_id,
                           remote=remote)
    assert KEY not in repr(loaded) + repr(loaded.remote) + str(loaded.remote)


@pytest.mark.parametrize("how", ["argument", "load_model", "nnsight_config"])
def test_the_key_reaches_no_log_folder_or_result(how, model, server, tmp_path, caplog, capfd, monkeypatch):
    monkeypatch.setattr(nnsight.CONFIG.APP, "DEBUG", True)  # nnsight's verbose remote output as well
    monkeypatch.setattr(nnsight.CONFIG.APP, "REMOTE_LOGGING", True)
    caplog.set_level(logging.DEBUG)
    remote = pl.Remote(host=server.url, api_key=KEY)
    used, remote_arg = model, remote
    if how == "load_model":
        used = pl.load_model(model.hf, tokenizer=model.tokenizer, model_id="tiny-gpt2", hub_id=model.hub_id,
                             remote=remote)
        remote_arg = None  # the model's default
    elif how == "nnsight_config":  # what NDIF_API_KEY / set_default_api_key set; monkeypatch restores it
        monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", KEY)
        monkeypatch.setattr(nnsight.CONFIG.API, "HOST", server.url)
        remote, remote_arg = pl.Remote(), True
    with pl.ExperimentRun("secrets", root=tmp_path, config={"remote": remote, "n": 3}, seed=0, run_id="s",
                          command=["x"]) as run:
        logging.getLogger("patchlab.test").info("running on %r with %r", used, used.remote or remote)
        ds = pl.patch_heads(used, pairs(model), progress=False, remote=remote_arg)
        run.save_dataset(ds, "heads")
        run.record(remote=remote, default_remote=used.remote)
    assert [r.status for r in server.requests] == ["COMPLETED"]  # the server got the key and accepted it
    captured = capfd.readouterr()
    assert not leaks(**folder_texts(run.path), attrs=repr(ds.attrs), log_text=caplog.text,
                     records=repr([(r.getMessage(), r.args) for r in caplog.records]),
                     stdout=captured.out, stderr=captured.err)
    assert sorted(folder_texts(run.path)) == ["config.json", "heads.nc", "log.txt", "manifest.json"]
    if how != "nnsight_config":
        assert '"api_key": "***"' in folder_texts(run.path)["config.json"]  # masked, not dropped


CHILD = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    import patchlab as pl
    from tests.test_remote import _load, pairs

    model = _load("gpt2")
    model = pl.load_model(model.hf, tokenizer=model.tokenizer, model_id="tiny-gpt2", hub_id=model.hub_id,
                          remote=True)
    with pl.ExperimentRun("secrets", root=sys.argv[1], config={"remote": "ndif"}, seed=0, run_id="env") as run:
        logging.getLogger("patchlab.test").info("running on %r with %r", model, model.remote)
        run.save_dataset(pl.patch_heads(model, pairs(model), progress=False), "heads")
        run.record(remote=model.remote)
    print("done", run.path)
""")


def test_the_key_from_the_environment_reaches_nothing(server, tmp_path):
    """NDIF_API_KEY is read when nnsight is imported, hence a fresh process."""
    env = {**os.environ, "NDIF_API_KEY": KEY, "NDIF_HOST": server.url, "NNSIGHT_DEBUG": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [r.status for r in server.requests] == ["COMPLETED"]
    assert not leaks(**folder_texts(tmp_path / "secrets" / "env"), stdout=proc.stdout, stderr=proc.stderr)
    assert "DEBUG" in proc.stderr  # debug logging was on


def test_errors_hide_the_key_even_when_the_server_quotes_it(model, server, tmp_path):
    with EchoingNDIF(hosted(model)) as echoing:
        with pytest.raises(pl.RemoteAuthError) as info:
            with pl.ExperimentRun("secrets", root=tmp_path, config={}, seed=0, run_id="e", command=["x"]):
                pl.patch_heads(model, pairs(model), progress=False, remote=pl.Remote(host=echoing.url, api_key=KEY))
    error = info.value
    assert "Invalid API key '***'" in str(error)  # the server did quote it
    assert not leaks(message=str(error), traceback="".join(traceback.format_exception(error)),
                     **folder_texts(tmp_path / "secrets" / "e"))


def test_other_remote_errors_do_not_show_the_key(model, server):
    keyed = pl.Remote(host=server.url, api_key=KEY, timeout_s=1)
    server.hang = True
    with pytest.raises(pl.RemoteTimeoutError) as timeout:
        pl.patch_heads(model, pairs(model), progress=False, remote=keyed)
    with pytest.raises(pl.RemoteConnectionError) as refused:
        pl.patch_heads(model, pairs(model), progress=False, remote=pl.Remote(host=closed_port_url(), api_key=KEY))
    with pytest.raises(pl.RemoteAuthError) as wrong:
        pl.patch_heads(model, pairs(model), progress=False, remote=pl.Remote(host=server.url, api_key=KEY[::-1]))
    for error in (timeout.value, refused.value, wrong.value):
        assert not leaks(message=str(error), traceback="".join(traceback.format_exception(error)))
        assert KEY[::-1] not in "".join(traceback.format_exception(error))
