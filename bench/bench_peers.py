"""Benchmark: patchlab against TransformerLens 4.3 and the naive floor, in one process.

Three sweeps (denoising, logit difference at the last position), each computed three ways on the
same weights and tokens, interleaved, medians of ``--rounds`` rounds:

1. patchlab: `patch_heads` (all positions), `patch_layer_pos` (``resid_pre``, layer x position) and
   `patch_heads(site="pattern")` (each head's attention pattern, all query positions);
2. TransformerLens 4.3 through its `TransformerBridge` (raw weights, no compatibility mode), one
   ``run_with_hooks`` per component, the prompts batched, as its patching helpers do (hooks
   ``attn.hook_z``, ``hook_resid_pre`` and ``attn.hook_pattern``);
3. the naive floor: one plain ``transformers`` forward pass per component, no patching at all
   (also printed: the same with last-position logits only, ``logits_to_keep=1``).

Attention patterns exist only under eager attention, so that sweep runs, for all three, on a
second copy of the model with the same weights loaded with ``attn_implementation="eager"``
(its floor is eager forwards; the issue sets no goal for it).

It checks that patchlab's values equal TransformerLens' (max |difference| in nats, printed), then
prints seconds, patchlab's peak resident memory above its start (sampled from ``/proc``) and the
ratios to the goals of issue 15 (head sweep <= 0.32x the floor and >= 3x faster than
TransformerLens; resid layer x position <= 0.25x and >= 4x; memory under 1 GiB above the model).
Then EAP (`bench_eap`): patchlab's against TransformerLens 4.3's ``attribution_patch`` at edge
granularity (transformer_lens.tools.analysis.attribution_patching), its per-position edge scores
summed over positions; it refuses grouped-query attention, so SmolLM2 has no EAP row
(``--skip-eap``). Not a test: compare the ratios
of one run. TransformerLens is not a core dependency:
``pip install -e '.[bench]'``.

    python bench/bench_peers.py [--prompts 8] [--rounds 3] [--models gpt2,smollm2]
        [--sweeps heads,resid,pattern] [--skip-eap | --eap-only]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bridge is built from the model in memory

import torch  # noqa: E402
from benchlib import PeakMemory, gpt2_small_shaped, model_bytes, plain_forwards, random_dataset, timed  # noqa: E402

import patchlab as pl  # noqa: E402


def bridge_of(model: pl.PatchModel):
    """A TransformerLens bridge over a copy of the model (the bridge rewires the module it wraps)."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    hf = copy.deepcopy(model.hf).eval().requires_grad_(True)  # patchlab freezes weights; TL's gradients need them
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


def pattern_edits(lay):
    return [(layer, lambda z, c, h=head: z.__setitem__((slice(None), h), c[:, h]))  # [batch, head, q, k]
            for layer in range(lay.n_layers) for head in range(lay.n_heads)]


def sweeps_of(model: pl.PatchModel, eager: pl.PatchModel | None, tokens, dataset):
    """``{name: (patchlab, TransformerLens, model of the floor, rows, goals or None)}``; the pattern
    sweep runs on `eager` (the same weights with eager attention: patterns need it, patchlab and
    TransformerLens alike), and its floor is eager forwards too."""
    lay, n_pos = model.layout, tokens.n_pos
    bridge = bridge_of(model)
    sweeps = {
        "head outputs, all positions": (
            lambda: pl.patch_heads(model, dataset, progress=False).patched.values.reshape(-1, tokens.n_prompts),
            lambda: tl_sweep(bridge, tokens, "blocks.{layer}.attn.hook_z", head_edits(lay)),
            model, lay.n_layers * lay.n_heads, (0.32, 3.0)),
        "resid_pre, layer x position": (
            lambda: pl.patch_layer_pos(model, dataset, progress=False).patched.values.reshape(-1, tokens.n_prompts),
            lambda: tl_sweep(bridge, tokens, "blocks.{layer}.hook_resid_pre", resid_edits(lay, n_pos)),
            model, lay.n_layers * n_pos, (0.25, 4.0)),
    }
    if eager is not None:
        eager_bridge = bridge_of(eager)
        sweeps["attention patterns, all positions (eager attention)"] = (
            lambda: pl.patch_heads(eager, dataset, site="pattern", progress=False).patched.values.reshape(
                -1, tokens.n_prompts),
            lambda: tl_sweep(eager_bridge, tokens, "blocks.{layer}.attn.hook_pattern", pattern_edits(lay)),
            eager, lay.n_layers * lay.n_heads, None)
    return sweeps


