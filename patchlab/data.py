"""Prompt-pair datasets for activation patching.

A `PromptPair` is a clean prompt (the behaviour happens), a corrupted prompt (it
does not), the answer token the clean prompt should produce (`correct`) and the
one the corruption pushes towards (`incorrect`), plus named token positions
("IO", "S1", "S2", "END", ...), per pair: "S2" may be token 9 of one prompt and token
12 of another, and a corrupted prompt may have other indices (`corrupted_positions`). A
`PromptPairDataset` is an immutable tuple of pairs with a name and the corruption used,
stored as JSON lines. `tokenize` validates it and returns `TokenizedPairs`: id tensors of
shape ``[prompt, pos]``, left-padded when prompts differ in length (with attention masks),
and answer ids of shape ``[prompt]``.

Clean/corrupted pairs with symmetric token replacement follow Zhang & Nanda 2023
("Towards Best Practices of Activation Patching", arXiv 2309.16042).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch

from ._io import atomic_write_text
from .positions import PromptPositions, RunPositions

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["DatasetError", "NamedPositions", "PromptPair", "PromptPairDataset",
           "TokenizedPairs", "FORMAT", "pad_token"]

FORMAT = "patchlab.prompt_pairs/1"
"""Value of the ``format`` field in the header line of a prompt-pair JSONL file."""

_PAIR_FIELDS = ("clean", "corrupted", "correct", "incorrect", "positions")
_OPTIONAL_FIELDS = ("corrupted_positions",)


class DatasetError(ValueError):
    """A prompt-pair dataset that cannot be used as asked; the message names the fix."""


class NamedPositions(Mapping[str, int]):
    """Immutable, hashable mapping from a position name to a 0-based token index.

    Items are kept in canonical order (by index, then name), so two equal mappings
    also serialise identically.

    Raises:
        DatasetError: a name that is not a non-empty string, or an index that is
            not an int >= 0.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, int] | None = None) -> None:
        items = dict(items or {})
        for name, index in items.items():
            if not isinstance(name, str) or not name:
                raise DatasetError(f"position names must be non-empty strings, got {name!r}")
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise DatasetError(f"position {name!r} must be an int >= 0 (a token index "
                                   f"counted from the left), got {index!r}")
        self._items = tuple(sorted(items.items(), key=lambda kv: (kv[1], kv[0])))

    def __getitem__(self, name: str) -> int:
        for key, index in self._items:
            if key == name:
                return index
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NamedPositions):
            return self._items == other._items
        return isinstance(other, Mapping) and dict(self._items) == dict(other.items())

    def __repr__(self) -> str:
        return f"NamedPositions({dict(self._items)!r})"


