"""load_model: every way in, the adapter checks, and the errors that name the fix."""

from __future__ import annotations

import pytest
import torch
from transformers import (BertConfig, BertForMaskedLM, GPTJConfig, GPTJForCausalLM, T5Config,
                          T5ForConditionalGeneration)

import patchlab as pl
from patchlab.adapters import UnsupportedModelError

from .precision import float32_atol
from .tiny_models import ALL_FAMILIES, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_layout_matches_the_config(family):
    hf = tiny_model(family)
    model = pl.load_model(hf, tokenizer=tiny_tokenizer(hf.config.vocab_size))
    lay = model.layout
    gqa = family in ("llama", "mistral", "qwen2", "gemma2", "gemma3")
    assert (lay.n_layers, lay.n_heads, lay.n_kv_heads) == (3, 4, 2 if gqa else 4)
    q_width = model.adapter.view(pl.Site.Q, torch.zeros(1, 1, 3 * lay.n_heads * lay.d_head), lay).shape \
        if model.adapter.qkv else None
    assert q_width is None or q_width[-2:] == (lay.n_heads, lay.d_head)


def test_unsupported_architecture_names_the_families():
    hf = GPTJForCausalLM(GPTJConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=50, rotary_dim=8, n_positions=16))
    with pytest.raises(UnsupportedModelError, match=r"gptj.*gpt2.*gpt_neo.*llama.*Adapter"):
        pl.load_model(hf, tokenizer=tiny_tokenizer(50))


def test_built_model_needs_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        pl.load_model(tiny_model("gpt2"))


def test_local_folder_loads_the_same_weights(tmp_path):
    hf = tiny_model("qwen2")
    tok = tiny_tokenizer(hf.config.vocab_size)
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    from_memory = pl.load_model(hf, tokenizer=tok)
    from_folder = pl.load_model(tmp_path)
    assert from_folder.weights_sha256 == from_memory.weights_sha256
    assert from_folder.model_id == str(tmp_path)
    ids = torch.tensor([[5, 6, 7]])
    folder64 = pl.load_model(tmp_path, dtype=torch.float64)
    memory64 = pl.load_model(hf, tokenizer=tok, dtype=torch.float64)
    with torch.no_grad():
        from_sdpa, from_eager = folder64.hf(ids).logits, memory64.hf(ids).logits
    # same weights; the attention kernels differ (the folder's default sdpa; tiny_model's eager, whose
    # softmax transformers computes in float32 even in float64): equal to float32 precision
    assert folder64.hf.config._attn_implementation != memory64.hf.config._attn_implementation
    assert torch.allclose(from_sdpa, from_eager, atol=float32_atol(from_eager), rtol=0)


def test_weight_hash_changes_with_one_weight():
    hf = tiny_model("gpt2")
    tok = tiny_tokenizer(hf.config.vocab_size)
    before = pl.load_model(hf, tokenizer=tok).weights_sha256
    with torch.no_grad():
        hf.lm_head.weight[0, 0] += 1e-3
    assert pl.load_model(hf, tokenizer=tok).weights_sha256 != before


def _tiny_non_causal(arch: str):
    """A tiny T5 (encoder-decoder) or BERT (an encoder, though it has a causal-LM head class)."""
    if arch == "t5":
        return T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                   num_heads=2))
    return BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=16))


@pytest.mark.parametrize("weights", ["readable", "unreadable"])
@pytest.mark.parametrize("arch", ["t5", "bert"])
def test_saved_non_causal_architecture_fails_like_a_built_one_before_its_weights(tmp_path, arch, weights):
    hf = _tiny_non_causal(arch)
    hf.save_pretrained(tmp_path)
    tiny_tokenizer(50).save_pretrained(tmp_path)
    if weights == "unreadable":  # so only a load that never reads the weights gets to the adapter check
        (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UnsupportedModelError, match=rf"model_type='{arch}'.*gpt2.*llama.*Adapter") as from_folder:
        pl.load_model(tmp_path)
    with pytest.raises(UnsupportedModelError) as built:
        pl.load_model(hf, tokenizer=tiny_tokenizer(50))
    assert str(from_folder.value) == str(built.value)