SWEEPS = ("heads", "resid", "pattern")


def bench(model: pl.PatchModel, dataset: pl.PromptPairDataset, rounds: int,
          eager: pl.PatchModel | None = None, only: tuple[str, ...] = SWEEPS) -> None:
    tokens = dataset.tokenize(model.tokenizer)
    sweeps = sweeps_of(model, eager, tokens, dataset)
    sweeps = {name: sweep for short, (name, sweep) in zip(SWEEPS, sweeps.items()) if short in only}
    pl.patch_heads(model, dataset, layers=[0], progress=False)  # warm-up
    if eager is not None:
        pl.patch_heads(eager, dataset, site="pattern", layers=[0], progress=False)
    print(f"\n{model.model_id}: {tokens.n_prompts} prompts x {tokens.n_pos} tokens, {torch.get_num_threads()} "
          f"threads, medians of {rounds} interleaved rounds; weights {model_bytes(model) / 2**20:.0f} MiB")
    ids = tokens.corrupted_ids
    for name, (ours, theirs, floor_model, n_rows, goals) in sweeps.items():
        times = {"patchlab": [], "TransformerLens": [], "floor": [], "floor, last logits": []}
        peak = 0
        for _ in range(rounds):
            with PeakMemory() as memory:
                t, ours_v = timed(ours)
            peak = max(peak, memory.bytes)
            times["patchlab"].append(t)
            t, theirs_v = timed(theirs)
            times["TransformerLens"].append(t)
            times["floor"].append(timed(lambda: plain_forwards(floor_model, ids, n_rows))[0])
            times["floor, last logits"].append(
                timed(lambda: plain_forwards(floor_model, ids, n_rows, logits_to_keep=1))[0])
        med = {k: statistics.median(v) for k, v in times.items()}
        diff = float((torch.as_tensor(ours_v, dtype=torch.float64) - theirs_v.double()).abs().max())
        print(f"  {name} ({n_rows} rows): patchlab {med['patchlab']:.2f} s, TransformerLens "
              f"{med['TransformerLens']:.2f} s, floor {med['floor']:.2f} s (last-position logits only: "
              f"{med['floor, last logits']:.2f} s); values agree within {diff:.1e} nats; patchlab's peak memory "
              f"{peak / 2**20:.0f} MiB above its start (goal < 1024 MiB)")
        floor_goal, tl_goal = goals or ("none set", "none set")
        print(f"    patchlab / floor {med['patchlab'] / med['floor']:.3f} (goal <= {floor_goal}; "
              f"{med['patchlab'] / med['floor, last logits']:.3f} of the last-logits floor), "
              f"TransformerLens / patchlab {med['TransformerLens'] / med['patchlab']:.2f} (goal >= {tl_goal})")


def tl_edge_label(writer, reader) -> str:
    """patchlab's label (`patchlab.graph.Edge.label`) of a TransformerLens attribution edge, positions dropped."""
    sender = {"embed": "embed", "attn_head_out": f"L{writer.layer}H{writer.head}",
              "mlp_out": f"L{writer.layer}.mlp"}[writer.kind]
    into = {"q_input": f"L{reader.layer}H{reader.head}.q", "k_input": f"L{reader.layer}H{reader.head}.k",
            "v_input": f"L{reader.layer}H{reader.head}.v", "mlp_in": f"L{reader.layer}.mlp",
            "logits": "logits"}[reader.kind]
    return f"{sender}->{into}"


