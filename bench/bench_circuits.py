"""Benchmark: circuit discovery costs, measured side by side in one run.

1. EAP over every edge, against one plain forward+backward pass of the same batch
   (``transformers`` model, embeddings requiring grad, metric summed, backward);
   target: at most 3x. EAP-IG with 5 steps is timed too. Best of 3 runs each.
2. Exact scoring of a random sample of edges (one patched row per edge), against
   as many plain forward passes of the batch (the floor for any method that
   reruns the model once per edge); the time for every edge is extrapolated.
3. ACDC wall time on SmolLM2 for IOI, as in experiments/ioi_circuit.py (logit
   difference, tau 0.05, over the top 300 EAP-IG edges).
4. One ACDC step (one edge-patched pass of a row holding all but 300 edges, one edge
   changing per step): its planning in Python with the step's `EdgePlanner` kept
   across steps (as `acdc` does) and with a fresh one, against the whole step;
   target: planning at most 10% of the patched pass.

Models: a GPT-2-small-shaped model (random weights: only shapes matter for time)
and SmolLM2-135M. Not a test: compare the ratios of one run, not times across runs.

    python bench/bench_circuits.py [--prompts 8] [--sample 64] [--acdc-candidates 300] [--skip-smollm2]
                                   [--acdc-step-only]
"""

from __future__ import annotations

import argparse
import random

import torch

import patchlab as pl
from patchlab.acdc_search import acdc
from patchlab.attribution import eap, eap_ig
from patchlab.circuit import rank_edges
from patchlab.edge_plan import EdgePlanner
from patchlab.exact import exact_edge_scores
from patchlab.graph import Graph
from patchlab.graph_runner import edge_patch_rows, local_graph_cache
from patchlab.metrics import Metric, Targets

from benchlib import gpt2_small_shaped, plain_forwards, random_dataset, timed


def best_of(n: int, fn) -> float:
    """The fastest of `n` runs, in seconds (the least disturbed by other work on the machine)."""
    return min(timed(fn)[0] for _ in range(n))


def plain_forward_backward(model: pl.PatchModel, tokens) -> None:
    """One forward+backward of the clean batch, gradients reaching the embeddings."""
    hf = model.hf
    embeds = hf.get_input_embeddings()(tokens.clean_ids).detach().requires_grad_(True)
    logits = hf(inputs_embeds=embeds, logits_to_keep=1).logits[:, -1]
    Metric.LOGIT_DIFF(logits, Targets(correct=tokens.correct_ids, incorrect=tokens.incorrect_ids)).sum().backward()


def bench(model: pl.PatchModel, dataset: pl.PromptPairDataset, sample: int) -> None:
    tokens = dataset.tokenize(model.tokenizer)
    graph = Graph.from_model(model)
    print(f"\n{model.model_id}: {graph.n_edges} edges, {tokens.n_prompts} prompts x {tokens.n_pos} tokens")
    plain_forward_backward(model, tokens), eap(model, dataset)  # warm up
    t_fb = best_of(3, lambda: plain_forward_backward(model, tokens))
    t_eap = best_of(3, lambda: eap(model, dataset))
    t_ig = best_of(3, lambda: eap_ig(model, dataset, steps=5))
    print(f"  forward+backward {t_fb:7.2f} s | EAP {t_eap:7.2f} s = {t_eap / t_fb:5.2f}x (target <= 3x) | "
          f"EAP-IG(5) {t_ig:7.2f} s = {t_ig / t_fb:5.2f}x")
    edges = random.Random(0).sample(list(graph.edges()), sample)
    t_exact, _ = timed(lambda: exact_edge_scores(model, dataset, edges=edges, progress=False))
    t_plain, _ = timed(lambda: plain_forwards(model, tokens.clean_ids, sample, logits_to_keep=1))
    print(f"  exact, {sample} edges {t_exact:7.2f} s | {sample} plain forwards {t_plain:7.2f} s | "
          f"ratio {t_exact / t_plain:5.2f} | every edge: ~{t_exact / sample * graph.n_edges / 60:6.1f} min")


def bench_acdc(model: pl.PatchModel, n_prompts: int, candidates: int) -> None:
    dataset = pl.ioi_dataset(model.tokenizer, n_prompts=n_prompts, corruption="abc", seed=0)
    t_ig, scores = timed(lambda: eap_ig(model, dataset, steps=5))
    top = rank_edges(scores)[:candidates]
    t_acdc, circuit = timed(lambda: acdc(model, dataset, tau=0.05, metric="logit_diff", candidates=top,
                                         progress=False))
    n = circuit.scores.attrs["n_evaluated"]
    print(f"  ACDC on IOI (logit diff, tau 0.05) over the top {candidates} EAP-IG edges: {t_acdc:7.2f} s, {n} evaluations "
          f"({t_acdc / max(n, 1):.3f} s each), {len(circuit)} edges kept; EAP-IG for the candidates {t_ig:.2f} s")


def bench_acdc_step(model: pl.PatchModel, dataset: pl.PromptPairDataset, n_kept: int = 300, steps: int = 6) -> None:
    tokens = dataset.tokenize(model.tokenizer)
    graph = Graph.from_model(model)
    every = list(graph.edges())
    kept = sorted(random.Random(0).sample(every, n_kept))
    removed = set(every) - set(kept)
    acts = local_graph_cache(model, tokens)
    rows = [removed | {edge} for edge in kept[:steps + 1]]

    def plan(planner: EdgePlanner, row) -> None:
        row = planner.check(row)
        planner.keys([row], [planner.summary(row)[1]])

    planner = EdgePlanner(model, graph, tokens.n_pos)
    plan(planner, rows[0])
    t_kept = timed(lambda: [plan(planner, row) for row in rows[1:]])[0] / steps
    t_fresh = timed(lambda: [plan(EdgePlanner(model, graph, tokens.n_pos), row) for row in rows[1:]])[0] / steps
    t_step = timed(lambda: [edge_patch_rows(model, graph, tokens=tokens, rows=[row], metric="logit_diff", acts=acts,
                                            progress=False, planner=planner) for row in rows[1:]])[0] / steps
    t_plain = timed(lambda: plain_forwards(model, tokens.clean_ids, steps, logits_to_keep=1))[0] / steps
    print(f"  ACDC step ({graph.n_edges - n_kept} of {graph.n_edges} edges removed, one changing): "
          f"step {t_step:6.3f} s, of it planning {t_kept * 1e3:6.1f} ms = {t_kept / (t_step - t_kept):6.1%} "
          f"of the patched pass (target <= 10%) | a fresh plan {t_fresh * 1e3:6.1f} ms | "
          f"one plain forward {t_plain:6.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--sample", type=int, default=64)
    parser.add_argument("--acdc-candidates", type=int, default=300)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--acdc-step-only", action="store_true", help="only part 4, the ACDC step")
    args = parser.parse_args()
    torch.manual_seed(0)
    gpt2 = gpt2_small_shaped()
    if not args.acdc_step_only:
        bench(gpt2, random_dataset(args.prompts, 16), args.sample)
    bench_acdc_step(gpt2, random_dataset(args.prompts, 16))
    if not args.skip_smollm2:
        smol = pl.load_model("smollm2-135m")
        ioi = pl.ioi_dataset(smol.tokenizer, n_prompts=args.prompts, corruption="abc", seed=0)
        if not args.acdc_step_only:
            bench(smol, ioi, args.sample)
        bench_acdc_step(smol, ioi)
        if not args.acdc_step_only:
            bench_acdc(smol, args.prompts, args.acdc_candidates)


if __name__ == "__main__":
    main()
