"""Tiny random causal LMs of each supported architecture family, built offline.

Every model here is float32, in eval mode, with eager attention and fully
deterministic weights given ``seed``: all parameters are re-drawn from a seeded
normal distribution so that biases and norm weights are non-trivial too (the
Hugging Face initialisation zeroes biases and sets norm weights to one, which
would hide layout mistakes in patching code).

Random weights are right for checking that patching code equals an independent
computation; they say nothing about whether a discovered circuit is right.
"""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "FAMILIES",
    "ALL_FAMILIES",
    "VOCAB_SIZE",
    "N_LAYERS",
    "D_MODEL",
    "N_HEADS",
    "N_KV_HEADS",
    "D_HEAD",
    "SPECIAL_TOKENS",
    "tiny_tokenizer",
    "tiny_model",
    "tiny_patch_model",
]

FAMILIES: tuple[str, ...] = ("gpt2", "gpt_neo", "gpt_neox", "llama", "mistral", "qwen2", "gemma2", "gemma3")
"""The architecture families patchlab supports, one tiny config each."""

ALL_FAMILIES: tuple[str, ...] = FAMILIES + ("gpt_neox_seq",)
"""`FAMILIES` plus GPT-NeoX with a sequential (non-parallel) residual."""

VOCAB_SIZE = 100
N_LAYERS = 3
D_MODEL = 64
N_HEADS = 4
N_KV_HEADS = 2  # grouped-query families only; the GPT families have N_HEADS key/value heads
D_HEAD = D_MODEL // N_HEADS
MAX_POSITIONS = 64
WINDOW = 4  # sliding / local attention window: small so that 8-token prompts exercise it

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
"""Special tokens, with ids 0, 1, 2; word tokens ``w0, w1, ...`` follow from id 3."""
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2

_INIT_STD = 0.2


def tiny_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with exactly ``vocab_size`` tokens, no download.

    Ids 0, 1, 2 are ``<pad>``, ``<eos>``, ``<unk>``; the words ``w0 .. w{vocab_size-4}``
    take ids 3 .. vocab_size-1, so ``len(tokenizer) == vocab_size`` matches the
    embedding size of `tiny_model`. Example: ``"w0 w5"`` encodes to ``[3, 8]``.
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS)}, got {vocab_size}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i in range(vocab_size - len(SPECIAL_TOKENS)):
        vocab[f"w{i}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _config(family: str) -> transformers.PretrainedConfig:
    ids = dict(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=EOS_ID)
    gqa = dict(
        hidden_size=D_MODEL,
        intermediate_size=4 * D_MODEL,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        **ids,
    )
    if family == "gpt2":
        return transformers.GPT2Config(
            n_layer=N_LAYERS, n_head=N_HEADS, n_embd=D_MODEL, n_positions=MAX_POSITIONS, **ids
        )
    if family == "gpt_neo":
        return transformers.GPTNeoConfig(
            num_layers=N_LAYERS,
            num_heads=N_HEADS,
            hidden_size=D_MODEL,
            max_position_embeddings=MAX_POSITIONS,
            attention_types=[[["global", "local"], 1], [["local"], 1]],  # global, local, local
            window_size=WINDOW,
            **ids,
        )
    if family in ("gpt_neox", "gpt_neox_seq"):
        return transformers.GPTNeoXConfig(
            hidden_size=D_MODEL,
            intermediate_size=4 * D_MODEL,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS,
            max_position_embeddings=MAX_POSITIONS,
            use_parallel_residual=(family == "gpt_neox"),
            **ids,  # rotary on 25% of each head (Pythia default), q/k/v/dense biases on
        )
    if family == "llama":
        return transformers.LlamaConfig(**gqa)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=WINDOW, **gqa)
    if family == "qwen2":
        return transformers.Qwen2Config(**gqa)  # q/k/v projections have biases
    if family == "gemma2":
        return transformers.Gemma2Config(
            head_dim=D_HEAD,
            query_pre_attn_scalar=D_HEAD,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            **gqa,  # keeps the default attention (50) and final-logit (30) soft-capping
        )
    if family == "gemma3":
        return transformers.Gemma3TextConfig(
            head_dim=D_HEAD,
            query_pre_attn_scalar=D_HEAD,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            **gqa,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {ALL_FAMILIES}")


_MODEL_CLASSES = {
    "gpt2": transformers.GPT2LMHeadModel,
    "gpt_neo": transformers.GPTNeoForCausalLM,
    "gpt_neox": transformers.GPTNeoXForCausalLM,
    "gpt_neox_seq": transformers.GPTNeoXForCausalLM,
    "llama": transformers.LlamaForCausalLM,
    "mistral": transformers.MistralForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "gemma2": transformers.Gemma2ForCausalLM,
    "gemma3": transformers.Gemma3ForCausalLM,
}


@torch.no_grad()
def _reinit(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter from a seeded normal distribution.

    Norm weights are drawn around their neutral value: 1 for LayerNorm / Llama-style
    RMSNorm, 0 for Gemma's RMSNorm (which scales by ``1 + weight``). Tied weights are
    drawn once (``named_parameters`` deduplicates them).
    """
    gen = torch.Generator().manual_seed(seed)
    norm_weights = set()
    for module in model.modules():
        name = type(module).__name__
        if "Norm" in name and getattr(module, "weight", None) is not None:
            centre = 0.0 if name.startswith("Gemma") else 1.0
            norm_weights.add(id(module.weight))
            module.weight.copy_(centre + _INIT_STD * torch.randn(module.weight.shape, generator=gen))
    for _, param in model.named_parameters():
        if id(param) not in norm_weights:
            param.copy_(_INIT_STD * torch.randn(param.shape, generator=gen))


def tiny_model(family: str, *, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random causal LM of ``family`` (one of `ALL_FAMILIES`), float32, eval mode.

    3 layers, d_model 64, 4 query heads of size 16, vocab 100, 64 positions, eager
    attention. Llama, Mistral, Qwen2, Gemma2 and Gemma3 use grouped-query attention
    with 2 key/value heads. GPT-Neo mixes global and local (window 4) layers; Mistral
    uses a sliding window of 4; Gemma2/3 alternate sliding (window 4) and full layers.
    "gpt_neox" has a parallel residual (Pythia), "gpt_neox_seq" a sequential one.

    Raises:
        ValueError: an unknown family.
    """
    config = _config(family)
    config._attn_implementation = "eager"
    with torch.random.fork_rng():  # the HF initialiser's draws (all overwritten) leave the global RNG alone
        model = _MODEL_CLASSES[family](config)
    _reinit(model, seed)
    model.to(torch.float32).eval()
    return model


def tiny_patch_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float64, **load_kwargs):
    """`tiny_model` loaded with `patchlab.load_model` in `dtype` (float64 by default: exactness
    tests compare it with the plain-hook reference on the same float64 modules, ``model.hf``).
    `load_kwargs` go to `load_model` (``model_id`` defaults to ``"tiny-<family>"``)."""
    import patchlab as pl

    hf = tiny_model(family, seed=seed)
    load_kwargs.setdefault("model_id", f"tiny-{family}")
    return pl.load_model(hf, tokenizer=tiny_tokenizer(hf.config.vocab_size), dtype=dtype, **load_kwargs)