def bench_eap(model: pl.PatchModel, dataset: pl.PromptPairDataset, rounds: int) -> None:
    """patchlab's EAP (denoising, all-token edges) against TransformerLens' ``attribution_patch`` at edge
    granularity, whose position-specific edge scores summed over positions are the same estimate."""
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

    tokens = dataset.tokenize(model.tokenizer)
    bridge = bridge_of(model)
    if len(set(tokens.correct_ids.tolist())) > 1 or len(set(tokens.incorrect_ids.tolist())) > 1:
        print("  EAP: skipped (TransformerLens' metric sees one example's logits, not its answers: needs one "
              "answer pair for every prompt)")
        return
    c, i = int(tokens.correct_ids[0]), int(tokens.incorrect_ids[0])

    def theirs():
        return attribution_patch(bridge, tokens.clean_ids, tokens.corrupted_ids,
                                 lambda logits: logits[0, -1, c] - logits[0, -1, i], EdgeAttributionConfig("edge"))

    def ours():
        return pl.eap(model, dataset, direction="denoising")

    try:
        theirs()
    except (ValueError, NotImplementedError) as error:  # e.g. grouped-query attention
        print(f"  EAP: TransformerLens' attribution_patch refuses this model: {error}")
        return
    ours()  # warm-up
    t_ours, t_theirs = [], []
    for _ in range(rounds):
        t, ours_v = timed(ours)
        t_ours.append(t)
        t, theirs_v = timed(theirs)
        t_theirs.append(t)
    summed = {}
    for (writer, reader), score in theirs_v.edge_scores.items():
        label = tl_edge_label(writer, reader)
        summed[label] = summed.get(label, 0.0) + score
    mine = dict(zip(ours_v.edge.values.tolist(), ours_v.score.values.tolist()))
    common = sorted(set(summed) & set(mine))
    diff = max(abs(summed[e] - mine[e]) for e in common)
    scale = max(abs(v) for v in mine.values())
    med_ours, med_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    print(f"  EAP, {len(mine)} edges (TransformerLens: {len(theirs_v.edge_scores)} position-specific, {len(common)} "
          f"in common after summing positions): patchlab {med_ours:.2f} s, TransformerLens {med_theirs:.2f} s "
          f"({med_theirs / med_ours:.1f}x); scores agree within {diff:.1e} nats (largest |score| {scale:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="gpt2", help="comma-separated: gpt2 (GPT-2-small-shaped, random "
                        "weights, 16-token prompts), smollm2 (SmolLM2-135M, IOI prompts; the bridge boots it as Llama)")
    parser.add_argument("--skip-eap", action="store_true", help="skip the EAP comparison")
    parser.add_argument("--eap-only", action="store_true", help="only the EAP comparison")
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help="comma-separated, of " + ", ".join(SWEEPS))
    args = parser.parse_args()
    only = tuple(args.sweeps.split(","))
    if set(only) - set(SWEEPS):
        parser.error(f"unknown sweeps {sorted(set(only) - set(SWEEPS))}: use {', '.join(SWEEPS)}")
    for name in args.models.split(","):
        if name == "gpt2":
            model, dataset = gpt2_small_shaped(), random_dataset(args.prompts, 16)
            eager = None if "pattern" not in only else gpt2_small_shaped("eager")
        elif name == "smollm2":
            model = pl.load_model("smollm2-135m")
            eager = None if "pattern" not in only else pl.load_model("smollm2-135m", attn_implementation="eager")
            dataset = pl.ioi_dataset(model.tokenizer, n_prompts=args.prompts, seed=0)
        else:
            parser.error(f"unknown model {name!r}: use gpt2 or smollm2")
        if not args.eap_only:
            bench(model, dataset, args.rounds, eager, only)
        if not args.skip_eap:
            bench_eap(model, dataset, args.rounds)


if __name__ == "__main__":
    main()
