"""Tests of patchlab.data: prompt pairs, JSONL storage, tokenization checks.

Token ids are checked against the tiny word-level tokenizer's own vocabulary, an
independent fact; hashes against hashlib over the written file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchlab.data import (FORMAT, DatasetError, NamedPositions, PromptPair, PromptPairDataset,
                           TokenizedPairs)

WORDS = ("When Mary John Anna Tom and went to the store park , gave a drink ball "
         "Then . had fun at").split()
POS = {"IO": 1, "S1": 3, "S2": 9, "END": 13}


def pair(io="Mary", s="John", place="store", obj="drink", **overrides) -> PromptPair:
    fields = dict(
        clean=f"When {io} and {s} went to the {place}, {s} gave a {obj} to",
        corrupted=f"When {io} and {s} went to the {place}, {io} gave a {obj} to",
        correct=f" {io}", incorrect=f" {s}", positions=POS)
    fields.update(overrides)
    return PromptPair(**fields)


def dataset(*pairs: PromptPair, **kw) -> PromptPairDataset:
    return PromptPairDataset(pairs=pairs or (pair(), pair("Anna", "Tom", "park", "ball")), **kw)


@pytest.fixture
def tok(make_wordlevel_tokenizer):
    return make_wordlevel_tokenizer(WORDS)


# --- PromptPair and PromptPairDataset --------------------------------------------------


def test_positions_are_frozen_hashable_and_canonical():
    a = pair(positions={"END": 13, "IO": 1, "S2": 9, "S1": 3})
    b = pair(positions=dict(POS))
    assert isinstance(a.positions, NamedPositions)
    assert a == b and hash(a) == hash(b) and a.positions == POS
    assert list(a.positions) == ["IO", "S1", "S2", "END"]  # sorted by index
    assert a.positions["S2"] == 9 and len(a.positions) == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.clean = "x"
    with pytest.raises(TypeError):
        a.positions["IO"] = 2
    assert pair(positions={**POS, "IO": 2}) != a


@pytest.mark.parametrize("overrides, words", [
    ({"positions": {"IO": -1}}, ["'IO'", ">= 0"]),
    ({"positions": {"IO": 1.0}}, ["'IO'", "int"]),
    ({"positions": {"": 1}}, ["non-empty"]),
    ({"correct": ""}, ["correct", "non-empty"]),
    ({"clean": None}, ["clean"]),
    ({"incorrect": " Mary"}, ["different"]),
])
def test_prompt_pair_rejects_bad_fields(overrides, words):
    with pytest.raises(DatasetError) as e:
        pair(**overrides)
    assert all(w in str(e.value) for w in words)


def test_dataset_validates_and_behaves_as_a_sequence():
    with pytest.raises(ValueError, match="at least one PromptPair"):
        PromptPairDataset(pairs=())
    with pytest.raises(DatasetError, match=r"pairs\[1\] is a dict"):
        PromptPairDataset(pairs=[pair(), {"clean": "x"}])
    p, q = pair(), pair("Anna", "Tom")
    ds = PromptPairDataset(pairs=[p, q], name="ioi", corruption="name_swap")
    assert isinstance(ds.pairs, tuple) and len(ds) == 2 and list(ds) == [p, q]
    assert ds[1] is q and ds[-1] is q
    assert (ds.name, ds.corruption) == ("ioi", "name_swap")
    assert hash(ds) == hash(PromptPairDataset(pairs=(p, q), name="ioi", corruption="name_swap"))


# --- JSONL ---------------------------------------------------------------------------


def test_jsonl_round_trip_and_sha256(tmp_path):
    ds = dataset(name="ioi", corruption="name_swap")
    path = tmp_path / "pairs.jsonl"
    ds.to_jsonl(path)
    assert os.listdir(tmp_path) == ["pairs.jsonl"]  # the temporary file was renamed away
    back = PromptPairDataset.from_jsonl(path)
    assert back == ds and back.sha256() == ds.sha256()
    assert ds.sha256() == hashlib.sha256(path.read_bytes()).hexdigest()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"format": FORMAT, "name": "ioi", "corruption": "name_swap"}
    assert lines[1] == {"clean": ds[0].clean, "corrupted": ds[0].corrupted, "correct": " Mary",
                        "incorrect": " John", "positions": POS}
    assert len(lines) == 1 + len(ds)


def test_to_jsonl_replaces_an_existing_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("old content\n")
    dataset().to_jsonl(path)
    assert PromptPairDataset.from_jsonl(path) == dataset()


def test_sha256_sees_every_field_but_not_position_order():
    base = dataset()
    assert base.sha256() == dataset(pair(positions=dict(reversed(POS.items()))),
                                    pair("Anna", "Tom", "park", "ball")).sha256()
    variants = [dataset(name="other"), dataset(corruption="abc"),
                dataset(pair(), pair("Anna", "Tom", "park", "drink")),
                dataset(pair(positions={**POS, "END": 12}), pair("Anna", "Tom", "park", "ball")),
                dataset(pair(incorrect=" Tom"), pair("Anna", "Tom", "park", "ball")),
                dataset(pair("Anna", "Tom", "park", "ball"), pair())]
    hashes = {v.sha256() for v in variants} | {base.sha256()}
    assert len(hashes) == len(variants) + 1
    assert len(base.sha256()) == 64 and int(base.sha256(), 16) >= 0


texts = st.text(min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(clean=texts, corrupted=texts, correct=texts, incorrect=texts, name=texts,
       positions=st.dictionaries(st.text(min_size=1, max_size=5), st.integers(0, 99), max_size=4))
def test_jsonl_round_trip_of_arbitrary_text(clean, corrupted, correct, incorrect, name, positions):
    if correct == incorrect:
        incorrect += "x"
    ds = PromptPairDataset(pairs=(PromptPair(clean=clean, corrupted=corrupted, correct=correct,
                                             incorrect=incorrect, positions=positions),),
                           name=name)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.jsonl")
        ds.to_jsonl(path)
        back = PromptPairDataset.from_jsonl(path)
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == ds.sha256()
    assert back == ds and back.sha256() == ds.sha256()
    assert dict(back[0].positions) == positions


def write(tmp_path, *lines) -> str:
    path = tmp_path / "x.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps(pair().to_json())


def good_with(**changes) -> str:
    return json.dumps({**pair().to_json(), **changes})


@pytest.mark.parametrize("lines, words", [
    ([GOOD, "{not json"], ["line 2", "not valid JSON"]),
    ([GOOD, "[1, 2]"], ["line 2", "JSON object"]),
    ([GOOD, GOOD.replace('"correct"', '"corect"')], ["line 2", "missing field 'correct'"]),
    ([GOOD[:-1] + ', "extra": 1}'], ["line 1", "unknown field 'extra'"]),
    ([good_with(correct=7)], ["line 1", "'correct'", "must be a string"]),
    ([GOOD, good_with(positions=[1, 3])], ["line 2", "'positions'", "object"]),
    ([good_with(positions={**POS, "IO": -1})], ["line 1", "'IO'", ">= 0"]),
    ([good_with(incorrect=" Mary")], ["line 1", "different"]),
    ([json.dumps({"format": "other/9"}), GOOD], ["line 1", "unknown format", FORMAT]),
    ([GOOD, json.dumps({"format": FORMAT})], ["line 2", "first line"]),
    ([json.dumps({"format": FORMAT})], ["no prompt pairs"]),
    ([], ["no prompt pairs"]),
])
def test_from_jsonl_errors_name_the_line_and_field(tmp_path, lines, words):
    with pytest.raises(DatasetError) as e:
        PromptPairDataset.from_jsonl(write(tmp_path, *lines))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_from_jsonl_without_header_and_with_blank_lines(tmp_path):
    ds = PromptPairDataset.from_jsonl(write(tmp_path, GOOD, "", GOOD))
    assert ds == PromptPairDataset(pairs=(pair(), pair()))
    assert (ds.name, ds.corruption) == ("custom", "custom")


# --- tokenize ------------------------------------------------------------------------


def test_tokenize_matches_the_vocabulary(tok):
    ds = dataset()
    tp = ds.tokenize(tok)
    vocab = tok.get_vocab()
    assert isinstance(tp, TokenizedPairs) and (tp.n_prompts, tp.n_pos) == (2, 14)
    for i, p in enumerate(ds):
        words = p.clean.replace(",", " ,").split()
        assert tp.clean_ids[i].tolist() == [vocab[w] for w in words]
        assert tp.clean_tokens[i] == tuple(words)
        assert tp.corrupted_tokens[i] == tuple(p.corrupted.replace(",", " ,").split())
        assert tp.correct_ids[i] == vocab[p.correct.strip()]
        assert tp.incorrect_ids[i] == vocab[p.incorrect.strip()]
        # independent facts of these prompts: the IO token is the answer, S2 is the subject
        assert tp.clean_ids[i, POS["IO"]] == tp.correct_ids[i]
        assert tp.clean_ids[i, POS["S2"]] == tp.incorrect_ids[i] == tp.corrupted_ids[i, POS["S1"]]
    for t in (tp.clean_ids, tp.corrupted_ids, tp.correct_ids, tp.incorrect_ids):
        assert t.dtype == torch.long
    assert tp.positions == POS
    assert ds.tokenize(tok, max_length=14).n_pos == 14


def test_tokenize_counts_the_bos(make_wordlevel_tokenizer):
    tok = make_wordlevel_tokenizer(WORDS, bos=True)
    shifted = {k: v + 1 for k, v in POS.items()}
    ds = dataset(pair(positions=shifted), pair("Anna", "Tom", positions=shifted))
    tp = ds.tokenize(tok)
    assert tp.n_pos == 15 and tp.clean_tokens[0][0] == "[BOS]"
    assert tp.clean_tokens[0][shifted["IO"]] == "Mary"
    assert tp.clean_tokens[1][shifted["END"]] == "to"
    with pytest.raises(DatasetError, match="max_length=14"):
        ds.tokenize(tok, max_length=14)


def test_tokenize_left_pads_prompts_of_different_lengths(tok):
    """Clean and corrupted of other lengths, and pairs of other lengths, share one left-padded batch:
    each prompt's own ids at the right, True in its mask, the pad id elsewhere; names stay per prompt."""
    longer = pair(clean="Then , Mary and John went to the store, John gave a drink to",
                  corrupted="Then , Mary and John went to the store, Mary gave a drink to",
                  positions={k: v + 1 for k, v in POS.items()})
    uneven = pair(corrupted="When Mary and John went to the store, Mary Anna gave a drink to",
                  corrupted_positions={**POS, "END": 14})
    tp = dataset(pair(), longer, uneven).tokenize(tok)
    vocab = tok.get_vocab()
    assert tp.n_pos == 15 and tp.padded
    for i, p in enumerate((pair(), longer, uneven)):
        for ids, mask, text in ((tp.clean_ids, tp.clean_mask, p.clean),
                                (tp.corrupted_ids, tp.corrupted_mask, p.corrupted)):
            words = text.replace(",", " ,").split()
            assert mask[i].tolist() == [False] * (15 - len(words)) + [True] * len(words)
            assert ids[i, 15 - len(words):].tolist() == [vocab[w] for w in words]
            assert (ids[i, :15 - len(words)] == tp.pad_token_id).all()
    assert tp.clean_tokens[1][tp.clean_positions[1]["S2"]] == "John"
    assert tp.corrupted_tokens[2][tp.corrupted_positions[2]["END"]] == "to"
    assert tp.clean_positions[2]["END"] == 13 and tp.corrupted_positions[0] == POS
    with pytest.raises(DatasetError, match="differ between prompts"):
        tp.positions
    assert tp.pad_attrs()["padding"] == "left"
    same = dataset().tokenize(tok)
    assert not same.padded and same.positions == POS and same.pad_attrs() == {"padding": "none"}


