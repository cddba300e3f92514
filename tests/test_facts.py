"""Tests of patchlab.facts: fact validation, JSONL storage, subject positions, check_facts.

Subject positions are checked by decoding the found tokens with the real SmolLM2
tokenizer; check_facts against an independent plain forward of the model.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from patchlab.data import DatasetError
from patchlab.facts import (
    FACTS_FORMAT,
    Fact,
    FactDataset,
    TokenizedFacts,
    builtin_facts,
    check_facts,
)

from .precision import EXACT

EIFFEL = Fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris")
PUTIN = Fact("The mother tongue of Vladimir Putin is", "Vladimir Putin", " Russian",
             counterfactual_subject="Angela Merkel")


def test_fact_validation():
    with pytest.raises(DatasetError, match=r"'Eiffel Towers'.*does not occur.*fix"):
        Fact("The Eiffel Tower is in", "Eiffel Towers", " Paris")
    with pytest.raises(DatasetError, match="answer"):
        Fact("The Eiffel Tower is in", "Eiffel Tower", "")
    with pytest.raises(DatasetError, match="counterfactual_subject"):
        Fact("The Eiffel Tower is in", "Eiffel Tower", " Paris", counterfactual_subject=3)
    assert Fact("The Eiffel Tower is in", "Eiffel Tower", " Paris").answer == " Paris"
    with pytest.raises(DatasetError, match="at least one Fact"):
        FactDataset(())
    with pytest.raises(DatasetError, match=r"facts\[0\] is a dict"):
        FactDataset(({"prompt": "x"},))


def test_dataset_sequence_and_jsonl_round_trip(tmp_path):
    d = FactDataset((EIFFEL, PUTIN), name="mine")
    assert len(d) == 2 and list(d) == [EIFFEL, PUTIN] and d[1] is PUTIN
    path = tmp_path / "facts.jsonl"
    d.to_jsonl(path)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"format": FACTS_FORMAT, "name": "mine"}
    assert json.loads(lines[1]) == {"prompt": EIFFEL.prompt, "subject": "The Eiffel Tower",
                                    "answer": " Paris"}
    assert json.loads(lines[2])["counterfactual_subject"] == "Angela Merkel"
    assert FactDataset.from_jsonl(path) == d
    assert d.sha256() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert FactDataset((EIFFEL,), name="mine").sha256() != d.sha256()
    # users' own files: no header; the name comes from the file
    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps(PUTIN.to_json()) + "\n\n" + json.dumps(EIFFEL.to_json()) + "\n")
    assert FactDataset.from_jsonl(own) == FactDataset((PUTIN, EIFFEL), name="own")


@pytest.mark.parametrize("line, words", [
    ('{"prompt": "The capital of France is", "subject": "Spain", "answer": " Paris"}',
     ["'Spain'", "does not occur"]),
    ('{"prompt": "The capital of France is", "answer": " Paris"}', ["missing field 'subject'"]),
    ('{"prompt": "a b", "subject": "a", "answer": " c", "object": "d"}', ["unknown field 'object'"]),
    ('{"prompt": "a b", "subject": "a", "answer": 3}', ["'answer' must be a string"]),
    ('{"prompt": "a b", ', ["not valid JSON"]),
    ('["a", "b"]', ["expected a JSON object"]),
    ('{"format": "other/1"}', ["header"]),
])
def test_from_jsonl_errors_name_the_line(tmp_path, line, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(EIFFEL.to_json()) + "\n" + line + "\n")
    with pytest.raises(DatasetError) as e:
        FactDataset.from_jsonl(path)
    assert f"{path}, line 2" in str(e.value)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_subject_positions_decode_to_the_subject(smollm2_tokenizer):
    tok = smollm2_tokenizer
    facts = (EIFFEL, PUTIN, Fact("The capital of France is", "France", " Paris"),
             Fact("Roger Federer plays the sport of", "Roger Federer", " tennis"))
    t = FactDataset(facts).tokenize(tok)
    assert isinstance(t, TokenizedFacts) and len(t) == 4
    for fact, ids, span, tokens in zip(facts, t.ids, t.subject_positions, t.tokens):
        assert ids.dtype == torch.long and ids.ndim == 1
        assert ids.tolist() == tok(fact.prompt)["input_ids"]
        assert tok.decode(ids[span.start:span.stop]).strip() == fact.subject
        assert tok.decode(ids[:span.start]).strip() == fact.prompt[:fact.prompt.index(fact.subject)].strip()
        assert "".join(tokens) == fact.prompt
    assert t.answer_ids.tolist() == [tok(f.answer, add_special_tokens=False)["input_ids"][0]
                                     for f in facts]
    assert tok.decode(t.answer_ids[:2]) == " Paris Russian"


def test_named_positions(smollm2_tokenizer):
    t = FactDataset((EIFFEL, PUTIN)).tokenize(smollm2_tokenizer)
    # "The| E|iffel| Tower| is| located| in| the| city| of"
    assert t.tokens[0][:4] == ("The", " E", "iffel", " Tower")
    assert dict(t.positions[0]) == {"first_subject": 0, "middle_subject": 1, "last_subject": 3,
                                    "first_subsequent": 4, "last": 9}
    # "The| mother| tongue| of| Vladimir| Putin| is": the subsequent token is the last one
    assert dict(t.positions[1]) == {"first_subject": 4, "middle_subject": 4, "last_subject": 5,
                                    "first_subsequent": 6, "last": 6}
    # a subject that ends the prompt has no subsequent token
    end = FactDataset((Fact("I love Paris", "Paris", " and"),)).tokenize(smollm2_tokenizer)
    assert dict(end.positions[0]) == {"first_subject": 2, "middle_subject": 2,
                                      "last_subject": 2, "last": 2}


def test_subject_off_token_boundaries_is_an_error(smollm2_tokenizer, make_wordlevel_tokenizer):
    bad = Fact("The Eiffel Tower is located in the city of", "Eiffel Tow", " Paris")
    with pytest.raises(DatasetError) as e:
        FactDataset((bad,)).tokenize(smollm2_tokenizer)
    msg = str(e.value)
    assert "'Eiffel Tow' does not align with token boundaries" in msg
    assert "' Tower'" in msg and "put the subject on token boundaries" in msg
    # "iffel" is a whole token, "ffel" starts inside it
    assert FactDataset((Fact(EIFFEL.prompt, "iffel Tower", " Paris"),)).tokenize(
        smollm2_tokenizer).subject_positions[0] == range(2, 4)
    with pytest.raises(DatasetError, match="does not align"):
        FactDataset((Fact(EIFFEL.prompt, "ffel Tower", " Paris"),)).tokenize(smollm2_tokenizer)
    # a leading space in the subject is allowed: it belongs to the token
    spaced = FactDataset((Fact(EIFFEL.prompt, " Eiffel Tower", " Paris"),)).tokenize(smollm2_tokenizer)
    assert spaced.subject_positions[0] == range(1, 4)
    words = make_wordlevel_tokenizer(["The", "capital", "of", "France", "is", "Paris"], bos=True)
    ok = FactDataset((Fact("The capital of France is", "France", " Paris"),)).tokenize(words)
    assert ok.subject_positions[0] == range(4, 5)  # BOS is position 0
    assert ok.answer_ids.tolist() == [words.convert_tokens_to_ids("Paris")]
    with pytest.raises(DatasetError, match="does not align"):
        FactDataset((Fact("The capital of France is", "Fran", " Paris"),)).tokenize(words)
    with pytest.raises(DatasetError, match="unknown first token"):
        FactDataset((Fact("The capital of France is", "France", " Berlin"),)).tokenize(words)


def test_builtin_facts_tokenize(smollm2_tokenizer):
    d = builtin_facts()
    assert 35 <= len(d) <= 50 and len(set(d)) == len(d)
    t = d.tokenize(smollm2_tokenizer)
    sizes = {len(span) for span in t.subject_positions}
    assert sizes == {1, 2, 3, 4}
    for fact, ids, span in zip(d, t.ids, t.subject_positions):
        assert smollm2_tokenizer.decode(ids[span.start:span.stop]).strip() == fact.subject


@pytest.mark.slow
def test_check_facts_keeps_what_the_model_knows(smollm2_f64):
    smollm2 = smollm2_f64  # float64, so that the plain forward below is an exact reference
    d = builtin_facts()
    kept, results = check_facts(smollm2, d)
    assert results.sizes["fact"] == len(d)
    assert list(results["answer"].values) == [f.answer for f in d]
    assert int(results["kept"].sum()) == len(kept) and len(kept) >= 25
    assert len(kept) < len(d)  # some built-in facts are beyond a 135M model
    assert list(kept) == [f for f, k in zip(d, results["kept"].values) if k]
    tok = smollm2.tokenizer
    for i, fact in enumerate(d):  # independent plain forward
        ids = tok(fact.prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            probs = smollm2.hf(ids).logits[0, -1].softmax(-1)
        answer = tok(fact.answer, add_special_tokens=False)["input_ids"][0]
        assert float(results["prob"][i]) == pytest.approx(float(probs[answer]), abs=EXACT)
        top1 = int(probs.argmax()) == answer
        assert bool(results["top1"][i]) == top1
        assert bool(results["kept"][i]) == (top1 and float(probs[answer]) >= 0.1)
    strict, strict_results = check_facts(smollm2, d, min_prob=0.5)
    assert 0 < len(strict) < len(kept)
    assert bool((strict_results["prob"].where(strict_results["kept"]) >= 0.5).sum()
                == len(strict))
    with pytest.raises(ValueError, match="min_prob"):
        check_facts(smollm2, d, min_prob=1.5)
    kp = results["prob"].where(results["kept"], drop=True)
    print(f"kept {len(kept)}/{len(d)}; p min {float(kp.min()):.3f} "
          f"median {float(kp.median()):.3f} max {float(kp.max()):.3f}")
