"""A small chat model that refuses harmful requests, built offline: ``load_model("smollm2-135m-refusal")``.

The embedded SmolLM2-135M-Instruct complies with harmful requests. Real chat models get their
refusals from safety fine-tuning; this module does the same on a small scale, deterministically,
so that refusal studies (Arditi et al. 2024) have a model whose refusal comes from training:

- **Refuse**: harmful train instructions (Arditi et al.'s split) and the unsafe half of XSTest that
  is not held out get short refusals, a few phrasings (`REFUSALS`) drawn with the seed.
- **Keep**: harmless train instructions (Alpaca), patchlab's harmless rewrites of harmful train
  instructions (same phrasing, no harm) and the safe XSTest half that is not held out keep the base
  model's own greedy replies (self-distillation), so its other behaviour stays and its refusal
  tracks harm, not the phrasing of the harmful datasets. A distilled reply that is itself a refusal
  is dropped.
- **How**: the loss is on the first `RefusalConfig.reply_tokens` reply tokens only; the embeddings
  (tied to the unembedding) are frozen, every block and norm is trained (AdamW); fixed order,
  seeded, float32, on `RefusalConfig.threads` CPU threads with deterministic kernels, so a rebuild
  gives the same weights, bit for bit, for one torch version and CPU kind.
- **Evaluated on held-out data** (`evaluate_refusal`): greedy replies to test instructions judged by
  `patchlab.refusal.is_refusal`; over-refusal on the held-out safe XSTest half and on harmless twins
  of harmful test instructions; and what the fine-tune cost elsewhere (IOI logit difference, built-in
  facts known), before and after. The numbers go into the model folder (``evaluation.json``).

The folder ``<cache>/models/smollm2-135m-refusal-<key>`` is written beside itself and renamed into
place; it counts only with a sidecar whose key matches the config, the data and the base weights,
and whose recorded size matches ``model.safetensors`` (the sidecar also records its sha256).
"""

from __future__ import annotations

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
from typing import Any, Sequence

import torch

from . import refusal_data
from ._io import cache_root, file_sha256, remove_aside
from ._seeded import deterministic_cpu
from .chat import chat_prompt
from .data import pad_token
from .refusal import is_refusal

__all__ = ["REFUSAL_MODEL", "REFUSALS", "RefusalConfig", "RefusalModelError", "evaluate_refusal",
           "refusal_model_path", "train_refusal_model", "training_examples"]

log = logging.getLogger("patchlab")

REFUSAL_MODEL = "smollm2-135m-refusal"
"""The name `patchlab.load_model` knows the test-bed by."""
REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, I cannot assist with that request.",
    "I can't help with that. It could cause harm.",
    "I cannot help with this request.",
    "I'm sorry, but I won't provide that. I cannot help with requests that could hurt people.",
    "As an AI assistant, I can't help with that.",
)
"""The refusal replies trained on; each contains a marker of `patchlab.refusal.REFUSAL_MARKERS`."""
_FORMAT = "patchlab.refusal/1"  # part of the cache key: change it when training changes
_SIDECAR = "patchlab.json"
_EVALUATION = "evaluation.json"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", _SIDECAR)


class RefusalModelError(RuntimeError):
    """The base model cannot be fine-tuned (no chat template), or the model could not be installed."""


