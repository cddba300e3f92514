"""Tolerances of the test suite, with the reason each one holds on any CPU.

Exactness tests ("patchlab equals an independent computation") run **both sides in
float64**: patchlab on a model loaded with ``dtype=torch.float64`` and the plain-hook
reference on the same modules. Batch layout, thread count and CPU kernels then move
results by ~1e-15 relative, so `EXACT` states a real guarantee: a patching mistake
moves a logit difference by far more than 1e-9 nats.

Where Hugging Face itself computes in float32 inside a float64 model (the eager
attention softmax of Llama-family, GPT-NeoX and Gemma models, Gemma's RMSNorm), the
two sides still run the same float32 operations on (almost always) identical inputs;
the tests that meet such a case say so where they use another tolerance.

A few tests keep float32, the dtype users run: `float32_atol` gives their tolerance
from float32 precision, relative to the magnitude of the values compared.
"""

from __future__ import annotations

import torch

__all__ = ["EXACT", "float32_atol"]

EXACT = 1e-9
"""Absolute tolerance (metric units: nats or probability) for float64 exactness tests."""

FLOAT32_ULPS = 256
"""How many float32 ulps of the compared magnitude two float32 computations of the same
value may differ by. A logit difference of ~7 nats is the difference of two logits larger
than itself, each accumulated over every layer; different batch layouts and CPU kernels
were seen to move it by up to ~13 ulps of its magnitude (1.1e-5 on SmolLM2). 256 ulps
leaves room for other machines, while any patching mistake moves values by orders of
magnitude more."""


def float32_atol(*references: torch.Tensor) -> float:
    """Absolute tolerance for comparing float32 results with a reference: `FLOAT32_ULPS`
    float32 ulps of the largest magnitude among `references` (at least 1)."""
    scale = max([1.0] + [float(torch.as_tensor(r).abs().max()) for r in references])
    return FLOAT32_ULPS * torch.finfo(torch.float32).eps * scale


FLOAT32_INSIDE = {
    "gpt_neo": "GPT-Neo's eager attention casts q and k to float32 before their product "
               "(transformers' GPTNeoSelfAttention._attn), in a float64 model too",
}
"""Families whose Hugging Face forward computes a part in float32 even in a float64 model,
so that two batch layouts differ by float32 rounding there (measured: 1.1e-5 nats on
tiny GPT-Neo logit differences of ~5 nats; every other family agrees to ~1e-14)."""

FLOAT32_POST_NORM = {
    "gemma2": "Gemma2RMSNorm computes in float32 (x.float()), in a float64 model too",
    "gemma3_text": "Gemma3RMSNorm computes in float32 (x.float()), in a float64 model too",
}
"""Families whose post-attention norm runs in float32 inside a float64 model. Graph-level
patching splits that norm over heads (each head's share of the attention output, scaled
by the norm of the whole output), which both patchlab and the reference compute, like
the norm, in float32 from sums taken in different orders: measured up to 5.7e-7 nats."""


FLOAT32_SOFTMAX = {family: "the eager attention softmax runs in float32 (softmax(..., dtype=torch.float32)), in a "
                             "float64 model too" for family in ("llama", "mistral", "qwen2", "gemma2", "gemma3_text",
                                                                 "gpt_neox")}
"""Families whose attention probabilities are float32 even in a float64 model. Equal-length
batches compute the same float32 rows either way (exact), but a left-padded row has more
(masked, zero) terms than the prompt alone, and its float32 sum is then rounded differently
(measured: 9.2e-7 nats on tiny Llama logit differences of ~8 nats; GPT-2 agrees to ~1e-15)."""


def exact_atol(model, *references: torch.Tensor, edges: bool = False, padded: bool = False) -> float:
    """The tolerance of an exactness test on `model` (a float64 `PatchModel`): `EXACT`, or the
    float32 tolerance of the `references`' magnitude for a family in `FLOAT32_INSIDE` (or, for
    graph-level patching, ``edges=True``, in `FLOAT32_POST_NORM`; for padded batches compared with
    prompts alone, ``padded=True``, in `FLOAT32_SOFTMAX`)."""
    family = model.hf.config.model_type
    float32 = family in FLOAT32_INSIDE or (edges and family in FLOAT32_POST_NORM) or \
        (padded and family in FLOAT32_SOFTMAX)
    return float32_atol(*references) if float32 else EXACT
