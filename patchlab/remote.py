"""Running patchlab on a hosted model (NDIF, the National Deep Inference Fabric).

Every algorithm plans on the client and runs its model work as one *program*
(a function of `patchlab.kernels`) inside one ``model.session``. `execute` runs
that session here, or, with ``remote=``, ships it to an NDIF server as **one
request**: the session's source, the program's source (the kernels travel by
value: the server does not have patchlab) and the plain data it reads. Only the
values the program returns come back.

``remote`` accepts:

- ``False`` / ``None``: run here (``None`` means the model's default, see
  `patchlab.load_model`'s ``remote``);
- ``True`` (or ``"ndif"``): the configured NDIF host (nnsight's ``CONFIG.API.HOST``, or the
  ``NDIF_HOST`` environment variable) and API key (``CONFIG.API.APIKEY``, or
  ``NDIF_API_KEY``);
- ``"local"``: nnsight's in-process simulation of the round trip (serialization
  and deserialization with local modules hidden), for checking without a server;
- a URL string (``"https://api.ndif.us"``): that host;
- a `Remote` value, to give the host, the API key and how long to wait.

The API key is never shown: ``repr(Remote(...))`` prints ``api_key='***'``, experiment
folders store ``"***"`` (the field is marked ``metadata={"secret": True}``), and error
messages have the key replaced by ``***`` (a server that echoes it cannot leak it).

Failures raise a `RemoteExecutionError` subclass whose message names the problem
and the fix: `RemoteConnectionError` (host unreachable), `RemoteAuthError` (API key
refused), `RemoteJobError` (the job failed on the server; carries the server's
message) and `RemoteTimeoutError` (no result in time).
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import nnsight

__all__ = ["Remote", "execute", "resolve_remote", "model_key", "send_by_value", "RemoteExecutionError",
           "RemoteConnectionError",
           "RemoteAuthError", "RemoteJobError", "RemoteTimeoutError"]

nnsight.register("patchlab.kernels")  # kernels travel by value (as source) with every request


@dataclass(frozen=True, repr=False)
class Remote:
    """Where and how to run remotely.

    Attributes:
        host: server URL; None: nnsight's ``CONFIG.API.HOST`` (``NDIF_HOST``).
        api_key: NDIF API key; None: nnsight's ``CONFIG.API.APIKEY`` (``NDIF_API_KEY``).
            A secret: repr and str show ``'***'``.
        timeout_s: how long to wait for one request's result, in seconds.
        simulate: run nnsight's in-process simulation instead of contacting a server.
    """

    host: str | None = None
    api_key: str | None = field(default=None, metadata={"secret": True})
    timeout_s: float = 6 * 3600
    simulate: bool = False

    def __repr__(self) -> str:
        shown = ("***" if f.metadata.get("secret") and getattr(self, f.name) is not None else getattr(self, f.name)
                 for f in fields(self))
        return "Remote(" + ", ".join(f"{f.name}={v!r}" for f, v in zip(fields(self), shown)) + ")"

    @property
    def url(self) -> str:
        return self.host or nnsight.CONFIG.API.HOST


class RemoteExecutionError(RuntimeError):
    """A remote request failed. Attributes: ``host`` and ``job_id`` (None before the job existed)."""

    def __init__(self, message: str, *, host: str | None = None, job_id: str | None = None):
        super().__init__(message)
        self.host, self.job_id = host, job_id


class RemoteConnectionError(RemoteExecutionError):
    """The host could not be reached, or the connection dropped before the result."""


class RemoteAuthError(RemoteExecutionError):
    """The host refused the API key."""


class RemoteJobError(RemoteExecutionError):
    """The job failed on the server; the message carries the server's."""


class RemoteTimeoutError(RemoteExecutionError):
    """No result arrived in time."""


def resolve_remote(remote: bool | str | Remote | None, default: Remote | None = None) -> Remote | None:
    """The `Remote` that a ``remote=`` argument names, or None to run here.

    Raises:
        ValueError: a string that is neither ``"local"`` nor an http(s) URL.
    """
    if remote is None:
        return default
    if remote is False or remote == "":
        return None
    if remote is True or remote == "ndif":
        return Remote()
    if isinstance(remote, Remote):
        return remote
    if remote == "local":
        return Remote(simulate=True)
    if isinstance(remote, str) and remote.startswith(("http://", "https://")):
        return Remote(host=remote.rstrip("/"))
    raise ValueError(f"remote={remote!r}: use False, True or 'ndif' (the configured NDIF host), 'local' (in-process "
                     "simulation), a host URL such as 'https://api.ndif.us', or patchlab.Remote(...)")


_SERVER_MODULES = ("torch", "numpy", "math", "einops", "builtins", "__main__")
"""Top-level modules a server has (``__main__`` functions already travel by value)."""


def send_by_value(fn: Callable) -> None:
    """Make the user function `fn` (e.g. a metric) travel with remote requests as source: its
    module is registered with ``nnsight.register``, unless the server has it anyway."""
    module = getattr(fn, "__module__", None)
    if module and module.split(".")[0] not in _SERVER_MODULES:
        nnsight.register(module)


