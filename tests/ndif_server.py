"""A loopback NDIF server that speaks nnsight 0.8.1's wire protocol.

The unmodified nnsight client -- ``model.trace(..., remote=url)``,
``model.session(remote=url)``, ``RemoteBackend(..., blocking=False)`` -- talks to
it exactly as it talks to the hosted service:

1. ``GET /subscribe`` (websocket): the first text frame is ``{"session_id": ...}``;
   the socket stays registered under that id until the client closes it.
2. ``POST /request`` (multipart: form field ``data`` = ``RequestModel`` JSON, file
   ``blob`` = payload, zstd when ``compress``): replies with a RECEIVED
   ``ResponseModel`` carrying the job id, or an HTTP error with ``{"detail": ...}``
   (401 bad/missing API key, 400 unknown model key, 422 malformed request).
3. Jobs run one at a time in a worker thread. Status updates (QUEUED, RUNNING,
   COMPLETED / ERROR) go to the request's session websocket as JSON text frames;
   every status is also stored for ``GET /response/{id}`` (404 until the first).
4. The result is ``torch.save({name: value})`` (zstd when ``compress``). COMPLETED
   carries it either as a binary frame (``ResponseModel.pickle()``, data = the
   bytes; ``result_via="frame"``) or as a ``/download/{id}`` URL
   (``result_via="url"``; always for polling).

A request runs the way the hosted service runs it: ``RequestModel.deserialize``
against the hosted model's persistent objects, with `AllowlistUnpickler` (only
modules the hosted service has installed may be loaded), ``_remoteable_set_env``,
then ``tracer.execute(tracer.info.code)`` as the outermost trace; the saved names
are what the execution pushed into the deserialized frame's locals.

Failure injection (consumed by the next job; `reset` clears them):
``fail_on_forward=k`` makes the k-th forward pass of the hosted module raise
``RuntimeError("injected failure: CUDA out of memory")``; ``hang=True`` makes the
job report RUNNING and then never finish (released, silently, by `reset`/`stop`).
"""

from __future__ import annotations

import asyncio
import io
import json
import linecache
import pickle
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import WSCloseCode, web
from nnsight.intervention.serialization import CustomCloudUnpickler
from nnsight.schema.request import RequestModel
from nnsight.schema.response import ResponseModel, Status
from nnsight.tracing.tracer import dec, inc

__all__ = [
    "ALLOWED_MODULE_ROOTS",
    "AllowlistUnpickler",
    "LoopbackNDIF",
    "RequestRecord",
    "closed_port_url",
]

ALLOWED_MODULE_ROOTS: frozenset[str] = frozenset(
    {
        "builtins",
        "copyreg",
        "collections",
        "_codecs",
        "math",
        "operator",
        "functools",
        "types",
        "typing",
        "enum",
        "torch",
        "numpy",
        "einops",
        "nnsight",
        "transformers",
        "cloudpickle",
    }
)
"""Top-level modules a request payload may load classes/functions/modules from."""

INJECTED_FAILURE = "injected failure: CUDA out of memory"


def _allowed(module: str) -> bool:
    return module.split(".", 1)[0] in ALLOWED_MODULE_ROOTS


def _not_whitelisted(module: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"Module {module} is not whitelisted")


def _guard_import(importer: Any) -> Any:
    """Wrap cloudpickle's ``subimport``/``dynamic_subimport`` with the allowlist."""

    def guarded(name: str, *args: Any, **kwargs: Any) -> Any:
        if not _allowed(name):
            raise _not_whitelisted(name)
        return importer(name, *args, **kwargs)

    guarded.__name__ = getattr(importer, "__name__", "guarded_import")
    return guarded


class AllowlistUnpickler(CustomCloudUnpickler):
    """`CustomCloudUnpickler` that loads only from `ALLOWED_MODULE_ROOTS`.

    Globals (``find_class``) from any other module root raise
    ``pickle.UnpicklingError("Module <m> is not whitelisted")``. Module
    *references* -- which cloudpickle rebuilds by calling
    ``cloudpickle.cloudpickle.subimport(name)`` (``dynamic_subimport`` for a module
    shipped by value) -- go through the same check, so a function shipped by value
    cannot pull in a package the hosted service does not have.
    """

    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module):
            raise _not_whitelisted(module)
        obj = super().find_class(module, name)
        if module.split(".", 1)[0] == "cloudpickle" and name in (
            "subimport",
            "dynamic_subimport",
        ):
            return _guard_import(obj)
        return obj


