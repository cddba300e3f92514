"""Benchmark: patchlab against TransformerLens 4.3 and the naive floor, in one process.

Two sweeps (denoising, logit difference at the last position), each computed three ways on the
same weights and tokens, interleaved, medians of ``--rounds`` rounds:

1. patchlab: `patch_heads` (all positions) and `patch_layer_pos` (``resid_pre``, layer x position);
2. TransformerLens 4.3 through its `TransformerBridge` (raw weights, no compatibility mode), one
   ``run_with_hooks`` per component, the prompts batched, as its patching helpers do;
3. the naive floor: one plain ``transformers`` forward pass per component, no patching at all.

It checks that patchlab's values equal TransformerLens' (max |difference| in nats, printed), then
prints seconds and the ratios to the goals of issue 15 (head sweep <= 0.32x the floor and >= 3x
faster than TransformerLens; resid layer x position <= 0.25x and >= 4x). Not a test: compare the
ratios of one run. TransformerLens is not a core dependency: ``pip install -e '.[bench]'``.

    python bench/bench_peers.py [--prompts 8] [--rounds 3] [--smollm2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bridge is built from the model in memory

import torch  # noqa: E402
from bench_head_sweep import gpt2_small_shaped, random_dataset  # noqa: E402

import patchlab as pl  # noqa: E402


def bridge_of(model: pl.PatchModel):
    """A TransformerLens bridge over a copy of the model (the bridge rewires the module it wraps)."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    hf = copy.deepcopy(model.hf).eval()
    arch = hf.config.architectures[0] if hf.config.architectures else "GPT2LMHeadModel"
    return build_bridge_from_module(hf, arch, hf_config=hf.config, tokenizer=None)


def logit_diff(logits, tokens) -> torch.Tensor:
    last = logits[:, -1]
    rows = torch.arange(last.shape[0])
    return last[rows, tokens.correct_ids] - last[rows, tokens.incorrect_ids]


@torch.no_grad()
def tl_sweep(bridge, tokens, hook_name: str, edits) -> torch.Tensor:
    """One ``run_with_hooks`` per edit; `edits[i](z, clean)` writes clean values into z. ``[edit, prompt]``."""
    names = sorted({hook_name.format(layer=layer) for layer, _ in edits})
    _, cache = bridge.run_with_cache(tokens.clean_ids, names_filter=names)
    out = []
    for layer, edit in edits:
        name = hook_name.format(layer=layer)
        clean = cache[name]

        def hook(z, hook, edit=edit, clean=clean):
            z = z.clone()
            edit(z, clean)
            return z

        out.append(logit_diff(bridge.run_with_hooks(tokens.corrupted_ids, fwd_hooks=[(name, hook)]), tokens))
    return torch.stack(out)


def head_edits(lay):
    return [(layer, lambda z, c, h=head: z.__setitem__((slice(None), slice(None), h), c[:, :, h]))
            for layer in range(lay.n_layers) for head in range(lay.n_heads)]


def resid_edits(lay, n_pos):
    return [(layer, lambda z, c, p=pos: z.__setitem__((slice(None), p), c[:, p]))
            for layer in range(lay.n_layers) for pos in range(n_pos)]


@torch.no_grad()
def floor(model: pl.PatchModel, tokens, n_rows: int) -> None:
    for _ in range(n_rows):
        model.hf(tokens.corrupted_ids)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench(model: pl.PatchModel, dataset: pl.PromptPairDataset, rounds: int) -> None:
    tokens = dataset.tokenize(model.tokenizer)
    lay, n_pos = model.layout, tokens.n_pos
    bridge = bridge_of(model)
    sweeps = {
        "head outputs, all positions": (
            lambda: pl.patch_heads(model, dataset, progress=False).patched.values.reshape(-1, tokens.n_prompts),
            lambda: tl_sweep(bridge, tokens, "blocks.{layer}.attn.hook_z", head_edits(lay)),
            lay.n_layers * lay.n_heads, (0.32, 3.0)),
        "resid_pre, layer x position": (
            lambda: pl.patch_layer_pos(model, dataset, progress=False).patched.values.reshape(-1, tokens.n_prompts),
            lambda: tl_sweep(bridge, tokens, "blocks.{layer}.hook_resid_pre", resid_edits(lay, n_pos)),
            lay.n_layers * n_pos, (0.25, 4.0)),
    }
    pl.patch_heads(model, dataset, layers=[0], progress=False)  # warm-up
    print(f"\n{model.model_id}: {tokens.n_prompts} prompts x {n_pos} tokens, {torch.get_num_threads()} threads, "
          f"medians of {rounds} interleaved rounds")
    for name, (ours, theirs, n_rows, (floor_goal, tl_goal)) in sweeps.items():
        times = {"patchlab": [], "TransformerLens": [], "floor": []}
        for _ in range(rounds):
            t, ours_v = timed(ours)
            times["patchlab"].append(t)
            t, theirs_v = timed(theirs)
            times["TransformerLens"].append(t)
            times["floor"].append(timed(lambda: floor(model, tokens, n_rows))[0])
        med = {k: statistics.median(v) for k, v in times.items()}
        diff = float((torch.as_tensor(ours_v, dtype=torch.float64) - theirs_v.double()).abs().max())
        print(f"  {name} ({n_rows} rows): patchlab {med['patchlab']:.2f} s, TransformerLens "
              f"{med['TransformerLens']:.2f} s, floor {med['floor']:.2f} s; values agree within {diff:.1e} nats")
        print(f"    patchlab / floor {med['patchlab'] / med['floor']:.2f} (goal <= {floor_goal}), "
              f"TransformerLens / patchlab {med['TransformerLens'] / med['patchlab']:.2f} (goal >= {tl_goal})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smollm2", action="store_true", help="also run on SmolLM2-135M (IOI prompts)")
    args = parser.parse_args()
    bench(gpt2_small_shaped(), random_dataset(args.prompts, 16), args.rounds)
    if args.smollm2:
        model = pl.load_model("smollm2-135m")
        bench(model, pl.ioi_dataset(model.tokenizer, n_prompts=args.prompts, seed=0), args.rounds)


if __name__ == "__main__":
    main()
