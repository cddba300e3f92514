"""Benchmark: circuit discovery costs, measured side by side in one run.

1. EAP over every edge, against one plain forward+backward pass of the same batch
   (``transformers`` model, embeddings requiring grad, metric summed, backward);
   target: at most 3x. EAP-IG with 5 steps is timed too. Best of 3 runs each.
2. Exact scoring of a random sample of edges (one patched row per edge), against
   as many plain forward passes of the batch (the floor for any method that
   reruns the model once per edge); the time for every edge is extrapolated.
3. ACDC wall time on SmolLM2 for IOI, as in experiments/ioi_circuit.py (logit
   difference, tau 0.05, over the top 300 EAP-IG edges).

Models: a GPT-2-small-shaped model (random weights: only shapes matter for time)
and SmolLM2-135M. Not a test: compare the ratios of one run, not times across runs.

    python bench/bench_circuits.py [--prompts 8] [--sample 64] [--acdc-candidates 300] [--skip-smollm2]
"""

from __future__ import annotations

import argparse
import random

import torch

import patchlab as pl
from patchlab.acdc_search import acdc
from patchlab.attribution import eap, eap_ig
from patchlab.circuit import rank_edges
from patchlab.exact import exact_edge_scores
from patchlab.graph import Graph
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--sample", type=int, default=64)
    parser.add_argument("--acdc-candidates", type=int, default=300)
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    bench(gpt2_small_shaped(), random_dataset(args.prompts, 16), args.sample)
    if not args.skip_smollm2:
        smol = pl.load_model("smollm2-135m")
        bench(smol, pl.ioi_dataset(smol.tokenizer, n_prompts=args.prompts, corruption="abc", seed=0), args.sample)
        bench_acdc(smol, args.prompts, args.acdc_candidates)


if __name__ == "__main__":
    main()
