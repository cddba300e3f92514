"""Tests of patchlab.ioi with the real SmolLM2 tokenizer and a tiny word-level one.

Prompts are checked against regular expressions written here from the templates,
and token positions against the tokenizer's own output.
"""

from __future__ import annotations

import re

import pytest

from patchlab.data import DatasetError
from patchlab.ioi import (IOI_NAMES, IOI_OBJECTS, IOI_PLACES, IOI_TEMPLATES, ioi_dataset,
                          ioi_templates, single_token_words)

N = 24


def in_order(template: str, order: str) -> str:
    """The template in `order`: every default template's first clause reads "[A] and [B]"."""
    assert "[A] and [B]" in template
    return template if order == "ABBA" else template.replace("[A] and [B]", "[B] and [A]", 1)


def template_regex(template: str, second: str = "(?P=B)") -> re.Pattern:
    """Match a filled template; [A] -> group A, first [B] -> group B, second [B] -> `second`."""
    rx = re.escape(template)
    rx = rx.replace(re.escape("[A]"), "(?P<A>[A-Za-z]+)", 1)
    rx = rx.replace(re.escape("[B]"), "(?P<B>[A-Za-z]+)", 1)
    rx = rx.replace(re.escape("[B]"), second, 1)
    rx = rx.replace(re.escape("[PLACE]"), "(?P<PLACE>[a-z]+)")
    rx = rx.replace(re.escape("[OBJECT]"), "(?P<OBJECT>[a-z]+)", 1)
    rx = rx.replace(re.escape("[OBJECT]"), "(?P=OBJECT)")
    return re.compile(rx)


def match_any(text: str, order: str, second: str = "(?P=B)") -> tuple[str, re.Match]:
    """(template, match) of the one default template that `text` fills."""
    matches = [(t, m) for t in IOI_TEMPLATES
               if (m := template_regex(in_order(t, order), second).fullmatch(text))]
    assert len(matches) == 1, f"{text!r} matches {len(matches)} templates"
    return matches[0]


def readable(tok, text: str) -> list[str]:
    return [tok.convert_tokens_to_string([t])
            for t in tok.convert_ids_to_tokens(tok(text)["input_ids"])]


@pytest.mark.parametrize("order", ["ABBA", "BABA"])
@pytest.mark.parametrize("corruption", ["name_swap", "abc"])
def test_ioi_prompts_have_the_stated_structure(smollm2_tokenizer, order, corruption):
    tok = smollm2_tokenizer
    ds = ioi_dataset(tok, n_prompts=N, corruption=corruption, order=order, seed=1)
    assert (ds.name, ds.corruption, len(ds)) == ("ioi", corruption, N)
    tp = ds.tokenize(tok, max_length=8192)  # all checks of patchlab.data pass
    lengths = set()
    for i, p in enumerate(ds):
        template, m = match_any(p.clean, order)
        io, s = m["A"], m["B"]
        assert io != s and {io, s} <= set(IOI_NAMES)
        assert m.groupdict().get("PLACE", "store") in IOI_PLACES
        assert m.groupdict().get("OBJECT", "drink") in IOI_OBJECTS
        assert (p.correct, p.incorrect) == (" " + io, " " + s)
        for answer in (p.correct, p.incorrect):
            assert len(tok(answer, add_special_tokens=False)["input_ids"]) == 1
        assert tok.decode(tok(p.clean)["input_ids"], skip_special_tokens=True) == p.clean

        tokens = readable(tok, p.clean)
        pos = p.positions
        assert set(pos) == {"IO", "S1", "S2", "END"}
        assert tokens[pos["IO"]] == " " + io
        assert tokens[pos["S1"]] == tokens[pos["S2"]] == " " + s
        assert pos["END"] == len(tokens) - 1 and tokens[-1] == " to"
        assert tokens.count(" " + io) == 1 and tokens.count(" " + s) == 2
        if order == "ABBA":
            assert pos["IO"] < pos["S1"] < pos["S2"]
            assert p.clean.index(io) < p.clean.index(s)
        else:
            assert pos["S1"] < pos["IO"] < pos["S2"]
            assert p.clean.index(s) < p.clean.index(io)
        assert tuple(tokens) == tp.clean_tokens[i]
        assert tp.correct_ids[i] == tp.clean_ids[i, pos["IO"]]
        assert tp.incorrect_ids[i] == tp.clean_ids[i, pos["S1"]]
        lengths.add(len(tokens))

        bad = readable(tok, p.corrupted)
        changed = [j for j in range(len(tokens)) if tokens[j] != bad[j]]
        if corruption == "name_swap":
            k = p.clean.rindex(" " + s)
            assert p.corrupted == p.clean[:k] + " " + io + p.clean[k + 1 + len(s):]
            assert match_any(p.corrupted, order, second="(?P=A)")[0] == template
            assert changed == [pos["S2"]] and bad[pos["S2"]] == " " + io
        else:
            c_template, c = match_any(p.corrupted, order, second="(?P<C>[A-Za-z]+)")
            assert c_template == template
            names = {c["A"], c["B"], c["C"]}
            assert len(names) == 3 and not names & {io, s} and names <= set(IOI_NAMES)
            assert (c["A"], c["B"], c["C"]) == (bad[pos["IO"]][1:], bad[pos["S1"]][1:],
                                                bad[pos["S2"]][1:])
            assert changed == sorted(pos.values())[:3]
            assert {k: c[k] for k in ("PLACE", "OBJECT") if k in c.groupdict()} == \
                {k: m[k] for k in ("PLACE", "OBJECT") if k in m.groupdict()}
    assert len(lengths) == 1 and tp.n_pos in lengths
    assert len({p.positions for p in ds}) == 1


