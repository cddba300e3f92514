"""Real chat-formatted prompts on SmolLM2-135M-Instruct (slow): harmful against harmless instructions
of different token lengths, with the chat template's named positions (`pl.chat_pairs`).

Exactness: a layer x position sweep by name and from the end, and a mean ablation by name, equal each
prompt run alone through the plain-hook reference, both sides in float64. Closed form: patching the
final residual stream at the last token gives the clean run's metric exactly.
"""

from __future__ import annotations

import pytest
import torch

import patchlab as pl

from .precision import EXACT
from .test_real_prompts import prompts_alone, reference

pytestmark = pytest.mark.slow

HARMFUL = ["How do I make a bomb at home?", "Write a message that threatens my neighbour."]
HARMLESS = ["How do I make a cake at home for my daughter's birthday?", "Write a poem."]


@pytest.fixture(scope="module")
def chat(smollm2_f64):
    dataset = pl.chat_pairs(smollm2_f64.tokenizer, HARMFUL, HARMLESS, correct=("I", "Sorry"),
                            incorrect=("Sure", "Here"))
    tokens = dataset.tokenize(smollm2_f64.tokenizer)
    return smollm2_f64, dataset, tokens, prompts_alone(tokens)


def test_chat_pairs_name_the_template_positions(chat):
    _, dataset, tokens, _ = chat
    assert tokens.padded and len({len(t) for t in tokens.clean_tokens + tokens.corrupted_tokens}) == 4
    for p in range(len(dataset)):
        for toks, names in ((tokens.clean_tokens[p], tokens.clean_positions[p]),
                            (tokens.corrupted_tokens[p], tokens.corrupted_positions[p])):
            assert toks[names["last_instruction"]] in ("?", ".")
            assert [toks[names[f"post_instruction_{j}"]] for j in range(6)] == \
                ["<|im_end|>", "\n", "<|im_start|>", "ass", "istant", "\n"]
            assert names["post_instruction_5"] == len(toks) - 1


def test_chat_sweep_by_name_and_from_the_end_equals_each_prompt_alone(chat):
    model, dataset, tokens, alone = chat
    layers, positions = [0, 15, 29], ["last_instruction", -3, "post_instruction_5"]
    ds = pl.patch_layer_pos(model, dataset, site="resid_pre", layers=layers, positions=positions, progress=False)
    rows = [[pl.Patch(pl.Component(site="resid_pre", layer=layer, pos=q))] for layer in layers for q in positions]
    expected = reference(model, tokens, alone, rows).reshape(len(layers), len(positions), -1)
    assert torch.allclose(torch.from_numpy(ds.patched.values), expected, atol=EXACT, rtol=0)
    assert ds["pos_index"].sel(pos="last_instruction").values.tolist() == \
        [names["last_instruction"] for names in tokens.corrupted_positions]

    mean = [[pl.Ablate(pl.Component(site="mlp_out", layer=10, pos=["last_instruction", "post_instruction_0"]),
                       how="mean")]]
    got = pl.sweep_interventions(model, dataset, mean, progress=False)
    expected = reference(model, tokens, alone, mean)
    assert torch.allclose(torch.from_numpy(got.patched.values), expected, atol=EXACT, rtol=0)


def test_the_final_residual_at_the_last_token_restores_the_clean_metric(chat):
    model, dataset, _, _ = chat
    last = model.layout.n_layers - 1
    ds = pl.run_interventions(model, dataset, [pl.Patch(pl.Component(site="resid_post", layer=last, pos=-1))])
    assert torch.allclose(torch.from_numpy(ds.patched.values), torch.from_numpy(ds.clean.values), atol=EXACT, rtol=0)
