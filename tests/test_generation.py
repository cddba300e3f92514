"""`pl.generate` against an independent decoder: each prompt alone (no padding), no KV cache, the
whole sequence recomputed at every step with plain forward hooks (tests/reference.py), float64."""

import pytest
import torch

import patchlab as pl
from tests.precision import exact_atol
from tests.reference import RefPatch, reference_cache, reference_patched_logits
from tests.test_real_prompts import loaded, mixed_pairs
from tests.tiny_models import FAMILIES, tiny_patch_model

C = pl.Component
N_NEW = 5


def decode_alone(hf, ids, n_new, patches_for, stop=()):
    """Greedy tokens and their log-probabilities; ``patches_for(n_pos)`` gives the RefPatches of a
    sequence of ``n_pos`` tokens (recomputed from scratch at every step)."""
    tokens, logprobs = [], []
    for _ in range(n_new):
        logits = reference_patched_logits(hf, ids, patches_for(ids.shape[1]))[0]
        logp = torch.log_softmax(logits.double(), -1)
        token = int(logp.argmax())
        tokens.append(token)
        logprobs.append(float(logp[token]))
        if token in stop:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokens, logprobs


def every_step(model):
    """Interventions of every kind that apply at each generated token (pos=None, no run read)."""
    d, dh = model.layout.d_model, model.layout.d_head
    r = torch.linspace(-1, 1, d, dtype=torch.float64) + 0.2
    return [pl.ProjectOut(C(site="resid_pre", layer=layer), r) for layer in range(model.layout.n_layers)] + [
        pl.Steer(C(site="attn_out", layer=1), torch.linspace(0.5, -0.5, d, dtype=torch.float64), scale=3.0),
        pl.Scale(C(site="head", layer=2, head=1), 0.3),
        pl.Ablate(C(site="mlp_out", layer=0), how="zero"),
        pl.Steer(C(site="v", layer=1, head=0), torch.linspace(-1, 1, dh, dtype=torch.float64))]


def ref_patches(interventions, n_pos, prompt_len):
    """The value-free interventions as hook functions over all `n_pos` positions."""
    out = []
    for i in interventions:
        c = i.component
        spot = dict(site=c.site.value, layer=c.layer, head=c.head, pos=None)
        if isinstance(i, pl.ProjectOut):
            unit = i.direction / i.direction.norm()
            out.append(RefPatch(**spot, fn=lambda x, u=unit: x - (x @ u)[..., None] * u))
        elif isinstance(i, pl.Steer):
            out.append(RefPatch(**spot, fn=lambda x, v=i.vector, s=i.scale: x + s * v))
        elif isinstance(i, pl.Scale):
            out.append(RefPatch(**spot, fn=lambda x, f=i.factor: x * f))
        elif isinstance(i, pl.Ablate):
            out.append(RefPatch(**spot, fn=lambda x: torch.zeros_like(x)))
    return out


def assert_logprobs(model, got, want):
    """Within `EXACT` (float32 precision where Hugging Face takes the softmax in float32 inside a
    float64 model and the batch is padded: tests/precision.py)."""
    want = torch.tensor(want, dtype=torch.float64)
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64), want, rtol=0,
                               atol=exact_atol(model, want, padded=True))