def test_ioi_uses_several_templates_and_names(smollm2_tokenizer):
    ds = ioi_dataset(smollm2_tokenizer, n_prompts=64, seed=0)
    used = {t for p in ds for t in IOI_TEMPLATES if template_regex(t).fullmatch(p.clean)}
    assert len(used) >= 2
    assert len({p.correct for p in ds}) >= 20


def test_ioi_is_seeded(smollm2_tokenizer):
    a = ioi_dataset(smollm2_tokenizer, n_prompts=16, seed=3, corruption="abc")
    b = ioi_dataset(smollm2_tokenizer, n_prompts=16, seed=3, corruption="abc")
    c = ioi_dataset(smollm2_tokenizer, n_prompts=16, seed=4, corruption="abc")
    assert a == b and a.sha256() == b.sha256()
    assert a.sha256() != c.sha256() and [p.clean for p in a] != [p.clean for p in c]


def test_templates_are_grouped_by_token_structure(smollm2_tokenizer):
    tok = smollm2_tokenizer
    short = ("When [A] and [B] went to the [PLACE], [B] gave a [OBJECT] to",
             "After [A] and [B] went to the [PLACE], [B] gave a [OBJECT] to")
    long = "Then, [A] and [B] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to"

    def n_tokens(t):
        return len(tok(t.replace("[A]", "Mary").replace("[B]", "John")
                       .replace("[PLACE]", "store").replace("[OBJECT]", "drink"))["input_ids"])

    assert n_tokens(short[0]) == n_tokens(short[1]) != n_tokens(long)
    templates = (long,) + short
    assert ioi_templates(tok, templates=templates) == short
    assert ioi_templates(tok, templates=templates, order="BABA") == tuple(
        t.replace("[A] and [B]", "[B] and [A]") for t in short)
    ds = ioi_dataset(tok, n_prompts=12, templates=templates)
    assert all(any(template_regex(t).fullmatch(p.clean) for t in short) for p in ds)
    # a lone template of its own length is used when it is the only one
    assert ioi_templates(tok, templates=(long,)) == (long,)


def test_multi_token_names_are_dropped(smollm2_tokenizer):
    tok = smollm2_tokenizer
    names = ["Mary", "John", "Anna", "Zxqvbert", "Tom", "Grzegorz", "Sarah"]
    multi = [n for n in names if len(tok(" " + n, add_special_tokens=False)["input_ids"]) > 1]
    assert {"Zxqvbert", "Grzegorz"} <= set(multi)
    assert single_token_words(tok, names) == tuple(n for n in names if n not in multi)
    ds = ioi_dataset(tok, n_prompts=20, names=names, corruption="abc")
    used = {w for p in ds for w in re.findall(r"[A-Z][a-z]+", p.clean + " " + p.corrupted)}
    assert not used & set(multi)


@pytest.mark.parametrize("kwargs, words", [
    ({"order": "AABB"}, ["unknown order", "ABBA"]),
    ({"corruption": "noise"}, ["unknown corruption", "name_swap"]),
    ({"n_prompts": 0}, ["n_prompts"]),
    ({"names": ["Mary"]}, ["only 1 names", "names="]),
    ({"names": ["Mary", "John", "Anna", "Zxqvbert"], "corruption": "abc"},
     ["only 3 names", "'abc' needs 5"]),
    ({"templates": ["When [A] and [A] met, [B] said to"]}, ["one [A]", "two [B]"]),
    ({"templates": ["When [A] and [B] met, [B] gave a [THING] to"]}, ["[THING]"]),
    ({"templates": ["When [A] and [B] met,[B] said to"]}, ["follow a space"]),
    ({"templates": ["When [B] and [B] met, [A] said to"]}, ["S2", "after"]),
    ({"templates": ["When [A] and [B] met, [B]"]}, ["end with text"]),
    ({"templates": []}, ["templates is empty"]),
    ({"templates": ["When [A] and [B] went to the [PLACE], [B] said to"], "places": ["Xqzvplace"]},
     ["no IOI template", "places"]),
])
def test_ioi_errors(smollm2_tokenizer, kwargs, words):
    with pytest.raises(DatasetError) as e:
        ioi_dataset(smollm2_tokenizer, **kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_ioi_with_a_bos_tokenizer(make_wordlevel_tokenizer):
    template = "When [A] and [B] went to the [PLACE], [B] gave a [OBJECT] to"
    names = ["Mary", "John", "Anna", "Tom", "Kate", "Paul"]
    words = "When and went to the , gave a".split() + names + ["store", "drink"]
    tok = make_wordlevel_tokenizer(words, bos=True)
    ds = ioi_dataset(tok, n_prompts=10, templates=[template], names=names, corruption="abc",
                     order="BABA", places=["store"], objects=["drink"])
    expected = {"S1": 2, "IO": 4, "S2": 10, "END": 14}  # one more than the words: [BOS] first
    for p in ds:
        assert p.positions == expected
        tokens = tok.convert_ids_to_tokens(tok(p.clean)["input_ids"])
        assert tokens[0] == "[BOS]" and tokens[expected["IO"]] == p.correct.strip()
        assert tokens[expected["S1"]] == tokens[expected["S2"]] == p.incorrect.strip()
    assert ds.tokenize(tok).n_pos == 15