@dataclass
class RequestRecord:
    """What the server saw of one POST /request."""

    job_id: str
    model_key: str
    session_id: str
    status: str  # RECEIVED/QUEUED/RUNNING while in flight; then COMPLETED, ERROR, REJECTED or HUNG
    payload_bytes: int  # size of the uploaded blob
    compress: bool = False
    result_bytes: int | None = None  # size of the result blob
    elapsed: float | None = None  # seconds spent running the job
    error: str | None = None  # "Type: message" for ERROR, the HTTP detail for REJECTED
    saved: list[str] | None = None  # names the result carries
    delivered_via: str | None = None  # "frame" or "url" (websocket clients)
    downloads: int = 0  # GET /download/{id} hits


@dataclass
class _Job:
    record: RequestRecord
    request: Any  # RequestModel
    blob: bytes
    fail_on_forward: int | None
    hang: bool


def closed_port_url() -> str:
    """A ``http://127.0.0.1:PORT`` URL with nothing listening on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class LoopbackNDIF:
    """An in-process NDIF server on ``127.0.0.1`` (free port), for tests.

    Args:
        models: model key -> hosted nnsight model (e.g. a ``TransformersModel``).
        api_keys: if given, POST /request must carry one of these in ``ndif-api-key``.
        result_via: ``"frame"`` (binary websocket frame) or ``"url"`` (download URL)
            for COMPLETED results of websocket clients.
    """

    def __init__(
        self,
        models: dict[str, Any],
        *,
        api_keys: set[str] | None = None,
        result_via: str = "frame",
    ) -> None:
        if result_via not in ("frame", "url"):
            raise ValueError(f"result_via must be 'frame' or 'url', got {result_via!r}")
        self.models = dict(models)
        self.api_keys = set(api_keys) if api_keys is not None else None
        self.result_via = result_via
        self.fail_on_forward: int | None = None
        self.hang: bool = False
        self.url: str = ""
        self.port: int = 0

        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._statuses: dict[str, str] = {}  # job id -> latest ResponseModel JSON
        self._results: dict[str, bytes] = {}  # job id -> result bytes (for /download)
        self._sockets: dict[str, Any] = {}  # session id -> aiohttp WebSocketResponse
        self._jobs: queue.Queue = queue.Queue()
        self._release = threading.Event()  # set to let a hung job go
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: Any = None
        self._loop_thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._started = False

    # -- public API ------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of the records of every request received since `reset`."""
        with self._lock:
            return list(self._records)

    def reset(self) -> None:
        """Forget recorded requests/results and clear failure options; release a hung job."""
        self.fail_on_forward = None
        self.hang = False
        with self._lock:
            self._records.clear()
            self._statuses.clear()
            self._results.clear()
            release, self._release = self._release, threading.Event()
        release.set()

    def start(self) -> LoopbackNDIF:
        if self._started:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._run_loop, args=(ready, failure), name="loopback-ndif-http", daemon=True
        )
        self._loop_thread.start()
        ready.wait(30)
        if failure:
            self._loop_thread.join(5)
            raise RuntimeError("LoopbackNDIF failed to start") from failure[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self._worker = threading.Thread(target=self._work, name="loopback-ndif-worker", daemon=True)
        self._worker.start()
        self._started = True
        return self

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self._release.set()
        self._jobs.put(None)
        if self._worker is not None:
            self._worker.join(30)
        loop = self._loop
        if loop is not None and self._runner is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(30)
            finally:
                loop.call_soon_threadsafe(loop.stop)
        if self._loop_thread is not None:
            self._loop_thread.join(30)

    def __enter__(self) -> LoopbackNDIF:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- HTTP / websocket side (event-loop thread) -----------------------------

    def _run_loop(self, ready: threading.Event, failure: list) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as error:  # noqa: BLE001 -- reported to start()
            failure.append(error)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        app = web.Application(client_max_size=1024**3)
        app.router.add_get("/subscribe", self._subscribe)
        app.router.add_post("/request", self._request)
        app.router.add_get("/response/{job_id}", self._response)
        app.router.add_get("/download/{job_id}", self._download)
        app.on_shutdown.append(self._close_sockets)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _close_sockets(self, app: Any) -> None:
        with self._lock:
            sockets = list(self._sockets.values())
        for ws in sockets:
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

    async def _subscribe(self, request: Any) -> Any:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        session_id = str(uuid.uuid4())
        with self._lock:
            self._sockets[session_id] = ws
        try:
            await ws.send_str(json.dumps({"session_id": session_id}))
            async for _ in ws:  # the client sends nothing; wait for it to close
                pass
        finally:
            with self._lock:
                self._sockets.pop(session_id, None)
        return ws

    @staticmethod
    def _error(status: int, detail: str) -> Any:
        return web.json_response({"detail": detail}, status=status)

    async def _request(self, request: Any) -> Any:
        form = await request.post()
        job_id = str(uuid.uuid4())
        data = form.get("data")
        blob_field = form.get("blob")
        blob = b""
        if blob_field is not None:
            blob = blob_field.file.read() if hasattr(blob_field, "file") else bytes(blob_field)
        try:
            req = RequestModel.model_validate_json(data if isinstance(data, str) else "")
        except ValueError as error:
            return self._error(422, f"Malformed request envelope: {error}")

        record = RequestRecord(
            job_id=job_id,
            model_key=req.model_key,
            session_id=req.session_id,
            status=Status.RECEIVED.value,
            payload_bytes=len(blob),
            compress=req.compress,
        )
        with self._lock:
            self._records.append(record)

        detail, status = None, 200
        api_key = request.headers.get("ndif-api-key")
        if self.api_keys is not None and not api_key:
            detail, status = "Missing API key: send it in the 'ndif-api-key' header.", 401
        elif self.api_keys is not None and api_key not in self.api_keys:
            detail, status = "Invalid API key: it is not registered with this server.", 401
        elif req.model_key not in self.models:
            hosted = ", ".join(sorted(self.models)) or "(none)"
            detail, status = (
                f"Model key {req.model_key!r} is not hosted on this server; hosted keys: {hosted}",
                400,
            )
        elif blob_field is None:
            detail, status = "Missing 'blob' file field.", 422
        if detail is not None:
            record.status, record.error = "REJECTED", detail
            return self._error(status, detail)

        # Take the failure options now: they belong to this ("the next") job.
        job = _Job(record, req, blob, self.fail_on_forward, self.hang)
        self.fail_on_forward, self.hang = None, False

        queued = ResponseModel(id=job_id, status=Status.QUEUED, description="Queued.")
        record.status = Status.QUEUED.value
        with self._lock:
            self._statuses[job_id] = queued.model_dump_json()
            ws = self._sockets.get(req.session_id) if req.session_id else None
        if ws is not None:
            try:
                await ws.send_str(queued.model_dump_json())
            except (ConnectionError, RuntimeError):
                pass
        self._jobs.put(job)

        received = ResponseModel(id=job_id, status=Status.RECEIVED, description="Your job has been received.")
        return web.Response(text=received.model_dump_json(), content_type="application/json")

    async def _response(self, request: Any) -> Any:
        with self._lock:
            latest = self._statuses.get(request.match_info["job_id"])
        if latest is None:
            return self._error(404, "No status recorded for this job (yet).")
        return web.Response(text=latest, content_type="application/json")

    async def _download(self, request: Any) -> Any:
        job_id = request.match_info["job_id"]
        with self._lock:
            content = self._results.get(job_id)
            for record in self._records:
                if record.job_id == job_id:
                    record.downloads += 1
        if content is None:
            return self._error(404, "No result for this job.")
        return web.Response(body=content, content_type="application/octet-stream")

    # -- worker side ------------------------------------------------------------

    def _emit(self, job: _Job, status: Any, description: str = "", result: bytes | None = None) -> None:
        """Record a status for polling and send it to the job's websocket, if any."""
        job_id = job.record.job_id
        url = f"{self.url}/download/{job_id}"
        stored = ResponseModel(
            id=job_id,
            status=status,
            description=description,
            data=url if result is not None else None,
        )
        with self._lock:
            self._statuses[job_id] = stored.model_dump_json()
            ws = self._sockets.get(job.request.session_id) if job.request.session_id else None
        if ws is None or self._loop is None:
            return
        if status == Status.COMPLETED and self.result_via == "frame":
            frame = ResponseModel(id=job_id, status=status, description=description, data=result)
            send = ws.send_bytes(frame.pickle())
            job.record.delivered_via = "frame"
        else:
            if status == Status.COMPLETED:
                job.record.delivered_via = "url"
            send = ws.send_str(stored.model_dump_json())
        try:
            asyncio.run_coroutine_threadsafe(send, self._loop).result(30)
        except Exception:  # noqa: BLE001 -- the client went away; polling still works
            pass

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._run_job(job)
            except BaseException as error:  # noqa: BLE001 -- never let the worker die
                job.record.status, job.record.error = "ERROR", f"{type(error).__name__}: {error}"

    def _run_job(self, job: _Job) -> None:
        record = job.record
        record.status = Status.RUNNING.value
        with self._lock:
            release = self._release
        self._emit(job, Status.RUNNING, "Your job has started running.")
        start = time.perf_counter()

        if job.hang:
            release.wait()  # set by reset()/stop(); the job is dropped, nothing sent
            record.status, record.elapsed = "HUNG", time.perf_counter() - start
            return

        try:
            result, saved = self._execute(job)
        except BaseException as error:  # noqa: BLE001 -- reported to the client
            message = f"{type(error).__name__}: {error}"
            record.status, record.error = Status.ERROR.value, message
            record.elapsed = time.perf_counter() - start
            self._emit(job, Status.ERROR, message)
            return

        record.result_bytes = len(result)
        record.saved = saved
        record.elapsed = time.perf_counter() - start
        record.status = Status.COMPLETED.value
        with self._lock:
            self._results[record.job_id] = result
        self._emit(job, Status.COMPLETED, "Your job has been completed.", result=result)

    def _execute(self, job: _Job) -> tuple[bytes, list[str]]:
        """Run one request against its hosted model; return the result blob and saved names."""
        import torch

        request = job.request
        model = self.models[request.model_key]
        module = model._module

        hook = None
        if job.fail_on_forward is not None:
            calls = [0]
            target = job.fail_on_forward

            def fail(_module: Any, _args: Any) -> None:
                calls[0] += 1
                if calls[0] == target:
                    raise RuntimeError(INJECTED_FAILURE)

            hook = module.register_forward_pre_hook(fail)

        # deserialize() registers the block's source in linecache under the client's
        # filename. A real server is another process; here it would clobber the
        # client's entry for its own file, so put that back afterwards.
        lines_before = dict(linecache.cache)
        filename = None
        try:
            tracer = RequestModel.deserialize(
                job.blob,
                model._remoteable_persistent_objects(),
                compress=request.compress,
                unpickler=AllowlistUnpickler,
            )
            filename = tracer.info.frame.f_code.co_filename
            model._remoteable_set_env(request.env)

            variables = tracer.info.frame.f_locals  # a plain dict (SerializedFrame)
            before = dict(variables)
            inc()
            try:
                tracer.execute(tracer.info.code)
            finally:
                dec()
            saves = {
                name: value
                for name, value in variables.items()
                if name not in before or before[name] is not value
            }
        finally:
            if hook is not None:
                hook.remove()
            if filename is not None:
                if filename in lines_before:
                    linecache.cache[filename] = lines_before[filename]
                else:
                    linecache.cache.pop(filename, None)

        buffer = io.BytesIO()
        torch.save(saves, buffer)
        result = buffer.getvalue()
        if request.compress:
            import zstandard as zstd

            result = zstd.ZstdCompressor(level=3).compress(result)
        return result, sorted(saves)