def stop_ids(model):
    return {model.tokenizer.eos_token_id}


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_interventions_at_every_step_equals_decoding_each_prompt_alone(family):
    model, dataset, tokens, alone = loaded(family, mixed_pairs)
    interventions = every_step(model)
    got = pl.generate(model, dataset, interventions, max_new_tokens=N_NEW, batch_size=2)
    for p, ids in enumerate(alone["clean"]):
        want, want_lp = decode_alone(model.hf, ids, N_NEW, lambda n: ref_patches(interventions, n, ids.shape[1]),
                                     stop_ids(model))
        assert got.tokens.values[p, :len(want)].tolist() == want
        assert (got.tokens.values[p, len(want):] == -1).all()
        assert_logprobs(model, got.logprob.values[p, :len(want)], want_lp)
    plain = pl.generate(model, dataset, max_new_tokens=N_NEW)
    assert (abs(plain.logprob.values[:, 0] - got.logprob.values[:, 0]) > 1e-3).any()  # the interventions act


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prompt_interventions_act_on_the_prompt_only(family):
    """A Patch at a named position and a mean ablation over every position read runs, so they act
    at the prompt's tokens; a ProjectOut at pos=None acts at every token."""
    model, dataset, tokens, alone = loaded(family, mixed_pairs)
    d = model.layout.d_model
    r = torch.linspace(1, -1, d, dtype=torch.float64)
    interventions = [pl.Patch(C(site="resid_pre", layer=1, pos="X"), source="clean"),
                     pl.Ablate(C(site="mlp_out", layer=1), how="mean"),
                     pl.ProjectOut(C(site="resid_post", layer=2), r)]
    got = pl.generate(model, dataset, interventions, max_new_tokens=N_NEW, run="corrupted")
    clean = [reference_cache(model.hf, ids, [("resid_pre", 1)]) for ids in alone["clean"]]
    corrupted = [reference_cache(model.hf, ids, [("mlp_out", 1)]) for ids in alone["corrupted"]]
    # the mean over corrupted prompts per offset from the end, over the prompts that reach it
    width = max(ids.shape[1] for ids in alone["corrupted"])
    total, count = torch.zeros(width, d, dtype=torch.float64), torch.zeros(width, 1, dtype=torch.float64)
    for cache in corrupted:
        n = cache[("mlp_out", 1)].shape[1]
        total[width - n:] += cache[("mlp_out", 1)][0]
        count[width - n:] += 1
    mean = total / count.clamp(min=1)
    for p, ids in enumerate(alone["corrupted"]):
        n_prompt = ids.shape[1]
        x_clean, x_corrupted = dataset.pairs[p].positions["X"], dataset.pairs[p].corrupted_positions["X"]

        def patches(n_pos, p=p, n_prompt=n_prompt, x_clean=x_clean, x_corrupted=x_corrupted):
            patch = torch.zeros(1, n_pos, d, dtype=torch.float64)
            patch[0, x_corrupted] = clean[p][("resid_pre", 1)][0, x_clean]
            ablated = torch.zeros(1, n_pos, d, dtype=torch.float64)
            ablated[0, :n_prompt] = mean[width - n_prompt:]
            unit = r / r.norm()

            def ablate(x):
                x = x.clone()
                x[:, :n_prompt] = ablated[:, :n_prompt]
                return x
            return [RefPatch(site="resid_pre", layer=1, head=None, pos=(x_corrupted,), value=patch),
                    RefPatch(site="mlp_out", layer=1, head=None, pos=None, fn=ablate),
                    RefPatch(site="resid_post", layer=2, head=None, pos=None,
                             fn=lambda x: x - (x @ unit)[..., None] * unit)]
        want, want_lp = decode_alone(model.hf, ids, N_NEW, patches, stop_ids(model))
        assert got.tokens.values[p, :len(want)].tolist() == want
        assert_logprobs(model, got.logprob.values[p, :len(want)], want_lp)


def test_plain_generation_equals_transformers_generate_on_strings():
    model = tiny_patch_model("llama")
    prompts = ["w1 w2 w3", "w4 w5 w6 w7 w8 w9", "w10"]
    got = pl.generate(model, prompts, max_new_tokens=6)
    for p, text in enumerate(prompts):
        ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
        ref = model.hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=1,
                                top_k=None, top_p=None, temperature=None)[0, ids.shape[1]:].tolist()
        n = int(got.n_tokens[p])
        assert got.tokens.values[p, :n].tolist() == ref[:n]
        assert got.text.values[p] == model.tokenizer.decode(ref[:n], skip_special_tokens=True)
    assert got.attrs["decoding"] == "greedy" and got.sizes == {"prompt": 3, "step": 6}


def test_sampling_is_seeded():
    model = tiny_patch_model("gpt2")
    prompts = ["w1 w2 w3", "w4 w5"]
    a = pl.generate(model, prompts, max_new_tokens=8, temperature=1.5, seed=3)
    b = pl.generate(model, prompts, max_new_tokens=8, temperature=1.5, seed=3)
    c = pl.generate(model, prompts, max_new_tokens=8, temperature=1.5, seed=4)
    greedy = pl.generate(model, prompts, max_new_tokens=8)
    assert (a.tokens.values == b.tokens.values).all()
    assert not (a.tokens.values == c.tokens.values).all()
    assert not (a.tokens.values == greedy.tokens.values).all()


def test_generate_refuses_bad_input():
    model = tiny_patch_model("llama")
    with pytest.raises(ValueError, match="corrupted"):  # strings are one run: no mean ablation over another
        pl.generate(model, ["w1 w2"], [pl.Ablate(C(site="mlp_out", layer=0), how="mean")])
    with pytest.raises(ValueError, match="max_new_tokens"):
        pl.generate(model, ["w1 w2"], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        pl.generate(model, ["w1 w2"], temperature=-1)
    with pytest.raises(TypeError, match="PromptPairDataset or a list"):
        pl.generate(model, "w1 w2")
    with pytest.raises(ValueError, match="pattern"):
        pl.generate(model, ["w1 w2"], [pl.Scale(C(site="pattern", layer=0, head=0), 0.5)])


def test_remote_generation_is_one_request():
    model = tiny_patch_model("llama")
    r = torch.linspace(-1, 1, model.layout.d_model, dtype=torch.float64)
    interventions = [pl.ProjectOut(C(site="resid_pre", layer=1), r)]
    here = pl.generate(model, ["w1 w2 w3", "w4 w5"], interventions, max_new_tokens=4)
    there = pl.generate(model, ["w1 w2 w3", "w4 w5"], interventions, max_new_tokens=4, remote="local")
    assert (here.tokens.values == there.tokens.values).all()
