"""Factual-recall prompts for causal tracing (Meng et al. 2022, "Locating and Editing
Factual Associations in GPT", ROME).

A `Fact` is a prompt that names a subject and whose next token is the answer:
``Fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris")``.
A `FactDataset` is an immutable tuple of facts stored as JSON lines. `tokenize`
finds each fact's subject tokens from character offsets and returns
`TokenizedFacts` with the paper's named positions (``first_subject``,
``middle_subject``, ``last_subject``, ``first_subsequent``, ``last``). Facts may
differ in token length, so ids are kept per fact, not as one ``[fact, pos]`` batch.
`builtin_facts` holds well-known facts; `check_facts` keeps those a model gets right.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._io import atomic_write_text
from .data import DatasetError, NamedPositions, _readable, read_jsonl
from .kernels import patching as kpatching
from .remote import execute
from .models import takes_model

if TYPE_CHECKING:
    import xarray as xr
    from transformers import PreTrainedTokenizerBase

    from .models import PatchModel

__all__ = ["FACTS_FORMAT", "Fact", "FactDataset", "TokenizedFacts", "builtin_facts", "check_facts"]

FACTS_FORMAT = "patchlab.facts/1"
"""Value of the ``format`` field in the (optional) header line of a facts JSONL file."""

_FIELDS = ("prompt", "subject", "answer", "counterfactual_subject")


@dataclass(frozen=True)
class Fact:
    """One factual-recall prompt.

    Args:
        prompt: text whose next token is the answer, e.g. "The Eiffel Tower is located in the city of".
        subject: the subject as it appears in `prompt` (its first occurrence is used),
            e.g. "The Eiffel Tower". Surrounding whitespace does not matter for token alignment.
        answer: the expected continuation, stored as given, e.g. " Paris" (leading space
            included); only its first token is scored.
        counterfactual_subject: optional replacement subject, e.g. "The Colosseum".

    Raises:
        DatasetError: a field that is not a non-empty string, or a subject not in the prompt.
    """

    prompt: str
    subject: str
    answer: str
    counterfactual_subject: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise DatasetError(f"Fact.{name} must be a non-empty string, got {value!r}")
        cf = self.counterfactual_subject
        if cf is not None and (not isinstance(cf, str) or not cf.strip()):
            raise DatasetError(f"Fact.counterfactual_subject must be None or a non-empty string, "
                               f"got {cf!r}")
        if self.subject not in self.prompt:
            raise DatasetError(f"fact {self.prompt!r} -> {self.answer!r}: subject {self.subject!r} "
                               "does not occur in the prompt; fix: copy the subject from the prompt "
                               "exactly (same case, spelling and punctuation)")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict; ``counterfactual_subject`` only when set."""
        obj = {"prompt": self.prompt, "subject": self.subject, "answer": self.answer}
        if self.counterfactual_subject is not None:
            obj["counterfactual_subject"] = self.counterfactual_subject
        return obj


