"""The rollout engine against the uncached reference decoder, and the consistency invariant.

A random tiny model has near-uniform predictions (every step commits one token), so
the fixture sharpens its output head: then the dynamic strategy commits several
tokens per step and the tests cover multi-token steps too.
"""

from __future__ import annotations

import collections
import itertools

import pytest
import torch

from dirl_min.decoding import generate
from dirl_min.dipo import rescore
from dirl_min.model.forward import backbone_hidden, dense_denoiser
from dirl_min.masking import block_causal_mask, block_diffusion_mask
from dirl_min.model import build_tiny
from reference.decoding import decode

PROMPTS = ["What is 2+3?", "Hi", "Solve: If x + 5 = 12, what is x?"]  # lengths not multiples of B
STOP = None  # set per model: the tokenizer's eos


def sharp_tiny(block_size: int, seed: int = 0):
    model, tok = build_tiny(block_size=block_size, seed=seed, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)  # peaked distributions: confidences spread over (0, 1)
    return model.eval(), tok


GRID = list(itertools.product([1, 2, 4, 8], ["low_confidence_static", "low_confidence_dynamic", "sequential"]))
#: a decision closer than this to a tie (see reference.decoding.decode's margins) may go either way:
#: the cached float32 path and the dense float64 reference round differently
TIE = 1e-5


def assert_matches_reference(out, i: int, ref: dict, what=()) -> bool:
    """Row ``i`` of a Rollout equals the reference decoder's output, up to its first near-tie step.

    Before the first step whose margin is under :data:`TIE` both must commit the same tokens at the
    same steps (with the same log-probs); from that step on they may diverge. Returns whether the
    whole row was compared (no near-tie)."""
    tie = next((s for s, m in enumerate(ref["margins"], 1) if m < TIE), None)
    if tie is None:
        assert out.response_ids[i] == ref["response_ids"], what
        assert out.step_map[i] == ref["step_map"], what
        assert out.truncated[i] == ref["truncated"], what
        assert torch.allclose(torch.tensor(out.logp[i]), torch.tensor(ref["logp"], dtype=torch.float32), atol=1e-4)
        return True
    before = [j for j, s in enumerate(ref["step_map"]) if s < tie]
    assert [j for j, s in enumerate(out.step_map[i]) if s < tie] == before, what
    assert [out.response_ids[i][j] for j in before] == [ref["response_ids"][j] for j in before], what
    return False


@pytest.mark.parametrize("block_size,strategy", GRID)
def test_cached_batched_decoding_equals_uncached_reference(block_size, strategy):
    model, tok = sharp_tiny(block_size)
    prompts = [tok.encode(p) for p in PROMPTS]
    stops = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    for (temperature, top_k, top_p), fused in itertools.product([(0.0, 0, 1.0), (1.0, 8, 0.9)], [True, False]):
        kw = dict(max_new_tokens=12, strategy=strategy, threshold=0.6, steps=2 if block_size > 1 else None,
                  temperature=temperature, top_k=top_k, top_p=top_p, stop_token_ids=stops)
        out = generate(model, prompts, seeds=[11, 12, 13], fused_commit=fused, **kw)
        for i, p in enumerate(prompts):
            ref = decode(dense_denoiser(model), p, block_size=block_size, mask_token_id=model.config.mask_token_id,
                         seed=[11, 12, 13][i], **kw)
            assert_matches_reference(out, i, ref, (temperature, fused, i))


def _stop_prompts(tok, stop: int, B: int) -> list[list[int]]:
    """Prompts whose last, partial block holds ``stop`` (as a chat template's ``<|im_end|>`` does:
    ``…<|im_end|>\n<|im_start|>assistant\n``): a stop there is not generated and must not stop."""
    out = []
    for p in [tok.encode(q) for q in PROMPTS] * 2:
        p = p + [p[-1]] * ((-len(p)) % B)
        out.append(p + [stop, p[0]])
    return out


STOP_KW = dict(max_new_tokens=48, temperature=1.0, top_k=8, threshold=0.6)
STOP_SEEDS = list(range(6))


