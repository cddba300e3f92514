"""Deterministic CPU work: a fixed thread count, deterministic kernels and a private RNG."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["deterministic_cpu"]


@contextlib.contextmanager
def deterministic_cpu(threads: int = 1):
    """Run the block on `threads` CPU threads with deterministic kernels and a forked global RNG;
    all restored afterwards. Results then depend on the torch version, the CPU kind and `threads`,
    not on how many cores the machine has."""
    before = torch.get_num_threads()
    flags = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