@dataclass(frozen=True, kw_only=True, eq=False)
class TokenizedFacts:
    """A tokenized `FactDataset`; index ``i`` is the ``fact`` dim.

    Attributes:
        ids: per fact, prompt token ids ``[pos]`` (int64); lengths differ between facts.
        subject_positions: per fact, the subject's token indices ``range(first, last + 1)``.
        answer_ids: first token id of each answer, ``[fact]``, int64.
        positions: per fact, `NamedPositions` ``first_subject``, ``middle_subject``
            (``(first + last) // 2``), ``last_subject``, ``first_subsequent``
            (``last_subject + 1``, absent when the subject ends the prompt) and ``last``.
        tokens: readable token strings per fact, ``[fact][pos]``.

    Positions are 0-based and count a BOS if the tokenizer adds one.
    """

    ids: tuple[torch.Tensor, ...]
    subject_positions: tuple[range, ...]
    answer_ids: torch.Tensor
    positions: tuple[NamedPositions, ...]
    tokens: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class FactDataset:
    """An immutable, named sequence of `Fact` values.

    Raises:
        DatasetError: no facts, an item that is not a `Fact`, or an empty name.
    """

    facts: tuple[Fact, ...]
    name: str = "facts"

    def __post_init__(self) -> None:
        facts = tuple(self.facts)
        if not facts:
            raise DatasetError("FactDataset has no facts; give at least one Fact")
        for i, fact in enumerate(facts):
            if not isinstance(fact, Fact):
                raise DatasetError(f"facts[{i}] is a {type(fact).__name__}, not a Fact; "
                                   "build it with Fact(prompt, subject, answer)")
        if not isinstance(self.name, str) or not self.name:
            raise DatasetError("FactDataset.name must be a non-empty string")
        object.__setattr__(self, "facts", facts)

    def __len__(self) -> int:
        return len(self.facts)

    def __iter__(self) -> Iterator[Fact]:
        return iter(self.facts)

    def __getitem__(self, index: int) -> Fact:
        return self.facts[index]

    def to_jsonl_text(self) -> str:
        """Canonical JSONL: a header line (format, name), then one object per fact."""
        lines = [{"format": FACTS_FORMAT, "name": self.name}] + [f.to_json() for f in self.facts]
        return "".join(json.dumps(o, ensure_ascii=True, separators=(", ", ": ")) + "\n"
                       for o in lines)

    def sha256(self) -> str:
        """Hex sha256 of `to_jsonl_text()`, equal to the sha256 of the file `to_jsonl` writes."""
        return hashlib.sha256(self.to_jsonl_text().encode("utf-8")).hexdigest()

    def to_jsonl(self, path: str | os.PathLike) -> None:
        """Write the dataset as JSON lines, atomically."""
        atomic_write_text(path, self.to_jsonl_text())

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, *, name: str | None = None) -> FactDataset:
        """Read facts, one JSON object per line (keys prompt, subject, answer and optionally
        counterfactual_subject); a header line ``{"format": ..., "name": ...}`` is optional.

        Raises:
            DatasetError: invalid JSON, a missing, unknown or non-string field, or an
                invalid fact; the message names the file and line and the fix.
        """
        path = Path(path)
        header, records = read_jsonl(path, FACTS_FORMAT)
        found_name = header.get("name", path.stem)
        facts = [_fact_from_json(obj, where) for obj, where in records]
        if not facts:
            raise DatasetError(f"{path}: holds no facts; add one JSON object per fact with keys "
                               "prompt, subject, answer")
        return cls(tuple(facts), name=name or found_name)

    def tokenize(self, tokenizer: PreTrainedTokenizerBase) -> TokenizedFacts:
        """Tokenize prompts (default special tokens) and locate subjects and answers.

        The subject's tokens are those whose character offsets (``return_offsets_mapping``,
        a fast tokenizer is required) overlap the subject's first occurrence; whitespace
        at the edges of tokens and of the subject is ignored.

        Raises:
            DatasetError: a subject that does not start and end on token boundaries; an
                answer with no tokens or whose first token is the unknown token; a slow
                tokenizer without offsets. Messages name the fact and the fix.
        """
        ids, spans, answers, positions, tokens = [], [], [], [], []
        for i, fact in enumerate(self.facts):
            enc = _encode_with_offsets(tokenizer, fact.prompt)
            prompt_ids = list(enc["input_ids"])
            readable = _readable(tokenizer, prompt_ids)
            span = _subject_span(fact, enc["offset_mapping"], readable, i)
            answer = list(tokenizer(fact.answer, add_special_tokens=False)["input_ids"])
            unk = getattr(tokenizer, "unk_token_id", None)
            if not answer or (unk is not None and answer[0] == unk):
                raise DatasetError(
                    f"fact {i} ({fact.prompt!r}): answer {fact.answer!r} has "
                    f"{'no tokens' if not answer else 'an unknown first token'} "
                    f"{_readable(tokenizer, answer)}; fix: use an answer the tokenizer knows, "
                    "usually a word with its leading space, e.g. ' Paris'")
            named = {"first_subject": span.start, "middle_subject": (span.start + span[-1]) // 2,
                     "last_subject": span[-1], "last": len(prompt_ids) - 1}
            if span.stop < len(prompt_ids):
                named["first_subsequent"] = span.stop
            ids.append(torch.tensor(prompt_ids, dtype=torch.long))
            spans.append(span)
            answers.append(answer[0])
            positions.append(NamedPositions(named))
            tokens.append(readable)
        return TokenizedFacts(ids=tuple(ids), subject_positions=tuple(spans),
                              answer_ids=torch.tensor(answers, dtype=torch.long),
                              positions=tuple(positions), tokens=tuple(tokens))