def stopping_batch(model, tok, block_size: int, **kw):
    """``(prompts, stop, rollout)``: a batch where rows stop at two different blocks or more (the
    decoder retires them and drops their cache rows while the others go on), some row never stops,
    and every prompt holds the stop token in its last partial block. The stop token is the first
    of the tokens this model generates most that makes such a batch."""
    plain = generate(model, [tok.encode(q) for q in PROMPTS] * 2, seeds=STOP_SEEDS, **STOP_KW)
    common = collections.Counter(t for r in plain.response_ids for t in r).most_common(8)
    for stop, _ in common:
        prompts = _stop_prompts(tok, stop, block_size)
        out = generate(model, prompts, seeds=STOP_SEEDS, stop_token_ids=[stop], **STOP_KW, **kw)
        ends = {len(p) + len(r) for p, r, t in zip(prompts, out.response_ids, out.truncated) if not t}
        if len(ends) >= 2 and any(out.truncated):
            return prompts, stop, out
    pytest.fail(f"no stop token among {common} gives rows stopping at two blocks and a truncated row")


@pytest.mark.parametrize("block_size", [4, 8])
def test_stops_and_retired_rows_equal_the_reference(block_size):
    """Each row of a :func:`stopping_batch` equals the reference decoder's, which checks for the stop
    token only among generated tokens (a chat prompt's ``<|im_end|>`` must not stop a response)."""
    model, tok = sharp_tiny(block_size)
    prompts, stop, out = stopping_batch(model, tok, block_size)
    for i, p in enumerate(prompts):
        ref = decode(dense_denoiser(model), p, block_size=block_size, mask_token_id=model.config.mask_token_id,
                     seed=STOP_SEEDS[i], stop_token_ids=[stop], **STOP_KW)
        assert_matches_reference(out, i, ref, (stop, i))
        assert out.stopped_at[i] == len(p) + len(out.response_ids[i])


def test_some_steps_commit_several_tokens():
    """Guards the fixture: without multi-token steps the grid above would test less than it claims."""
    model, tok = sharp_tiny(4)
    out = generate(model, [tok.encode(p) for p in PROMPTS], max_new_tokens=32, threshold=0.6, temperature=0.0)
    assert max(out.tokens_per_step(i) for i in range(len(out))) > 1.0


def test_fused_commit_saves_exactly_one_forward_per_block():
    model, tok = sharp_tiny(4)
    prompts = [tok.encode("Hi there")]  # 8 tokens: two full prompt blocks, so unfused also pays a prefill pass
    kw = dict(max_new_tokens=24, threshold=0.6, temperature=0.0)
    fused = generate(model, prompts, fused_commit=True, **kw)
    unfused = generate(model, prompts, fused_commit=False, **kw)
    assert fused.response_ids == unfused.response_ids and fused.step_map == unfused.step_map
    n_blocks = len(fused.response_ids[0]) // 4
    # unfused: a prefill pass + one commit pass between consecutive blocks
    assert unfused.num_forwards - fused.num_forwards == n_blocks


def test_a_sequence_decodes_the_same_alone_or_in_a_batch():
    model, tok = sharp_tiny(4)
    prompts = [tok.encode(p) for p in PROMPTS]
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=20, threshold=0.6)
    batch = generate(model, prompts, seeds=[5, 6, 7], **kw)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], seeds=[[5, 6, 7][i]], **kw)
        assert alone.response_ids[0] == batch.response_ids[i]
        assert alone.step_map[0] == batch.step_map[i]