def test_pad_token_choice_is_recorded(tok):
    """No pad token: EOS, else BOS, else id 0; the choice is named."""
    from patchlab.data import pad_token

    class Bare:
        pad_token_id = eos_token_id = bos_token_id = None
    bare = Bare()
    assert pad_token(bare) == (0, "id 0 (no pad, EOS or BOS token)")
    bare.eos_token_id = 7
    assert pad_token(bare) == (7, "EOS (no pad token)")
    bare.pad_token_id = 3
    assert pad_token(bare) == (3, "the tokenizer's pad token")


def test_corrupted_positions_name_the_same_positions():
    with pytest.raises(DatasetError, match="'S2' is named in positions only"):
        pair(corrupted_positions={k: v for k, v in POS.items() if k != "S2"})
    p = pair(corrupted_positions={**POS, "END": 14})
    assert p.corrupted_positions["END"] == 14 and p.positions["END"] == 13
    assert pair().corrupted_positions == POS and "corrupted_positions" not in pair().to_json()
    back = PromptPairDataset.from_jsonl(_written(dataset(p)))
    assert back[0] == p and back.sha256() == dataset(p).sha256()


def _written(ds: PromptPairDataset) -> str:
    path = os.path.join(tempfile.mkdtemp(), "pairs.jsonl")
    ds.to_jsonl(path)
    return path


