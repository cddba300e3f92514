"""How load_model resolves a name (embedded -> folder -> local Hugging Face cache -> Hub), and
the errors that say which step failed.

Every test runs with a fresh, empty Hugging Face cache in a temporary folder and with a
network guard: a DNS lookup or a socket connection to anything but loopback raises
`NetworkUsed`, a BaseException that neither transformers nor huggingface_hub catches, so a
name that must fail at once cannot spend a minute retrying the Hub, and a cached model
cannot quietly ask the Hub first. The tests that need a Hub either make it unreachable
(the guard raises the DNS error of a machine without network, and huggingface_hub's retry
waits are skipped) or serve a fake Hub on loopback that knows no repository.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import time
from pathlib import Path

import huggingface_hub
import huggingface_hub.utils._http as hf_http
import nnsight.modeling.transformers  # noqa: F401  imported here so that its import time is not a load's
import pytest
import transformers.utils.hub
from huggingface_hub import constants

import patchlab as pl
from patchlab.models import ModelNotFoundError

from .tiny_models import tiny_model, tiny_tokenizer

AT_ONCE_S = 5.0  # failing at once: the Hub's retries take about 23 s per file, 47 s per load before


class NetworkUsed(BaseException):
    """A test made a network request it must not make."""


class NetworkGuard:
    """Fails (`NetworkUsed`) or refuses (``socket.gaierror``, as on a machine without
    network) every DNS lookup and connection except to loopback; records each attempt."""

    def __init__(self, monkeypatch):
        self.attempts: list[tuple] = []
        self.unreachable = False  # False: any attempt fails the test; True: it gets a DNS error
        getaddrinfo, connect = socket.getaddrinfo, socket.socket.connect

        def guarded_getaddrinfo(host, *args, **kwargs):
            self._check(host)
            return getaddrinfo(host, *args, **kwargs)

        def guarded_connect(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                self._check(address[0])
            return connect(sock, address)

        monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
        monkeypatch.setattr(socket.socket, "connect", guarded_connect)

    def _check(self, host):
        if host in ("127.0.0.1", "::1", "localhost"):
            return
        self.attempts.append(host)
        if self.unreachable:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        raise NetworkUsed(f"network request to {host!r}")


@pytest.fixture(autouse=True)
def network(monkeypatch) -> NetworkGuard:
    return NetworkGuard(monkeypatch)


@pytest.fixture(autouse=True)
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, online mode. huggingface_hub reads HF_HUB_CACHE and
    HF_HUB_OFFLINE once, at import, into `constants`, which it and transformers read at each
    call: so the constants are patched (the environment too, for anything reading it)."""
    cache = tmp_path / "hf-cache" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return cache


