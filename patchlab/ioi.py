"""Indirect object identification (IOI) prompt pairs.

After Wang et al. 2022, "Interpretability in the Wild: a Circuit for Indirect
Object Identification in GPT-2 small" (arXiv 2211.00593). A prompt such as
"When Mary and John went to the store, John gave a drink to" names an indirect
object IO (Mary) once and a subject S (John) twice, at positions S1 and S2; the
model should continue with " Mary". Named token positions: ``IO``, ``S1``,
``S2`` and ``END`` (the last token, where the answer is predicted).

Templates are written with ``[A]`` for the IO, ``[B]`` for the subject (twice:
S1 then S2), and optional ``[PLACE]`` and ``[OBJECT]``; every placeholder
follows a space. The answer ``[A]`` that would end the sentence is left out.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import TYPE_CHECKING, Sequence

from patchlab.data import DatasetError, PromptPair, PromptPairDataset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["ioi_dataset", "ioi_templates", "single_token_words", "IOI_TEMPLATES", "IOI_NAMES",
           "IOI_PLACES", "IOI_OBJECTS", "ORDERS", "CORRUPTIONS"]

ORDERS = ("ABBA", "BABA")
"""ABBA: the IO comes first in the first clause; BABA: the subject comes first."""
CORRUPTIONS = ("name_swap", "abc")
"""Corruptions `ioi_dataset` can make; see its docstring."""

IOI_TEMPLATES: tuple[str, ...] = (
    # The 15 templates of Wang et al. 2022 (their ABBA form, final answer removed) ...
    "Then, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [A] and [B] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [A] and [B] were working at the [PLACE]. [B] decided to give a [OBJECT] to",
    "Then, [A] and [B] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to",
    "Then, [A] and [B] had a long argument, and afterwards [B] said to",
    "After [A] and [B] went to the [PLACE], [B] gave a [OBJECT] to",
    "When [A] and [B] got a [OBJECT] at the [PLACE], [B] decided to give it to",
    "When [A] and [B] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to",
    "While [A] and [B] were working at the [PLACE], [B] gave a [OBJECT] to",
    "While [A] and [B] were commuting to the [PLACE], [B] gave a [OBJECT] to",
    "After the lunch, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Afterwards, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [A] and [B] had a long argument. Afterwards [B] said to",
    "The [PLACE] [A] and [B] went to had a [OBJECT]. [B] gave it to",
    "Friends [A] and [B] found a [OBJECT] at the [PLACE]. [B] gave it to",
    # ... the prompt of the TransformerLens exploratory-analysis demo, and patchlab's own
    # variants of it (one clause, one verb each), so that tokenizers which split the
    # templates above into many length groups still keep several templates of one length.
    "When [A] and [B] went to the [PLACE], [B] gave a [OBJECT] to",
    "When [A] and [B] arrived at the [PLACE], [B] gave a [OBJECT] to",
    "While [A] and [B] were at the [PLACE], [B] gave a [OBJECT] to",
    "Once [A] and [B] got to the [PLACE], [B] gave a [OBJECT] to",
    "After [A] and [B] arrived at the [PLACE], [B] handed a [OBJECT] to",
)
"""Default templates, in ABBA form: Wang et al.'s 15, the TransformerLens demo's and four
of patchlab's. `ioi_dataset` makes the BABA form by swapping the first ``[A]`` and ``[B]``;
it keeps only the largest group of one token structure (see `ioi_templates`)."""

IOI_PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
"""Places of Wang et al. 2022."""
IOI_OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")
"""Objects of Wang et al. 2022 (all take the article "a")."""

IOI_NAMES = (
    "Mary", "John", "James", "Michael", "David", "Robert", "William", "Richard", "Thomas",
    "Daniel", "Paul", "Mark", "George", "Steven", "Andrew", "Kevin", "Brian", "Edward", "Jason",
    "Ryan", "Eric", "Jacob", "Gary", "Peter", "Frank", "Scott", "Sam", "Adam", "Henry", "Jack",
    "Alex", "Tom", "Kyle", "Sean", "Carl", "Aaron", "Ben", "Nick", "Luke", "Simon", "Sarah",
    "Anna", "Emma", "Emily", "Lisa", "Laura", "Karen", "Susan", "Linda", "Nancy", "Jessica",
    "Rachel", "Amy", "Kate", "Alice", "Grace", "Julia", "Rose", "Helen", "Jane", "Lucy", "Sophie",
    "Claire", "Diana", "Megan", "Amanda", "Olivia", "Maria", "Julie", "Ellen", "Ruth", "Betty",
    "Kelly", "Hannah", "Victoria", "Elizabeth", "Christina", "Patricia", "Michelle", "Nicole",
)
"""Common English first names; only those that are one token with a leading space are used."""

_PLACEHOLDER = re.compile(r"\[([A-Z_]+)\]")
_KNOWN = ("A", "B", "PLACE", "OBJECT")
_ROLES = ("IO", "S1", "S2")


def single_token_words(tokenizer: "PreTrainedTokenizerBase",
                       words: Sequence[str]) -> tuple[str, ...]:
    """The words (deduplicated, in order) that are exactly one token with a leading space.

    Tokenized as ``" " + word`` without special tokens.
    """
    kept: list[str] = []
    for word in dict.fromkeys(words):
        if word and not word.isspace() and word == word.strip() \
                and len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1:
            kept.append(word)
    return tuple(kept)


def ioi_templates(tokenizer: "PreTrainedTokenizerBase", *, order: str = "ABBA",
                  templates: Sequence[str] | None = None, names: Sequence[str] | None = None,
                  places: Sequence[str] | None = None,
                  objects: Sequence[str] | None = None) -> tuple[str, ...]:
    """The templates `ioi_dataset` uses: in `order`, all with one token structure.

    Each template is put in the requested order, tokenized with a probe filling,
    and grouped by its token structure (length and the IO, S1, S2, END
    indices). The largest group is kept (ties: the group whose first template
    comes first), in the given template order.

    Raises:
        DatasetError: a malformed template, an unknown order, or no template whose
            placeholders all fill with single tokens.
    """
    chosen = _select(tokenizer, order, templates, names, places, objects)[0]
    marks = {"IO": "[A]", "S1": "[B]", "S2": "[B]", "PLACE": "[PLACE]", "OBJECT": "[OBJECT]"}
    return tuple(_fill(parts, marks) for parts in chosen)


def ioi_dataset(tokenizer: "PreTrainedTokenizerBase", *, n_prompts: int = 8,
                corruption: str = "name_swap", order: str = "ABBA", seed: int = 0,
                templates: Sequence[str] | None = None, names: Sequence[str] | None = None,
                places: Sequence[str] | None = None,
                objects: Sequence[str] | None = None) -> PromptPairDataset:
    """IOI prompt pairs after Wang et al. 2022 (arXiv 2211.00593).

    Each pair draws, with ``random.Random(seed)``, a template (see
    `ioi_templates`), two different names IO and S, a place and an object. All
    prompts have the same token length and the same named positions ``IO``,
    ``S1``, ``S2`` and ``END`` (0-based, counting a BOS if the tokenizer adds one).
    ``correct`` is " " + IO and ``incorrect`` is " " + S, for both prompts.

    Orders (`order`):
        "ABBA": IO first: "When Mary and John went to the store, John gave a drink to".
        "BABA": S first: "When John and Mary went to the store, John gave a drink to".

    Corruptions (`corruption`):
        "name_swap": symmetric token replacement (Zhang & Nanda 2023): the clean
            prompt with the S2 name replaced by the IO name, so the duplicated
            name, and hence the IOI answer, flips: "When Mary and John went to the
            store, Mary gave a drink to" (would answer " John"). This is the
            corruption of the TransformerLens IOI demo.
        "abc": Wang et al.'s ABC distribution (used for path patching): the same
            template, place and object with three different names C1, C2, C3,
            none equal to IO or S, at IO, S1 and S2: "When Alice and Bob went to
            the store, Carol gave a drink to". Name information is removed, the
            sentence structure kept.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        n_prompts: number of pairs (the ``prompt`` dim).
        corruption: "name_swap" or "abc".
        order: "ABBA" or "BABA".
        seed: seed of the `random.Random` that draws templates, names, places, objects.
        templates: templates with ``[A]``, two ``[B]`` and optional ``[PLACE]``,
            ``[OBJECT]`` (default `IOI_TEMPLATES`).
        names, places, objects: word lists (defaults `IOI_NAMES`, `IOI_PLACES`,
            `IOI_OBJECTS`); only words that are single tokens with a leading space are used.

    Returns:
        A `PromptPairDataset` with ``name="ioi"`` and ``corruption=corruption``.

    Raises:
        DatasetError: an unknown order or corruption, n_prompts < 1, a malformed
            template, no usable template, or too few single-token names (2 for
            "name_swap", 5 for "abc").
    """
    if corruption not in CORRUPTIONS:
        raise DatasetError(f"unknown corruption {corruption!r}; choose one of {CORRUPTIONS}")
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 1:
        raise DatasetError(f"n_prompts must be an int >= 1, got {n_prompts!r}")
    chosen, layout, names_, places_, objects_ = _select(tokenizer, order, templates, names,
                                                        places, objects)
    need = 2 if corruption == "name_swap" else 5
    if len(names_) < need:
        raise DatasetError(
            f"only {len(names_)} names are single tokens with a leading space in this tokenizer "
            f"({list(names_)}); corruption {corruption!r} needs {need}; fix: pass names= with "
            "more common first names")
    positions = layout[1]
    rng = random.Random(seed)
    pairs: list[PromptPair] = []
    for _ in range(100 * n_prompts + 100):
        if len(pairs) == n_prompts:
            break
        parts = rng.choice(chosen)
        io, s = rng.sample(names_, 2)
        fill = {"PLACE": rng.choice(places_) if places_ else "",
                "OBJECT": rng.choice(objects_) if objects_ else ""}
        if corruption == "name_swap":
            swapped = (io, s, io)
        else:
            swapped = tuple(rng.sample([n for n in names_ if n not in (io, s)], 3))
        clean = _fill(parts, dict(fill, IO=io, S1=s, S2=s))
        corrupted = _fill(parts, dict(fill, IO=swapped[0], S1=swapped[1], S2=swapped[2]))
        if _layout(tokenizer, clean, io, s) != layout:
            continue  # a rare in-context merge changed the structure: draw again
        clean_ids = list(tokenizer(clean)["input_ids"])
        corrupted_ids = list(tokenizer(corrupted)["input_ids"])
        want = list(clean_ids)
        for role, name in zip(_ROLES, swapped):
            want[positions[role]] = _token_id(tokenizer, name)
        if corrupted_ids != want:
            continue
        pairs.append(PromptPair(clean=clean, corrupted=corrupted, correct=" " + io,
                                incorrect=" " + s, positions=positions))
    if len(pairs) < n_prompts:
        raise DatasetError(f"could only build {len(pairs)} of {n_prompts} IOI prompts with a "
                           "consistent token structure; fix: pass other templates or names")
    return PromptPairDataset(pairs=tuple(pairs), name="ioi", corruption=corruption)


def _parse(template: str, order: str) -> tuple[tuple[str, str], ...]:
    """Template -> ((literal, role), ...) in `order`; role is "" after the last literal."""
    found = _PLACEHOLDER.findall(template)
    bad = [p for p in found if p not in _KNOWN]
    if bad or found.count("A") != 1 or found.count("B") != 2:
        raise DatasetError(
            f"template {template!r} must hold one [A] (the IO), two [B] (the subject) and "
            f"optionally [PLACE] and [OBJECT]; found {['[' + p + ']' for p in found]}")
    names = [p for p in found if p in ("A", "B")]
    if names[-1] != "B":
        raise DatasetError(f"template {template!r}: the second [B] (S2) must come after [A] "
                           "and the first [B]")
    pieces = _PLACEHOLDER.split(template)  # literal, name, literal, name, ..., literal
    if not pieces[-1].strip():
        raise DatasetError(f"template {template!r} must end with text after the last "
                           "placeholder (the END token, e.g. ' to')")
    roles, seen_b = [], 0
    for placeholder in pieces[1::2]:
        if placeholder == "B":
            roles.append("S1" if seen_b == 0 else "S2")
            seen_b += 1
        else:
            roles.append({"A": "IO"}.get(placeholder, placeholder))
    i_io, i_s1 = roles.index("IO"), roles.index("S1")
    if (order == "ABBA") != (i_io < i_s1):  # swap the first-clause names
        roles[i_io], roles[i_s1] = "S1", "IO"
    literals = pieces[0::2]
    for literal, role in zip(literals, roles):
        if not literal.endswith(" "):
            raise DatasetError(f"template {template!r}: every placeholder must follow a space "
                               f"(names are single tokens with a leading space); {role} does not")
    return tuple(zip(literals, roles + [""]))


def _fill(parts: tuple[tuple[str, str], ...], values: dict[str, str]) -> str:
    return "".join(literal + (values[role] if role else "") for literal, role in parts)


def _token_id(tokenizer, word: str) -> int:
    return int(tokenizer(" " + word, add_special_tokens=False)["input_ids"][0])


def _layout(tokenizer, text: str, io: str, s: str) -> tuple[int, dict[str, int]] | None:
    """(token length, {IO, S1, S2, END}) of a clean prompt, or None if names do not stand alone."""
    full = list(tokenizer(text)["input_ids"])
    bare = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    starts = [k for k in range(len(full) - len(bare) + 1) if full[k:k + len(bare)] == bare]
    if not starts:
        return None
    k = starts[0]
    io_at = [k + j for j, t in enumerate(bare) if t == _token_id(tokenizer, io)]
    s_at = [k + j for j, t in enumerate(bare) if t == _token_id(tokenizer, s)]
    end = k + len(bare) - 1
    if len(io_at) != 1 or len(s_at) != 2 or s_at[1] >= end:
        return None
    return len(full), {"IO": io_at[0], "S1": s_at[0], "S2": s_at[1], "END": end}


def _select(tokenizer, order, templates, names, places, objects):
    """(templates as parts, layout, names, places, objects) after filtering by the tokenizer."""
    if order not in ORDERS:
        raise DatasetError(f"unknown order {order!r}; choose one of {ORDERS}")
    templates = IOI_TEMPLATES if templates is None else tuple(templates)
    if not templates:
        raise DatasetError("templates is empty; pass at least one template, or None for "
                           "the defaults")
    names_ = single_token_words(tokenizer, IOI_NAMES if names is None else names)
    places_ = single_token_words(tokenizer, IOI_PLACES if places is None else places)
    objects_ = single_token_words(tokenizer, IOI_OBJECTS if objects is None else objects)
    if len(names_) < 2:
        raise DatasetError(f"only {len(names_)} names are single tokens with a leading space in "
                           "this tokenizer; fix: pass names= with common first names")
    probes = [(names_[i], names_[i + 1]) for i in range(0, min(len(names_) - 1, 6), 2)]
    layouts = {}
    for template in templates:
        parts = _parse(template, order)
        roles = {role for _, role in parts}
        if ("PLACE" in roles and not places_) or ("OBJECT" in roles and not objects_):
            continue
        for io, s in probes:
            text = _fill(parts, {"IO": io, "S1": s, "S2": s,
                                 "PLACE": places_[0] if places_ else "",
                                 "OBJECT": objects_[0] if objects_ else ""})
            layout = _layout(tokenizer, text, io, s)
            if layout is not None:
                layouts[parts] = (layout[0], tuple(layout[1].items()))
                break
    if not layouts:
        raise DatasetError(
            f"no IOI template fills with single-token names, places and objects in this "
            f"tokenizer ({len(names_)} names, {len(places_)} places, {len(objects_)} objects "
            "survive); fix: pass other templates, names, places or objects")
    counts = Counter(layouts.values())
    first = {}
    for parts, key in layouts.items():
        first.setdefault(key, len(first))
    best = max(counts, key=lambda key: (counts[key], -first[key]))
    chosen = tuple(parts for parts, key in layouts.items() if key == best)
    return chosen, (best[0], dict(best[1])), names_, places_, objects_