@dataclass(frozen=True, kw_only=True)
class PromptPair:
    """One clean/corrupted prompt pair.

    Args:
        clean: the prompt on which the model shows the behaviour.
        corrupted: the same prompt with the information the behaviour needs
            replaced. It may tokenize to another length than `clean`; then name the
            positions that correspond (`corrupted_positions`) or align from the end.
        correct: answer token text for the clean prompt, e.g. " Mary" (the
            leading space is part of the token), or a set of them, e.g. ``(" I", " As")``:
            metrics then combine the set (logsumexp of logits, sum of probabilities).
        incorrect: the competing answer token text, e.g. " John", or a set of them.
        positions: named token positions, e.g. ``{"IO": 2, "S1": 4, "S2": 10,
            "END": 14}``: 0-based indices into the tokenized clean prompt, as
            tokenized with the tokenizer's default special tokens (a BOS the
            tokenizer adds counts as position 0). Stored as `NamedPositions`. Every pair
            of a dataset names the same positions; their indices may differ per pair.
        corrupted_positions: the same names as indices into the corrupted prompt, when
            they differ from `positions` (None: the same indices).

    Raises:
        DatasetError: a field that is not a non-empty string, equal correct and
            incorrect answers, bad positions, or `corrupted_positions` with other names.
    """

    clean: str
    corrupted: str
    correct: str | tuple[str, ...]
    incorrect: str | tuple[str, ...]
    positions: Mapping[str, int] = field(default_factory=NamedPositions)
    corrupted_positions: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        for name in ("clean", "corrupted"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise DatasetError(f"PromptPair.{name} must be a non-empty string, got {value!r}")
        for name in ("correct", "incorrect"):
            object.__setattr__(self, name, _answers(getattr(self, name), name))
        shared = set(answer_texts(self.correct)) & set(answer_texts(self.incorrect))
        if shared:
            raise DatasetError(f"PromptPair.correct and .incorrect both hold {sorted(shared)[0]!r}; "
                               "give different answer tokens")
        object.__setattr__(self, "positions", NamedPositions(self.positions))
        corrupted = self.positions if self.corrupted_positions is None else NamedPositions(self.corrupted_positions)
        if set(corrupted) != set(self.positions):
            name = sorted(set(corrupted) ^ set(self.positions))[0]
            raise DatasetError(f"PromptPair {self.clean!r}: position {name!r} is named in "
                               f"{'corrupted_positions' if name in corrupted else 'positions'} only; "
                               "corrupted_positions names the same positions as positions, in the corrupted prompt")
        object.__setattr__(self, "corrupted_positions", corrupted)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict with the keys in a fixed order (``corrupted_positions`` only when it
        differs from ``positions``)."""
        listed = lambda a: a if isinstance(a, str) else list(a)  # noqa: E731
        out = {"clean": self.clean, "corrupted": self.corrupted, "correct": listed(self.correct),
               "incorrect": listed(self.incorrect), "positions": dict(self.positions)}
        if self.corrupted_positions != self.positions:
            out["corrupted_positions"] = dict(self.corrupted_positions)
        return out


def answer_texts(answers: str | tuple[str, ...]) -> tuple[str, ...]:
    """A pair's answer (set) as a tuple of texts."""
    return (answers,) if isinstance(answers, str) else answers


def _answers(value, name: str) -> str | tuple[str, ...]:
    """One answer text, or a set of them as a tuple in the order given (a set of one is its text)."""
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise DatasetError(f"PromptPair.{name} must be a non-empty string or a list/tuple of them, got {value!r}")
    if not items or any(not isinstance(v, str) or not v for v in items):
        raise DatasetError(f"PromptPair.{name} must be a non-empty string or a non-empty list/tuple of non-empty "
                           f"strings, got {value!r}")
    if len(set(items)) != len(items):
        raise DatasetError(f"PromptPair.{name} lists an answer twice: {items!r}")
    return items[0] if len(items) == 1 else tuple(items)


@dataclass(frozen=True, kw_only=True, eq=False)
class TokenizedPairs:
    """A tokenized, validated `PromptPairDataset`.

    Prompts of different lengths are left-padded to the longest (`pad_token_id`); the masks
    mark real tokens. Positions per prompt are in the prompt's own tokens (0 is its first token).

    Attributes:
        clean_ids: clean prompt token ids, ``[prompt, pos]``, int64, left-padded.
        corrupted_ids: corrupted prompt token ids, ``[prompt, pos]``, int64, left-padded.
        clean_mask, corrupted_mask: True on real tokens, ``[prompt, pos]``, bool.
        correct_ids: id of the correct answer token, ``[prompt]``, int64; with answer sets
            ``[prompt, answer]``, padded with -1.
        incorrect_ids: id of the incorrect answer token(s), likewise.
        clean_positions, corrupted_positions: each prompt's named positions (`NamedPositions`),
            ``[prompt]``.
        clean_tokens: readable token strings of the real tokens, ``[prompt][token]`` (" Mary", not "ĠMary").
        corrupted_tokens: readable corrupted token strings, likewise.
        pad_token_id: the id at padding, and `pad_token` how it was chosen (`pad_token`).
    """

    clean_ids: torch.Tensor
    corrupted_ids: torch.Tensor
    clean_mask: torch.Tensor
    corrupted_mask: torch.Tensor
    correct_ids: torch.Tensor
    incorrect_ids: torch.Tensor
    clean_positions: tuple[NamedPositions, ...]
    corrupted_positions: tuple[NamedPositions, ...]
    clean_tokens: tuple[tuple[str, ...], ...]
    corrupted_tokens: tuple[tuple[str, ...], ...]
    pad_token_id: int
    pad_token: str

    def __post_init__(self) -> None:
        shape = tuple(self.clean_ids.shape)
        for name in ("corrupted_ids", "clean_mask", "corrupted_mask"):
            if len(shape) != 2 or tuple(getattr(self, name).shape) != shape:
                raise DatasetError(f"clean_ids and {name} must share one [prompt, pos] shape, "
                                   f"got {shape} and {tuple(getattr(self, name).shape)}")
        for name in ("correct_ids", "incorrect_ids"):
            got = tuple(getattr(self, name).shape)
            if got[:1] != shape[:1] or len(got) not in (1, 2):
                raise DatasetError(f"{name} must have shape [prompt] = {shape[:1]} (or [prompt, answer]), got {got}")

    @property
    def n_prompts(self) -> int:
        """Size of the ``prompt`` dim."""
        return int(self.clean_ids.shape[0])

    @property
    def n_pos(self) -> int:
        """Size of the ``pos`` dim: tokens of the longest prompt, special tokens included."""
        return int(self.clean_ids.shape[1])

    @property
    def padded(self) -> bool:
        """Whether some prompt is shorter than `n_pos` (the batch is left-padded)."""
        return not bool(self.clean_mask.all() and self.corrupted_mask.all())

    def run_positions(self) -> PromptPositions:
        """The clean and corrupted runs' lengths and named positions (`patchlab.positions`)."""
        def run(mask, positions):
            names = {k: torch.tensor([p[k] for p in positions], dtype=torch.long) for k in positions[0]}
            return RunPositions(lengths=mask.sum(1), width=self.n_pos, names=names)
        return PromptPositions(runs={"clean": run(self.clean_mask, self.clean_positions),
                                     "corrupted": run(self.corrupted_mask, self.corrupted_positions)})

    @property
    def positions(self) -> NamedPositions:
        """The named positions as batch columns, when every prompt has each name at the same column.

        Raises:
            DatasetError: the columns differ between prompts; use `clean_positions` /
                `corrupted_positions` (per prompt) or `run_positions`.
        """
        shared = self.run_positions().shared()
        if shared is None:
            raise DatasetError("the named positions of this dataset differ between prompts, so no one index "
                               "holds for all; read them per prompt (clean_positions, corrupted_positions), and give "
                               "components positions by name or from the end")
        return NamedPositions(shared)

    def pad_attrs(self) -> dict[str, Any]:
        """Result attrs describing the padding: ``padding`` ("left" or "none") and, when padded,
        ``pad_token_id`` and ``pad_token`` (how it was chosen)."""
        if not self.padded:
            return {"padding": "none"}
        return {"padding": "left", "pad_token_id": self.pad_token_id, "pad_token": self.pad_token}


@dataclass(frozen=True, kw_only=True)
class PromptPairDataset:
    """An immutable, named sequence of `PromptPair` values.

    Args:
        pairs: the prompt pairs (any iterable; stored as a tuple).
        name: what task the prompts test, e.g. "ioi".
        corruption: how the corrupted prompts were made, e.g. "name_swap", "abc".

    Raises:
        DatasetError: no pairs, or an item that is not a `PromptPair`.
    """

    pairs: tuple[PromptPair, ...]
    name: str = "custom"
    corruption: str = "custom"

    def __post_init__(self) -> None:
        pairs = tuple(self.pairs)
        if not pairs:
            raise DatasetError("PromptPairDataset has no pairs; give at least one PromptPair")
        for i, pair in enumerate(pairs):
            if not isinstance(pair, PromptPair):
                raise DatasetError(f"pairs[{i}] is a {type(pair).__name__}, not a PromptPair; "
                                   "build it with PromptPair(clean=..., corrupted=..., ...)")
        for attr in ("name", "corruption"):
            if not isinstance(getattr(self, attr), str) or not getattr(self, attr):
                raise DatasetError(f"PromptPairDataset.{attr} must be a non-empty string")
        object.__setattr__(self, "pairs", pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[PromptPair]:
        return iter(self.pairs)

    def __getitem__(self, index: int) -> PromptPair:
        return self.pairs[index]

    # --- serialisation ----------------------------------------------------------------

    def to_jsonl_text(self) -> str:
        """Canonical JSONL text: a header line, then one line per pair (ASCII, "\\n" endings)."""
        header = {"format": FORMAT, "name": self.name, "corruption": self.corruption}
        lines = [header] + [pair.to_json() for pair in self.pairs]
        return "".join(json.dumps(obj, ensure_ascii=True, separators=(", ", ": ")) + "\n"
                       for obj in lines)

    def sha256(self) -> str:
        """Hex sha256 of `to_jsonl_text()`; equal to the sha256 of the file `to_jsonl` writes."""
        return hashlib.sha256(self.to_jsonl_text().encode("utf-8")).hexdigest()

    def to_jsonl(self, path: str | os.PathLike) -> None:
        """Write the dataset as JSON lines, atomically (temporary file, then `os.replace`)."""
        atomic_write_text(path, self.to_jsonl_text())

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike) -> "PromptPairDataset":
        """Read a file written by `to_jsonl` (the header line is optional).

        Raises:
            DatasetError: invalid JSON, an unknown format, or a pair with a missing,
                unknown or badly typed field; the message names the line number.
        """
        path = Path(path)
        header, records = read_jsonl(path, FORMAT)
        name, corruption = header.get("name", "custom"), header.get("corruption", "custom")
        pairs = [_pair_from_json(obj, where) for obj, where in records]
        if not pairs:
            raise DatasetError(f"{path}: holds no prompt pairs; add one JSON object per pair")
        try:
            return cls(pairs=tuple(pairs), name=name, corruption=corruption)
        except DatasetError as e:
            raise DatasetError(f"{path}, header: {e}") from None

    # --- tokenization -----------------------------------------------------------------

    def tokenize(self, tokenizer: "PreTrainedTokenizerBase", *,
                 max_length: int | None = None) -> TokenizedPairs:
        """Tokenize and validate every pair.

        Prompts are tokenized with the tokenizer's default special tokens (so a BOS,
        if the tokenizer adds one, is position 0); answers without special tokens. Prompts of
        different lengths (across pairs, or clean against corrupted) are left-padded to the
        longest with `pad_token`'s choice; named positions stay per prompt.

        Args:
            tokenizer: a Hugging Face tokenizer.
            max_length: the model's context length; longer prompts are an error.

        Returns:
            `TokenizedPairs` with ids and masks ``[prompt, pos]`` and answer ids ``[prompt]``.

        Raises:
            DatasetError: an answer that is not exactly one token; correct and
                incorrect answers that tokenize to the same id; a prompt longer than
                `max_length`; a named position outside its prompt; pairs that name different
                positions. The message names the prompt index, its text and the fix.
        """
        if max_length is not None and (isinstance(max_length, bool)
                                       or not isinstance(max_length, int) or max_length < 1):
            raise DatasetError(f"max_length must be a positive int or None, got {max_length!r}")
        clean_ids, corrupted_ids, correct_ids, incorrect_ids = [], [], [], []
        first = self.pairs[0]
        for i, pair in enumerate(self.pairs):
            correct_ids.append(_answer_ids(tokenizer, pair.correct, "correct", i, pair))
            incorrect_ids.append(_answer_ids(tokenizer, pair.incorrect, "incorrect", i, pair))
            _check_answer_ids(tokenizer, pair, i, correct_ids[-1], incorrect_ids[-1])
            clean = list(tokenizer(pair.clean)["input_ids"])
            corrupted = list(tokenizer(pair.corrupted)["input_ids"])
            for role, text, ids in (("clean", pair.clean, clean), ("corrupted", pair.corrupted, corrupted)):
                if max_length is not None and len(ids) > max_length:
                    raise DatasetError(
                        f"prompt {i}: {role} prompt {text!r} is {len(ids)} tokens, longer than "
                        f"max_length={max_length} (the model's context); fix: shorten the prompt")
            _check_positions(pair, i, len(clean), len(corrupted), first)
            clean_ids.append(clean)
            corrupted_ids.append(corrupted)
        pad_id, pad_how = pad_token(tokenizer)
        width = max(len(ids) for ids in clean_ids + corrupted_ids)
        clean, clean_mask = left_padded(clean_ids, width, pad_id)
        corrupted, corrupted_mask = left_padded(corrupted_ids, width, pad_id)
        return TokenizedPairs(
            clean_ids=clean, corrupted_ids=corrupted, clean_mask=clean_mask, corrupted_mask=corrupted_mask,
            correct_ids=_answer_tensor(correct_ids, incorrect_ids),
            incorrect_ids=_answer_tensor(incorrect_ids, correct_ids),
            clean_positions=tuple(p.positions for p in self.pairs),
            corrupted_positions=tuple(p.corrupted_positions for p in self.pairs),
            clean_tokens=tuple(_readable(tokenizer, ids) for ids in clean_ids),
            corrupted_tokens=tuple(_readable(tokenizer, ids) for ids in corrupted_ids),
            pad_token_id=pad_id, pad_token=pad_how,
        )


def read_jsonl(path: Path, fmt: str) -> tuple[dict, list[tuple[dict, str]]]:
    """The optional header object (first line, with ``"format": fmt``) and every other line's
    JSON object with its location (``"<path>, line N"``) for error messages.

    Raises:
        DatasetError: invalid JSON, a line that is not an object, a misplaced header or
            an unknown format.
    """
    header, records = {}, []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON ({e.msg}); "
                                   "each line must hold one JSON object") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if "format" in obj:
                if records or lineno != 1:
                    raise DatasetError(f"{where}: a header object (with 'format') may only be the first line")
                if obj["format"] != fmt:
                    raise DatasetError(f"{where}: unknown format {obj['format']!r}; "
                                       f"this version of patchlab reads {fmt!r}")
                header = obj
                continue
            records.append((obj, where))
    return header, records


