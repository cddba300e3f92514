"""Sanity tests of the plain-hook reference (tests/reference.py) on every tiny family.

The reference is what patchlab is tested against, so it is itself checked here
against closed forms and invariants that fail if a site is hooked at the wrong
module, viewed with the wrong head layout, or patched in the wrong place.
"""

from __future__ import annotations

import functools

import pytest
import torch

if __package__:  # tests/ imported as a package (tests/__init__.py present)
    from .reference import HEAD_SITES, SITES, RefPatch, is_parallel, reference_cache, reference_patched_logits
    from .tiny_models import ALL_FAMILIES, D_MODEL, N_HEADS, N_KV_HEADS, N_LAYERS, VOCAB_SIZE, tiny_model, tiny_tokenizer
else:  # rootdir-less "prepend" import: tests/ itself is on sys.path
    from reference import HEAD_SITES, SITES, RefPatch, is_parallel, reference_cache, reference_patched_logits
    from tiny_models import ALL_FAMILIES, D_MODEL, N_HEADS, N_KV_HEADS, N_LAYERS, VOCAB_SIZE, tiny_model, tiny_tokenizer

GQA = {"llama", "mistral", "qwen2", "gemma2", "gemma3"}
GEMMA = {"gemma2", "gemma3"}
BATCH, SEQ = 2, 8
EXACT = dict(atol=0.0, rtol=0.0)
TIGHT = dict(atol=1e-9, rtol=0.0)
CLOSE = dict(atol=1e-9, rtol=1e-9)

# Module paths written out here, independently of reference.py.
FINAL_NORM = {"gpt2": "transformer.ln_f", "gpt_neo": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}
OUT_PROJ = {"gpt2": "transformer.h.{}.attn.c_proj", "gpt_neo": "transformer.h.{}.attn.attention.out_proj"}
OUT_PROJ["gpt_neox"] = "gpt_neox.layers.{}.attention.dense"
for _f in ("llama", "mistral", "qwen2", "gemma2", "gemma3"):
    FINAL_NORM[_f], OUT_PROJ[_f] = "model.norm", "model.layers.{}.self_attn.o_proj"
FINAL_NORM["gpt_neox_seq"], OUT_PROJ["gpt_neox_seq"] = FINAL_NORM["gpt_neox"], OUT_PROJ["gpt_neox"]

family = pytest.mark.parametrize("fam", ALL_FAMILIES)


@functools.lru_cache(maxsize=None)
def model(fam: str):
    return tiny_model(fam).double()  # float64: the invariants below hold to ~1e-15 on any CPU


