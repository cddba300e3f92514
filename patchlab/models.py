"""Loading models: any Hugging Face causal LM, wrapped in nnsight, with its adapter."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import Adapter, Layout, adapter_for

__all__ = ["PatchModel", "load_model", "weights_sha256"]

log = logging.getLogger("patchlab")


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


def load_model(model: str | os.PathLike | torch.nn.Module = "smollm2-135m", *, tokenizer: Any = None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str | None = None, model_id: str | None = None,
               hub_id: str | None = None, revision: str | None = None, remote: Any = False) -> PatchModel:
    """Load a causal LM and wrap it in nnsight for patching.

    Args:
        model: an embedded short name (``"smollm2-135m"``, available offline, see
            `patchlab.embedded`), a Hugging Face Hub id, a local folder, or an
            already-built ``transformers`` causal LM.
        tokenizer: a tokenizer; required for a built model, otherwise loaded
            with ``AutoTokenizer.from_pretrained`` from the same place.
        dtype: parameter dtype (float32 for exact comparisons).
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
        UnsupportedModelError: no adapter for the architecture (lists the families).
        patchlab.embedded.EmbeddedModelMissing: an embedded model's package is not installed
            (the message gives the pip command).
        ValueError: a built model given without a tokenizer, or an invalid `remote`.
    """
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .remote import resolve_remote

    remote = resolve_remote(remote)
    meta = remote is not None and not remote.simulate and not isinstance(model, torch.nn.Module)

    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("a built model needs its tokenizer: load_model(model, tokenizer=tok)")
        hf = model
        model_id = model_id or getattr(model.config, "name_or_path", "") or type(model).__name__
    else:
        source = _resolve_source(model)
        kwargs = {"dtype": dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(source)
        if meta:  # nnsight builds it on the meta device from the config: no weights
            wrapped = TransformersModel(source, tokenizer=tokenizer, task="text-generation", **kwargs)
            hf = wrapped._module
        else:
            hf = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        model_id = model_id or str(model)
        hub_id = hub_id or _hub_id(model)
    adapter = adapter_for(hf.config)  # fail fast, before moving weights around
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


def _resolve_source(model: str | os.PathLike) -> str:
    from . import embedded

    name = str(model)
    if name in embedded.EMBEDDED_MODELS:
        return str(embedded.embedded_model_path(name))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    return name  # a Hub id: from_pretrained resolves it (needs network or the HF cache)


def _hub_id(model: str | os.PathLike) -> str | None:
    from . import embedded

    name = str(model)
    if name in embedded.EMBEDDED_MODELS:
        return embedded.EMBEDDED_MODELS[name].hub_id
    if Path(name).expanduser().is_dir():
        return None
    return name


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
    try:
        with torch.no_grad():
            hf(torch.zeros(1, 1, dtype=torch.long, device=next(hf.parameters()).device))
    finally:
        handle.remove()
    out = seen[0]
    return len(out) if isinstance(out, tuple) else 0
