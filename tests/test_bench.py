"""Deterministic properties of the benchmark helpers (dirl_min.bench). Nothing here is timed."""

from __future__ import annotations

import pytest
import torch

from dirl_min.bench import json_args, parse_args
from dirl_min.speed.measures import (
    _layout_tokens,
    _subset,
    bench_model,
    bench_prompts,
    choose_reference_tokens,
    decoded_blocks,
    forwards_per_block,
    fused_commit_check,
    mean_tokens_per_step,
    rescore_agreement,
    steps_per_block,
)
from dirl_min.speed.timing import Case, time_cases
from dirl_min.decoding import generate
from dirl_min.dipo import rollout_rounds, build_layout
from dirl_min.model import build_tiny
from reference.decoding import decode
from dirl_min.model.forward import dense_denoiser

B = 4


@pytest.fixture(scope="module")
def tiny():
    return bench_model("tiny")


def test_bench_model_is_the_tiny_model_with_an_untied_sharpened_head(tiny):
    model, _ = tiny
    plain, _ = build_tiny(tie_word_embeddings=False)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(model.lm_head.weight, plain.lm_head.weight * 25.0)
    assert torch.equal(model.get_input_embeddings().weight, plain.get_input_embeddings().weight)
    assert model.lm_head.weight.dtype == torch.float32 and not model.training


def test_prompts_vary_and_hold_a_complete_block(tiny):
    _, tok = tiny
    prompts = bench_prompts(tok, 16)
    assert len(prompts) == 16
    assert len({len(p) % B for p in prompts}) > 1  # different grids in one batch
    assert min(len(p) for p in prompts) >= B  # unfused decoding pays a prefill pass (see fused check)


def test_fused_commit_check_reports_exactly_one_forward_per_block_fewer(tiny):
    model, tok = tiny
    check = fused_commit_check(model, bench_prompts(tok, 1)[0], 32, temperature=0.0, threshold=0.9)
    assert check["blocks"] == 8
    assert check["same_output"] and check["met"]
    assert check["forwards_unfused"] - check["forwards_fused"] == check["blocks"]
    assert check["per_block_unfused"] - check["per_block_fused"] == pytest.approx(1.0, abs=1e-12)


def test_fused_commit_check_fails_without_a_prefill_pass(tiny):
    """The check has teeth: a prompt shorter than a block has no prefill pass, so only blocks-1 are saved."""
    model, _ = tiny
    check = fused_commit_check(model, [10, 11], 16, temperature=0.0)
    assert check["same_output"] and not check["met"]
    assert check["forwards_unfused"] - check["forwards_fused"] == check["blocks"] - 1


def test_decoded_blocks_and_forwards_per_block_on_a_mixed_batch(tiny):
    model, tok = tiny
    prompts = bench_prompts(tok, 3)
    calls = []
    hook = model.model.register_forward_hook(lambda *_: calls.append(1))  # the backbone's real calls
    try:
        out = generate(model, prompts, max_new_tokens=20, temperature=0.0, seeds=[0, 1, 2])
    finally:
        hook.remove()
    assert decoded_blocks(out) == 5  # ceil(20 / B) working blocks, whatever the prompt tails
    for i, p in enumerate(prompts):
        assert len(out.response_ids[i]) == 5 * B - len(p) % B
    assert out.num_forwards == len(calls)
    assert forwards_per_block(out) == len(calls) / 5


def test_steps_per_block_equal_the_reference_decoders_forwards(tiny):
    """The reference-time estimate assumes the reference runs one forward per step of the cached decoder."""
    model, tok = tiny
    p = bench_prompts(tok, 1)[0]
    kw = dict(max_new_tokens=24, temperature=0.0, threshold=0.9)
    out = generate(model, [p], seeds=[0], **kw)
    ref = decode(dense_denoiser(model), p, block_size=B, mask_token_id=model.config.mask_token_id, seed=0, **kw)
    spb = steps_per_block(out)
    assert len(spb) == 6 and all(1 <= s <= B for s in spb)
    assert sum(spb) == ref["num_forwards"] == out.num_forwards  # fused: the prefill rides on step 1


def test_static_one_token_per_step_and_dynamic_at_least_one(tiny):
    model, tok = tiny
    prompts = bench_prompts(tok, 2)
    static = generate(model, prompts, max_new_tokens=16, temperature=0.0, strategy="low_confidence_static", steps=B)
    dynamic = generate(model, prompts, max_new_tokens=16, temperature=0.0, threshold=0.5)
    assert mean_tokens_per_step(static) == 1.0
    assert mean_tokens_per_step(dynamic) > 1.0


