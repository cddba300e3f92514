"""The induction model: deterministic training, a cache that ignores broken folders, and
its circuit checked against plain PyTorch (attention patterns, forward hooks, forward passes).

The real model is trained once per session (~15 s) into a pytest temporary cache, so the
tests never read or write the user's ``~/.cache/patchlab``.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

import patchlab as pl
from patchlab import induction
from patchlab.data import DatasetError
from patchlab.graph import Channel, Edge, Node, NodeKind
from patchlab.induction import (
    InductionConfig,
    InductionError,
    head_pattern_scores,
    induction_dataset,
    induction_model_path,
    induction_tokenizer,
    known_circuit,
    load_induction_model,
    train_induction_model,
)

from .precision import float32_atol
from .tiny_models import tiny_tokenizer

CONFIG = InductionConfig()
T = CONFIG.seq_len
K = T // 2


@pytest.fixture(scope="session")
def folder(induction_cache):
    return induction_model_path(CONFIG, cache_dir=induction_cache, progress=False)


@pytest.fixture(scope="session")
def cache_root(induction_cache):
    return induction_cache


@pytest.fixture(scope="session")
def model(induction_model):
    return induction_model


def repeated_ids(tokenizer, n: int, seed: int) -> torch.Tensor:
    """``[n, 2T+1]`` ids of "<bos> r r" with r of T distinct words, built from text (not by the module)."""
    rng = random.Random(seed)
    words = [f"t{i}" for i in range(CONFIG.n_words)]
    rows = []
    for _ in range(n):
        r = rng.sample(words, T)
        rows.append(tokenizer(" ".join(["<bos>", *r, *r]))["input_ids"])
    return torch.tensor(rows)


# ---- training ------------------------------------------------------------------------

def test_training_is_bit_identical_and_leaves_global_state_alone():
    config = InductionConfig(steps=20)
    threads = torch.get_num_threads()
    rng_state = torch.random.get_rng_state()
    try:
        torch.set_num_threads(1)
        first = train_induction_model(config)[0].state_dict()
        torch.set_num_threads(2)  # training pins one thread, so the machine's setting does not matter
        second = train_induction_model(config)[0].state_dict()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert not torch.are_deterministic_algorithms_enabled()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    other = train_induction_model(InductionConfig(steps=20, seed=1))[0].state_dict()
    assert not torch.equal(first["transformer.wte.weight"], other["transformer.wte.weight"])


def test_trained_model_predicts_the_second_half(model, folder):
    ids = repeated_ids(model.tokenizer, 200, seed=123)
    with torch.no_grad():
        pred = model.hf(ids).logits.argmax(-1)
    accuracy = (pred[:, T + 1:2 * T] == ids[:, T + 2:]).float().mean().item()
    assert accuracy > 0.9
    meta = json.loads((folder / "patchlab.json").read_text())
    assert meta["accuracy"] > 0.9 and meta["train_seconds"] > 0  # its speed is a benchmark matter, not a test's
    assert meta["key"] == CONFIG.key and folder.name == f"induction-{CONFIG.key}"


def test_model_is_an_attention_only_gpt2(model):
    assert model.adapter.family == "gpt2"
    assert (model.layout.n_layers, model.layout.n_heads, model.layout.n_ctx) == (2, 4, 2 * T + 1)
    assert model.hf.config._attn_implementation == "eager"
    outputs = []
    handles = [block.mlp.register_forward_hook(lambda _m, _i, out: outputs.append(out))
               for block in model.hf.transformer.h]
    try:
        with torch.no_grad():
            model.hf(repeated_ids(model.tokenizer, 8, seed=1))
    finally:
        for handle in handles:
            handle.remove()
    assert len(outputs) == 2
    assert all(out.abs().max().item() == 0.0 for out in outputs)


# ---- heads and circuit --------------------------------------------------------------------

def test_head_scores_equal_a_hand_computation(model):
    ids = repeated_ids(model.tokenizer, 32, seed=7)
    scores = head_pattern_scores(model, ids)
    assert scores.prev_token.dims == ("layer", "head") and scores.prev_token.shape == (2, 4)
    with torch.no_grad():
        attentions = model.hf(ids, output_attentions=True).attentions
    for layer in range(2):
        for head in range(4):
            att = attentions[layer][:, head]  # [prompt, query, key]
            prev = [att[b, i, i - 1].item() for b in range(32) for i in range(2, 2 * T + 1)]
            ind = [att[b, i, i - T + 1].item() for b in range(32) for i in range(T + 1, 2 * T + 1)]
            tol = float32_atol(att)  # float32 means of probabilities over ~500 entries, summed in another order
            assert scores.prev_token.sel(layer=layer, head=head).item() == pytest.approx(sum(prev) / len(prev), abs=tol)
            assert scores.induction.sel(layer=layer, head=head).item() == pytest.approx(sum(ind) / len(ind), abs=tol)
    # the structure: previous-token heads only in layer 0, induction heads only in layer 1
    assert scores.prev_token.sel(layer=0).max() > 0.5 and scores.induction.sel(layer=1).max() > 0.5
    assert scores.induction.sel(layer=0).max() < 0.2 and scores.prev_token.sel(layer=1).max() < 0.2
    assert scores.prev_token.attrs["units"] == "attention probability"
    assert scores.attrs["weights_sha256"] == model.weights_sha256


def test_head_scores_reject_unusable_ids(model):
    with pytest.raises(ValueError, match="no repeated token"):
        head_pattern_scores(model, torch.arange(2, 2 + 2 * T + 1)[None])
    with pytest.raises(ValueError, match=r"\[prompt, pos\]"):
        head_pattern_scores(model, torch.arange(5))


def test_known_circuit_is_prev_token_heads_into_induction_keys(model):
    circuit = known_circuit(model)
    assert circuit.prev_token_heads and all(n.kind is NodeKind.HEAD and n.layer == 0 for n in circuit.prev_token_heads)
    assert circuit.induction_heads and all(n.kind is NodeKind.HEAD and n.layer == 1 for n in circuit.induction_heads)
    expected = {Edge(p, i, Channel.K) for p in circuit.prev_token_heads for i in circuit.induction_heads}
    expected |= {Edge(i, Node(NodeKind.LOGITS), Channel.IN) for i in circuit.induction_heads}
    assert set(circuit.edges) == expected and list(circuit.edges) == sorted(expected)
    # independent ids from text give the same heads
    again = known_circuit(model, ids=repeated_ids(model.tokenizer, 64, seed=5))
    assert again.prev_token_heads == circuit.prev_token_heads and again.induction_heads == circuit.induction_heads
    with pytest.raises(InductionError, match="no previous-token head in layer 0"):
        known_circuit(model, threshold=1.0)


def test_logit_difference_needs_the_repeat(model):
    tokens = induction_dataset(model.tokenizer, 100, seed=3).tokenize(model.tokenizer)
    diffs = {}
    with torch.no_grad():
        for name, ids in (("clean", tokens.clean_ids), ("corrupted", tokens.corrupted_ids)):
            logits = model.hf(ids).logits[:, -1]
            diffs[name] = (logits.gather(1, tokens.correct_ids[:, None])
                           - logits.gather(1, tokens.incorrect_ids[:, None]))[:, 0]
            if name == "clean":
                assert (logits.argmax(-1) == tokens.correct_ids).float().mean() > 0.9
    assert (diffs["clean"] > 0).all() and diffs["clean"].mean() > 5
    assert diffs["corrupted"].mean() < 1.0
    assert diffs["clean"].mean() - diffs["corrupted"].mean() > 5


# ---- dataset --------------------------------------------------------------------------------

def test_dataset_prompts_are_valid():
    tokenizer = induction_tokenizer(CONFIG)
    dataset = induction_dataset(tokenizer, 50, seed=1)
    assert (dataset.name, dataset.corruption, len(dataset)) == ("induction", "resample_first_half", 50)
    assert dataset.sha256() == induction_dataset(tokenizer, 50, seed=1).sha256()
    assert dataset.sha256() != induction_dataset(tokenizer, 50, seed=2).sha256()
    tokens = dataset.tokenize(tokenizer, max_length=2 * T + 1)
    assert tokens.clean_ids.shape == (50, 1 + T + K)
    assert dict(tokens.positions) == {"TOK1": K, "ANS1": K + 1, "END": T + K}
    bos = tokenizer.convert_tokens_to_ids("<bos>")
    for b in range(50):
        clean, corrupted = tokens.clean_ids[b].tolist(), tokens.corrupted_ids[b].tolist()
        r, s = clean[1:T + 1], corrupted[1:T + 1]
        assert clean[0] == corrupted[0] == bos
        assert len(set(r) | set(s)) == 2 * T  # distinct within and across the two sequences
        assert clean[T + 1:] == r[:K] and corrupted[T + 1:] == r[:K]
        assert clean[K] == clean[T + K] and corrupted.count(clean[T + K]) == 1
        assert tokens.correct_ids[b].item() == clean[K + 1] == r[K]
        assert tokens.incorrect_ids[b].item() == corrupted[K + 1] == s[K]
        assert tokens.incorrect_ids[b].item() not in clean and tokens.correct_ids[b].item() not in corrupted


def test_dataset_errors():
    with pytest.raises(DatasetError, match="n_prompts"):
        induction_dataset(induction_tokenizer(CONFIG), 0)
    with pytest.raises(DatasetError, match="lacks"):
        induction_dataset(tiny_tokenizer(), 3)


def test_config_validation_and_key():
    assert InductionConfig().key == CONFIG.key and len(CONFIG.key) == 10
    assert InductionConfig(seed=1).key != CONFIG.key
    with pytest.raises(ValueError, match="vocab_size"):
        InductionConfig(seq_len=40)
    with pytest.raises(ValueError, match="d_model"):
        InductionConfig(d_model=30)


# ---- cache ----------------------------------------------------------------------------------

def _fake_trainer(folder, calls, accuracy=1.0):
    def train(config, *, progress=False):
        from transformers import AutoModelForCausalLM

        calls.append(config)
        return (AutoModelForCausalLM.from_pretrained(folder), induction_tokenizer(config),
                {"accuracy": accuracy, "final_loss": 0.0, "train_seconds": 0.0})
    return train


def test_cached_model_is_reused_without_training(folder, cache_root, monkeypatch):
    calls = []
    monkeypatch.setattr(induction, "train_induction_model", _fake_trainer(folder, calls))
    assert induction_model_path(CONFIG, cache_dir=cache_root, progress=False) == folder
    assert isinstance(load_induction_model(CONFIG, cache_dir=cache_root), pl.PatchModel)
    assert calls == []
    monkeypatch.setenv("PATCHLAB_CACHE", str(cache_root))  # the environment variable finds it too
    assert induction_model_path(CONFIG, progress=False) == folder and calls == []


@pytest.mark.parametrize("damage", ["truncated_weights", "no_sidecar", "other_config", "no_tokenizer"])
def test_broken_cache_folder_is_retrained(damage, folder, tmp_path, monkeypatch):
    broken = tmp_path / "models" / folder.name
    shutil.copytree(folder, broken)
    if damage == "truncated_weights":
        data = (broken / "model.safetensors").read_bytes()
        (broken / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif damage == "no_sidecar":
        (broken / "patchlab.json").unlink()
    elif damage == "other_config":
        meta = json.loads((broken / "patchlab.json").read_text())
        (broken / "patchlab.json").write_text(json.dumps({**meta, "key": "0000000000"}))
    else:
        (broken / "tokenizer.json").unlink()
    calls = []
    monkeypatch.setattr(induction, "train_induction_model", _fake_trainer(folder, calls))
    assert induction_model_path(CONFIG, cache_dir=tmp_path, progress=False) == broken
    assert calls == [CONFIG]
    assert (broken / "tokenizer.json").is_file()
    assert (broken / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [folder.name]  # no temporaries left


def test_retrain_replaces_and_low_accuracy_is_not_cached(folder, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(induction, "train_induction_model", _fake_trainer(folder, calls))
    path = induction_model_path(CONFIG, cache_dir=tmp_path, progress=False)
    assert induction_model_path(CONFIG, cache_dir=tmp_path, retrain=True, progress=False) == path
    assert len(calls) == 2
    monkeypatch.setattr(induction, "train_induction_model", _fake_trainer(folder, calls, accuracy=0.5))
    with pytest.raises(InductionError, match="accuracy 0.500"):
        induction_model_path(CONFIG, cache_dir=tmp_path / "other", progress=False)
    assert not (tmp_path / "other" / "models").exists() or not any((tmp_path / "other" / "models").iterdir())