def _fact_from_json(obj: dict, where: str) -> Fact:
    missing = [k for k in _FIELDS[:3] if k not in obj]
    if missing:
        raise DatasetError(f"{where}: missing field {missing[0]!r}; each fact needs prompt, "
                           "subject, answer (and optionally counterfactual_subject)")
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
        raise DatasetError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(_FIELDS)}")
    for key, value in obj.items():
        if not isinstance(value, str) and not (key == _FIELDS[3] and value is None):
            raise DatasetError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    try:
        return Fact(**obj)
    except DatasetError as e:
        raise DatasetError(f"{where}: {e}") from None


def _encode_with_offsets(tokenizer, text: str):
    try:
        return tokenizer(text, return_offsets_mapping=True)
    except NotImplementedError:
        raise DatasetError("finding subject tokens needs character offsets, which only fast "
                           "tokenizers give; fix: load it with AutoTokenizer.from_pretrained("
                           "..., use_fast=True)") from None


def _subject_span(fact: Fact, offsets, readable: tuple[str, ...], i: int) -> range:
    text = fact.prompt
    start = text.index(fact.subject)
    end = start + len(fact.subject)
    start += len(fact.subject) - len(fact.subject.lstrip())
    end -= len(fact.subject) - len(fact.subject.rstrip())
    hits = []  # (token index, trimmed start, trimmed end) of tokens overlapping the subject
    for t, (a, b) in enumerate(offsets):
        piece = text[a:b]
        a, b = a + len(piece) - len(piece.lstrip()), b - (len(piece) - len(piece.rstrip()))
        if a < b and a < end and b > start:
            hits.append((t, a, b))
    if not hits or hits[0][1] != start or hits[-1][2] != end:
        raise DatasetError(
            f"fact {i}: subject {fact.subject!r} does not align with token boundaries in prompt "
            f"{text!r} (tokens: {list(readable)}); put the subject on token boundaries, e.g. "
            "whole words, not part of a word")
    return range(hits[0][0], hits[-1][0] + 1)


_BUILTIN = (
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris"),
    ("The Colosseum is located in the city of", "The Colosseum", " Rome"),
    ("The Statue of Liberty is located in the city of", "The Statue of Liberty", " New"),
    ("The Louvre is located in the city of", "The Louvre", " Paris"),
    ("The Kremlin is located in the city of", "The Kremlin", " Moscow"),
    ("The Acropolis is located in the city of", "The Acropolis", " Athens"),
    ("The Golden Gate Bridge is located in the city of", "Golden Gate Bridge", " San"),
    ("Big Ben is located in the city of", "Big Ben", " London"),
    ("The Great Wall is located in the country of", "Great Wall", " China"),
    ("The Taj Mahal is located in the country of", "Taj Mahal", " India"),
    ("The pyramids of Giza are located in the country of", "pyramids of Giza", " Egypt"),
    ("Mount Fuji is located in the country of", "Mount Fuji", " Japan"),
    ("The capital of France is", "France", " Paris"),
    ("The capital of Germany is", "Germany", " Berlin"),
    ("The capital of Italy is", "Italy", " Rome"),
    ("The capital of Japan is", "Japan", " Tokyo"),
    ("The capital of Spain is", "Spain", " Madrid"),
    ("The capital of Russia is", "Russia", " Moscow"),
    ("The capital of Greece is", "Greece", " Athens"),
    ("The capital of China is", "China", " Beijing"),
    ("The capital city of Canada is", "Canada", " Ottawa"),
    ("The capital city of Australia is", "Australia", " Canberra"),
    ("Apple was founded by Steve", "Apple", " Jobs"),
    ("Microsoft was founded by Bill", "Microsoft", " Gates"),
    ("The iPhone is produced by", "The iPhone", " Apple"),
    ("The PlayStation is produced by", "The PlayStation", " Sony"),
    ("Google is headquartered in the state of", "Google", " California"),
    ("Toyota is a car company from the country of", "Toyota", " Japan"),
    ("BMW is a car company from the country of", "BMW", " Germany"),
    ("Ferrari is a car company from the country of", "Ferrari", " Italy"),
    ("IKEA is a company from the country of", "IKEA", " Sweden"),
    ("The official language of France is", "France", " French"),
    ("The official language of Mexico is", "Mexico", " Spanish"),
    ("The official language of Brazil is", "Brazil", " Portuguese"),
    ("The mother tongue of Vladimir Putin is", "Vladimir Putin", " Russian"),
    ("Tiger Woods plays the sport of", "Tiger Woods", " golf"),
    ("Roger Federer plays the sport of", "Roger Federer", " tennis"),
    ("Barack Obama is a citizen of the United", "Barack Obama", " States"),
    ("The Mona Lisa was painted by Leonardo da", "The Mona Lisa", " Vinci"),
    ("The Beatles were a band from the city of", "The Beatles", " Liverpool"),
    ("The Nile River flows through the country of", "The Nile River", " Egypt"),
    ("The kangaroo is native to the country of", "kangaroo", " Australia"),
)


