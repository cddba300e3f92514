"""Left padding in the node-level engine (the mechanism of the real-prompts issue).

The core invariant, on tiny random models of every family in float64: a prompt's values in a
left-padded batch of mixed lengths (5, 8 and 11 tokens), with the attention mask and position ids
that count real tokens only, equal that prompt run alone, unpadded, through the independent hook
reference (within 1e-9, or float32 precision where Hugging Face takes the attention softmax in
float32, `tests.precision.FLOAT32_SOFTMAX`). Positions are given from the end, which left padding aligns; padding never receives an
intervention, and a mean is taken over real tokens only.
"""

from __future__ import annotations

import pytest
import torch

import patchlab as pl
from patchlab.metrics import Metric, Targets
from patchlab.runner import CachePass, run_rows

from .precision import exact_atol
from .reference import RefPatch, reference_cache, reference_patched_logits
from .test_interventions import pattern_edits, reference_pattern
from .tiny_models import ALL_FAMILIES, tiny_patch_model

LENGTHS = (5, 8, 11)
C = pl.Component


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def batch(request):
    model = tiny_patch_model(request.param)
    g = torch.Generator().manual_seed(0)
    vocab = model.hf.config.vocab_size
    clean, corrupted = [], []
    for n in LENGTHS:
        c = torch.randint(5, vocab - 3, (n,), generator=g)
        x = c.clone()
        x[[0, n - 2]] = torch.randint(5, vocab - 3, (2,), generator=g)
        clean.append(c)
        corrupted.append(x)
    correct = torch.randint(5, vocab - 4, (len(LENGTHS),), generator=g)
    return model, clean, corrupted, Targets(correct=correct, incorrect=correct + 1)


def left_padded(seqs, pad: int = 0):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):], mask[i, n - len(s):] = s, True
    return ids, mask


def rows_for(model):
    last = model.layout.n_layers - 1
    v = torch.linspace(-1, 1, model.layout.d_model, dtype=torch.float64)
    return [
        [pl.Patch(C(site="resid_pre", layer=1, pos=-1))],
        [pl.Patch(C(site="head", layer=0, head=1, pos=[-1, -2])), pl.Patch(C(site="mlp_out", layer=0, pos=-5))],
        [pl.Ablate(C(site="attn_out", layer=last, pos=[-1, -3]), how="mean")],
        [pl.Ablate(C(site="mlp_out", layer=0), how="mean")],                  # the mean over real tokens
        [pl.Ablate(C(site="resid_post", layer=0), how="zero")],                 # every real token
        [pl.Steer(C(site="resid_pre", layer=last, pos=-2), v, scale=3.0), pl.Scale(C(site="q", layer=last, head=0), 0.5)],
        [pl.Patch(C(site="resid_pre", layer=0))],                             # all positions: the whole clean prompt
        [pl.Patch(C(site="pattern", layer=last, head=1, pos=-1)), pl.Freeze(C(site="v", layer=last, head=0))],
    ]