def ids(seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB_SIZE, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


CLEAN, CORRUPT = ids(1), ids(2)


def sites_of(fam: str, layers=range(N_LAYERS)) -> list[tuple[str, int]]:
    return [(s, L) for L in layers for s in SITES if not (s == "resid_mid" and is_parallel(model(fam)))]


@functools.lru_cache(maxsize=None)
def cache(fam: str, which: str) -> dict:
    return reference_cache(model(fam), CLEAN if which == "clean" else CORRUPT, sites_of(fam))


def logits(fam: str, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(fam)(input_ids, use_cache=False).logits[:, -1]


def n_kv(fam: str) -> int:
    return N_KV_HEADS if fam in GQA else N_HEADS


# --------------------------------------------------------------------------- tiny models


@family
def test_tiny_model_is_deterministic_and_nontrivial(fam):
    a, b, c = tiny_model(fam, seed=0), tiny_model(fam, seed=0), tiny_model(fam, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    for name, p in a.named_parameters():
        assert p.std() > 0.1, name  # biases and norm weights too: nothing left at a constant init
    assert a.config._attn_implementation == "eager" and not a.training
    assert a.config.num_attention_heads == N_HEADS and getattr(a.config, "num_key_value_heads", N_HEADS) == n_kv(fam)


def test_tokenizer_matches_vocab():
    tok = tiny_tokenizer(VOCAB_SIZE)
    assert len(tok) == VOCAB_SIZE
    assert tok("w0 w5 w96").input_ids == [3, 8, 99]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok("nope").input_ids == [2]


# --------------------------------------------------------------------------- reading


@family
def test_residual_stream_is_chained(fam):
    c = cache(fam, "clean")
    for L in range(N_LAYERS - 1):
        torch.testing.assert_close(c["resid_post", L], c["resid_pre", L + 1], **EXACT)


@family
def test_block_output_is_input_plus_branches(fam):
    c = cache(fam, "clean")
    for L in range(N_LAYERS):
        total = c["resid_pre", L] + c["attn_out", L] + c["mlp_out", L]
        torch.testing.assert_close(total, c["resid_post", L], **CLOSE)


@family
def test_resid_mid(fam):
    m, c = model(fam), cache(fam, "clean")
    if is_parallel(m):
        with pytest.raises(ValueError, match="parallel"):
            reference_cache(m, CLEAN, [("resid_mid", 0)])
        with pytest.raises(ValueError, match="parallel"):
            reference_patched_logits(m, CLEAN, [RefPatch("resid_mid", 0, None, None, c["resid_pre", 0])])
        return
    for L in range(N_LAYERS):
        torch.testing.assert_close(c["resid_mid", L], c["resid_pre", L] + c["attn_out", L], **EXACT)
        torch.testing.assert_close(c["resid_mid", L] + c["mlp_out", L], c["resid_post", L], **CLOSE)


@family
def test_final_resid_post_gives_logits(fam):
    m, c = model(fam), cache(fam, "clean")
    with torch.no_grad():
        out = m.get_output_embeddings()(m.get_submodule(FINAL_NORM[fam])(c["resid_post", N_LAYERS - 1]))
        cap = getattr(m.config, "final_logit_softcapping", None)
        if cap is not None:
            out = cap * torch.tanh(out / cap)
        full = m(CLEAN, use_cache=False).logits
    torch.testing.assert_close(out, full, **CLOSE)


@family
def test_heads_project_to_attention_output(fam):
    m, c = model(fam), cache(fam, "clean")
    for L in range(N_LAYERS):
        z = c["head", L]
        assert z.shape == (BATCH, SEQ, N_HEADS, D_MODEL // N_HEADS)
        with torch.no_grad():
            out = m.get_submodule(OUT_PROJ[fam].format(L))(z.flatten(-2))
            if fam in GEMMA:  # the value added to the residual is post-normed
                out = m.get_submodule(f"model.layers.{L}.post_attention_layernorm")(out)
        torch.testing.assert_close(out, c["attn_out", L], **CLOSE)


@family
def test_position_zero_head_output_is_its_value(fam):
    """At position 0 a head attends only to itself, so z[0] is v[0] of its kv head."""
    c, group = cache(fam, "clean"), N_HEADS // n_kv(fam)
    for L in range(N_LAYERS):
        assert c["q", L].shape[2] == N_HEADS and c["k", L].shape[2] == c["v", L].shape[2] == n_kv(fam)
        for h in range(N_HEADS):
            torch.testing.assert_close(c["head", L][:, 0, h], c["v", L][:, 0, h // group], **CLOSE)


# --------------------------------------------------------------------------- patching


@family
def test_self_patching_changes_nothing(fam):
    """Every site at every layer patched with the run's own values, all in one run."""
    m, c = model(fam), cache(fam, "clean")
    patches = [RefPatch(s, L, 1 if s in HEAD_SITES else None, None, c[s, L]) for s, L in sites_of(fam)]
    patches += [RefPatch("head", L, None, (0, 5), c["head", L]) for L in range(N_LAYERS)]
    torch.testing.assert_close(reference_patched_logits(m, CLEAN, patches), logits(fam, CLEAN), **TIGHT)


@family
@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "resid_post"])
def test_full_residual_patch_gives_source_logits(fam, site):
    m, src = model(fam), cache(fam, "corrupt")
    if site == "resid_mid" and is_parallel(m):
        pytest.skip("no resid_mid in a parallel-residual model")
    for L in range(N_LAYERS):
        got = reference_patched_logits(m, CLEAN, [RefPatch(site, L, None, None, src[site, L])])
        torch.testing.assert_close(got, logits(fam, CORRUPT), **(CLOSE if site == "resid_mid" else EXACT))


@family
def test_last_position_final_resid_post_gives_source_logits(fam):
    m, src = model(fam), cache(fam, "corrupt")
    patch = RefPatch("resid_post", N_LAYERS - 1, None, (SEQ - 1,), src["resid_post", N_LAYERS - 1])
    torch.testing.assert_close(reference_patched_logits(m, CLEAN, [patch]), logits(fam, CORRUPT), **TIGHT)


@family
@pytest.mark.parametrize("pos", [None, (2, 5, 7)])
def test_all_heads_equal_attn_out(fam, pos):
    m, src = model(fam), cache(fam, "corrupt")
    for L in range(N_LAYERS):
        by_heads = reference_patched_logits(m, CLEAN, [RefPatch("head", L, None, pos, src["head", L])])
        one_by_one = [RefPatch("head", L, h, pos, src["head", L]) for h in range(N_HEADS)]
        by_attn = reference_patched_logits(m, CLEAN, [RefPatch("attn_out", L, None, pos, src["attn_out", L])])
        torch.testing.assert_close(reference_patched_logits(m, CLEAN, one_by_one), by_heads, **EXACT)
        torch.testing.assert_close(by_heads, by_attn, **CLOSE)
        assert (by_heads - logits(fam, CLEAN)).abs().max() > 1e-3  # the patch did something


@family
def test_patched_site_reads_back(fam):
    """After a patch, the site holds the source at the patched slots and the target elsewhere."""
    m, clean, src = model(fam), cache(fam, "clean"), cache(fam, "corrupt")
    L, pos = 1, (3, 6)
    for site, _ in sites_of(fam, layers=[L]):
        head = 1 if site in HEAD_SITES else None
        got = reference_cache(m, CLEAN, [(site, L)], patches=[RefPatch(site, L, head, pos, src[site, L])])[site, L]
        want = clean[site, L].clone()
        if head is None:
            want[:, list(pos)] = src[site, L][:, list(pos)]
        else:
            want[:, list(pos), head] = src[site, L][:, list(pos), head]
        torch.testing.assert_close(got, want, **(TIGHT if site == "resid_mid" else EXACT), msg=site)


@family
def test_later_patch_wins(fam):
    m, clean, src = model(fam), cache(fam, "clean"), cache(fam, "corrupt")
    for site in ("attn_out", "v", "resid_pre"):
        head = 0 if site == "v" else None
        patches = [RefPatch(site, 1, head, None, src[site, 1]), RefPatch(site, 1, head, None, clean[site, 1])]
        torch.testing.assert_close(reference_patched_logits(m, CLEAN, patches), logits(fam, CLEAN), **EXACT)


@family
def test_single_position_patch_is_causal(fam):
    m, src = model(fam), cache(fam, "corrupt")
    p, last = 4, ("resid_post", N_LAYERS - 1)
    patch = RefPatch("resid_pre", 1, None, (p,), src["resid_pre", 1])
    got = reference_cache(m, CLEAN, [last], patches=[patch])[last]
    base = cache(fam, "clean")[last]
    torch.testing.assert_close(got[:, :p], base[:, :p], **EXACT)
    assert ((got[:, p:] - base[:, p:]).abs().amax(-1) > 1e-4).all()


@family
@pytest.mark.parametrize("site", ["q", "k", "v"])
def test_zeroed_qkv_head(fam, site):
    """Zero q of one head, or k/v of one kv head, at all positions, in layer 1.

    A zero query (or zero keys) gives equal scores, so at position 1 the affected heads
    average v over positions 0 and 1; zero values give a zero head output. Heads outside
    the kv group are untouched. This pins the q/k/v head layout (fused GPT-2/NeoX) and the
    grouped-query mapping (query head h reads kv head h // group).
    """
    m, c, L = model(fam), cache(fam, "clean"), 1
    group, h = N_HEADS // n_kv(fam), 1
    affected = [h] if site == "q" else [q for q in range(N_HEADS) if q // group == h]
    patch = RefPatch(site, L, h, None, torch.zeros_like(c[site, L]))
    got = reference_cache(m, CLEAN, [("head", L), ("v", L)], patches=[patch])
    z, v = got["head", L], got["v", L]
    for q in range(N_HEADS):
        if q not in affected:
            torch.testing.assert_close(z[:, :, q], c["head", L][:, :, q], **EXACT)
        elif site == "v":
            torch.testing.assert_close(z[:, :, q], torch.zeros_like(z[:, :, q]), **EXACT)
        else:
            mean = (v[:, 0, q // group] + v[:, 1, q // group]) / 2
            torch.testing.assert_close(z[:, 1, q], mean, **CLOSE)
            assert not torch.allclose(z[:, 1, q], c["head", L][:, 1, q], atol=1e-3)


def test_bad_patches_raise():
    m, c = model("llama"), cache("llama", "clean")
    with pytest.raises(ValueError, match="unknown site"):
        reference_cache(m, CLEAN, [("hook_z", 0)])
    with pytest.raises(ValueError, match="out of range"):
        reference_cache(m, CLEAN, [("resid_pre", N_LAYERS)])
    with pytest.raises(ValueError, match="no heads"):
        reference_patched_logits(m, CLEAN, [RefPatch("attn_out", 0, 1, None, c["attn_out", 0])])
    with pytest.raises(ValueError, match="shape"):  # k has n_kv_heads heads, not n_heads
        reference_patched_logits(m, CLEAN, [RefPatch("k", 0, 1, None, c["q", 0])])
    with pytest.raises(ValueError, match="shape"):  # one prompt's values for a batch of two
        reference_patched_logits(m, CLEAN, [RefPatch("resid_pre", 0, None, None, c["resid_pre", 0][:1])])
