"""Generation program: decode with node-level interventions at every step, using the model's KV cache.

Torch-only (see the package docstring): this module runs on the server too.
"""

import torch

from .common import padding
from .patching import apply_writes, cache_runs, planned_writes, taken_writes


def generate_program(nn, spec):
    """Cache the source runs, then decode each group of prompts. One session, one request remotely.

    `spec`: ``arch``; ``runs`` (cache passes, `cache_runs`; may be empty); ``base`` (the run decoded
    from) with ``base_ids`` and ``base_mask`` (``[prompt, pos]``, left-padded, True on real tokens);
    ``masks`` (every run's, for means over real tokens); ``prefill`` (the writes of the prompt
    pass, over ``[prompt, pos]``) and ``step`` (the writes of each generated token, over
    ``[prompt, 1]``), both as `patchlab.kernels.patching.patch_chunk` reads them; ``groups``
    (``[(prompt indices, first column)]``: decoded together); ``max_new_tokens``; ``stop_ids``
    (``[k]``: tokens that end a reply); ``temperature`` (0: greedy) and ``seed``.

    Returns ``{"tokens": [prompt, step] (-1 after a reply ended), "logprobs": [prompt, step]}``: the
    tokens chosen and their log-probabilities under the intervened model (-inf after the end).
    """
    arch = spec["arch"]
    acts = cache_runs(nn, arch, spec["runs"])
    n_prompts, n_new = spec["base_ids"].shape[0], spec["max_new_tokens"]
    tokens = torch.full((n_prompts, n_new), -1, dtype=torch.long)
    logprobs = torch.full((n_prompts, n_new), float("-inf"), dtype=torch.float64)
    generator = None  # made on the logits' device at the first sampled token, shared by every group
    for prompts, col in spec["groups"]:
        take = {"prompts": prompts, "sel": prompts, "start": int(col), "n_batch": n_prompts}
        ids = spec["base_ids"][prompts, col:]
        mask = spec["base_mask"][prompts, col:]
        prefill = planned_writes(arch, taken_writes(spec["prefill"], take), 0, mask)
        step = taken_writes(spec["step"], {"prompts": prompts, "sel": prompts, "start": 0, "n_batch": n_prompts})
        done = torch.zeros(len(prompts), dtype=torch.bool)
        with torch.no_grad(), nn.trace(ids, use_cache=True, logits_to_keep=1, **padding(mask)):
            apply_writes(nn, arch, prefill, 1, acts, spec["base"], mask=mask, masks=spec["masks"], take=take)
            logits = nn.output.logits[:, -1].clone()
            cache = nn.output.cache
        mask = mask.long()
        for t in range(n_new):
            if spec["temperature"] > 0 and generator is None:
                generator = torch.Generator(device=logits.device).manual_seed(spec["seed"])
            chosen, lp = _choose(logits, spec["temperature"], generator)
            chosen, lp = chosen.cpu(), lp.cpu()
            tokens[prompts[~done], t] = chosen[~done]
            logprobs[prompts[~done], t] = lp[~done].double()
            done = done | torch.isin(chosen, spec["stop_ids"])
            if bool(done.all()) or t == n_new - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = mask.sum(-1, keepdim=True) - 1
            with torch.no_grad(), nn.trace(chosen[:, None].to(ids.device), cache=cache, use_cache=True,
                                           attention_mask=mask, position_ids=position):
                apply_writes(nn, arch, step, 1, acts, spec["base"])
                logits = nn.output.logits[:, -1].clone()
                cache = nn.output.cache
    return {"tokens": tokens, "logprobs": logprobs}


def _choose(logits, temperature, generator):
    """The next token of each row (greedy, or sampled at `temperature`) and its log-probability
    under the model's distribution (before temperature)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    if temperature > 0:
        probs = torch.softmax(logits.double() / temperature, dim=-1)
        chosen = torch.multinomial(probs, 1, generator=generator)[:, 0]
    else:
        chosen = logp.argmax(-1)
    return chosen, logp.gather(1, chosen[:, None])[:, 0]
