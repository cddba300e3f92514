"""load_model: every way in, the adapter checks, and the errors that name the fix."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTJConfig, GPTJForCausalLM

import patchlab as pl
from patchlab.adapters import UnsupportedModelError

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
    with torch.no_grad():  # same weights; the attention kernel may differ (eager vs sdpa)
        assert torch.allclose(from_folder.hf(ids).logits, hf(ids).logits, atol=1e-5)


def test_weight_hash_changes_with_one_weight():
    hf = tiny_model("gpt2")
    tok = tiny_tokenizer(hf.config.vocab_size)
    before = pl.load_model(hf, tokenizer=tok).weights_sha256
    with torch.no_grad():
        hf.lm_head.weight[0, 0] += 1e-3
    assert pl.load_model(hf, tokenizer=tok).weights_sha256 != before
