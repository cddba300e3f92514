"""Architecture adapters: where each `Site` lives in a family's modules.

One adapter per architecture family maps a component address to a module path
and knows the head layout. Nothing else in patchlab touches module paths. An
adapter reads and writes the same attribute paths on a plain ``torch.nn.Module``
and on its nnsight envoy, because envoys mirror module attributes.

Supported families (Hugging Face ``config.model_type`` in brackets):

- GPT-2 [gpt2]
- GPT-Neo [gpt_neo]
- GPT-NeoX / Pythia [gpt_neox] (parallel residual: no ``resid_mid``)
- Llama family [llama, mistral, qwen2, qwen3]: grouped-query attention
- Gemma 2/3 [gemma2, gemma3_text]: grouped-query attention; attention and MLP
  outputs are taken after their post-norms, as added to the residual stream.

To add a family, write one `Adapter` value (module paths relative to a decoder
block, plus the fused-q/k/v layout if any) and register it in `ADAPTERS`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .components import Site
from .kernels import common as K

__all__ = ["Adapter", "Layout", "HookPoint", "ADAPTERS", "adapter_for", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Sizes of a decoder-only transformer."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    n_ctx: int
    vocab_size: int

    def n_heads_at(self, site: Site) -> int:
        """Heads addressable at a per-head site: key/value heads for k and v."""
        return self.n_kv_heads if site in (Site.K, Site.V) else self.n_heads


@dataclass(frozen=True)
class HookPoint:
    """A module value in one layer: the first input or the output of the module at
    `path` under block `layer` ("" is the block itself). A tuple output stands for
    its first element. `rank` orders points within a layer in forward order."""

    layer: int
    path: str
    io: str  # "input" | "output"
    rank: int = 0

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.layer, self.rank)


@dataclass(frozen=True, kw_only=True)
class Adapter:
    """Module paths of one architecture family.

    Paths under a block are relative to decoder block ``L`` (``blocks[L]``).
    ``qkv`` names a fused projection with layout ``"split3"`` ([q | k | v] along
    the last dim, GPT-2) or ``"per_head"`` (per head [q | k | v], GPT-NeoX);
    otherwise ``q``, ``k``, ``v`` name separate projections.

    ``positions`` says how the family encodes token positions, and so how left-padded prompts
    run (`patchlab.kernels.common.padding`): ``"learned"`` absolute embeddings (GPT-2, GPT-Neo)
    are looked up by the position ids, which these models do not derive from the attention mask
    (nnsight issue 672), so every pass gives them explicitly; ``"rotary"`` embeddings (GPT-NeoX,
    Llama, Gemma) rotate q and k by the same explicit position ids. Either way a prompt's first
    real token is position 0, as when it runs alone.
    """

    family: str
    model_types: tuple[str, ...]
    blocks: str
    o_proj: str
    attn_out: str  # module whose output is the attention branch as added to the residual
    mlp_out: str
    mid_norm: str | None  # its input is what the MLP reads (resid_mid, or resid_pre when parallel)
    attn_norm: str = "input_layernorm"  # the norm in front of the q/k/v projections
    final_norm: str = "model.norm"  # absolute path of the norm in front of the unembedding
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    qkv_layout: str | None = None
    parallel_residual_attr: str | None = None
    post_norms: bool = False  # attention and MLP outputs pass an RMSNorm (1 + w) before the residual (Gemma)
    positions: str = "rotary"  # "learned" absolute position embeddings or "rotary" (see the class docstring)

    # ---- layout ---------------------------------------------------------
    def layout(self, config) -> Layout:
        n_heads = config.num_attention_heads
        d_model = config.hidden_size
        return Layout(
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            d_head=getattr(config, "head_dim", None) or d_model // n_heads,
            d_model=d_model,
            n_ctx=getattr(config, "max_position_embeddings", None) or 2048,
            vocab_size=config.vocab_size,
        )

    def has_resid_mid(self, config) -> bool:
        if self.parallel_residual_attr and getattr(config, self.parallel_residual_attr, False):
            return False
        return self.mid_norm is not None

    # ---- the plain description read by trace kernels ------------------------------------------
    def arch(self, model: torch.nn.Module, layout: Layout, block_output_arity: int = 0) -> dict:
        """Module paths, head layout and sizes as a plain dict: what `patchlab.kernels` read
        inside traces (they cannot use this class on a server that lacks patchlab)."""
        o_proj = self.module(model, self.point(Site.HEAD, 0))
        unembed = model.get_output_embeddings()
        return {**self._paths, "has_resid_mid": self.has_resid_mid(model.config), "post_norms": self.post_norms,
                "unembed": next(name for name, m in model.named_modules() if m is unembed),
                "final_softcap": getattr(model.config, "final_logit_softcapping", None),
                "conv1d": type(o_proj).__name__ == "Conv1D", "arity": block_output_arity,
                "n_layers": layout.n_layers, "n_heads": layout.n_heads, "n_kv_heads": layout.n_kv_heads,
                "d_head": layout.d_head, "d_model": layout.d_model}

    @functools.cached_property
    def _paths(self) -> dict:
        return {"blocks": self.blocks, "o_proj": self.o_proj, "attn_out": self.attn_out, "mlp_out": self.mlp_out,
                "mid_norm": self.mid_norm, "attn_norm": self.attn_norm, "final_norm": self.final_norm,
                "q": self.q, "k": self.k, "v": self.v, "qkv": self.qkv, "qkv_layout": self.qkv_layout}

    # ---- module access (one implementation: the kernels') ----------------------------------------
    def block(self, root, layer: int):
        return K.block(root, self._paths, layer)

    def module(self, root, point: HookPoint):
        return K.module(self.block(root, point.layer), point.path)

    def point(self, site: Site, layer: int) -> HookPoint:
        """The hook point that carries `site` at `layer` (for reading)."""
        return HookPoint(*K.point(self._paths, site.value, layer))

    def write_point(self, site: Site, layer: int) -> HookPoint:
        """The hook point written to patch `site`: resid_mid is written through the attention branch."""
        return HookPoint(*K.write_point(self._paths, site.value, layer))

    # ---- canonical views ---------------------------------------------------
    def view(self, site: Site, raw: torch.Tensor, layout: Layout) -> torch.Tensor:
        """The site's value in canonical shape: ``[batch, pos, d_model]`` or ``[batch, pos, head, d_head]``."""
        sizes = {"n_heads": layout.n_heads, "n_kv_heads": layout.n_kv_heads, "d_head": layout.d_head}
        return K.view({**self._paths, **sizes}, site.value, raw)

    # ---- validation ---------------------------------------------------------
    def validate(self, model: torch.nn.Module, layout: Layout) -> None:
        """Check that every path resolves and the projections match the layout.

        Raises:
            UnsupportedModelError: a path is missing or a shape disagrees.
        """
        sites = [Site.RESID_PRE, Site.Q, Site.K, Site.V, Site.HEAD, Site.ATTN_OUT, Site.MLP_OUT]
        if self.has_resid_mid(model.config):
            sites.append(Site.RESID_MID)
        try:
            blocks = _get(model, self.blocks)
            if len(blocks) != layout.n_layers:
                raise UnsupportedModelError(
                    f"{self.family}: found {len(blocks)} blocks at {self.blocks!r}, config says {layout.n_layers}")
            _get(model, self.final_norm)
            for layer in range(layout.n_layers):
                _get(self.block(model, layer), self.attn_norm)
                for site in sites:
                    self.module(model, self.point(site, layer))
        except AttributeError as err:
            raise UnsupportedModelError(
                f"{type(model).__name__} looks like family {self.family!r} but a module path is missing ({err}). "
                "Its transformers version may have renamed modules: update the adapter in patchlab/adapters.py."
            ) from err
        o_proj = self.module(model, self.point(Site.HEAD, 0))
        width = _in_features(o_proj)
        if width is not None and width != layout.n_heads * layout.d_head:
            raise UnsupportedModelError(
                f"{self.family}: output projection takes {width} features, expected "
                f"n_heads * d_head = {layout.n_heads} * {layout.d_head}")


