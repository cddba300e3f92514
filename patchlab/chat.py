"""Prompt pairs of chat-formatted instructions (refusal studies, Arditi et al. 2024).

`chat_pairs` wraps each instruction in the tokenizer's chat template (a user turn, optionally after
a system turn, with the generation prompt) and names its positions per pair:

- ``last_instruction``: the instruction's last token;
- ``post_instruction_0 .. post_instruction_{k-1}``: the template's tokens after the instruction, the
  same ``k`` in every prompt, so they also align from the end (``post_instruction_{k-1}`` is ``-1``).
  Arditi et al. read the refusal direction at these positions.

Instructions of different token lengths give pairs of different lengths, which every node-level
sweep takes (left padding, `patchlab.positions`). `match_lengths=True` instead pairs each clean
instruction with an unused corrupted one of the same token length, as Arditi et al.'s and the
TASA refusal studies do, so that all-position patches are defined too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .data import DatasetError, PromptPair, PromptPairDataset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["chat_pairs", "chat_prompt"]


def chat_prompt(tokenizer: "PreTrainedTokenizerBase", instruction: str, *,
                system: str | None = None) -> tuple[str, dict[str, int]]:
    """One instruction in the tokenizer's chat template, with the generation prompt.

    Returns:
        The prompt text and its named positions (see the module docstring), as indices into
        ``tokenizer(text)["input_ids"]`` (the tokens `patchlab.PromptPairDataset.tokenize` sees).

    Raises:
        DatasetError: a tokenizer without a chat template, an empty instruction, or a template
            whose tokens do not keep the instruction apart (no token ends where it ends).
    """
    if not isinstance(instruction, str) or not instruction.strip():
        raise DatasetError(f"an instruction must be a non-empty string, got {instruction!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError("this tokenizer has no chat template; chat_pairs needs a chat model's tokenizer (e.g. "
                           "SmolLM2-135M-Instruct's), or build PromptPair values with your own prompt format")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": instruction}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = getattr(tokenizer, "bos_token", None)
    ids = list(tokenizer(text)["input_ids"])
    if bos and text.startswith(bos) and len(ids) > 1 and ids[0] == ids[1] == tokenizer.bos_token_id:
        text = text[len(bos):]  # the template writes the BOS the tokenizer adds: keep one
        ids = list(tokenizer(text)["input_ids"])
    end = text.rfind(instruction) + len(instruction)
    if end < len(instruction):
        raise DatasetError(f"the chat template changed the instruction {instruction!r}, so its tokens cannot be "
                           "found in the prompt; pass it as the template writes it (e.g. without outer spaces)")
    last = _last_token_ending_by(tokenizer, text, end, len(ids))
    if last is None or last + 1 >= len(ids):
        raise DatasetError(f"no token of the chat prompt ends where the instruction {instruction!r} ends, or no "
                           "template token follows it; this template cannot name post-instruction positions")
    positions = {"last_instruction": last}
    positions.update({f"post_instruction_{j}": last + 1 + j for j in range(len(ids) - last - 1)})
    return text, positions


def chat_pairs(tokenizer: "PreTrainedTokenizerBase", clean_instructions: Sequence[str],
               corrupted_instructions: Sequence[str], *, correct: str | Sequence[str], incorrect: str | Sequence[str],
               system: str | None = None, match_lengths: bool = False, name: str = "chat",
               corruption: str = "instruction") -> PromptPairDataset:
    """Clean/corrupted pairs of chat-formatted instructions, with per-pair named positions.

    Args:
        tokenizer: a chat model's tokenizer (it must have a chat template).
        clean_instructions: instructions on which the model shows the behaviour (e.g. harmful ones,
            for refusal).
        corrupted_instructions: instructions paired with them in order (e.g. harmless ones); with
            `match_lengths`, a pool to draw from.
        correct, incorrect: the answer token(s) the metric compares (e.g. refusal openers ``(" I",
            "I", " Sorry")`` against compliance openers), as in `patchlab.PromptPair`.
        system: a system message before each instruction (None: none; some templates add their own).
        match_lengths: pair each clean instruction, in order, with the first unused corrupted one whose
            chat prompt has as many tokens; clean ones without a match are dropped.
        name, corruption: the dataset's labels.

    Returns:
        A `patchlab.PromptPairDataset`; positions ``last_instruction`` and ``post_instruction_0..k-1``
        in both prompts of every pair (see the module docstring).

    Raises:
        DatasetError: see `chat_prompt`; instruction lists of different sizes (without
            `match_lengths`); templates whose suffix length differs between prompts; no pair of
            equal lengths (with `match_lengths`).
    """
    clean = [chat_prompt(tokenizer, text, system=system) for text in clean_instructions]
    corrupted = [chat_prompt(tokenizer, text, system=system) for text in corrupted_instructions]
    if not clean or not corrupted:
        raise DatasetError("chat_pairs needs at least one clean and one corrupted instruction")
    if match_lengths:
        clean, corrupted = _matched(clean, corrupted)
    elif len(clean) != len(corrupted):
        raise DatasetError(f"{len(clean)} clean and {len(corrupted)} corrupted instructions: pairs are made in "
                           "order, so give as many of each, or pass match_lengths=True to pair by token length")
    suffixes = {len(p) for _, p in clean + corrupted}
    if len(suffixes) > 1:
        raise DatasetError(f"the chat template leaves {sorted(s - 1 for s in suffixes)} tokens after different "
                           "instructions, so post-instruction positions would not correspond; check the template")
    pairs = [PromptPair(clean=c, corrupted=x, correct=correct, incorrect=incorrect, positions=cp,
                        corrupted_positions=xp) for (c, cp), (x, xp) in zip(clean, corrupted)]
    return PromptPairDataset(pairs=pairs, name=name, corruption=corruption)


def _matched(clean, corrupted):
    """Each clean prompt with the first unused corrupted prompt of its token length (its last
    position, the last template token, plus one)."""
    length = lambda item: max(item[1].values()) + 1  # noqa: E731
    pool: dict[int, list[int]] = {}
    for j, item in enumerate(corrupted):
        pool.setdefault(length(item), []).append(j)
    kept_clean, kept_corrupted = [], []
    for item in clean:
        free = pool.get(length(item))
        if free:
            kept_clean.append(item)
            kept_corrupted.append(corrupted[free.pop(0)])
    if not kept_clean:
        raise DatasetError("match_lengths=True found no clean and corrupted instructions whose chat prompts have "
                           "the same number of tokens; give more corrupted instructions to draw from")
    return kept_clean, kept_corrupted


def _last_token_ending_by(tokenizer, text: str, end: int, n_ids: int) -> int | None:
    """The index of the last token that ends at or before character `end` and after it starts."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) == n_ids:
            ends = [j for j, (a, b) in enumerate(offsets) if b > a and b <= end]
            return ends[-1] if ends and offsets[ends[-1]][1] == end else None
    prefix = len(tokenizer(text[:end])["input_ids"])  # a slow tokenizer: the tokens of the text up to `end`
    return prefix - 1 if prefix >= 1 else None