def _pair_from_json(obj: dict, where: str) -> PromptPair:
    missing = [k for k in _PAIR_FIELDS if k not in obj]
    if missing:
        raise DatasetError(f"{where}: missing field {missing[0]!r}; each pair needs "
                           f"{', '.join(_PAIR_FIELDS)}")
    unknown = sorted(set(obj) - set(_PAIR_FIELDS) - set(_OPTIONAL_FIELDS))
    if unknown:
        raise DatasetError(f"{where}: unknown field {unknown[0]!r}; each pair has "
                           f"{', '.join(_PAIR_FIELDS)} and optionally {', '.join(_OPTIONAL_FIELDS)}")
    for key in _PAIR_FIELDS[:4]:
        value = obj[key]
        if not isinstance(value, str) and not (key in ("correct", "incorrect") and isinstance(value, list)):
            kinds = "a string" if key in ("clean", "corrupted") else "a string or a list of strings"
            raise DatasetError(f"{where}: field {key!r} must be {kinds}, got {type(value).__name__}")
    for key in ("positions", "corrupted_positions"):
        if key in obj and not isinstance(obj[key], dict):
            raise DatasetError(f"{where}: field {key!r} must be an object mapping names to "
                               f"token indices, got {type(obj[key]).__name__}")
    try:
        return PromptPair(**obj)
    except DatasetError as e:
        raise DatasetError(f"{where}: {e}") from None