def test_packed_and_per_round_rescoring_agree(tiny):
    model, tok = tiny
    ro = generate(model, bench_prompts(tok, 4), max_new_tokens=24, temperature=1.0, top_k=50, threshold=0.9,
                  seeds=[0, 1, 2, 3])
    agree = rescore_agreement(model, ro)
    assert agree["tokens"] == sum(len(r) for r in ro.response_ids)
    assert agree["max_abs_diff"] <= 1e-5
    assert agree["max_abs_diff_recorded"] <= 1e-4  # the consistency invariant


def test_layout_token_counts_match_the_layouts_rescore_builds(tiny):
    model, tok = tiny
    ro = generate(model, bench_prompts(tok, 3), max_new_tokens=16, temperature=1.0, top_k=50, threshold=0.6,
                  seeds=[4, 5, 6])
    lay = _layout_tokens(ro)
    rounds = [rollout_rounds(ro, i) for i in range(len(ro))]
    packed = build_layout(*zip(*rounds), ro.mask_token_id, B)
    per_round = build_layout(
        *zip(*[(x0, nz[r:r + 1], tg[r:r + 1]) for x0, nz, tg in rounds for r in range(len(nz))]), ro.mask_token_id, B
    )
    assert lay["packed_padded"] == packed.input_ids.numel()
    assert lay["per_round_padded"] == per_round.input_ids.numel()
    assert lay["packed"] == int((packed.seg >= 0).sum()) and lay["per_round"] == int((per_round.seg >= 0).sum())
    assert lay["max_rounds"] == int(packed.clean_copy.max())


def test_subset_keeps_the_first_sequences(tiny):
    model, tok = tiny
    ro = generate(model, bench_prompts(tok, 3), max_new_tokens=8, temperature=0.0)
    sub = _subset(ro, 2)
    assert len(sub) == 2 and sub.response_ids == ro.response_ids[:2] and sub.step_map == ro.step_map[:2]


def test_choose_reference_tokens_halves_in_whole_blocks_until_the_estimate_fits():
    assert choose_reference_tokens(256, 4, lambda n: n / 10, 60.0) == 256
    assert choose_reference_tokens(256, 4, lambda n: n / 2, 60.0) == 64
    assert choose_reference_tokens(256, 4, lambda n: 1e9, 60.0) == 4  # at least one block
    assert choose_reference_tokens(250, 4, lambda n: 0.0, 60.0) == 252  # whole blocks
    assert choose_reference_tokens(100, 8, lambda n: n, 60.0) == 56  # 104 -> 52 rounded up to 56


def test_time_cases_warms_up_first_then_interleaves_in_rotated_order():
    calls = []
    ticks = iter(range(1000))
    cases = [Case(name, (lambda n=name: calls.append(n) or n), (lambda n=name: calls.append("warm-" + n)))
             for name in "abc"]
    time_cases(cases, 3, clock=lambda: float(next(ticks)), cpu_clock=lambda: 0.0)
    assert calls == ["warm-a", "warm-b", "warm-c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(c.times) == len(c.cpu_times) == 3 and c.result == c.name for c in cases)
    cases[0].clock = "cpu"
    assert cases[0].median == 0.0 and cases[1].median == 1.0  # the clock picks the series


def test_quick_replaces_defaults_but_not_explicit_options():
    cfg = parse_args(["--quick", "--new-tokens", "128"])
    assert cfg.decode.new_tokens == 128 and cfg.run.repeats == 1 and cfg.rescore.batch == 4
    assert parse_args([]).decode.new_tokens == 256 and parse_args(["--sizes", "mid"]).model.sizes == ["mid"]
    with pytest.raises(SystemExit):
        parse_args(["--sizes", "huge"])


def test_json_meta_args_hold_every_setting_under_its_flags_name():
    """The --json file's ``meta.args``: one key per flag (``--no-reference`` -> ``no_reference``) holding its setting."""
    from dirl_min.settings.commands import BENCH_ALIASES
    from dirl_min.settings.rules import get_setting

    cfg = parse_args(["--json", "r.json", "--no-reference", "--sizes", "mid", "--top-k", "5", "--clock", "cpu"])
    assert json_args(cfg) == {f.lstrip("-").replace("-", "_"): get_setting(cfg, dotted)
                              for f, dotted in BENCH_ALIASES.items()}
    got = json_args(cfg)  # the given values, by hand
    assert (got["json"], got["no_reference"], got["sizes"], got["top_k"], got["clock"]) == ("r.json", True, ["mid"], 5, "cpu")
    assert json_args(parse_args([]))["json"] is None  # no file: null
    # the file's key order, as the earlier files have it: valued flags in the table's order, then the switches
    assert list(json_args(parse_args([]))) == [
        "sizes", "block_size", "sharpen", "seed", "new_tokens", "batch", "threshold", "temperature", "top_k",
        "ref_max_seconds", "ref_tokens", "rescore_batch", "rescore_new_tokens", "repeats", "threads", "clock",
        "json", "no_reference", "quick", "quiet"]
