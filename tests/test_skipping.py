"""What the engine does not recompute, and that skipping it leaves every value exact.

A patched pass skips the blocks below its first patched layer (tested throughout the exactness
tests), the columns before its first patched position (their keys and values come from the base
run's KV cache) and the unembedding of all but the answer tokens (the logit difference). Values are
compared with plain-hook forward passes that recompute everything (`tests.reference`).
"""

from __future__ import annotations

import math

import pytest
import torch

import patchlab as pl
import patchlab.kernels.patching as kpatching
import patchlab.chunking as chunking
from patchlab.components import Component as C
from patchlab.interventions import Patch
from patchlab.metrics import Metric
from patchlab.positions import PromptPositions
from patchlab.chunking import column_chunks
from patchlab.runner import first_columns

from .precision import exact_atol
from .test_interventions import answer_set_pairs
from .test_patching_exact import N_POS, random_pairs, reference_values
from .tiny_models import tiny_patch_model


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_a_pass_computes_only_the_columns_from_its_first_patched_one(family, monkeypatch):
    monkeypatch.setattr(chunking, "PASS_TOKENS", 0)  # a pass costs nothing: rows of different columns never merge
    model = tiny_patch_model(family)
    dataset = random_pairs(model.hf.config.vocab_size)
    widths = []
    last = model.adapter.block(model.hf, model.layout.n_layers - 1)
    hook = last.register_forward_pre_hook(lambda module, args, kwargs: widths.append(args[0].shape[1])
                                          if args else widths.append(kwargs["hidden_states"].shape[1]),
                                          with_kwargs=True)
    try:
        pl.patch_layer_pos(model, dataset, site="resid_pre", progress=False)
    finally:
        hook.remove()
    # The cache pass sees every column; the pass of a row patched at position p sees N_POS - p.
    expected = [N_POS] + [N_POS - p for _ in range(model.layout.n_layers) for p in range(N_POS)]
    assert sorted(widths) == sorted(expected)


def test_first_columns_are_the_earliest_column_a_row_touches():
    positions = PromptPositions.uniform(["clean", "corrupted"], n_prompts=2, n_pos=5, names={"S": 2})
    rows = [
        (Patch(C(site="resid_pre", layer=0, pos=3)),),
        (Patch(C(site="resid_pre", layer=1, pos=[4, 2])), Patch(C(site="mlp_out", layer=0, pos=1))),
        (Patch(C(site="head", layer=0, head=0)),),  # every position
        (Patch(C(site="attn_out", layer=1, pos="S")),),
        (Patch(C(site="resid_pre", layer=1, pos=-1)),),  # from the end
        (Patch(C(site="pattern", layer=1, head=0, pos=4)),),  # a row over key positions: everything
    ]
    assert first_columns(rows, positions, "corrupted") == [3, 1, 0, 2, 4, 0]


def brute_force_cost(starts, cols, limit, n_prompts, width):
    """The least cost of any partition of each layer's rows into runs of consecutive first columns."""
    best = 0
    for layer in set(starts):
        columns = sorted({c for s, c in zip(starts, cols) if s == layer})
        count = {c: sum(1 for s, k in zip(starts, cols) if s == layer and k == c) for c in columns}
        options = []
        for mask in range(2 ** (len(columns) - 1)):  # a cut after column i where bit i is set
            runs, run = [], [columns[0]]
            for i, c in enumerate(columns[1:]):
                if mask >> i & 1:
                    runs.append(run)
                    run = []
                run.append(c)
            runs.append(run)
            options.append(sum(math.ceil(sum(count[c] for c in r) / limit) * chunking.PASS_TOKENS
                               + sum(count[c] for c in r) * n_prompts * (width - r[0]) for r in runs))
        best += min(options)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_column_chunks_cost_no_more_than_the_best_partition(seed):
    g = torch.Generator().manual_seed(seed)
    n_rows, width, n_prompts, limit = 14, 9, int(torch.randint(1, 12, (1,), generator=g)), 4
    starts = torch.randint(0, 3, (n_rows,), generator=g).tolist()
    cols = torch.randint(0, width, (n_rows,), generator=g).tolist()
    chunks = column_chunks(starts, cols, limit, n_prompts, width)
    assert sorted(r for chunk in chunks for r in chunk) == list(range(n_rows))
    assert all(len(chunk) <= limit and len({starts[r] for r in chunk}) == 1 for chunk in chunks)
    cost = sum(chunking.PASS_TOKENS + len(chunk) * n_prompts * (width - min(cols[r] for r in chunk))
               for chunk in chunks)
    assert cost <= brute_force_cost(starts, cols, limit, n_prompts, width)  # a split run starts later, if anything


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_metrics_over_many_unembedding_slabs_equal_reference(family, monkeypatch):
    """The unembedding of every chunk runs after the passes, in slabs: one prompt's rows at a time here."""
    monkeypatch.setattr(kpatching, "LOGIT_ELEMENTS", 1)
    model = tiny_patch_model(family)
    dataset = random_pairs(model.hf.config.vocab_size)
    tokens = dataset.tokenize(model.tokenizer)
    comps = [C(site="resid_pre", layer=1, pos=1), C(site="head", layer=0, head=1), C(site="mlp_out", layer=2, pos=3)]
    for metric in Metric:
        ds = pl.patch_components(model, dataset, comps, metric=metric, progress=False)
        expected = reference_values(model, tokens, comps, "denoising", metric=metric)
        got = torch.from_numpy(ds.patched.values)
        assert torch.allclose(got, expected, atol=exact_atol(model, expected), rtol=0), metric


def test_answer_set_logit_difference_from_answer_logits_equals_reference():
    """The logit difference reads only the answers' rows of the unembedding; with answer sets
    padded with -1 it still equals the logsumexp over the full logits."""
    model = tiny_patch_model("llama")
    dataset = answer_set_pairs(model.hf.config.vocab_size)
    tokens = dataset.tokenize(model.tokenizer)
    comps = [C(site="resid_pre", layer=1, pos=3), C(site="head", layer=2, head=0)]
    ds = pl.patch_components(model, dataset, comps, progress=False)
    expected = reference_values(model, tokens, comps, "denoising", metric=Metric.LOGIT_DIFF)
    got = torch.from_numpy(ds.patched.values)
    assert torch.allclose(got, expected, atol=exact_atol(model, expected), rtol=0), (got - expected).abs().max()
