"""Benchmark: what padding costs a sweep over chat prompts of different lengths, on SmolLM2-135M.

Harmful against harmless instructions (``../shared/data/refusal/*_test.json``) in SmolLM2's chat
template (`pl.chat_pairs`), a layer x position sweep at the post-instruction positions. Timed side by
side in one run:

1. one batch: the whole dataset as one left-padded batch (`patchlab.chunking.MAX_BUCKETS = 1`);
2. length groups: what patchlab does by default: each chunk of rows runs one pass per group of
   similar length (`patchlab.chunking.length_buckets`), padded to its group's longest prompt only;
3. separate sweeps: the pairs split by hand into `--buckets` datasets of similar length, each its own
   sweep (for comparison: the same saving, but every sweep caches its runs again);
4. matched: `match_lengths=True` pairs of equal lengths, for reference.

Prints the padded-token fraction (padding / all tokens the patched passes compute) and the seconds. Not a test:
compare the ratios of one run.

    python bench/bench_padding.py [--pairs 16] [--buckets 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import patchlab as pl
import patchlab.chunking as chunking

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "refusal"


def instructions(name: str, n: int) -> list[str]:
    return [r["instruction"] for r in json.loads((DATA / f"{name}_test.json").read_text())[:n]]


def padded_fraction(tokens) -> float:
    """Padding's share of the tokens the patched passes compute (they run the corrupted prompts)."""
    return 1 - int(tokens.corrupted_mask.sum()) / tokens.corrupted_mask.numel()


def sweep(model, dataset):
    t = time.perf_counter()
    pl.patch_layer_pos(model, dataset, layers=range(0, 30, 3),
                       positions=["last_instruction"] + [f"post_instruction_{j}" for j in range(6)], progress=False)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--buckets", type=int, default=4)
    args = parser.parse_args()
    model = pl.load_model("smollm2-135m")
    answers = dict(correct=("I", "Sorry"), incorrect=("Sure", "Here"))
    dataset = pl.chat_pairs(model.tokenizer, instructions("harmful", args.pairs), instructions("harmless", args.pairs),
                            **answers)
    tokens = dataset.tokenize(model.tokenizer)
    lengths = tokens.corrupted_mask.sum(1).tolist()
    order = sorted(range(len(dataset)), key=lambda i: lengths[i])
    size = -(-len(order) // args.buckets)
    buckets = [pl.PromptPairDataset(pairs=[dataset[i] for i in order[k:k + size]]) for k in range(0, len(order), size)]
    bucket_fraction = sum(padded_fraction(b.tokenize(model.tokenizer)) * len(b) for b in buckets) / len(dataset)
    pool = pl.chat_pairs(model.tokenizer, instructions("harmful", args.pairs),
                         instructions("harmless", 600), match_lengths=True, **answers)

    sweep(model, buckets[0])  # warm up
    groups = chunking.length_buckets(tokens.corrupted_mask.sum(1), tokens.n_pos)
    group_tokens = sum(len(g) * (tokens.n_pos - col) for g, col in groups) if groups else tokens.corrupted_mask.numel()
    default, chunking.MAX_BUCKETS = chunking.MAX_BUCKETS, 1
    padded = sweep(model, dataset)
    chunking.MAX_BUCKETS = default
    grouped = sweep(model, dataset)
    by_length = sum(sweep(model, b) for b in buckets)
    matched = sweep(model, pool)
    print(f"{len(dataset)} pairs, {min(tokens.clean_mask.sum(1).tolist() + tokens.corrupted_mask.sum(1).tolist())}"
          f"-{tokens.n_pos} tokens; 10 layers x 7 positions")
    real = int(tokens.corrupted_mask.sum())
    print(f"one batch:                padded-token fraction {padded_fraction(tokens):.2f}  {padded:6.1f} s")
    print(f"length groups ({len(groups or [0])}, default): padded-token fraction {1 - real / group_tokens:.2f}  "
          f"{grouped:6.1f} s ({grouped / padded:.2f}x)")
    print(f"separate sweeps ({len(buckets)}):     padded-token fraction {bucket_fraction:.2f}  {by_length:6.1f} s "
          f"({by_length / padded:.2f}x)")
    matched_tokens = pool.tokenize(model.tokenizer)
    print(f"match_lengths ({len(pool)} pairs): padded-token fraction {padded_fraction(matched_tokens):.2f}  "
          f"{matched:6.1f} s")


if __name__ == "__main__":
    main()
