"""A two-layer attention-only transformer whose induction circuit is known by construction.

Induction (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"; Olsson
et al. 2022, arXiv 2209.11895): on ``<bos> r_1..r_T r_1..r_k`` the model predicts r_{k+1}. A
**previous-token head** in layer 0 writes "my previous token is r_j" into position j+1; an
**induction head** in layer 1 reads it through its **keys** (K-composition), attends from the
second r_j to position j+1 and copies r_{j+1} to the logits. With two layers and no MLPs
nothing else predicts the repeat. Training replays the sequence in chunks at random offsets
(see `_training_batch`): on plain ``r r`` rows the model learns positional skip heads instead.
`induction_model_path` trains deterministically (one CPU thread, ~15 s) and caches a GPT-2
folder; `head_pattern_scores` and `known_circuit` find its heads from attention patterns
with plain PyTorch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from ._io import file_sha256
from ._seeded import deterministic_cpu
from .data import DatasetError, PromptPair, PromptPairDataset
from ._io import cache_root, remove_aside
from .graph import Channel, Edge, Node, NodeKind
from .models import takes_model

__all__ = ["MIN_ACCURACY", "InductionConfig", "InductionError", "KnownCircuit", "head_pattern_scores",
           "induction_dataset", "induction_model_path", "induction_tokenizer", "known_circuit",
           "load_induction_model", "train_induction_model"]

log = logging.getLogger("patchlab")

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>")
"""Ids 0, 1, 2; the words ``t0, t1, ...`` follow from id 3."""
BOS, BOS_ID = "<bos>", 2
MIN_ACCURACY = 0.9
"""Second-half accuracy a trained model must reach to be cached."""
_FORMAT = "patchlab.induction/1"  # part of the cache key: change it when training changes
_SIDECAR = "patchlab.json"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", _SIDECAR)


class InductionError(RuntimeError):
    """Training missed `MIN_ACCURACY`, or a model lacks the expected heads."""


@dataclass(frozen=True, kw_only=True)
class InductionConfig:
    """What to train; every field is part of the cache key.

    Raises:
        ValueError: a field out of range (the message names it).
    """

    vocab_size: int = 64
    """Tokens in all: 3 special ones and the words ``t0 .. t{vocab_size-4}``."""
    seq_len: int = 10
    """T, the length of the repeated random sequence; the context is ``2T+1`` tokens."""
    min_seq_len: int = 3
    """Shortest sequence in training rows with a random layout."""
    n_heads: int = 4
    d_model: int = 64
    steps: int = 1000
    batch: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.1
    """AdamW weight decay; 0.1 tends to leave a single previous-token head."""
    jump_prob: float = 0.3
    """Chance that a training replay jumps to a random word of the sequence instead of continuing."""
    fixed_frac: float = 0.5
    """Fraction of training rows laid out as at test time (sequence at positions 1..T)."""
    seed: int = 0

    def __post_init__(self) -> None:
        ok = {"seq_len": self.seq_len >= 2, "min_seq_len": 2 <= self.min_seq_len <= self.seq_len,
              "vocab_size": self.n_words >= 2 * self.seq_len, "n_heads": self.n_heads >= 1,
              "d_model": self.d_model % max(self.n_heads, 1) == 0, "steps": self.steps >= 1,
              "batch": self.batch >= 1, "lr": self.lr > 0, "weight_decay": self.weight_decay >= 0,
              "jump_prob": 0 <= self.jump_prob < 1, "fixed_frac": 0 <= self.fixed_frac <= 1}
        for name in (name for name, good in ok.items() if not good):
            raise ValueError(f"InductionConfig.{name}={getattr(self, name)!r} is out of range (vocab_size "
                             "needs 3 + 2*seq_len tokens, d_model a multiple of n_heads)")

    @property
    def n_words(self) -> int:
        return self.vocab_size - len(SPECIAL_TOKENS)

    @property
    def key(self) -> str:
        """Short hash of the config and training format, e.g. ``"5151275292"``."""
        text = json.dumps({"format": _FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def induction_tokenizer(config: InductionConfig = InductionConfig()):
    """Word-level tokenizer, no download, adds nothing: ``"<bos> t3 t9"`` -> ``[2, 6, 12]``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": len(SPECIAL_TOKENS) + i for i in range(config.n_words)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # Whitespace() would split "<bos>" in three
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, pad_token="<pad>", unk_token="<unk>")


