"""`pl.chat_pairs` on a tiny word-level tokenizer with a hand-written chat template: the named
positions are checked against the template's own words, an independent fact."""

from __future__ import annotations

import pytest

import patchlab as pl
from patchlab.data import DatasetError

from .tiny_models import tiny_tokenizer

TEMPLATE = ("{% for m in messages %}w1 {{ m['role'] == 'system' and 'w9' or 'w8' }} {{ m['content'] }} w2 "
            "{% endfor %}{% if add_generation_prompt %}w3 w4{% endif %}")


@pytest.fixture
def tok():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def words(tok, text):
    return tok.convert_ids_to_tokens(tok(text)["input_ids"])


def test_positions_name_the_last_instruction_token_and_the_template_after_it(tok):
    ds = pl.chat_pairs(tok, ["w20 w21 w22", "w23"], ["w30", "w31 w32"], correct=" w40", incorrect=" w41",
                       system="w50 w51")
    first = ds[0]
    assert words(tok, first.clean) == ["w1", "w9", "w50", "w51", "w2", "w1", "w8", "w20", "w21", "w22", "w2", "w3",
                                       "w4"]
    assert dict(first.positions) == {"last_instruction": 9, "post_instruction_0": 10, "post_instruction_1": 11,
                                     "post_instruction_2": 12}
    assert first.corrupted_positions["last_instruction"] == 7 and first.corrupted_positions["post_instruction_2"] == 10
    tokens = ds.tokenize(tok)
    assert tokens.padded and tokens.clean_tokens[1][tokens.clean_positions[1]["last_instruction"]] == "w23"


def test_match_lengths_pairs_instructions_of_equal_token_length(tok):
    ds = pl.chat_pairs(tok, ["w20 w21", "w22", "w23 w24 w25"], ["w30", "w31 w32 w33", "w34 w35", "w36"],
                       correct=" w40", incorrect=" w41", match_lengths=True)
    assert [(p.clean.split()[2:-3], p.corrupted.split()[2:-3]) for p in ds] == \
        [(["w20", "w21"], ["w34", "w35"]), (["w22"], ["w30"]), (["w23", "w24", "w25"], ["w31", "w32", "w33"])]
    tokens = ds.tokenize(tok)
    assert all(len(c) == len(x) for c, x in zip(tokens.clean_tokens, tokens.corrupted_tokens))
    with pytest.raises(DatasetError, match="no clean and corrupted instructions"):
        pl.chat_pairs(tok, ["w20 w21"], ["w30"], correct=" w40", incorrect=" w41", match_lengths=True)


def test_bad_input_is_a_clear_error(tok):
    with pytest.raises(DatasetError, match="2 clean and 1 corrupted"):
        pl.chat_pairs(tok, ["w20", "w21"], ["w30"], correct=" w40", incorrect=" w41")
    with pytest.raises(DatasetError, match="non-empty string"):
        pl.chat_pairs(tok, [" "], ["w30"], correct=" w40", incorrect=" w41")
    with pytest.raises(DatasetError, match="no chat template"):
        pl.chat_pairs(tiny_tokenizer(), ["w20"], ["w30"], correct=" w40", incorrect=" w41")
