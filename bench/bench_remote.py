"""Benchmark: what running remotely costs, through the loopback NDIF server.

For each algorithm on SmolLM2-135M (8 IOI prompts), side by side in one run:

- the local time and the remote time (same machine: the difference is serialization,
  the wire protocol and rebuilding the kernels on the server; no network latency);
- the requests made and the bytes sent and received;
- what the same sweep would move with one request per component (each shipping the
  run caches up and its logits back): its request count and bytes.

The server is `tests/ndif_server.py` on 127.0.0.1 with its own copy of the weights;
the client holds the model on the meta device. Not a test: compare ratios of one run.

    python bench/bench_remote.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nnsight
from nnsight.modeling.transformers import TransformersModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patchlab as pl  # noqa: E402
from patchlab.graph_runner import graph_cache_sites  # noqa: E402
from patchlab.remote import model_key  # noqa: E402
from tests.ndif_server import LoopbackNDIF  # noqa: E402


def main() -> None:
    nnsight.CONFIG.APP.REMOTE_LOGGING = False
    local = pl.load_model("smollm2-135m")
    served = pl.load_model("smollm2-135m")
    data = pl.ioi_dataset(local.tokenizer, n_prompts=8, seed=0)
    tokens = data.tokenize(local.tokenizer)
    lay = local.layout
    n_sites = len(graph_cache_sites(local))
    cache_bytes = 2 * n_sites * tokens.n_prompts * tokens.n_pos * lay.d_model * 4  # both runs, float32
    logits_bytes = tokens.n_prompts * lay.vocab_size * 4
    graph = pl.Graph.from_model(local)
    every = list(graph.edges())
    jobs = {
        "patch_heads": (lambda m, **kw: pl.patch_heads(m, data, progress=False, **kw),
                        lay.n_layers * lay.n_heads),
        "patch_edges (20 sets)": (lambda m, **kw: pl.patch_edges(m, data, [every[i::20] for i in range(20)],
                                                                 progress=False, **kw), 20),
        "eap": (lambda m, **kw: pl.eap(m, data, **kw), None),
    }
    hosted = TransformersModel(served.hf, tokenizer=served.tokenizer, task="text-generation")
    with LoopbackNDIF({model_key(local): hosted}) as server:
        meta = pl.load_model("smollm2-135m", remote=server.url)
        print(f"SmolLM2-135M, {tokens.n_prompts} prompts x {tokens.n_pos} tokens; run caches "
              f"{cache_bytes / 2**20:.1f} MiB; loopback server at {server.url}\n")
        print(f"{'algorithm':24s} {'local':>8s} {'remote':>8s} {'ratio':>6s} {'requests':>8s} "
              f"{'sent':>9s} {'received':>9s}   one request per component would move")
        for name, (run, rows) in jobs.items():
            t = time.perf_counter()
            run(local)
            here = time.perf_counter() - t
            server.reset()
            t = time.perf_counter()
            run(meta)
            there = time.perf_counter() - t
            records = server.requests
            sent = sum(r.payload_bytes for r in records)
            received = sum(r.result_bytes for r in records)
            naive = "-" if rows is None else \
                f"{rows} requests, {rows * (cache_bytes + logits_bytes) / 2**30:.1f} GiB"
            print(f"{name:24s} {here:7.1f}s {there:7.1f}s {there / here:6.2f} {len(records):8d} "
                  f"{sent / 1024:8.1f}K {received / 1024:8.1f}K   {naive}")


if __name__ == "__main__":
    main()
