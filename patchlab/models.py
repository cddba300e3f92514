"""Loading models: any Hugging Face causal LM, wrapped in nnsight, with its adapter."""

from __future__ import annotations

import difflib
import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import Adapter, Layout, adapter_for

__all__ = ["ModelNotFoundError", "PatchModel", "load_model", "weights_sha256", "check_patch_model", "takes_model"]

log = logging.getLogger("patchlab")


class ModelNotFoundError(ValueError, OSError):
    """`load_model` found no model under the name it was given.

    Raised at once, without any network request, for a name that cannot be a Hub model
    (a missing path, a misspelt embedded name) or that is not cached while
    ``HF_HUB_OFFLINE=1``; raised after trying the Hub when the Hub could not be reached
    or has no such model. The message says which, lists the embedded model names
    (suggesting a close one) and how to work offline. An `OSError` too, as what
    ``from_pretrained`` raised here before, so that ``except OSError`` still catches it.
    """


@dataclass(frozen=True, eq=False)
class PatchModel:
    """A causal LM ready for patching.

    Attributes:
        nn: the nnsight wrapper (`nnsight.modeling.transformers.TransformersModel`);
            the only object patchlab opens traces on.
        hf: the underlying ``transformers`` model (eval mode).
        tokenizer: its tokenizer.
        adapter: the architecture family's `Adapter`.
        layout: sizes (layers, heads, key/value heads, d_head, ...).
        model_id: what the model was loaded from (short name, Hub id or folder).
        weights_sha256: sha256 over every parameter and buffer (names, dtypes,
            shapes, bytes), identifying the exact weights used.
        block_output_arity: 0 if a decoder block returns a tensor, else the length
            of the tuple it returns (first element: hidden states).
        hub_id, revision: the Hugging Face checkpoint a remote server knows the model by.
        remote: where algorithms run by default (their ``remote=None``); None: here.
            Set by ``load_model(..., remote=...)``; see `patchlab.remote`.
    """

    nn: Any
    hf: torch.nn.Module
    tokenizer: Any
    adapter: Adapter
    layout: Layout
    model_id: str
    weights_sha256: str
    block_output_arity: int
    hub_id: str | None = None
    revision: str | None = None
    remote: Any = None

    @property
    def device(self) -> torch.device:
        """Where inputs go: the model's device, or the CPU for a model on the meta device
        (weights only on a remote server)."""
        device = next(self.hf.parameters()).device
        return torch.device("cpu") if device.type == "meta" else device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype: what activations, and so patched values, are computed in."""
        return next(self.hf.parameters()).dtype

    @property
    def is_meta(self) -> bool:
        """The weights are not here (loaded for remote execution only)."""
        return next(self.hf.parameters()).device.type == "meta"

    def arch(self) -> dict:
        """The plain description of the model that trace kernels read (`patchlab.kernels`)."""
        return self.adapter.arch(self.hf, self.layout, self.block_output_arity)

    def __repr__(self) -> str:
        lay = self.layout
        return (f"PatchModel({self.model_id!r}, family={self.adapter.family}, layers={lay.n_layers}, "
                f"heads={lay.n_heads}, kv_heads={lay.n_kv_heads}, d_head={lay.d_head})")


def check_patch_model(model: Any) -> PatchModel:
    """`model` itself if it is a `PatchModel`.

    Raises:
        TypeError: anything else; for a Hugging Face model (or its nnsight wrapper) the message
            says to call ``pl.load_model(model, tokenizer=...)`` first.
    """
    if isinstance(model, PatchModel):
        return model
    module = type(model).__module__.split(".")[0]
    if isinstance(model, torch.nn.Module) or module in ("transformers", "nnsight"):
        raise TypeError(f"expected a patchlab PatchModel, got a {type(model).__name__} ({module}): wrap it first "
                        "with `model = pl.load_model(hf_model, tokenizer=tokenizer)` (or load it by name: "
                        "pl.load_model('smollm2-135m'))")
    raise TypeError(f"expected a patchlab PatchModel from pl.load_model(...), got {type(model).__name__}")


def takes_model(function):
    """Decorator of a public algorithm whose first argument is the model: refuse anything but a
    `PatchModel` (`check_patch_model`) before the algorithm touches it."""
    @functools.wraps(function)
    def checked(model, *args, **kwargs):
        return function(check_patch_model(model), *args, **kwargs)

    return checked


def load_model(model: str | os.PathLike | torch.nn.Module = "smollm2-135m", *, tokenizer: Any = None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str | None = None, model_id: str | None = None,
               hub_id: str | None = None, revision: str | None = None, remote: Any = False) -> PatchModel:
    """Load a causal LM and wrap it in nnsight for patching.

    A name is looked up in this order:

    1. an embedded short name (``"smollm2-135m"``, see `patchlab.embedded`): offline; or
       ``"smollm2-135m-refusal"``, the refusal test-bed (`patchlab.refusal_model`), built on
       first use (about 10 minutes on 2 cores) and cached;
    2. an existing local folder, as written by ``save_pretrained`` (an ``os.PathLike``
       is only ever taken for a folder);
    3. a Hugging Face Hub id (``"org/name"``, or a bare legacy name such as ``"gpt2"``):
       from the local Hugging Face cache when it is there, without any network request,
       else from the Hub; with ``HF_HUB_OFFLINE=1`` a Hub id that is not cached fails at once.

    Anything else (a missing path, a name close to an embedded one) fails at once with a
    `ModelNotFoundError`. The config is read first and its architecture checked, so an
    unsupported model fails before its tokenizer and weights are loaded.

    Args:
        model: an embedded short name, a local folder, a Hugging Face Hub id, or an
            already-built ``transformers`` causal LM.
        tokenizer: a tokenizer; required for a built model, otherwise loaded
            with ``AutoTokenizer.from_pretrained`` from the same place.
        dtype: parameter dtype: float32 (default), float64 (exact comparisons: what the tests use),
            bfloat16 or float16; metrics are computed in at least float32 (`PatchModel.dtype`).
        device: where to put the model.
        attn_implementation: passed to ``from_pretrained`` ("eager" exposes
            attention patterns; default: the library's choice).
        model_id: name recorded in results; defaults to what was passed.
        hub_id, revision: the Hub checkpoint a remote server knows the model by;
            default: the Hub id given as `model` (or the embedded model's original).
        remote: where patchlab's algorithms run this model by default (each also
            takes ``remote=``): False (here), True (the configured NDIF host), a host
            URL, ``"local"`` (in-process simulation) or a `patchlab.Remote`. With a
            server, the model is built on the **meta device** from its config (no
            weights are loaded or downloaded; the config and tokenizer still come from
            `model`: a Hub id, its cache, or a folder), so a model that exists only on
            the server can be traced.

    Returns:
        A `PatchModel`.

    Raises:
        TypeError: `model` is neither a string or ``os.PathLike`` nor a ``torch.nn.Module``.
        ModelNotFoundError: `model` is no embedded name, folder, cached or Hub model, or the
            Hub could not be reached; the message says which, lists the embedded names and
            suggests a close one.
        UnsupportedModelError: no adapter for the architecture (lists the families).
        patchlab.embedded.EmbeddedModelMissing: an embedded model's package is not installed
            (the message gives the pip command).
        ValueError: a built model given without a tokenizer, or an invalid `remote`.
    """
    if not isinstance(model, (str, os.PathLike, torch.nn.Module)):
        raise TypeError("load_model(model) takes an embedded model name, a Hugging Face Hub id or a folder "
                        "(str or os.PathLike), or a built transformers model (torch.nn.Module); "
                        f"got {type(model).__name__} {model!r:.80}")
    built = isinstance(model, torch.nn.Module)
    source = None if built else _resolve_source(model)  # a wrong name fails here, before the slow imports

    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .remote import resolve_remote

    remote = resolve_remote(remote)
    meta = remote is not None and not remote.simulate and not built

    if built:
        if tokenizer is None:
            raise ValueError("a built model needs its tokenizer: load_model(model, tokenizer=tok)")
        hf = model
        model_id = model_id or getattr(model.config, "name_or_path", "") or type(model).__name__
        adapter = adapter_for(hf.config)  # fail fast, before moving weights around
    else:
        kwargs = {"dtype": dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        config = _from_pretrained(AutoConfig.from_pretrained, source)
        adapter = adapter_for(config)  # fail fast, before the tokenizer and the weights
        tokenizer = tokenizer or _from_pretrained(AutoTokenizer.from_pretrained, source, needs=_TOKENIZER_FILES)
        if meta:  # nnsight builds it on the meta device from this config: no weights
            wrapped = TransformersModel(source.location, tokenizer=tokenizer, task="text-generation",
                                        config=config, **kwargs)
            hf = wrapped._module
        else:
            hf = _from_pretrained(AutoModelForCausalLM.from_pretrained, source, **kwargs)
        model_id = model_id or str(model)
        hub_id = hub_id or source.hub_id
    if not meta:
        hf = hf.to(device=device, dtype=dtype)
    hf.eval()
    for param in hf.parameters():
        param.requires_grad_(False)
    layout = adapter.layout(hf.config)
    adapter.validate(hf, layout)
    if not meta:
        wrapped = TransformersModel(hf, tokenizer=tokenizer, task="text-generation")
    loaded = PatchModel(nn=wrapped, hf=hf, tokenizer=wrapped.tokenizer or tokenizer, adapter=adapter,
                        layout=layout, model_id=model_id,
                        weights_sha256="" if meta else weights_sha256(hf),
                        block_output_arity=_block_output_arity(hf, adapter),
                        hub_id=hub_id, revision=revision, remote=remote)
    log.info("loaded %r", loaded)
    return loaded


# ---- where a name points ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """Where `load_model` reads a model from.

    kind: ``"embedded"`` (location: the converted folder of an embedded model),
    ``"folder"`` (a local folder), ``"cached"`` (a Hub id whose ``config.json`` is in the
    local Hugging Face cache; location: that snapshot folder) or ``"hub"`` (location: the
    Hub id). name: what the caller passed. hub_id: the checkpoint's Hub id, if known.
    """

    kind: str
    location: str
    name: str
    hub_id: str | None = None


def _resolve_source(model: str | os.PathLike) -> _Source:
    """An embedded name, else an existing folder, else a Hub id: cached, or on the Hub.

    Raises, at once and without network:
        ModelNotFoundError: an empty name; an existing file or a folder without
            ``config.json``; a missing path (an ``os.PathLike``, or a string that is no
            Hub id: absolute, ``./``, ``~``, a backslash, several slashes, a trailing
            slash); a bare name close to an embedded one (`_MISSPELT`) that is not cached;
            a Hub id that is not cached while ``HF_HUB_OFFLINE`` is set.
        patchlab.embedded.EmbeddedModelMissing: from `patchlab.embedded.embedded_model_path`.
    """
    from . import embedded

    name = os.fspath(model)
    if name in embedded.EMBEDDED_MODELS:
        return _Source("embedded", str(embedded.embedded_model_path(name)), name,
                       hub_id=embedded.EMBEDDED_MODELS[name].hub_id)
    if name == "smollm2-135m-refusal":  # the refusal test-bed: fine-tuned once, then cached
        from .refusal_model import refusal_model_path

        return _Source("embedded", str(refusal_model_path()), name)
    if not name.strip():
        raise ModelNotFoundError(_not_found(name, "an empty name names no model"))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(_not_found(name, f"the folder {path.resolve()} has no config.json, so it is no "
                                                      "saved model (model.save_pretrained(folder) writes one)"))
        return _Source("folder", str(path), name)
    if path.exists():
        raise ModelNotFoundError(_not_found(name, f"{path.resolve()} is a file; load_model takes the folder that "
                                                  "save_pretrained writes (config.json, weights, tokenizer files)"))
    if isinstance(model, os.PathLike) or not _is_hub_id(name):
        why = ("a path object is only looked for as a folder" if isinstance(model, os.PathLike)
               else "it is not shaped like a Hub id ('org/name') either")
        raise ModelNotFoundError(_not_found(name, f"it is not an embedded model name and there is no folder "
                                                  f"{path.absolute()}; {why}, so the Hub was not tried"))
    snapshot = _cached_snapshot(name)
    if snapshot:
        return _Source("cached", snapshot, name, hub_id=name)
    if "/" not in name and _close_embedded(name, _MISSPELT):
        raise ModelNotFoundError(_not_found(name, "it is not an embedded model name, not an existing folder and not "
                                                  "in the local Hugging Face cache; it is so close to an embedded "
                                                  "name that the Hub was not tried"))
    if _hub_offline():
        raise ModelNotFoundError(_not_found(name, "it is not an embedded model name or an existing folder, and as a "
                                                  "Hub id it is not in the local Hugging Face cache, the only place "
                                                  "looked in while HF_HUB_OFFLINE is set"))
    return _Source("hub", name, name, hub_id=name)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model")
"""Files of which a cached snapshot must hold one for its tokenizer to count as cached:
transformers builds an empty tokenizer, without an error, for some models (GPT-2) from a
folder that has none (a cache that only ``AutoModelForCausalLM.from_pretrained`` filled)."""

_MISSPELT = 0.8
"""A bare name at least this close (difflib ratio, ignoring case) to an embedded name is
taken for a misspelling of it, and the Hub is not tried: "SmolLM2-135M", "smollm2-360m"."""


def _from_pretrained(load, source: _Source, *, needs: tuple[str, ...] = (), **kwargs):
    """``load(source.location, **kwargs)``, ``load`` being a ``from_pretrained``. A cached Hub
    id is read from its snapshot folder like any folder (so huggingface_hub makes no request
    at all), if that folder has one of the files `needs` names; what is not cached comes
    from the Hub, unless offline.

    Raises:
        ModelNotFoundError: a Hub id that neither the cache nor the Hub could give (the
            ``OSError`` of transformers / huggingface_hub is its ``__cause__``).
    """
    if source.kind in ("embedded", "folder"):
        return load(source.location, **kwargs)
    if source.kind == "cached":
        try:
            if needs and not any(os.path.isfile(os.path.join(source.location, f)) for f in needs):
                raise FileNotFoundError(f"{source.location} has none of {', '.join(needs)}")
            return load(source.location, **kwargs)
        except OSError as missing:  # partly cached: e.g. the config and weights, not the tokenizer
            if _hub_offline():
                raise ModelNotFoundError(_not_found(source.name, "only part of it is in the local Hugging Face "
                                                                 f"cache ({_first_line(missing)}), and HF_HUB_OFFLINE "
                                                                 "is set")) from missing
            log.info("%s is only partly cached (%s); trying the Hub", source.name, _first_line(missing))
    try:
        return load(source.hub_id, **kwargs)
    except OSError as error:
        raise ModelNotFoundError(_not_found(source.name, _hub_failure(error))) from error


def _is_hub_id(name: str) -> bool:
    """``org/name`` or a bare ``name`` of letters, digits, ``-``, ``_`` and ``.``: the Hub's own
    rule, so ``/abs``, ``./x``, ``~/x``, ``a\\b``, ``a/b/c`` and ``x/`` are paths."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _cached_snapshot(repo_id: str) -> str | None:
    """The local Hugging Face cache's folder of the repo's main revision, if it holds the
    repo's ``config.json`` (read from disk: no network)."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    return os.path.dirname(config) if isinstance(config, str) else None


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``): as huggingface_hub read it at import,
    or as set in the environment since."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any((flag or "").upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


# ---- what went wrong ---------------------------------------------------------------------------


def _not_found(name: str, reason: str) -> str:
    """The whole `ModelNotFoundError` message: the name, `reason`, close embedded names, the
    embedded names, where Hub ids are looked for and ``HF_HUB_OFFLINE=1``."""
    from huggingface_hub import constants

    from . import embedded

    close = _close_embedded(name, 0.6)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    for short, spec in embedded.EMBEDDED_MODELS.items():
        if name.lower() == spec.hub_id.lower():
            hint = f" The embedded {short!r} is a quantised copy of this checkpoint that needs no network."
    offline = ("HF_HUB_OFFLINE=1 is set, so the Hub is never tried: to download a model into the cache once, "
               "run without it on a machine with network" if _hub_offline() else
               "on a machine without network set HF_HUB_OFFLINE=1, so that a model that is not cached fails at "
               "once instead of after retries")
    return (f"load_model({name!r}): {reason}.{hint} Embedded models (no network needed): "
            f"{', '.join(map(repr, sorted(embedded.EMBEDDED_MODELS)))}. A Hub id ('org/name') is loaded from the "
            f"local Hugging Face cache ({constants.HF_HUB_CACHE}) when it is there, else from the Hub; {offline}.")


def _close_embedded(name: str, cutoff: float) -> list[str]:
    """Embedded model names close to `name` (difflib, ignoring case), also by their Hub ids."""
    from . import embedded

    aliases = {}
    for short, spec in embedded.EMBEDDED_MODELS.items():
        for alias in (short, spec.hub_id, spec.hub_id.rsplit("/", 1)[-1]):
            aliases[alias.lower()] = short
    close = difflib.get_close_matches(name.lower(), list(aliases), n=3, cutoff=cutoff)
    return list(dict.fromkeys(aliases[alias] for alias in close))


def _hub_failure(error: OSError) -> str:
    """Why the Hub gave no model (`error`, from transformers): no access, no such repo,
    unreachable, or what it said."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    chain, cause = [], error
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    hub = f"the Hugging Face Hub ({constants.ENDPOINT})"
    where = ("it is not an embedded model name, not an existing folder and not (wholly) in the local Hugging Face "
             "cache, and")
    if any(isinstance(e, GatedRepoError) for e in chain):
        return f"{where} {hub} refused access to this gated repo (log in with `hf auth login`, accept its terms)"
    if any(isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError)) for e in chain):
        return f"{where} {hub} has no such model (or it is private: log in with `hf auth login`)"
    if any(isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError))
           for e in chain):
        return f"{where} {hub} could not be reached ({_first_line(error)})"
    return f"{where} loading it from {hub} failed: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's state dict: names, dtypes, shapes and raw bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _block_output_arity(hf: torch.nn.Module, adapter: Adapter) -> int:
    """Run one token through the model with a plain hook to see what a block returns
    (on the meta device too: shapes only)."""
    seen: list[Any] = []
    handle = adapter.block(hf, 0).register_forward_hook(lambda _m, _i, out: seen.append(out))
    # Without a pad token id, transformers does not check the probe token for padding (a warning
    # here, and an .item() that the meta device cannot do).
    pad, hf.config.pad_token_id = hf.config.pad_token_id, None
    try:
        with torch.no_grad():
            hf(torch.zeros(1, 1, dtype=torch.long, device=next(hf.parameters()).device))
    finally:
        hf.config.pad_token_id = pad
        handle.remove()
    out = seen[0]
    return len(out) if isinstance(out, tuple) else 0