def _answer_ids(tokenizer, answers, role: str, i: int, pair: PromptPair) -> list[int]:
    return [_single_token(tokenizer, text, role, i, pair) for text in answer_texts(answers)]


def _check_answer_ids(tokenizer, pair: PromptPair, i: int, correct: list[int], incorrect: list[int]) -> None:
    texts = {}
    for role, answers, ids in (("correct", pair.correct, correct), ("incorrect", pair.incorrect, incorrect)):
        for text, token in zip(answer_texts(answers), ids):
            if token in texts:
                other_role, other = texts[token]
                what = ("the correct answer {0!r} and the incorrect answer {1!r}" if other_role != role
                        else "the " + role + " answers {0!r} and {1!r}")
                raise DatasetError(
                    f"prompt {i} ({pair.clean!r}): {what.format(other, text)} are different texts but the same "
                    f"token (id {token}, {_readable(tokenizer, [token])[0]!r}), so "
                    f"{'every logit difference would be 0' if other_role != role else 'the set counts it twice'}; "
                    "fix: use answers that this tokenizer keeps apart (check that neither is an unknown token)")
            texts[token] = (role, text)


def _answer_tensor(ids: list[list[int]], other: list[list[int]]) -> torch.Tensor:
    """``[prompt]`` when every pair has single answers, else ``[prompt, answer]`` padded with -1."""
    if all(len(a) == 1 for a in ids + other):
        return torch.tensor([a[0] for a in ids], dtype=torch.long)
    width = max(len(a) for a in ids)
    return torch.tensor([a + [-1] * (width - len(a)) for a in ids], dtype=torch.long)


