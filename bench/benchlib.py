"""What the benchmarks share: the GPT-2-small-shaped model, random prompts, the naive floor, timing
and peak memory. Not a test and not part of the package."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import patchlab as pl


def gpt2_small_shaped(attn_implementation: str = "sdpa") -> pl.PatchModel:
    """GPT-2 small's shape (12 layers, 12 heads, d_model 768, vocab 50257) with random weights: only
    shapes matter for time. A word-level tokenizer over ``w0 .. w998``. The same weights for every
    `attn_implementation` (``"eager"`` for attention-pattern sweeps)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = GPT2Config()
    config._attn_implementation = attn_implementation
    hf = GPT2LMHeadModel(config).eval()
    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(999)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>", eos_token="<unk>")
    suffix = "" if attn_implementation == "sdpa" else f", {attn_implementation} attention"
    return pl.load_model(hf, tokenizer=tokenizer, model_id=f"gpt2-small-shaped (random{suffix})")


def random_dataset(n_prompts: int, n_pos: int, seed: int = 0) -> pl.PromptPairDataset:
    """Random prompts of `n_pos` words; the corrupted prompt changes the middle one."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n_prompts):
        words = torch.randint(1, 999, (n_pos,), generator=g)
        corrupted = words.clone()
        corrupted[n_pos // 2] = (words[n_pos // 2] + 1) % 998 + 1
        pairs.append(pl.PromptPair(clean=" ".join(f"w{i}" for i in words.tolist()),
                                   corrupted=" ".join(f"w{i}" for i in corrupted.tolist()),
                                   correct="w1", incorrect="w2", positions={}))
    return pl.PromptPairDataset(pairs=pairs, name="random")


@torch.no_grad()
def plain_forwards(model: pl.PatchModel, ids: torch.Tensor, n: int, **kwargs) -> None:
    """The naive floor of a sweep of `n` components: `n` plain ``transformers`` forward passes over
    the batch `ids`, no patching at all (``logits_to_keep=1`` in `kwargs`: last-position logits only)."""
    for _ in range(n):
        model.hf(ids, **kwargs)


def timed(fn):
    """``(seconds, fn())``."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _rss() -> int:
    """This process's resident memory in bytes (Linux ``/proc``)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


class PeakMemory:
    """Peak resident memory above the start, sampled every `interval` seconds while the block runs:
    ``with PeakMemory() as peak: ...; peak.bytes``. 0 where ``/proc`` is missing."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.bytes = interval, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.bytes = max(self.bytes, _rss() - self._start)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if not Path("/proc/self/statm").exists():
            return self
        self._start = _rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if hasattr(self, "_thread"):
            self._thread.join()
            self.bytes = max(self.bytes, _rss() - self._start)


def model_bytes(model: pl.PatchModel) -> int:
    return sum(p.numel() * p.element_size() for p in model.hf.parameters())