def go_offline(monkeypatch, how: str) -> None:
    """HF_HUB_OFFLINE=1 set before Python started ("at_import") or only since ("since_import")."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if how == "at_import":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def cache_repo(cache: Path, repo_id: str, folder: Path, only: set[str] | None = None) -> None:
    """Put the files of `folder` into `cache` the way huggingface_hub does: blobs named by
    hash, a snapshot of symlinks to them, and refs/main naming the snapshot's commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        if only is None or file.name in only:
            blob = hashlib.sha256(file.read_bytes()).hexdigest()
            (repo / "blobs" / blob).write_bytes(file.read_bytes())
            (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def saved(tmp_path):
    """A tiny Llama (grouped-query) saved with its tokenizer: (folder, model)."""
    hf = tiny_model("llama")
    folder = tmp_path / "saved"
    hf.save_pretrained(folder)
    tiny_tokenizer(hf.config.vocab_size).save_pretrained(folder)
    return folder, hf


def fails_at_once(model, error=ModelNotFoundError, **kwargs) -> str:
    start = time.monotonic()
    with pytest.raises(error) as info:
        pl.load_model(model, **kwargs)
    elapsed = time.monotonic() - start
    assert elapsed < AT_ONCE_S, f"took {elapsed:.1f} s"
    return str(info.value)


def assert_says_how_to_go_on(message: str) -> None:
    assert "'smollm2-135m'" in message  # the embedded names
    assert "HF_HUB_OFFLINE=1" in message


# ---------------------------------------------------------------- names that cannot be a Hub model


@pytest.mark.parametrize("name", ["SmolLM2-135M", "smollm2-360m", "smollm-135m"])
def test_misspelt_embedded_name_fails_at_once_and_suggests_it(name, network):
    message = fails_at_once(name)
    assert f"load_model({name!r})" in message
    assert "not an embedded model name" in message and "not an existing folder" in message
    assert "Did you mean 'smollm2-135m'?" in message
    assert_says_how_to_go_on(message)
    assert network.attempts == []


@pytest.mark.parametrize("name", [
    "/nonexistent/model", "./missing-model", "../missing-model", "~/missing-model-7f3a",
    "runs\\tiny", "runs/tiny/model", "runs/tiny/", "C:\\models\\tiny",
])
def test_missing_path_fails_at_once(name, network, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = fails_at_once(name)
    assert f"load_model({name!r})" in message
    assert "not an embedded model name and there is no folder" in message
    assert "the Hub was not tried" in message
    assert_says_how_to_go_on(message)
    assert network.attempts == []


@pytest.mark.parametrize("name", ["org/name", "gpt2"])
def test_a_path_object_is_never_a_hub_id(name, network, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = fails_at_once(Path(name))
    assert f"there is no folder {Path.cwd() / name}" in message
    assert network.attempts == []


def test_a_file_is_not_a_model_folder(tmp_path, network):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"weights")
    message = fails_at_once(str(file))
    assert f"{file.resolve()} is a file" in message and "save_pretrained" in message
    assert network.attempts == []


def test_a_folder_without_config_is_not_a_model(tmp_path, network):
    message = fails_at_once(tmp_path)
    assert f"the folder {tmp_path.resolve()} has no config.json" in message
    assert network.attempts == []


@pytest.mark.parametrize("model", [42, None, b"gpt2", ["smollm2-135m"]])
def test_neither_a_name_nor_a_model_is_a_type_error(model, network):
    message = fails_at_once(model, error=TypeError)
    assert "str or os.PathLike" in message and "torch.nn.Module" in message
    assert type(model).__name__ in message
    assert network.attempts == []


# ---------------------------------------------------------------- the local Hugging Face cache


@pytest.mark.parametrize("repo_id", ["tiny-org/tiny-llama", "tiny-llama"])  # "org/name", or a legacy bare name
@pytest.mark.parametrize("offline", [None, "at_import", "since_import"])
def test_cached_hub_model_loads_without_any_network_request(saved, hub_cache, network, monkeypatch, repo_id,
                                                            offline):
    folder, hf = saved
    cache_repo(hub_cache, repo_id, folder)
    if offline:
        go_offline(monkeypatch, offline)
    start = time.monotonic()
    model = pl.load_model(repo_id)
    assert time.monotonic() - start < AT_ONCE_S
    assert network.attempts == []
    assert model.weights_sha256 == pl.load_model(hf, tokenizer=model.tokenizer).weights_sha256
    assert (model.model_id, model.hub_id) == (repo_id, repo_id)
    assert model.tokenizer("w0 w5").input_ids == [3, 8]


def test_cached_hub_model_on_the_meta_device_needs_no_network(saved, hub_cache, network):
    folder, hf = saved
    cache_repo(hub_cache, "tiny-org/tiny-llama", folder)
    model = pl.load_model("tiny-org/tiny-llama", remote="http://127.0.0.1:9")  # the server is not contacted here
    assert model.is_meta and model.hub_id == "tiny-org/tiny-llama"
    assert model.layout == pl.load_model(hf, tokenizer=model.tokenizer).layout
    assert network.attempts == []


def test_an_existing_folder_comes_before_the_cache(saved, hub_cache, network, tmp_path, monkeypatch):
    folder, hf = saved
    other = tiny_model("llama", seed=1)
    other.save_pretrained(tmp_path / "other")
    tiny_tokenizer(other.config.vocab_size).save_pretrained(tmp_path / "other")
    cache_repo(hub_cache, "org/name", tmp_path / "other")
    (tmp_path / "cwd" / "org").mkdir(parents=True)
    folder.rename(tmp_path / "cwd" / "org" / "name")
    monkeypatch.chdir(tmp_path / "cwd")
    model = pl.load_model("org/name")
    assert model.weights_sha256 == pl.load_model(hf, tokenizer=model.tokenizer).weights_sha256
    assert model.hub_id is None  # a folder: no Hub checkpoint known
    assert network.attempts == []


@pytest.mark.parametrize("how", ["at_import", "since_import"])
def test_offline_hub_id_not_in_the_cache_fails_at_once(how, network, monkeypatch):
    go_offline(monkeypatch, how)
    message = fails_at_once("tiny-org/not-cached")
    assert "load_model('tiny-org/not-cached')" in message
    assert "not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE is set" in message
    assert_says_how_to_go_on(message)
    assert network.attempts == []


def test_offline_with_only_the_weights_cached_names_what_is_missing(saved, hub_cache, network, monkeypatch):
    folder, _ = saved  # what AutoModelForCausalLM.from_pretrained alone leaves in a cache: no tokenizer
    cache_repo(hub_cache, "tiny-org/tiny-llama", folder, only={"config.json", "model.safetensors"})
    go_offline(monkeypatch, "at_import")
    message = fails_at_once("tiny-org/tiny-llama")
    assert "only part of it is in the local Hugging Face cache" in message and "tokenizer" in message
    assert_says_how_to_go_on(message)
    assert network.attempts == []


# ---------------------------------------------------------------- the Hub


@pytest.fixture
def unreachable_hub(network, monkeypatch):
    """No network (DNS fails), and huggingface_hub's waits between its retries skipped."""
    network.unreachable = True

    class NoWait:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds):
            pass

    monkeypatch.setattr(hf_http, "time", NoWait())


@pytest.mark.parametrize("repo_id", ["tiny-org/not-cached", "gpt2"])
def test_unreachable_hub_is_a_clear_error(repo_id, unreachable_hub, network):
    with pytest.raises(ModelNotFoundError) as info:
        pl.load_model(repo_id)
    message = str(info.value)
    assert f"load_model({repo_id!r})" in message
    assert f"the Hugging Face Hub ({constants.ENDPOINT}) could not be reached" in message
    assert_says_how_to_go_on(message)
    assert isinstance(info.value.__cause__, OSError)
    assert network.attempts  # a Hub id that is not cached does try the Hub


class NoSuchRepo(http.server.BaseHTTPRequestHandler):
    """A Hub that knows no repository: every request gets the Hub's 404 RepoNotFound."""

    def do_HEAD(self):
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


@pytest.fixture
def empty_hub(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoSuchRepo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # both are read from the environment at import
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # its shared HfApi keeps the endpoint it was made with
    yield endpoint
    server.shutdown()
    server.server_close()
    thread.join()
    huggingface_hub.close_session()  # drop the pooled connection to the closed server


def test_hub_id_the_hub_does_not_have_is_a_clear_error(empty_hub, network):
    message = fails_at_once("tiny-org/no-such-model")
    assert "load_model('tiny-org/no-such-model')" in message
    assert f"the Hugging Face Hub ({empty_hub}) has no such model" in message
    assert_says_how_to_go_on(message)
    assert network.attempts == []  # only the loopback Hub was asked


def test_the_error_is_a_value_error_and_still_an_os_error():
    assert issubclass(ModelNotFoundError, ValueError) and issubclass(ModelNotFoundError, OSError)
    assert "ModelNotFoundError" in pl.models.__all__