def test_seeded_generator_reproduces_a_run():
    model, tok = sharp_tiny(4)
    prompts = [tok.encode(p) for p in PROMPTS]
    runs = [generate(model, prompts, max_new_tokens=16, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    other = generate(model, prompts, max_new_tokens=16, generator=torch.Generator().manual_seed(4))
    assert runs[0].response_ids == runs[1].response_ids
    assert runs[0].response_ids != other.response_ids


def test_stop_keeps_the_block_whole_and_text_is_cut():
    model, tok = sharp_tiny(4)
    prompts, eos, out = stopping_batch(model, tok, 4, tokenizer=tok)
    for i, p in enumerate(prompts):
        total = len(p) + len(out.response_ids[i])
        assert total % 4 == 0  # whole blocks on the absolute grid
        full = p + out.response_ids[i]
        generated_eos = [j for j in range(len(p), total) if full[j] == eos]
        if not out.truncated[i]:
            # the first generated stop lies in the last block, and the block is kept whole after it
            assert generated_eos and generated_eos[0] >= total - 4
            cut = out.response_ids[i].index(eos)
            assert out.text[i] == tok.decode(out.response_ids[i][:cut])
            assert out.length_to_stop(i) == cut
        else:
            assert not generated_eos
            assert total == (len(p) // 4 + 12) * 4  # max_new_tokens=48 is 12 whole blocks
            assert out.text[i] == tok.decode(out.response_ids[i])


@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_consistency_invariant_rescore_equals_recorded_logp(block_size, temperature):
    """SPEC §4: the trainer's log-probs, rebuilt from step_map, equal the decoder's."""
    model, tok = sharp_tiny(block_size)
    prompts = [tok.encode(p) for p in PROMPTS]
    out = generate(model, prompts, max_new_tokens=24, temperature=temperature, top_k=10, threshold=0.6,
                   generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = rescore(model, out, packed=True)
        per_round = rescore(model, out, packed=False)
    for i in range(len(out)):
        recorded = torch.tensor(out.logp[i])
        assert packed[i].shape == recorded.shape
        assert (packed[i] - recorded).abs().max() <= 1e-4
        assert (packed[i] - per_round[i]).abs().max() <= 1e-5


def test_consistency_fails_when_the_step_map_is_wrong():
    """The invariant has teeth: scoring with a shuffled step map gives different log-probs."""
    model, tok = sharp_tiny(4)
    out = generate(model, [tok.encode(PROMPTS[2])], max_new_tokens=24, temperature=0.0, threshold=0.6)
    assert len(set(out.step_map[0])) > 1
    out.step_map[0] = [1] * len(out.step_map[0])  # pretend everything was committed at once
    with torch.no_grad():
        wrong = rescore(model, out)[0]
    assert (wrong - torch.tensor(out.logp[0])).abs().max() > 1e-3


def test_clean_half_of_training_layout_equals_block_causal_forward():
    model, tok = sharp_tiny(4)
    ids = torch.tensor(tok.encode("Solve: If x + 5 = 12"))
    L = len(ids)
    noisy = ids.clone()
    noisy[::3] = model.config.mask_token_id
    with torch.no_grad():
        pos = torch.arange(L)
        both = backbone_hidden(model, torch.cat([noisy, ids])[None], torch.cat([pos, pos])[None],
                               block_diffusion_mask(L, 4)[None, None])
        clean = backbone_hidden(model, ids[None], pos[None], block_causal_mask(L, 4)[None, None])
    assert torch.allclose(both[0, L:], clean[0], atol=1e-5)


def test_layout_logits_and_logp_entropy_against_a_plain_forward_of_the_sft_layout():
    """layout_logits runs lm_head only at ``select`` of the ``[x_t ; x_0]`` layout (oracle: the dense
    reference mask and a full lm_head); layout_logp_entropy is their log-softmax at the targets."""
    from dirl_min.model.forward import layout_logits, layout_logp_entropy
    from dirl_min.masking import layout_metadata

    model, tok = sharp_tiny(4)
    ids = torch.tensor(tok.encode("Solve: If x + 5 = 12"))
    L = len(ids)
    noisy = ids.clone()
    noisy[1::3] = model.config.mask_token_id
    pos, copy = layout_metadata(L, 1)
    layout = torch.cat([noisy, ids])[None]
    select = (layout == model.config.mask_token_id)
    targets = torch.cat([ids, ids])[None][select]
    with torch.no_grad():
        want = model.lm_head(backbone_hidden(model, layout, pos[None], block_diffusion_mask(L, 4)[None, None]))[select]
        logits = layout_logits(model, layout, torch.zeros_like(layout), pos[None], copy[None], 1, 4, select)
        logp, entropy = layout_logp_entropy(model, layout, torch.zeros_like(layout), pos[None], copy[None], 1, 4,
                                            select, targets, temperature=0.7)
    assert logits.shape == (int(select.sum()), model.config.vocab_size)
    assert torch.allclose(logits, want, atol=1e-5)
    logp_all = torch.log_softmax(logits / 0.7, dim=-1)
    assert torch.allclose(logp, logp_all.gather(-1, targets[:, None])[:, 0], atol=1e-5)
    assert torch.allclose(entropy, -(logp_all.exp() * logp_all).sum(-1), atol=1e-5)


def test_block_size_one_equals_transformers_causal_lm():
    """At B = 1 the block-causal forward is an ordinary causal LM: transformers' own forward is the oracle."""
    model, tok = sharp_tiny(1)
    ids = torch.tensor(tok.encode("What is 7 - 3?"))[None]
    with torch.no_grad():
        ours = model.lm_head(backbone_hidden(model, ids, torch.arange(ids.shape[1])[None],
                                             block_causal_mask(ids.shape[1], 1)[None, None]))
        theirs = model(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_flex_attention_training_layout_equals_sdpa_and_keeps_the_invariant():
    """The GPU path's BlockMask (built from mask_mod, no dense mask) computes what SDPA computes.

    Forward only: on CPU flex_attention has no backward, so CPU training uses SDPA.
    """
    model, tok = sharp_tiny(4)
    out = generate(model, [tok.encode(p) for p in PROMPTS], max_new_tokens=16, temperature=1.0, threshold=0.6,
                   generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sdpa = rescore(model, out)
        model.set_attn_implementation("flex_attention")
        try:
            flex = rescore(model, out)
            flex_decoded = generate(model, [tok.encode(p) for p in PROMPTS], max_new_tokens=16, temperature=1.0,
                                    threshold=0.6, generator=torch.Generator().manual_seed(0))
        finally:
            model.set_attn_implementation("sdpa")
    for a, b in zip(sdpa, flex):
        assert (a - b).abs().max() <= 1e-5
    assert flex_decoded.response_ids == out.response_ids


def test_sdar_standin_chats_generates_and_round_trips(tmp_path, sdar_source):
    """A faithful SDAR stand-in (full Qwen vocabulary, real tokenizer files) runs the whole engine."""
    from dirl_min.decoding import generate_text
    from dirl_min.model import load_model, save_model, stop_token_ids
    from tests.fixtures.checkpoints import make_standin_checkpoint

    path = make_standin_checkpoint(tmp_path / "sdar", source=sdar_source)
    model, tok = load_model(path, dtype=torch.float32)
    out = generate_text(model, tok, ["Solve: If x + 5 = 12, what is x?"], max_new_tokens=16, temperature=0.0)
    prompt = out.prompt_ids[0]
    assert tok.decode(prompt).startswith("<|im_start|>user\nSolve: If x + 5 = 12")
    assert (len(prompt) + len(out.response_ids[0])) % 4 == 0
    assert 151669 not in out.response_ids[0]  # the mask token is never committed
    stops = stop_token_ids(tok)
    cut = next((j for j, t in enumerate(out.response_ids[0]) if t in stops), len(out.response_ids[0]))
    assert out.text[0] == tok.decode(out.response_ids[0][:cut])
    with torch.no_grad():
        assert (rescore(model, out)[0] - torch.tensor(out.logp[0])).abs().max() <= 1e-4
    saved = save_model(model, tok, tmp_path / "saved")
    again, _ = load_model(saved, dtype=torch.float32)
    again_out = generate_text(again, tok, ["Solve: If x + 5 = 12, what is x?"], max_new_tokens=16, temperature=0.0)
    assert again_out.response_ids == out.response_ids and again_out.logp == out.logp


def test_chunked_log_probs_equal_the_plain_formula_in_values_and_gradients():
    from dirl_min.model.forward import selected_logp

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    logp_all = torch.log_softmax(head(hidden) / 0.7, dim=-1)
    want = logp_all.gather(-1, targets[:, None])[:, 0]
    want_entropy = -(logp_all.exp() * logp_all).sum(-1)
    want_grads = torch.autograd.grad((want * torch.arange(37.0)).sum(), [hidden, head.weight])
    for chunk in (8, 37, 1000):  # several checkpointed chunks, exactly one, and the unchunked path
        logp, entropy = selected_logp(hidden, head, targets, temperature=0.7, chunk=chunk)
        grads = torch.autograd.grad((logp * torch.arange(37.0)).sum(), [hidden, head.weight])
        assert torch.allclose(logp, want, atol=1e-6) and torch.allclose(entropy, want_entropy, atol=1e-5)
        assert not entropy.requires_grad
        assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(grads, want_grads))