def model_key(model) -> str:
    """The key a server knows `model` by: nnsight's ``"<wrapper class>:{repo_id, revision}"``.

    Raises:
        ValueError: the model has no Hub id (a local folder or a built model): give one
            with ``load_model(..., hub_id="org/name")``.
    """
    if not model.hub_id:
        raise ValueError(f"model {model.model_id!r} has no Hugging Face Hub id, so a server cannot know it: "
                         "load it with load_model(..., hub_id='org/name') naming the checkpoint the server hosts")
    from nnsight.util import to_import_path

    # The format of nnsight 0.8's TransformersModel key, minted here without its Hub lookup.
    data = {"repo_id": model.hub_id, "revision": model.revision, "task": "text-generation"}
    return f"{to_import_path(type(model.nn))}:" + json.dumps(data)


def execute(model, program: Callable, *args: Any, remote: bool | str | Remote | None = None) -> Any:
    """Run ``program(model.nn, *args)`` in one session: here, or remotely as one request.

    `program` is a function of `patchlab.kernels` and `args` plain data; its return
    value (tensors in dicts, lists, tuples) is what comes back.

    Raises:
        RemoteConnectionError, RemoteAuthError, RemoteJobError, RemoteTimeoutError: see the module docstring.
    """
    config = resolve_remote(remote, model.remote)
    nn = model.nn
    backend = None if config is None else _backend(model, config)
    try:
        with nn.session(backend=backend):
            result = nnsight.save(program(nn, *args))
    except RemoteExecutionError:
        raise
    except Exception as error:
        mapped = _map_error(error, config, backend)
        if mapped is None:
            raise
        key = getattr(backend, "api_key", None)
        if key and key in "".join(traceback.format_exception(error)):
            raise mapped from None  # the chained errors would print the key
        raise mapped from error
    return result


def _backend(model, config: Remote):
    if config.simulate:
        from nnsight.intervention.backends.local import LocalSimulationBackend

        return LocalSimulationBackend(model.nn)
    return _RemoteBackend(model_key(model), config, env=model.nn._remoteable_get_env())


def _map_error(error: Exception, config: Remote | None, backend) -> RemoteExecutionError | None:
    if config is None or config.simulate:
        return None
    from nnsight.intervention.backends.remote import RemoteError

    host, job_id = config.url, getattr(backend, "job_id", None)
    text = _hide(error, getattr(backend, "api_key", None))
    if isinstance(error, RemoteError):
        status = getattr(getattr(error.__cause__, "response", None), "status_code", None)
        if status in (401, 403):
            return RemoteAuthError(
                f"the NDIF host {host} refused the API key ({text}). Set a valid key with the NDIF_API_KEY "
                "environment variable, nnsight.CONFIG.set_default_api_key(...) or patchlab.Remote(api_key=...); "
                "keys are issued at https://login.ndif.us", host=host)
        if error.__cause__ is not None and status is None:
            return RemoteConnectionError(
                f"cannot reach the NDIF host {host} ({text}). Check the address (remote=URL, NDIF_HOST or "
                "nnsight.CONFIG.API.HOST) and that the service is up (nnsight.status())", host=host)
        if job_id is None:
            return RemoteJobError(f"the NDIF host {host} rejected the request: {text}", host=host)
        return RemoteJobError(f"the remote job {job_id} failed on {host}: {text}", host=host, job_id=job_id)
    return None


def _hide(message: Any, key: str | None) -> str:
    """``str(message)`` with the API key `key` replaced by ``***``."""
    return str(message).replace(key, "***") if key else str(message)


def _remote_backend_class():
    from nnsight.intervention.backends.remote import RemoteBackend

    return RemoteBackend


class _RemoteBackend(_remote_backend_class()):
    """nnsight's blocking backend with a deadline and connection errors that name the host."""

    def __init__(self, key: str, config: Remote, env: dict):
        super().__init__(key, host=config.url, api_key=config.api_key, env=env)
        self.timeout_s = config.timeout_s

    def send(self, request, blob):
        response = self._post(request, blob)
        self.job_id = response.id
        return self.handle(response)

    def request(self, request, tracer):
        import websocket

        blob = self._serialize(tracer)
        try:
            connection = websocket.create_connection(
                f"{self.ws_host}/subscribe", timeout=30,
                header={"ndif-api-key": self.api_key} if self.api_key else None)
        except (OSError, websocket.WebSocketException) as error:
            raise RemoteConnectionError(
                f"cannot reach the NDIF host {self.host} ({type(error).__name__}: {_hide(error, self.api_key)}). "
                "Check the address (remote=URL, NDIF_HOST or nnsight.CONFIG.API.HOST) and that the service is up "
                "(nnsight.status())",
                host=self.host) from None
        try:
            request.session_id = json.loads(connection.recv())["session_id"]
            self.send(request, blob)
            deadline = time.monotonic() + self.timeout_s
            connection.settimeout(0.5)
            while True:
                try:
                    message = connection.recv()
                except websocket.WebSocketTimeoutException:
                    if time.monotonic() > deadline:
                        raise RemoteTimeoutError(
                            f"no result from {self.host} for job {self.job_id} after {self.timeout_s:g} s. Wait "
                            "longer with patchlab.Remote(timeout_s=...); a long experiment keeps the requests that "
                            "finished (checkpoint=)", host=self.host, job_id=self.job_id) from None
                    self.display.refresh()
                    continue
                except (OSError, websocket.WebSocketConnectionClosedException) as error:
                    raise RemoteConnectionError(
                        f"the connection to {self.host} closed before job {self.job_id} finished "
                        f"({_hide(error, self.api_key)}); "
                        "run the step again", host=self.host, job_id=self.job_id) from None
                response = self.parse(message)
                result = self.handle(response)
                if response.status.value == "COMPLETED":
                    return result
        finally:
            connection.close()
