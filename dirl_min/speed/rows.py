"""The rows of one model size (see :mod:`dirl_min.bench` for what each compares) and their composition."""

from __future__ import annotations

from typing import Any

import torch

from dirl_min.speed.context import Bench, _fmt_rate, _fmt_s, _verdict
from dirl_min.speed.measures import (
    _agreement,
    _layout_tokens,
    _n_tokens,
    _subset,
    bench_model,
    bench_prompts,
    decoded_blocks,
    mean_tokens_per_step,
)
from dirl_min.speed.reference_row import row_reference
from dirl_min.speed.timing import Case, time_cases
from dirl_min.engine.decode import generate
from dirl_min.engine.score import rescore


#: packed vs per-round rescoring (row 6): the same log-probs computed through kernels of other shapes, whose
#: float32 sums run in other orders; 1e-4 is the tolerance the tests hold the decoder's recorded log-probs to
RESCORE_TOLERANCE = 1e-4


def time_decoding(bench: Bench) -> tuple[dict[str, Case], dict[str, float], int]:
    """Rows 1 (cached side), 2, 3, 4, 5: one interleaved set of cases.

    Returns:
        (the timed cases by name, tokens/s by case name, tokens the HF AR baseline generated).
    """
    model, tok, run, B = bench.model, bench.tok, bench.cfg.run, bench.B
    p0, n_new, warm_new, gen = bench.p0, bench.n_new, bench.warm_new, bench.gen
    prompts = bench.prompts
    ids0 = torch.tensor([p0])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def hf(n):
        def run():
            with torch.no_grad():
                return model.generate(
                    ids0, attention_mask=torch.ones_like(ids0), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, use_cache=True, pad_token_id=pad_id, eos_token_id=tok.eos_token_id,
                )
        return run

    cases = [
        Case("cached", gen([p0], n_new), gen([p0], warm_new)),  # fused, dynamic, batch 1: the default engine
        Case("unfused", gen([p0], n_new, fused_commit=False), gen([p0], warm_new, fused_commit=False)),
        Case("static", gen([p0], n_new, strategy="low_confidence_static", steps=B),
             gen([p0], warm_new, strategy="low_confidence_static", steps=B)),
        Case(f"batch{bench.cfg.decode.batch}", gen(prompts, n_new), gen(prompts, warm_new)),
        Case("hf_ar", hf(n_new), hf(warm_new)),
    ]
    for case in cases:
        case.clock = run.clock
    bench.log(f"timing {len(cases)} decoding configurations × {run.repeats} repeat(s) at {n_new} new tokens")
    time_cases(cases, run.repeats)
    c = {case.name: case for case in cases}
    rate = {k: _n_tokens(v.result) / v.median for k, v in c.items() if k != "hf_ar"}
    hf_tokens = c["hf_ar"].result.shape[1] - len(p0)
    rate["hf_ar"] = hf_tokens / c["hf_ar"].median
    return c, rate, hf_tokens


def row_fused(c: dict[str, Case], rate: dict[str, float]) -> dict[str, Any]:
    """Row 2: fused vs unfused commit."""
    base, unfused = c["cached"].result, c["unfused"].result
    blocks = decoded_blocks(base)
    saved = unfused.num_forwards - base.num_forwards
    same2 = base.response_ids == unfused.response_ids and base.step_map == unfused.step_map
    ok2 = same2 and saved == blocks
    return {
        "row": 2, "name": "fused vs unfused commit",
        "a": f"{base.num_forwards / blocks:.3f} fwd/blk, {_fmt_rate(rate['cached'])}",
        "b": f"{unfused.num_forwards / blocks:.3f} fwd/blk, {_fmt_rate(rate['unfused'])}",
        "ratio": f"{rate['cached'] / rate['unfused']:.2f}×",
        "check": f"saves {saved}/{blocks} = {saved / blocks:.3f} fwd/blk (exactly 1): {_verdict(ok2)}; "
                 f"same tokens: {'yes' if same2 else 'NO'}",
        "forwards_fused": base.num_forwards, "forwards_unfused": unfused.num_forwards, "blocks": blocks,
        "tokens_per_s_fused": rate["cached"], "tokens_per_s_unfused": rate["unfused"], "target_met": ok2,
        "correct": ok2,
    }


def row_dynamic(c: dict[str, Case], rate: dict[str, float], threshold: float) -> dict[str, Any]:
    """Row 3: dynamic vs static unmasking."""
    base, static = c["cached"].result, c["static"].result
    tps_dyn, tps_sta = mean_tokens_per_step(base), mean_tokens_per_step(static)
    return {
        "row": 3, "name": f"dynamic (thr {threshold}) vs static (1 tok/step)",
        "a": f"{tps_dyn:.3f} tok/step, {_fmt_rate(rate['cached'])}",
        "b": f"{tps_sta:.3f} tok/step, {_fmt_rate(rate['static'])}",
        "ratio": f"{rate['cached'] / rate['static']:.2f}×",
        "check": f"forwards {base.num_forwards} vs {static.num_forwards}",
        "tokens_per_step_dynamic": tps_dyn, "tokens_per_step_static": tps_sta,
        "tokens_per_s_dynamic": rate["cached"], "tokens_per_s_static": rate["static"],
    }


