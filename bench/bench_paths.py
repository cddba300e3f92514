"""Benchmark: path patching sweeps, in plain-forward-pass equivalents.

For a GPT-2-small-shaped model (random weights) and SmolLM2-135M, 8 prompts:

- every head -> logits;
- every head (before the receivers) -> the q, k and v of one receiver set (3 heads of a late layer);

timed side by side with one plain ``transformers`` forward pass of the same batch.
Prints forward passes' worth of compute per (sender, receiver-set) pair (target:
at most 2) and checks that the clean and corrupted caches are computed once per
sweep (by counting the path program's `cache_runs` calls).

    python bench/bench_paths.py [--skip-smollm2]
"""

from __future__ import annotations

import argparse
import time

import torch

import patchlab as pl
import patchlab.kernels.paths as kpaths
from patchlab.graph import Node, NodeKind
from patchlab.paths import path_patch_heads

from benchlib import gpt2_small_shaped, random_dataset


def bench(model: pl.PatchModel, dataset: pl.PromptPairDataset) -> None:
    tokens = dataset.tokenize(model.tokenizer)
    lay = model.layout
    with torch.no_grad():
        model.hf(tokens.clean_ids)
        start = time.perf_counter()
        for _ in range(5):
            model.hf(tokens.clean_ids)
        forward = (time.perf_counter() - start) / 5
    calls = []
    original = kpaths.cache_runs
    kpaths.cache_runs = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        start = time.perf_counter()
        path_patch_heads(model, dataset, receivers="logits", progress=False)
        t_logits = time.perf_counter() - start
        receivers = [Node(NodeKind.HEAD, lay.n_layers - 2, h) for h in range(3)]
        start = time.perf_counter()
        path_patch_heads(model, dataset, receivers=receivers, progress=False)
        t_qkv = time.perf_counter() - start
    finally:
        kpaths.cache_runs = original
    pairs_logits = lay.n_layers * lay.n_heads
    pairs_qkv = 3 * (lay.n_layers - 2) * lay.n_heads  # senders before the receivers, x 3 channels
    print(f"\n{model.model_id}: {tokens.n_prompts} prompts x {tokens.n_pos} tokens, {torch.get_num_threads()} threads; "
          f"one plain forward {forward * 1000:.0f} ms; cache_runs calls per sweep: {len(calls) // 2}")
    print(f"  every head -> logits          {t_logits:7.2f} s for {pairs_logits} pairs = "
          f"{t_logits / (pairs_logits * forward):.2f} forwards per pair")
    print(f"  every head -> 3 heads' q/k/v  {t_qkv:7.2f} s for {pairs_qkv} pairs = "
          f"{t_qkv / (pairs_qkv * forward):.2f} forwards per pair")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    bench(gpt2_small_shaped(), random_dataset(args.prompts, 16))
    if not args.skip_smollm2:
        model = pl.load_model("smollm2-135m")
        bench(model, pl.ioi_dataset(model.tokenizer, n_prompts=args.prompts, corruption="abc", seed=0))


if __name__ == "__main__":
    main()