def builtin_facts() -> FactDataset:
    """42 well-known facts in the style of Meng et al. 2022 (landmarks, capitals, companies,
    languages, sports, people); subjects of 1-4 words. Not all are known to every model:
    filter with `check_facts` before causal tracing."""
    return FactDataset(tuple(Fact(*row) for row in _BUILTIN), name="builtin_facts")


@takes_model
def check_facts(model: PatchModel, dataset: FactDataset, *,
                min_prob: float = 0.1, remote=None) -> tuple[FactDataset, xr.Dataset]:
    """Keep the facts the model answers correctly, and record how well it answers each.

    Each prompt is run alone (no padding), all in one program (one request with
    ``remote``, see `patchlab.remote`). A fact is kept when the
    answer's first token is the top-1 next token at the last position (the criterion of
    Meng et al. 2022's "known facts") and its probability is at least `min_prob`, so that
    causal tracing has a clean effect to restore.

    Returns:
        ``(kept, results)``: the kept facts (name ``dataset.name + "_known"``) and a Dataset
        over dim ``fact`` with coords ``prompt``, ``subject``, ``answer`` and variables
        ``prob`` (p(answer first token), softmax probability in [0, 1]), ``top1`` (bool),
        ``top_token`` (the model's top-1 token text) and ``kept`` (bool).

    Raises:
        ValueError: `min_prob` outside [0, 1].
        DatasetError: a fact that fails `FactDataset.tokenize`, or no fact kept.
    """
    import xarray as xr

    if isinstance(min_prob, bool) or not isinstance(min_prob, (int, float)) \
            or not 0.0 <= min_prob <= 1.0:
        raise ValueError(f"min_prob must be a number in [0, 1], got {min_prob!r}")
    tokenized = dataset.tokenize(model.tokenizer)
    out = execute(model, kpatching.answer_program, model.arch(), [ids[None] for ids in tokenized.ids],
                  tokenized.answer_ids.tolist(), remote=remote)
    prob, top_ids = out["prob"].tolist(), out["top"].tolist()
    top1 = [t == a for t, a in zip(top_ids, tokenized.answer_ids.tolist())]
    kept = [t and p >= min_prob for t, p in zip(top1, prob)]
    coords = {"fact": range(len(dataset)),
              **{k: ("fact", [getattr(f, k) for f in dataset]) for k in ("prompt", "subject", "answer")}}
    results = xr.Dataset(
        {"prob": ("fact", prob), "top1": ("fact", top1), "kept": ("fact", kept),
         "top_token": ("fact", list(_readable(model.tokenizer, top_ids)))},
        coords=coords,
        attrs={"criterion": "answer's first token is top-1 and prob >= min_prob",
               "min_prob": float(min_prob), "prob_units": "softmax probability at the last position",
               "model_id": model.model_id, "model_sha256": model.weights_sha256,
               "dataset_sha256": dataset.sha256(), "dataset_name": dataset.name})
    if not any(kept):
        raise DatasetError(f"no fact of {dataset.name!r} is answered correctly by {model.model_id!r} "
                           f"(top-1 and p >= {min_prob}); fix: lower min_prob or use facts the "
                           "model knows")
    return FactDataset(tuple(f for f, k in zip(dataset, kept) if k),
                       name=f"{dataset.name}_known"), results