def _single_token(tokenizer, text: str, role: str, i: int, pair: PromptPair) -> int:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) != 1:
        raise DatasetError(
            f"prompt {i} ({pair.clean!r}): {role} answer {text!r} is {len(ids)} tokens "
            f"{_readable(tokenizer, ids)}, not one; fix: use answers that are single tokens "
            "(usually a common word with its leading space, e.g. ' Mary')")
    return int(ids[0])


def _readable(tokenizer, ids: list[int]) -> tuple[str, ...]:
    return tuple(tokenizer.convert_tokens_to_string([t])
                 for t in tokenizer.convert_ids_to_tokens(list(ids)))


def _check_positions(pair: PromptPair, i: int, n_clean: int, n_corrupted: int, first: PromptPair) -> None:
    for role, positions, n_pos in (("clean", pair.positions, n_clean),
                                   ("corrupted", pair.corrupted_positions, n_corrupted)):
        for name, index in positions.items():
            if index >= n_pos:
                raise DatasetError(
                    f"prompt {i} ({pair.clean!r}): position {name!r}={index} is outside the {role} prompt "
                    f"of {n_pos} tokens (valid: 0..{n_pos - 1}, counting special tokens the "
                    "tokenizer adds); fix: recompute positions with this tokenizer")
    names = set(pair.positions) ^ set(first.positions)
    if names:
        name = sorted(names)[0]
        raise DatasetError(
            f"prompt {i} ({pair.clean!r}): position {name!r} is in prompt {'0' if name in first.positions else i} "
            f"but not in prompt {i if name in first.positions else 0}; every pair names the same positions "
            f"(prompt 0 {first.clean!r} has {sorted(first.positions)}), at its own indices; fix: name "
            f"{name!r} in every pair, or drop it")


def pad_token(tokenizer) -> tuple[int, str]:
    """The id that fills left padding and how it was chosen: the tokenizer's pad token, else its
    EOS token, else its BOS token, else id 0. Padding is masked out and never read, so the choice
    changes no value; it is recorded in result attrs."""
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value), {"pad_token_id": "the tokenizer's pad token", "eos_token_id": "EOS (no pad token)",
                                "bos_token_id": "BOS (no pad or EOS token)"}[attr]
    return 0, "id 0 (no pad, EOS or BOS token)"


def left_padded(seqs: list[list[int]], width: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids ``[prompt, width]`` with each sequence at the right, and True on its tokens."""
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, seq in enumerate(seqs):
        ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq):] = True
    return ids, mask