def _new_model(config: InductionConfig):
    """GPT-2, 2 layers, no dropout, every MLP weight and bias frozen at 0: MLP outputs are exactly 0."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(vocab_size=config.vocab_size, n_positions=2 * config.seq_len + 1, n_embd=config.d_model,
                           n_layer=2, n_head=config.n_heads, n_inner=4, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0, bos_token_id=BOS_ID, eos_token_id=BOS_ID)
    hf_config._attn_implementation = "eager"
    model = GPT2LMHeadModel(hf_config)
    for linear in (lin for block in model.transformer.h for lin in (block.mlp.c_fc, block.mlp.c_proj)):
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
        linear.requires_grad_(False)
    return model


def _training_batch(config: InductionConfig, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ids ``[n, 2T+1]`` and mask ``[n, 2T]``: True where position p's next token is predictable.

    A row is ``<bos>``, m filler words, a sequence r of L distinct words, then a replay of r:
    each word follows its predecessor in r or, with chance `jump_prob`, is a random word of r.
    Random m, L and jumps make fixed position offsets useless, so only induction predicts the
    replay; `fixed_frac` of the rows use the test layout (m = 0, L = T) to speed learning up.
    """
    T, N = config.seq_len, 2 * config.seq_len
    words = torch.rand(n, config.n_words, generator=gen).argsort(dim=1)[:, :N] + len(SPECIAL_TOKENS)
    L = torch.randint(config.min_seq_len, T + 1, (n,), generator=gen)
    replay_len = 2 + (torch.rand(n, generator=gen) * (N - L - 1)).long()  # in [2, N - L]
    fixed = torch.rand(n, generator=gen) < config.fixed_frac
    L, m = torch.where(fixed, T, L), torch.where(fixed, 0, N - L - replay_len)
    src, mask = torch.arange(N).repeat(n, 1), torch.zeros(n, N, dtype=torch.bool)
    cur = torch.zeros(n, dtype=torch.long)  # index into r of the previous replayed word
    for t in range(N):
        start = (torch.rand(n, generator=gen) * L).long()
        jump = (torch.rand(n, generator=gen) < config.jump_prob) | (cur + 1 >= L) | (t == m + L)
        cur = torch.where(jump, start, cur + 1)
        src[:, t] = torch.where(t >= m + L, m + cur, t)
        mask[:, t] = (t >= m + L) & ~jump  # word t sits at position t+1 and is predicted at position t
    return torch.cat([torch.full((n, 1), BOS_ID), words.gather(1, src)], dim=1), mask


def _repeat_rows(config: InductionConfig, n: int, gen: torch.Generator) -> torch.Tensor:
    """ids ``[n, 2T+1]``: ``<bos> r r`` with r of T distinct random words."""
    r = torch.rand(n, config.n_words, generator=gen).argsort(dim=1)[:, :config.seq_len] + len(SPECIAL_TOKENS)
    return torch.cat([torch.full((n, 1), BOS_ID), r, r], dim=1)


def train_induction_model(config: InductionConfig = InductionConfig(), *, progress: bool = False):
    """Train on CPU, bit-for-bit reproducibly (for one torch version and CPU kind); caches nothing.

    Returns:
        ``(model, tokenizer, stats)``: a ``GPT2LMHeadModel`` (eval mode), its tokenizer and
        ``{"accuracy", "final_loss", "train_seconds"}``. accuracy: top-1 on 512 rows
        ``<bos> r r``, predicting positions T+2..2T (the second half after its first word).
    """
    from tqdm.auto import tqdm

    start, T = time.perf_counter(), config.seq_len
    with deterministic_cpu(threads=1):  # so that results do not depend on the core count
        torch.manual_seed(config.seed)
        model, gen = _new_model(config).train(), torch.Generator().manual_seed(config.seed)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                weight_decay=config.weight_decay)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 100))
        for _ in tqdm(range(config.steps), desc="training induction model", disable=not progress):
            ids, mask = _training_batch(config, config.batch, gen)
            loss = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1][mask], ids[:, 1:][mask])
            opt.zero_grad()
            loss.backward()
            opt.step()
            warmup.step()
        model.eval()
        with torch.no_grad():
            ids = _repeat_rows(config, 512, torch.Generator().manual_seed(config.seed + 1))
            accuracy = (model(ids).logits[:, T + 1:2 * T].argmax(-1) == ids[:, T + 2:]).float().mean().item()
    stats = {"accuracy": accuracy, "final_loss": loss.item(), "train_seconds": time.perf_counter() - start}
    log.info("trained induction model %s: %s", config.key, stats)
    return model, induction_tokenizer(config), stats