def reference(model, clean, corrupted, rows, targets) -> torch.Tensor:
    """Metric per (row, prompt), each prompt run alone and unpadded with plain hooks."""
    hf = model.hf
    sites = sorted({(i.component.site.value, i.component.layer) for row in rows for i in row
                    if i.component.site is not pl.Site.PATTERN})
    caches = {run: [reference_cache(hf, ids[None], sites) for ids in seqs]
              for run, seqs in (("clean", clean), ("corrupted", corrupted))}
    out = torch.zeros(len(rows), len(clean), dtype=torch.float64)
    for r, row in enumerate(rows):
        for p, ids in enumerate(corrupted):
            n = len(ids)
            sets, patches, edits = [], [], {}  # setting interventions first, then scale and steer
            for i in row:
                c = i.component
                pos = None if c.pos is None else tuple(sorted(n + q for q in c.pos))
                spot = dict(site=c.site.value, layer=c.layer, head=c.head, pos=pos)
                key = (c.site.value, c.layer)
                if c.site is pl.Site.PATTERN:
                    value = reference_pattern(hf, clean[p][None], c.layer)[:, c.head][:, list(pos)]
                    edits.setdefault(c.layer, []).append((c.head, pos, lambda x, value=value: value))
                elif isinstance(i, pl.Patch):
                    sets.append(RefPatch(**spot, value=caches[i.source.value][p][key]))
                elif isinstance(i, pl.Freeze):
                    sets.append(RefPatch(**spot, value=caches["corrupted"][p][key]))
                elif isinstance(i, pl.Ablate) and i.how.value == "zero":
                    sets.append(RefPatch(**spot, fn=torch.zeros_like))
                elif isinstance(i, pl.Ablate):  # mean over the prompts that reach the same offset from the end
                    value = torch.zeros_like(caches["corrupted"][p][key])
                    for q in (range(-n, 0) if c.pos is None else c.pos):
                        value[:, n + q] = torch.stack([cache[key][0, len(s) + q] for cache, s in
                                                       zip(caches["corrupted"], corrupted) if len(s) + q >= 0]).mean(0)
                    sets.append(RefPatch(**spot, value=value))
                elif isinstance(i, pl.Scale):
                    patches.append(RefPatch(**spot, fn=lambda x, f=i.factor: x * f))
                else:
                    patches.append(RefPatch(**spot, fn=lambda x, v=i.vector, s=i.scale: x + s * v))
            with pattern_edits(hf, edits):
                logits = reference_patched_logits(hf, ids[None], sets + patches)
            t = Targets(correct=targets.correct[p:p + 1], incorrect=targets.incorrect[p:p + 1])
            out[r, p] = Metric.LOGIT_DIFF(logits, t)[0]
    return out


@pytest.mark.parametrize("length_groups", [True, False], ids=["length groups", "one batch"])
def test_padded_mixed_lengths_equal_each_prompt_alone(batch, length_groups):
    """Both ways of running the padded batch: one pass per length group (here each prompt its own,
    `patchlab.chunking.length_buckets`), and one pass over the whole batch."""
    model, clean, corrupted, targets = batch
    clean_ids, clean_mask = left_padded(clean)
    corrupted_ids, corrupted_mask = left_padded(corrupted)
    passes = [CachePass(("clean", "corrupted"), ids=torch.cat([clean_ids, corrupted_ids]),
                        mask=torch.cat([clean_mask, corrupted_mask]))]
    rows = rows_for(model)
    result = run_rows(model, passes=passes, base="corrupted", base_ids=corrupted_ids, rows=rows,
                      metric=Metric.LOGIT_DIFF, targets=targets, progress=False, max_rows=3,
                      length_groups=length_groups)
    expected = reference(model, clean, corrupted, rows, targets)
    tol = exact_atol(model, expected, padded=True)
    assert torch.allclose(result.values, expected, atol=tol, rtol=0), (result.values - expected).abs().max()
    for run, seqs in (("clean", clean), ("corrupted", corrupted)):
        alone = torch.stack([Metric.LOGIT_DIFF(model.hf(ids[None]).logits[:, -1].detach(),
                                               Targets(correct=targets.correct[p:p + 1],
                                                       incorrect=targets.incorrect[p:p + 1]))[0]
                             for p, ids in enumerate(seqs)])
        assert torch.allclose(result.runs[run], alone, atol=tol, rtol=0), run


def test_length_buckets_cut_where_padding_costs_more_than_a_pass():
    """Closed forms: the cheapest grouping of sorted lengths, counting a pass as 5% of the batch."""
    from patchlab.chunking import length_buckets
    groups = length_buckets(torch.tensor([11, 5, 8]), 11)
    assert [(g.tolist(), col) for g, col in groups] == [([1], 6), ([2], 3), ([0], 0)]  # 24 + 2 passes < 33
    assert length_buckets(torch.tensor([10, 10, 9]), 10) is None  # saving 1 token costs a pass of 1.5
    assert length_buckets(torch.tensor([7, 7]), 7) is None
    many = length_buckets(torch.tensor(list(range(1, 21))), 20, max_buckets=2)
    assert [len(g) for g, _ in many] == [10, 10] and [col for _, col in many] == [10, 0]  # 100 + 200 + 20