def _get(root, path: str):
    return K.module(root, path)


def _in_features(module) -> int | None:
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
    return weight.shape[0] if type(module).__name__ == "Conv1D" else weight.shape[1]


_LLAMA_ATTN = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o_proj="self_attn.o_proj")

ADAPTERS: tuple[Adapter, ...] = (
    Adapter(family="gpt2", model_types=("gpt2",), blocks="transformer.h",
            qkv="attn.c_attn", qkv_layout="split3", o_proj="attn.c_proj",
            attn_out="attn", mlp_out="mlp", mid_norm="ln_2", attn_norm="ln_1", final_norm="transformer.ln_f",
            positions="learned"),
    Adapter(family="gpt_neo", model_types=("gpt_neo",), blocks="transformer.h",
            q="attn.attention.q_proj", k="attn.attention.k_proj", v="attn.attention.v_proj",
            o_proj="attn.attention.out_proj", attn_out="attn", mlp_out="mlp", mid_norm="ln_2",
            attn_norm="ln_1", final_norm="transformer.ln_f", positions="learned"),
    Adapter(family="gpt_neox", model_types=("gpt_neox",), blocks="gpt_neox.layers",
            qkv="attention.query_key_value", qkv_layout="per_head", o_proj="attention.dense",
            attn_out="attention", mlp_out="mlp", mid_norm="post_attention_layernorm",
            final_norm="gpt_neox.final_layer_norm", parallel_residual_attr="use_parallel_residual"),
    Adapter(family="llama", model_types=("llama", "mistral", "qwen2", "qwen3"), blocks="model.layers",
            attn_out="self_attn", mlp_out="mlp", mid_norm="post_attention_layernorm", **_LLAMA_ATTN),
    Adapter(family="gemma", model_types=("gemma2", "gemma3_text"), blocks="model.layers",
            attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm",
            mid_norm="pre_feedforward_layernorm", post_norms=True, **_LLAMA_ATTN),
)


def adapter_for(config) -> Adapter:
    """The adapter for a Hugging Face config.

    Raises:
        UnsupportedModelError: no adapter claims ``config.model_type``; the message
            lists the supported families and how to add one.
    """
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ADAPTERS)
    raise UnsupportedModelError(
        f"unsupported architecture model_type={model_type!r}. Supported families: {supported}. "
        "To add one, define an Adapter with its module paths in patchlab/adapters.py and add it to ADAPTERS.")

