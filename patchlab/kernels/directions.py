"""Mean activations at each prompt's own positions (difference-in-means directions).

Torch-only (see the package docstring): this module runs on the server too.
"""

import torch

from .patching import cache_runs


def position_means_program(nn, spec):
    """Cache the runs, then average each read's activations over prompts at per-prompt columns.

    `spec`: ``arch``, ``runs`` (see `cache_runs`) and ``reads``: ``[{"run", "site", "layer",
    "columns"}]`` with ``columns`` ``[prompt, n_pos]`` (each prompt's batch column of each position).

    Returns ``[n_pos, d] float64`` per read, in order.
    """
    acts = cache_runs(nn, spec["arch"], spec["runs"])
    means = []
    for r in spec["reads"]:
        cached = acts[(r["run"], r["site"], r["layer"])]
        cols = r["columns"].to(cached.device)
        rows = torch.arange(cols.shape[0], device=cached.device)[:, None]
        means.append(cached[rows, cols].double().mean(0))
    return means