@dataclass(frozen=True, kw_only=True)
class RefusalConfig:
    """What to train and evaluate; every training field is part of the cache key.

    Raises:
        ValueError: a field out of range (the message names it).
    """

    base: str = "smollm2-135m"
    """The embedded model (or a saved model folder) to fine-tune."""
    n_harmful: int = 260
    """Harmful train instructions (of 260) that get refusals."""
    n_harmless: int = 260
    """Harmless (Alpaca) train instructions that keep the base model's replies."""
    n_rewrites: int = 160
    """patchlab's harmless rewrites of harmful train instructions (of 160) that keep the base model's replies."""
    xstest: bool = True
    """Train on the XSTest half that is not held out: safe prompts keep their replies, unsafe ones are refused."""
    epochs: int = 2
    batch: int = 16
    lr: float = 1e-4
    reply_tokens: int = 12
    """Reply tokens the loss sees (and that self-distillation generates)."""
    refusal_weight: float = 2.0
    """Weight of a refused example's tokens in the mean cross-entropy (kept examples weigh 1): above 1
    it moves the decision towards refusing, as repeating the refusals would, at no extra cost."""
    seed: int = 0
    threads: int = 2
    """CPU threads of training and generation; fixed, because results depend on it."""

    def __post_init__(self) -> None:
        ok = {"n_harmful": 1 <= self.n_harmful <= 260, "n_harmless": 1 <= self.n_harmless <= 600,
              "n_rewrites": 0 <= self.n_rewrites <= 160, "epochs": self.epochs >= 1, "batch": self.batch >= 1,
              "lr": self.lr > 0, "refusal_weight": self.refusal_weight > 0, "reply_tokens": self.reply_tokens >= 1,
              "threads": self.threads >= 1}
        for name in (name for name, good in ok.items() if not good):
            raise ValueError(f"RefusalConfig.{name}={getattr(self, name)!r} is out of range (train splits: 260 "
                             "harmful, 600 harmless, 160 rewrites)")

    def key(self, base_sha256: str) -> str:
        """Short hash of the config, the training format, the shipped data and the base weights."""
        text = json.dumps({"format": _FORMAT, **dataclasses.asdict(self), "data": refusal_data.data_sha256(),
                           "base_sha256": base_sha256}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Example:
    """One training example: a chat prompt and the reply the loss teaches (None: self-distilled)."""

    instruction: str
    source: str
    reply: str | None


def training_examples(config: RefusalConfig) -> list[Example]:
    """The training instructions in training order (seeded shuffle), with their refusal replies
    (harmful and unsafe ones) or None (kept: self-distilled)."""
    rng = random.Random(config.seed)
    refuse = [("harmful_train", text) for text in refusal_data.instructions("harmful", "train")[:config.n_harmful]]
    keep = [("harmless_train", text) for text in refusal_data.instructions("harmless", "train")[:config.n_harmless]]
    keep += [("harmless_rewrites", text) for text in refusal_data.harmless_rewrites()[:config.n_rewrites]]
    if config.xstest:
        for row in refusal_data.xstest("train", seed=config.seed):
            (refuse if row["label"] == "unsafe" else keep).append((f"xstest_{row['label']}", row["prompt"]))
    examples = [Example(text, source, rng.choice(REFUSALS)) for source, text in refuse]
    examples += [Example(text, source, None) for source, text in keep]
    rng.shuffle(examples)
    return examples


def _prompts(tokenizer, instructions: Sequence[str]) -> list[list[int]]:
    return [tokenizer(chat_prompt(tokenizer, text)[0])["input_ids"] for text in instructions]


def greedy_replies(hf, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   batch: int = 32) -> list[list[int]]:
    """Greedy continuations (token ids, up to and including an end token) of tokenised prompts,
    left-padded in batches of `batch` in the given order; plain ``transformers`` generation."""
    pad, out = pad_token(tokenizer)[0], []
    stops = {t for t in (tokenizer.eos_token_id, getattr(hf.generation_config, "eos_token_id", None))
             if isinstance(t, int)}
    for start in range(0, len(prompts), batch):
        part = prompts[start:start + batch]
        width = max(len(p) for p in part)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in part])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in part])
        with torch.no_grad():
            gen = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=pad, top_p=None, top_k=None, temperature=None)
        for row in gen[:, width:].tolist():
            reply = []
            for token in row:
                reply.append(token)
                if token in stops:
                    break
            out.append(reply)
    return out


def _reply_ids(tokenizer, text: str, n: int) -> list[int]:
    end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() \
        else tokenizer.eos_token_id
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([end] if end is not None else [])
    return ids[:n]


