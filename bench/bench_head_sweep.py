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
import time

import nnsight
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import patchlab as pl
from patchlab.components import Site


def gpt2_small_shaped():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # 12 layers, 12 heads, d_model 768, vocab 50257
    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(999)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>", eos_token="<unk>")
    return pl.load_model(hf, tokenizer=tokenizer, model_id="gpt2-small-shaped (random)")


def random_dataset(n_prompts: int, n_pos: int, seed: int = 0) -> pl.PromptPairDataset:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n_prompts):
        words = torch.randint(1, 999, (n_pos,), generator=g)
        corrupted = words.clone()
        corrupted[n_pos // 2] = (words[n_pos // 2] + 1) % 998 + 1
        pairs.append(pl.PromptPair(clean=" ".join(f"w{i}" for i in words.tolist()),
                                   corrupted=" ".join(f"w{i}" for i in corrupted.tolist()),
                                   correct="w1", incorrect="w2", positions={}))
    return pl.PromptPairDataset(pairs=pairs, name="random")


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


def plain_forwards(model: pl.PatchModel, tokens) -> None:
    with torch.no_grad():
        for _ in range(model.layout.n_layers * model.layout.n_heads):
            model.hf(tokens.corrupted_ids)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(model: pl.PatchModel, dataset: pl.PromptPairDataset) -> None:
    tokens = dataset.tokenize(model.tokenizer)
    pl.patch_heads(model, dataset, layers=[0], progress=False)  # warm-up
    t_patchlab = timed(lambda: pl.patch_heads(model, dataset, progress=False))
    t_naive = timed(lambda: naive_loop(model, tokens))
    t_plain = timed(lambda: plain_forwards(model, tokens))
    rows = model.layout.n_layers * model.layout.n_heads
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