def induction_model_path(config: InductionConfig = InductionConfig(), *, retrain: bool = False,
                         progress: bool = True, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached model folder, trained first if missing, incomplete, or `retrain`.

    The folder ``<cache>/models/induction-<config.key>`` is written as a temporary sibling and
    renamed into place; it counts only with a sidecar ``patchlab.json`` that records this
    config key and the sha256 of its ``model.safetensors`` (re-hashed on every call, ~1 ms).
    `cache_dir` overrides ``$PATCHLAB_CACHE`` and ``~/.cache/patchlab``.

    Raises:
        InductionError: the trained model's accuracy is below `MIN_ACCURACY` (nothing is cached).
    """
    from transformers import __version__ as transformers_version

    folder = cache_root(cache_dir) / "models" / f"induction-{config.key}"
    if not retrain and _is_complete(folder, config):
        return folder
    model, tokenizer, stats = train_induction_model(config, progress=progress)
    if stats["accuracy"] < MIN_ACCURACY:
        raise InductionError(f"the induction model reached accuracy {stats['accuracy']:.3f} < {MIN_ACCURACY} "
                             f"with {config}; train longer (steps) or change seed or lr")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"format": _FORMAT, "key": config.key, "config": dataclasses.asdict(config), **stats,
                "safetensors_sha256": file_sha256(tmp / "model.safetensors"), "torch_version": torch.__version__,
                "transformers_version": transformers_version,
                "trained_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        (tmp / _SIDECAR).write_text(json.dumps(meta, indent=2) + "\n")
        for path in (tmp, *tmp.iterdir()):  # mkdtemp makes the folder private; a cache may be shared
            path.chmod(0o755 if path.is_dir() else 0o644)
        if retrain or not _is_complete(folder, config):
            remove_aside(folder)
        with contextlib.suppress(OSError):  # a concurrent call may have installed one meanwhile
            os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(folder, config):
        raise InductionError(f"could not install the trained model into {folder}")
    return folder


def _is_complete(folder: Path, config: InductionConfig) -> bool:
    try:
        meta = json.loads((folder / _SIDECAR).read_text())
        return (isinstance(meta, dict) and meta.get("format") == _FORMAT and meta.get("key") == config.key
                and all((folder / name).is_file() for name in _REQUIRED)
                and meta.get("safetensors_sha256") == file_sha256(folder / "model.safetensors"))
    except (OSError, ValueError):
        return False


def load_induction_model(config: InductionConfig = InductionConfig(), **kwargs: Any):
    """`patchlab.load_model` (eager attention, float32, CPU) on `induction_model_path(config, **kwargs)`."""
    from .models import load_model

    return load_model(induction_model_path(config, **kwargs), attn_implementation="eager",
                      model_id=f"induction-{config.key}")


def induction_dataset(tokenizer, n_prompts: int, *, config: InductionConfig = InductionConfig(),
                      seed: int = 0) -> PromptPairDataset:
    """Induction prompt pairs, all ``1 + T + k`` tokens long with ``k = T // 2`` (16 for T = 10).

    clean ``<bos> r_1..r_T r_1..r_k``, correct `` r_{k+1}``; corrupted ``<bos> s_1..s_T r_1..r_k``
    (first half resampled: nothing repeats, no induction), incorrect `` s_{k+1}``, the word at
    the answer's place in the corrupted prompt (what copying by position would give). The 2T
    words of a pair are distinct: r_k occurs once before the end, s_{k+1} never in the clean
    prompt, r_{k+1} never in the corrupted one. So logit(correct) - logit(incorrect) is large on
    clean prompts and about 0 or below on corrupted ones. Positions: ``TOK1`` = k (first r_k),
    ``ANS1`` = k+1 (first r_{k+1}, where induction heads attend from ``END`` = T+k).

    Raises:
        DatasetError: n_prompts < 1, or `tokenizer` lacks a word of `config`.
    """
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 1:
        raise DatasetError(f"n_prompts must be an int >= 1, got {n_prompts!r}")
    words = [f"t{i}" for i in range(config.n_words)]
    missing = [w for w in (BOS, *words) if w not in tokenizer.get_vocab()]
    if missing:
        raise DatasetError(f"the tokenizer lacks {missing[:3]}; use the tokenizer of "
                           "load_induction_model(config) with the same config")
    T, rng, pairs = config.seq_len, random.Random(seed), []
    k = T // 2
    for _ in range(n_prompts):
        picked = rng.sample(words, 2 * T)
        r, s = picked[:T], picked[T:]
        pairs.append(PromptPair(clean=" ".join([BOS, *r, *r[:k]]), corrupted=" ".join([BOS, *s, *r[:k]]),
                                correct=f" {r[k]}", incorrect=f" {s[k]}",
                                positions={"TOK1": k, "ANS1": k + 1, "END": T + k}))
    return PromptPairDataset(pairs=tuple(pairs), name="induction", corruption="resample_first_half")


def head_pattern_scores(model, ids: torch.Tensor) -> xr.Dataset:
    """Previous-token and induction scores ``(layer, head)`` in attention probability (0..1).

    Plain PyTorch (``model.hf(ids, output_attentions=True)`` on a `patchlab.PatchModel` with
    eager attention), no patching code: an independent ground truth. `ids` are ``[prompt, pos]``
    with repeats, e.g. ``<bos> r r``. ``prev_token``: mean attention from position i to i-1
    over prompts and i >= 2 (position 1's previous token is ``<bos>``, the attention sink).
    ``induction``: mean attention from each position i whose token occurred before, last at
    j <= i-2, to j+1 (to ``i - T + 1`` on ``<bos> r r``).

    Raises:
        ValueError: ids not ``[prompt, pos]`` with pos >= 3, no repeated token, or no attention
            patterns (model not loaded with ``attn_implementation="eager"``).
    """
    ids = torch.as_tensor(ids, dtype=torch.long, device=model.device)
    if ids.ndim != 2 or ids.shape[1] < 3:
        raise ValueError(f"ids must be [prompt, pos] with pos >= 3, got shape {tuple(ids.shape)}")
    pos = torch.arange(ids.shape[1], device=ids.device)
    earlier = (ids[:, :, None] == ids[:, None, :]) & (pos[None, :, None] - pos[None, None, :] >= 2)
    last = torch.where(earlier, pos, -1).amax(-1)  # [prompt, pos]: last earlier occurrence j <= i-2, or -1
    rows, queries = torch.nonzero(last >= 0, as_tuple=True)
    if rows.numel() == 0:
        raise ValueError("ids hold no repeated token, so induction is undefined; use rows like "
                         "'<bos> r r' (e.g. induction_dataset(...).tokenize(tokenizer).clean_ids)")
    with torch.no_grad():
        attentions = model.hf(ids, output_attentions=True).attentions
    if not attentions or any(a is None for a in attentions):
        raise ValueError("the model returned no attention patterns; load it with attn_implementation='eager'")
    att = torch.stack(attentions, dim=1).float()  # [prompt, layer, head, query, key]
    scores = {"prev_token": (att[:, :, :, pos[2:], pos[2:] - 1].mean(dim=(0, 3)), "attention to the previous token"),
              "induction": (att[rows, :, :, queries, last[rows, queries] + 1].mean(dim=0),
                            "attention to the token after the earlier occurrence")}
    return xr.Dataset(
        {name: (("layer", "head"), v.cpu().numpy(), {"units": "attention probability", "long_name": long_name})
         for name, (v, long_name) in scores.items()},
        coords={"layer": np.arange(att.shape[1]), "head": np.arange(att.shape[2])},
        attrs={"model_id": model.model_id, "weights_sha256": model.weights_sha256, "n_prompts": int(ids.shape[0]),
               "n_pos": int(ids.shape[1]), "n_induction_queries": int(rows.numel())})


@dataclass(frozen=True, kw_only=True, eq=False)
class KnownCircuit:
    """Heads found by `known_circuit` and the edges between them."""

    prev_token_heads: tuple[Node, ...]
    induction_heads: tuple[Node, ...]
    edges: tuple[Edge, ...]
    """Each previous-token head -> each induction head's k; each induction head -> logits (sorted)."""
    scores: xr.Dataset
    """The `head_pattern_scores` the heads were read from."""


@takes_model
def known_circuit(model, *, threshold: float = 0.5, ids: torch.Tensor | None = None, seed: int = 0) -> KnownCircuit:
    """The ground-truth induction circuit of a model from `load_induction_model`.

    Previous-token heads: layer 0 with ``prev_token > threshold``; induction heads: layer 1
    with ``induction > threshold``; scores from `head_pattern_scores` on `ids` (default: 256
    rows ``<bos> r r``, T from the model's context of 2T+1, drawn with `seed`). The mechanism
    also uses edges from the embeddings (into q, k, v); they are not listed.

    Raises:
        InductionError: no previous-token head or no induction head above `threshold`.
    """
    if ids is None:
        config = InductionConfig(vocab_size=model.layout.vocab_size, seq_len=(model.layout.n_ctx - 1) // 2)
        ids = _repeat_rows(config, 256, torch.Generator().manual_seed(seed))
    scores = head_pattern_scores(model, ids)
    prev = tuple(Node(NodeKind.HEAD, 0, int(h)) for h in np.flatnonzero(scores.prev_token.values[0] > threshold))
    ind = tuple(Node(NodeKind.HEAD, 1, int(h)) for h in np.flatnonzero(scores.induction.values[1] > threshold))
    if not prev or not ind:
        raise InductionError(
            f"no {'previous-token head in layer 0' if not prev else 'induction head in layer 1'} scores above "
            f"{threshold}: prev_token={scores.prev_token.values.round(2).tolist()}, "
            f"induction={scores.induction.values.round(2).tolist()}; is this a trained induction model?")
    edges = ([Edge(p, i, Channel.K) for p in prev for i in ind]
             + [Edge(i, Node(NodeKind.LOGITS), Channel.IN) for i in ind])
    return KnownCircuit(prev_token_heads=prev, induction_heads=ind, edges=tuple(sorted(edges)), scores=scores)