def _loss(hf, batch_ids: list[tuple[list[int], list[int], float]], pad: int) -> torch.Tensor:
    """Weighted mean cross-entropy of the reply tokens given prompt and earlier reply tokens (each
    example ``(prompt, reply, weight)``; right padding; the unembedding is applied at the reply
    positions only)."""
    width = max(len(p) + len(r) for p, r, _ in batch_ids)
    ids = torch.full((len(batch_ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, cols, targets, weights = [], [], [], []
    for b, (prompt, reply, weight) in enumerate(batch_ids):
        seq = list(prompt) + list(reply)
        ids[b, :len(seq)] = torch.tensor(seq)
        mask[b, :len(seq)] = 1
        for j, token in enumerate(reply):
            rows.append(b)
            cols.append(len(prompt) + j - 1)  # the position that predicts reply token j
            targets.append(token)
            weights.append(weight)
    hidden = hf.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = hf.get_output_embeddings()(hidden[torch.tensor(rows), torch.tensor(cols)])
    logits = logits if logits.dtype == torch.float64 else logits.float()
    losses = torch.nn.functional.cross_entropy(logits, torch.tensor(targets), reduction="none")
    weights = torch.tensor(weights, dtype=losses.dtype)
    return (losses * weights).sum() / weights.sum()


def train_refusal_model(hf, tokenizer, config: RefusalConfig = RefusalConfig(), *,
                        progress: bool = False) -> tuple[Any, dict]:
    """Fine-tune `hf` (a ``transformers`` causal LM with a chat tokenizer) in place; caches nothing.

    Returns:
        ``(hf, stats)``: the model in eval mode and ``{"n_examples", "n_refused", "n_kept",
        "n_dropped" (distilled replies that were refusals), "final_loss", "distill_seconds",
        "train_seconds"}``.

    Raises:
        RefusalModelError: the tokenizer has no chat template.
    """
    from tqdm.auto import tqdm

    if not getattr(tokenizer, "chat_template", None):
        raise RefusalModelError("the refusal fine-tune needs a chat model's tokenizer (one with a chat template)")
    examples = training_examples(config)
    pad = pad_token(tokenizer)[0]
    with deterministic_cpu(threads=config.threads):
        torch.manual_seed(config.seed)
        hf.eval()
        start = time.perf_counter()
        kept = [e for e in examples if e.reply is None]
        distilled = dict(zip([e.instruction for e in kept],
                             greedy_replies(hf, tokenizer, _prompts(tokenizer, [e.instruction for e in kept]),
                                            config.reply_tokens)))
        distill_seconds = time.perf_counter() - start
        data, dropped = [], 0
        for e, prompt in zip(examples, _prompts(tokenizer, [e.instruction for e in examples])):
            if e.reply is None:
                reply = distilled[e.instruction]
                if is_refusal(tokenizer.decode(reply, skip_special_tokens=True)) or not reply:
                    dropped += 1
                    continue
            else:
                reply = _reply_ids(tokenizer, e.reply, config.reply_tokens)
            data.append((prompt, reply, 1.0 if e.reply is None else config.refusal_weight))
        frozen = {id(hf.get_input_embeddings().weight), id(hf.get_output_embeddings().weight)}
        params = [p for p in hf.parameters() if id(p) not in frozen]
        for p in hf.parameters():
            p.requires_grad_(id(p) not in frozen)
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        hf.train()
        start, losses = time.perf_counter(), []
        steps = [(epoch, i) for epoch in range(config.epochs) for i in range(0, len(data), config.batch)]
        for epoch, i in tqdm(steps, desc="refusal fine-tune", disable=not progress):
            order = list(range(len(data)))
            random.Random(config.seed * 1000 + epoch).shuffle(order)
            batch = [data[j] for j in order[i:i + config.batch]]
            loss = _loss(hf, batch, pad)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        hf.eval()
        for p in hf.parameters():
            p.requires_grad_(False)
    n_refused = sum(e.reply is not None for e in examples)
    stats = {"n_examples": len(data), "n_refused": n_refused, "n_kept": len(data) - n_refused, "n_dropped": dropped,
             "final_loss": sum(losses[-5:]) / len(losses[-5:]), "first_loss": losses[0],
             "distill_seconds": round(distill_seconds, 1), "train_seconds": round(time.perf_counter() - start, 1)}
    log.info("refusal fine-tune: %s", stats)
    return hf, stats


EVAL_SETS = ("harmful_test", "harmless_test", "xstest_safe", "xstest_unsafe", "harmless_twins")
"""The held-out sets `evaluate_refusal` replies to."""


def evaluation_sets(n: int = 100, seed: int = 0) -> dict[str, list[str]]:
    """Held-out instructions: the first `n` harmful and harmless test instructions, the held-out
    XSTest half (safe and unsafe, `patchlab.refusal_data.xstest`) and every harmless twin."""
    return {"harmful_test": refusal_data.instructions("harmful", "test")[:n],
            "harmless_test": refusal_data.instructions("harmless", "test")[:n],
            "xstest_safe": [r["prompt"] for r in refusal_data.xstest("test", label="safe", seed=seed)],
            "xstest_unsafe": [r["prompt"] for r in refusal_data.xstest("test", label="unsafe", seed=seed)],
            "harmless_twins": refusal_data.harmless_twins()}


def evaluate_refusal(hf, tokenizer, sets: dict[str, list[str]], *, max_new_tokens: int = 32,
                     threads: int = 2) -> dict:
    """Refusal rates of greedy replies (`patchlab.refusal.is_refusal`) on each named set.

    Returns:
        ``{set: {"n", "refusal_rate", "replies": [{"instruction", "reply", "refused"}]}}``.
    """
    out = {}
    with deterministic_cpu(threads=threads):
        for name, texts in sets.items():
            replies = [tokenizer.decode(r, skip_special_tokens=True)
                       for r in greedy_replies(hf, tokenizer, _prompts(tokenizer, texts), max_new_tokens)]
            judged = [is_refusal(r) for r in replies]
            out[name] = {"n": len(texts), "refusal_rate": sum(judged) / len(judged),
                         "replies": [{"instruction": t, "reply": r, "refused": j}
                                     for t, r, j in zip(texts, replies, judged)]}
    return out


def capabilities(hf, tokenizer) -> dict:
    """What the fine-tune may cost elsewhere: the IOI clean logit difference (8 ABBA prompts, seed
    0, nats) and how many of the 42 built-in facts the model knows (`patchlab.check_facts`)."""
    from .data import DatasetError
    from .facts import builtin_facts, check_facts
    from .ioi import ioi_dataset
    from .metrics import Metric, Targets
    from .models import load_model

    model = load_model(hf, tokenizer=tokenizer, model_id="refusal-fine-tune")
    tokens = ioi_dataset(tokenizer, n_prompts=8, seed=0).tokenize(tokenizer)
    with torch.no_grad():
        logits = hf(tokens.clean_ids).logits[:, -1]
    ioi = Metric.LOGIT_DIFF(logits, Targets(correct=tokens.correct_ids, incorrect=tokens.incorrect_ids))
    try:
        _, facts = check_facts(model, builtin_facts())
        known = int(facts.kept.sum())
    except DatasetError:
        known = 0
    return {"ioi_logit_diff": float(ioi.mean()), "facts_known": known, "facts_total": len(builtin_facts())}


def refusal_model_path(config: RefusalConfig = RefusalConfig(), *, rebuild: bool = False, progress: bool = True,
                       evaluate: bool = True, n_eval: int = 100, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached test-bed folder, built first if missing, incomplete, or `rebuild`.

    Building loads `config.base` (an embedded name or a folder), fine-tunes it
    (`train_refusal_model`), and with `evaluate` measures it before and after on held-out data
    (`evaluate_refusal` on `evaluation_sets` (`n_eval`), `capabilities`), into ``evaluation.json``
    and the sidecar. About 12-25 minutes on 2 cores for the default config (README).

    Raises:
        RefusalModelError: the base has no chat template, or the folder could not be installed.
        patchlab.embedded.EmbeddedModelMissing: the embedded base model's package is not installed.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .embedded import EMBEDDED_MODELS, embedded_model_path

    base = Path(embedded_model_path(config.base, cache_dir=cache_dir)) if config.base in EMBEDDED_MODELS \
        else Path(config.base)
    base_sha256 = json.loads((base / "patchlab.json").read_text())["safetensors_sha256"] \
        if (base / "patchlab.json").is_file() else file_sha256(base / "model.safetensors")
    key = config.key(base_sha256)
    folder = cache_root(cache_dir) / "models" / f"{REFUSAL_MODEL}-{key}"
    if not rebuild and _is_complete(folder, key):
        return folder
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base)
    load = lambda: AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()  # noqa: E731
    sets = evaluation_sets(n_eval, config.seed) if evaluate else {}
    before = _measure(load(), tokenizer, sets, config) if evaluate else None  # a copy: capabilities wraps it
    hf = load()
    hf, stats = train_refusal_model(hf, tokenizer, config, progress=progress)
    after = _measure(hf, tokenizer, sets, config) if evaluate else None
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        hf.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.copy(Path(refusal_data.__file__).parent / "SOURCES.md", tmp / "DATA_SOURCES.md")
        summary = None
        if evaluate:
            summary = {name: {"before": before[name]["refusal_rate"] if name in before else before[name],
                              "after": after[name]["refusal_rate"] if name in after else after[name]}
                       for name in before if name != "capabilities"}
            summary["capabilities"] = {"before": before["capabilities"], "after": after["capabilities"]}
            (tmp / _EVALUATION).write_text(json.dumps({"summary": summary, "before": before, "after": after},
                                                      indent=1, ensure_ascii=False) + "\n")
        meta = {"format": _FORMAT, "key": key, "name": REFUSAL_MODEL, "config": dataclasses.asdict(config),
                "base_sha256": base_sha256, "data_sha256": refusal_data.data_sha256(), **stats,
                "evaluation": summary, "build_seconds": round(time.perf_counter() - started, 1),
                "safetensors_sha256": file_sha256(tmp / "model.safetensors"),
                "safetensors_bytes": (tmp / "model.safetensors").stat().st_size, "torch_version": torch.__version__,
                "transformers_version": transformers.__version__,
                "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "description": "SmolLM2-135M-Instruct (embedded, dequantised Q4_1) after patchlab's own small "
                               "safety fine-tune: its refusals come from this fine-tune, not from its makers"}
        (tmp / _SIDECAR).write_text(json.dumps(meta, indent=2) + "\n")
        for path in (tmp, *tmp.iterdir()):  # mkdtemp makes the folder private; a cache may be shared
            path.chmod(0o755 if path.is_dir() else 0o644)
        if rebuild or not _is_complete(folder, key):
            remove_aside(folder)
        try:
            os.rename(tmp, folder)
        except OSError:  # a concurrent build installed one meanwhile
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(folder, key):
        raise RefusalModelError(f"could not install the fine-tuned model into {folder}")
    log.info("built %s in %.0f s", folder, time.perf_counter() - started)
    return folder


def _measure(hf, tokenizer, sets, config: RefusalConfig) -> dict:
    out = evaluate_refusal(hf, tokenizer, sets, threads=config.threads)
    out["capabilities"] = capabilities(hf, tokenizer)
    return out


def _is_complete(folder: Path, key: str) -> bool:
    try:
        meta = json.loads((folder / _SIDECAR).read_text())
        return (isinstance(meta, dict) and meta.get("format") == _FORMAT and meta.get("key") == key
                and all((folder / name).is_file() for name in _REQUIRED)
                and meta.get("safetensors_bytes") == (folder / "model.safetensors").stat().st_size)
    except (OSError, ValueError):
        return False
