"""Benchmark: a head-output sweep (every head, all positions, denoising, logit difference).

Three ways of computing the same rows, timed side by side in one run:

1. patchlab: `patch_heads` (batch expansion, one vectorised write per layer,
   lower layers skipped, final-position logits only);
2. naive: one nnsight trace per head, patching that head's output;
3. plain: one plain ``transformers`` forward pass per head with no patching at all
   (the floor for any method that reruns the model once per row).

on a GPT-2-small-shaped model (random weights: only shapes matter for time) and
on SmolLM2-135M. Prints seconds and ratios. Not a test: machines are noisy, so
compare the ratios of one run, not absolute times across runs.

    python bench/bench_head_sweep.py [--prompts 8] [--skip-smollm2]
"""

from __future__ import annotations

import argparse

import nnsight
import torch
from benchlib import gpt2_small_shaped, plain_forwards, random_dataset, timed

import patchlab as pl
from patchlab.components import Site


def naive_loop(model: pl.PatchModel, tokens) -> torch.Tensor:
    """One trace per head: write the clean head output into the corrupted run."""
    adapter, lay, nn = model.adapter, model.layout, model.nn
    with torch.no_grad(), nn.trace(tokens.clean_ids):
        clean_z = nnsight.save([adapter.module(nn, adapter.point(Site.HEAD, L)).input.clone()
                                for L in range(lay.n_layers)])
    out = []
    for layer in range(lay.n_layers):
        for head in range(lay.n_heads):
            cols = slice(head * lay.d_head, (head + 1) * lay.d_head)
            with torch.no_grad(), nn.trace(tokens.corrupted_ids):
                module = adapter.module(nn, adapter.point(Site.HEAD, layer))
                z = module.input.clone()
                z[..., cols] = clean_z[layer][..., cols]
                module.input = z
                logits = nnsight.save(nn.output.logits[:, -1])
            out.append(logits)
    return torch.stack(out)


def bench(model: pl.PatchModel, dataset: pl.PromptPairDataset) -> None:
    tokens = dataset.tokenize(model.tokenizer)
    pl.patch_heads(model, dataset, layers=[0], progress=False)  # warm-up
    rows = model.layout.n_layers * model.layout.n_heads
    t_patchlab = timed(lambda: pl.patch_heads(model, dataset, progress=False))[0]
    t_naive = timed(lambda: naive_loop(model, tokens))[0]
    t_plain = timed(lambda: plain_forwards(model, tokens.corrupted_ids, rows))[0]
    print(f"\n{model.model_id}: {rows} heads, {tokens.n_prompts} prompts x {tokens.n_pos} tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"  patchlab patch_heads       {t_patchlab:7.2f} s")
    print(f"  naive trace per head       {t_naive:7.2f} s   ({t_naive / t_patchlab:.2f}x patchlab)")
    print(f"  plain forward per head     {t_plain:7.2f} s   ({t_plain / t_patchlab:.2f}x patchlab)")
    print(f"  patchlab / plain forwards  {t_patchlab / t_plain:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    bench(gpt2_small_shaped(), random_dataset(args.prompts, 16))
    if not args.skip_smollm2:
        model = pl.load_model("smollm2-135m")
        bench(model, pl.ioi_dataset(model.tokenizer, n_prompts=args.prompts, seed=0))


if __name__ == "__main__":
    main()