def row_batch(c: dict[str, Case], rate: dict[str, float], batch_size: int) -> dict[str, Any]:
    """Row 4: batch 1 vs batch N."""
    bname = f"batch{batch_size}"
    batch = c[bname].result
    return {
        "row": 4, "name": f"batch {batch_size} vs batch 1",
        "a": f"{_fmt_rate(rate[bname])}", "b": f"{_fmt_rate(rate['cached'])}",
        "ratio": f"{rate[bname] / rate['cached']:.2f}×",
        "check": f"{_n_tokens(batch)} tok in {_fmt_s(c[bname].median)}; {mean_tokens_per_step(batch):.3f} tok/step",
        "tokens_per_s_batch": rate[bname], "tokens_per_s_batch1": rate["cached"],
    }


def row_hf(rate: dict[str, float], hf_tokens: int) -> dict[str, Any]:
    """Row 5: transformers autoregressive generate."""
    return {
        "row": 5, "name": "block diffusion (b1) vs HF AR generate",
        "a": f"{_fmt_rate(rate['cached'])}", "b": f"{_fmt_rate(rate['hf_ar'])}",
        "ratio": f"{rate['cached'] / rate['hf_ar']:.2f}×",
        "check": f"AR: {hf_tokens} tok, 1 tok/forward, greedy, KV cache",
        "tokens_per_s_block_diffusion": rate["cached"], "tokens_per_s_hf_generate": rate["hf_ar"],
    }


def row_rescore(bench: Bench) -> dict[str, Any]:
    """Row 6: packed vs per-round rescoring of sampled rollouts (``--rescore-batch`` > 0)."""
    model, tok, rs_cfg, run = bench.model, bench.tok, bench.cfg.rescore, bench.cfg.run
    ro = generate(model, bench_prompts(tok, rs_cfg.batch), max_new_tokens=rs_cfg.new_tokens,
                  temperature=1.0, top_k=50, threshold=bench.cfg.decode.threshold, seeds=list(range(rs_cfg.batch)))
    lay = _layout_tokens(ro)

    warm_ro = _subset(ro, min(2, len(ro)))

    def rs(packed, r=ro):
        def run():
            with torch.no_grad():
                return rescore(model, r, packed=packed)
        return run

    bench.log(f"timing packed vs per-round rescoring of {len(ro)} rollouts × {run.repeats} repeat(s)")
    rc = time_cases([Case("packed", rs(True), rs(True, warm_ro), run.clock),
                     Case("per_round", rs(False), rs(False, warm_ro), run.clock)],
                    run.repeats)
    agree = _agreement(rc[0].result, rc[1].result, ro)
    ratio6 = rc[1].median / rc[0].median
    ok_diff = agree["max_abs_diff"] <= RESCORE_TOLERANCE
    return {
        "row": 6, "name": f"packed vs per-round rescore ({len(ro)}×{rs_cfg.new_tokens} tok)",
        "a": _fmt_s(rc[0].median), "b": _fmt_s(rc[1].median), "ratio": f"{ratio6:.2f}×",
        "check": f"≥1.5×: {_verdict(ratio6 >= 1.5)}; max|Δ| {agree['max_abs_diff']:.1e} ≤ {RESCORE_TOLERANCE:g} (float32): "
                 f"{_verdict(ok_diff)} (vs decoder logp {agree['max_abs_diff_recorded']:.1e}); "
                 f"R≤{lay['max_rounds']}, layout tok {lay['packed']} vs {lay['per_round']} "
                 f"({lay['packed_padded']} vs {lay['per_round_padded']} padded)",
        "seconds_packed": rc[0].median, "seconds_per_round": rc[1].median, "speedup": ratio6,
        "target_met": ratio6 >= 1.5, "max_abs_diff": agree["max_abs_diff"], "diff_met": ok_diff, "correct": ok_diff,
        "tolerance": RESCORE_TOLERANCE,
        "max_abs_diff_vs_recorded_logp": agree["max_abs_diff_recorded"], "tokens": agree["tokens"],
        "layout": lay,
    }


def bench_size(size: str, cfg) -> dict[str, Any]:
    """All rows for one model size under the settings ``cfg`` (:class:`dirl_min.settings.commands.BenchCommand`).
    Returns a JSON-ready dict (the table rows are under ``rows``)."""
    m, d = cfg.model, cfg.decode
    model, tok = bench_model(size, sharpen=m.sharpen, block_size=m.block_size, seed=m.seed)
    dec = dict(temperature=d.temperature, top_k=d.top_k, threshold=d.threshold, stop_token_ids=())
    bench = Bench(size, cfg, model, tok, bench_prompts(tok, d.batch), dec)
    n_params = sum(p.numel() for p in model.parameters())

    # 1. time the decoding configurations of rows 1-5 together, interleaved
    c, rate, hf_tokens = time_decoding(bench)
    # 2. the rows: reference (times its own runs), the decoding comparisons, rescoring (times its own)
    rows: list[dict[str, Any]] = [
        row_reference(bench, c),
        row_fused(c, rate),
        row_dynamic(c, rate, d.threshold),
        row_batch(c, rate, d.batch),
        row_hf(rate, hf_tokens),
    ]
    if cfg.rescore.batch > 0:
        rows.append(row_rescore(bench))

    return {
        "size": size,
        "params": n_params,
        "config": {k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                "num_key_value_heads", "head_dim", "intermediate_size",
                                                "vocab_size", "block_size")},
        "prompt_tokens": len(bench.p0),
        "timings_s": {case.name: case.times for case in c.values()},
        "cpu_timings_s": {case.name: case.cpu_times for case in c.values()},
        "rows": rows,
    }