@pytest.mark.parametrize("role", ["correct", "incorrect"])
def test_tokenize_rejects_multi_token_answers(tok, role):
    bad = pair(**{role: " Mary Anna"})
    with pytest.raises(DatasetError) as e:
        dataset(pair(), bad).tokenize(tok)
    msg = str(e.value)
    assert "prompt 1" in msg and f"{role} answer ' Mary Anna'" in msg and "2 tokens" in msg
    assert "('Mary', 'Anna')" in msg and "single tokens" in msg


def test_tokenize_rejects_prompts_longer_than_max_length(tok):
    with pytest.raises(DatasetError) as e:
        dataset().tokenize(tok, max_length=10)
    msg = str(e.value)
    assert "prompt 0" in msg and dataset()[0].clean in msg and "max_length=10" in msg
    with pytest.raises(DatasetError, match="positive int"):
        dataset().tokenize(tok, max_length=0)


def test_tokenize_rejects_positions_outside_the_prompt(tok):
    bad = pair("Anna", "Tom", positions={**POS, "END": 14})
    with pytest.raises(DatasetError) as e:
        dataset(bad).tokenize(tok)
    msg = str(e.value)
    assert "prompt 0" in msg and "'END'=14" in msg and "outside the clean prompt" in msg and "0..13" in msg
    bad = pair("Anna", "Tom", corrupted_positions={**POS, "END": 14})
    with pytest.raises(DatasetError, match="'END'=14 is outside the corrupted prompt"):
        dataset(bad).tokenize(tok)


def test_tokenize_keeps_positions_per_pair_and_rejects_missing_names(tok):
    moved = pair("Anna", "Tom", positions={**POS, "S2": 8})
    tp = dataset(pair(), moved).tokenize(tok)
    assert tp.clean_positions[1]["S2"] == 8 and tp.clean_positions[0]["S2"] == 9

    missing = pair("Anna", "Tom", positions={k: v for k, v in POS.items() if k != "S1"})
    with pytest.raises(DatasetError, match="'S1' is in prompt 0 but not in prompt 1"):
        dataset(pair(), missing).tokenize(tok)
    extra = pair("Anna", "Tom", positions={**POS, "X": 5})
    with pytest.raises(DatasetError, match="'X' is in prompt 1 but not in prompt 0"):
        dataset(pair(), extra).tokenize(tok)
