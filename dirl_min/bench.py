"""Decoding and rescoring benchmark: ``python -m dirl_min.bench`` (``--help`` for the options).

Every figure is measured side by side in one run, on one device (CPU, float32), on
randomly initialised models built by :func:`dirl_min.model.build_tiny`: the default
tiny one and a mid-size one. Rows, per model size:

1. KV-cached :func:`dirl_min.decoding.generate` vs the uncached reference decoder
   (``reference.decoding.decode``, the same weights wrapped as a denoiser), tokens/s.
2. Fused vs unfused commit: forwards per block (from ``Rollout.num_forwards``), tokens/s.
3. Dynamic (threshold) vs static (one token per step) unmasking: tokens per step, tokens/s.
4. Batch 1 vs batch 16 throughput.
5. The same weights decoding autoregressively with transformers' ``model.generate``
   (KV cache, greedy): the baseline a user would otherwise pick.
6. Packed vs per-round DiPO rescoring (:func:`dirl_min.dipo.rescore`): time and the
   largest difference of the values.

A random model predicts almost uniformly, so its confidences never reach a threshold:
the output head is untied and multiplied by ``--sharpen`` (as the engine tests do), and
decoding runs to ``max_new_tokens`` with no stop tokens, so every run of a row decodes
the same number of blocks. Timings are medians over ``--repeats`` after a warm-up, the
configurations of a row interleaved repeat by repeat, so that load from other processes
falls on all of them alike; only the ratios inside one run are meant to be compared.

``--shape qwen3-0.6b`` (or ``sdar-1.7b``) runs a different benchmark instead: one SFT and one
DiPO step on a real checkpoint's shape, see :mod:`dirl_min.bench_shape`
(``python -m dirl_min.bench_shape --help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dirl_min.forward import dense_denoiser
from dirl_min.decoding import Rollout, generate
from dirl_min.dipo import rescore
from dirl_min.model import build_tiny, chat_prompt_ids

__all__ = [
    "SIZES",
    "bench_model",
    "bench_prompts",
    "decoded_blocks",
    "forwards_per_block",
    "mean_tokens_per_step",
    "fused_commit_check",
    "rescore_agreement",
    "steps_per_block",
    "choose_reference_tokens",
    "time_cases",
    "main",
]

# Model sizes (keyword arguments of build_tiny).
SIZES: dict[str, dict[str, int]] = {
    "tiny": {},  # build_tiny defaults: hidden 64, 2 layers, 4 heads (2 KV), head_dim 16, MLP 256
    "mid": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, intermediate_size=1536),
}

# Prompts of varied lengths (with the chat template: 40 to 100 tokens of the tiny tokenizer).
PROMPTS = [
    "Solve: If x + 5 = 12, what is x?",
    "What is 2+3?",
    "Hi",
    "A train travels 60 km in 45 minutes. What is its average speed in km/h?",
    "Compute 17 * 23.",
    "How many positive divisors does 36 have?",
    "Simplify (x^2 - 9) / (x - 3).",
    "What is the sum of the first 10 positive odd numbers?",
    "If a rectangle has perimeter 30 and width 5, what is its area?",
    "Find the remainder when 2^10 is divided by 7.",
    "Tom has 3 apples and buys twice as many. How many apples does he have now?",
    "What is 15% of 80?",
    "Solve for y: 3y - 7 = 2y + 4.",
    "Write 0.375 as a fraction in lowest terms.",
    "The angles of a triangle are in the ratio 1:2:3. What is the largest angle?",
    "What is the least common multiple of 12 and 18?",
]


# --------------------------------------------------------------------------------------------
# Models, prompts and deterministic measures (tested in tests/test_bench.py)
# --------------------------------------------------------------------------------------------


def bench_model(size: str = "tiny", *, sharpen: float = 25.0, block_size: int = 4, seed: int = 0):
    """A random model of a named size with a sharpened, untied output head, in eval mode, float32.

    Args:
        size: a key of :data:`SIZES`.
        sharpen: ``lm_head.weight`` is multiplied by this (1 = the plain random model, whose
            near-uniform predictions commit one token per step).
        block_size, seed: passed to :func:`build_tiny`.

    Returns:
        (model, tokenizer).
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    model, tok = build_tiny(block_size=block_size, seed=seed, tie_word_embeddings=False, dtype=torch.float32,
                            **SIZES[size])
    with torch.no_grad():
        model.lm_head.weight.mul_(float(sharpen))
    return model.eval(), tok


def bench_prompts(tokenizer, n: int) -> list[list[int]]:
    """``n`` chat prompts (token ids) of varied lengths, cycling through :data:`PROMPTS`."""
    return [chat_prompt_ids(tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(n)]


def decoded_blocks(rollout: Rollout) -> int:
    """Working blocks the batch decoded: the most any sequence decoded (its forwards are shared).

    A sequence's working blocks run from its first incomplete prompt block to ``stopped_at``.
    """
    b = rollout.block_size
    counts = [
        (end - (len(p) // b) * b) // b
        for p, end in zip(rollout.prompt_ids, rollout.stopped_at)
        if end is not None
    ]
    return max(counts, default=0)


def forwards_per_block(rollout: Rollout) -> float:
    """Model calls per decoded block (``Rollout.num_forwards`` / :func:`decoded_blocks`)."""
    return rollout.num_forwards / max(1, decoded_blocks(rollout))


def mean_tokens_per_step(rollout: Rollout) -> float:
    """Tokens per step (SPEC §3: response tokens / distinct steps), averaged over sequences."""
    return statistics.fmean(rollout.tokens_per_step(i) for i in range(len(rollout)))


def steps_per_block(rollout: Rollout, i: int = 0) -> list[int]:
    """Denoising steps each working block of sequence ``i`` took (= the reference decoder's forwards)."""
    b = rollout.block_size
    prompt = rollout.prompt_ids[i]
    full = [0] * len(prompt) + list(rollout.step_map[i])
    first = len(prompt) // b
    out = []
    for k in range(first, len(full) // b):
        out.append(len({s for s in full[k * b:(k + 1) * b] if s > 0}))
    return out


def fused_commit_check(model, prompt_ids: list[int], max_new_tokens: int, **decode_kw) -> dict[str, Any]:
    """Decode once fused and once unfused (no timing) and compare their forward counts.

    With a prompt holding at least one complete block, the unfused decoder pays one extra
    forward per block (the prefill pass for the first, a cache pass between blocks), so
    the check is ``unfused - fused == blocks``, and both must produce the same tokens.

    Returns:
        dict with ``blocks``, ``forwards_fused``, ``forwards_unfused``, ``per_block_fused``,
        ``per_block_unfused``, ``saved_per_block`` (exact fraction as a float),
        ``same_output`` and ``met`` (saved exactly one per block and same output).
    """
    fused = generate(model, [prompt_ids], max_new_tokens=max_new_tokens, fused_commit=True, seeds=[0], **decode_kw)
    unfused = generate(model, [prompt_ids], max_new_tokens=max_new_tokens, fused_commit=False, seeds=[0],
                       **decode_kw)
    blocks = decoded_blocks(fused)
    same = (fused.response_ids == unfused.response_ids and fused.step_map == unfused.step_map
            and decoded_blocks(unfused) == blocks)
    saved = unfused.num_forwards - fused.num_forwards
    return {
        "blocks": blocks,
        "forwards_fused": fused.num_forwards,
        "forwards_unfused": unfused.num_forwards,
        "per_block_fused": fused.num_forwards / blocks,
        "per_block_unfused": unfused.num_forwards / blocks,
        "saved_per_block": saved / blocks,
        "same_output": same,
        "met": same and saved == blocks,
    }


def rescore_agreement(model, rollout: Rollout, *, batch_size: int = 8) -> dict[str, float]:
    """Packed and per-round rescoring of the same rollouts (no timing), compared.

    Returns:
        dict with ``max_abs_diff`` (packed vs per-round), ``max_abs_diff_recorded`` (packed vs
        the decoder's recorded ``logp``: the consistency invariant), ``tokens`` scored.
    """
    with torch.no_grad():
        packed = rescore(model, rollout, packed=True, batch_size=batch_size)
        per_round = rescore(model, rollout, packed=False, batch_size=batch_size)
    return _agreement(packed, per_round, rollout)


def _agreement(packed, per_round, rollout) -> dict[str, float]:
    diff, diff_rec, n = 0.0, 0.0, 0
    for i, (a, b) in enumerate(zip(packed, per_round)):
        if a.shape != b.shape:
            return {"max_abs_diff": math.inf, "max_abs_diff_recorded": math.inf, "tokens": n}
        if a.numel():
            diff = max(diff, float((a - b).abs().max()))
            diff_rec = max(diff_rec, float((a - torch.tensor(rollout.logp[i])).abs().max()))
        n += a.numel()
    return {"max_abs_diff": diff, "max_abs_diff_recorded": diff_rec, "tokens": n}


def _layout_tokens(rollout: Rollout, batch_size: int = 8) -> dict[str, int]:
    """Sizes of the rescoring layouts: max rounds R, and per variant the tokens of the layouts
    (``sum (R_i+1)·L_i`` packed, ``sum R_i·2·L_i`` per round) and the tokens actually computed
    (rows × padded width, per forward of ``batch_size`` responses, as :func:`rescore` batches them)."""
    from dirl_min.dipo import step_rounds

    out = {"max_rounds": 0, "packed": 0, "per_round": 0, "packed_padded": 0, "per_round_padded": 0}
    for start in range(0, len(rollout), batch_size):
        w_packed, w_round, n_round = 0, 0, 0
        idx = range(start, min(start + batch_size, len(rollout)))
        for i in idx:
            length = len(rollout.prompt_ids[i]) + len(rollout.response_ids[i])
            steps = torch.tensor([0] * len(rollout.prompt_ids[i]) + rollout.step_map[i])
            r = step_rounds(steps, rollout.block_size)[0].shape[0]
            out["max_rounds"] = max(out["max_rounds"], r)
            out["packed"] += (r + 1) * length
            out["per_round"] += r * 2 * length
            w_packed, w_round, n_round = max(w_packed, (r + 1) * length), max(w_round, 2 * length), n_round + r
        out["packed_padded"] += len(idx) * w_packed
        out["per_round_padded"] += n_round * w_round
    return out


def choose_reference_tokens(
    new_tokens: int, block_size: int, estimate: Callable[[int], float], budget_s: float
) -> int:
    """Largest of ``new_tokens, new_tokens/2, …`` (whole blocks, at least one) whose estimated
    reference-decoding time fits ``budget_s`` (the smallest candidate if none does)."""
    n = max(block_size, -(-new_tokens // block_size) * block_size)
    while n > block_size and estimate(n) > budget_s:
        n = max(block_size, -(-(n // 2) // block_size) * block_size)
    return n


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One configuration to time: ``run()`` is timed, ``warm()`` (default: ``run``) is run first.

    ``times`` holds wall-clock seconds (``time.perf_counter``), ``cpu_times`` this process's
    CPU seconds (``time.process_time``); :attr:`median` uses the one named by ``clock``.
    """

    name: str
    run: Callable[[], Any]
    warm: Callable[[], Any] | None = None
    clock: str = "wall"
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    result: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.cpu_times if self.clock == "cpu" else self.times)


def time_cases(
    cases: list[Case],
    repeats: int,
    *,
    clock: Callable[[], float] = time.perf_counter,
    cpu_clock: Callable[[], float] = time.process_time,
) -> list[Case]:
    """Warm every case up once, then time ``repeats`` rounds, interleaved.

    Round ``r`` runs the cases in an order rotated by ``r``, so slow phases of a shared
    machine fall on all cases alike. Each case keeps its wall and CPU times and its last result.
    """
    for c in cases:
        (c.warm or c.run)()
    for r in range(repeats):
        k = r % len(cases)
        for c in cases[k:] + cases[:k]:
            t0, c0 = clock(), cpu_clock()
            c.result = c.run()
            c.times.append(clock() - t0)
            c.cpu_times.append(cpu_clock() - c0)
    return cases


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def _import_reference():
    """``reference.decoding`` (shipped next to the package in the repository, not installed)."""
    try:
        from reference import decoding
    except ImportError:
        root = Path(__file__).resolve().parents[1]
        if not (root / "reference" / "decoding.py").is_file():
            return None
        sys.path.insert(0, str(root))
        try:
            from reference import decoding
        except ImportError:
            return None
    return decoding


def _subset(rollout: Rollout, k: int) -> Rollout:
    """The first ``k`` sequences of a rollout (for cheap warm-ups)."""
    lists = {f: getattr(rollout, f)[:k] for f in ("prompt_ids", "response_ids", "step_map", "logp", "truncated",
                                                  "stopped_at", "seeds")}
    return dataclasses.replace(rollout, **lists, text=None if rollout.text is None else rollout.text[:k])


def _n_tokens(rollout: Rollout) -> int:
    return sum(len(r) for r in rollout.response_ids)


def _fmt_rate(x: float) -> str:
    return f"{x:,.1f} tok/s" if x < 1000 else f"{x:,.0f} tok/s"


def _fmt_s(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"  · {msg}", file=sys.stderr, flush=True)


def bench_size(size: str, args) -> dict[str, Any]:
    """All rows for one model size. Returns a JSON-ready dict (the table rows are under ``rows``)."""
    log = lambda m: _log(f"[{size}] {m}", args.quiet)  # noqa: E731
    model, tok = bench_model(size, sharpen=args.sharpen, block_size=args.block_size, seed=args.seed)
    B = args.block_size
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    prompts = bench_prompts(tok, args.batch)
    p0 = prompts[0]
    n_new = args.new_tokens
    warm_new = 2 * B  # warm-ups decode two blocks
    dec = dict(temperature=args.temperature, top_k=args.top_k, threshold=args.threshold, stop_token_ids=())

    def gen(prompt_list, n, **kw):
        opts = {**dec, **kw}
        return lambda: generate(model, prompt_list, max_new_tokens=n, seeds=list(range(len(prompt_list))), **opts)

    # --- rows 1 (cached side), 2, 3, 4, 5: one interleaved set of cases ---------------------------
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
        Case(f"batch{args.batch}", gen(prompts, n_new), gen(prompts, warm_new)),
        Case("hf_ar", hf(n_new), hf(warm_new)),
    ]
    for case in cases:
        case.clock = args.clock
    log(f"timing {len(cases)} decoding configurations × {args.repeats} repeat(s) at {n_new} new tokens")
    time_cases(cases, args.repeats)
    c = {case.name: case for case in cases}
    base, unfused, static = c["cached"].result, c["unfused"].result, c["static"].result
    batch = c[f"batch{args.batch}"].result
    rate = {k: _n_tokens(v.result) / v.median for k, v in c.items() if k != "hf_ar"}
    hf_tokens = c["hf_ar"].result.shape[1] - len(p0)
    rate["hf_ar"] = hf_tokens / c["hf_ar"].median

    rows: list[dict[str, Any]] = []

    # --- row 1: cached vs uncached reference -------------------------------------------------
    ref_mod = None if args.no_reference else _import_reference()
    if ref_mod is None:
        rows.append({"row": 1, "name": "cached vs uncached reference", "skipped": True,
                     "a": "-", "b": "-", "ratio": "-",
                     "check": "skipped (--no-reference)" if args.no_reference else
                     "skipped: reference/ not found (run from the repository checkout)"})
    else:
        denoise = dense_denoiser(model)
        spb = steps_per_block(base)  # the reference runs the same steps (same tokens, tested)
        P = len(p0)
        first = P // B

        probe_cache: dict[int, float] = {}

        def probe(length: int) -> float:
            if length not in probe_cache:
                ids = torch.full((length,), cfg.mask_token_id, dtype=torch.long)
                ids[:P] = torch.tensor(p0)
                best = math.inf
                for _ in range(2):
                    t0 = time.perf_counter()
                    logits = denoise(ids, ref_mod.block_causal(length, B)).double()
                    [torch.log_softmax(logits[j], dim=-1).tolist() for j in range(length - B, length)]
                    best = min(best, time.perf_counter() - t0)
                probe_cache[length] = best
            return probe_cache[length]

        # reference time per forward ≈ a + b·L + c·L² (mask building is quadratic in Python), fitted on 3 probes
        lens = [(first + 1) * B, (first + 1 + len(spb) // 2) * B, (first + len(spb)) * B]
        lens = sorted(set(lens))
        A = torch.tensor([[1.0, L, L * L] for L in lens], dtype=torch.float64)
        y = torch.tensor([probe(L) for L in lens], dtype=torch.float64)
        coef = torch.linalg.lstsq(A, y[:, None]).solution[:, 0].tolist()

        def estimate(n: int) -> float:
            blocks = max(1, -(-n // B))
            tot = 0.0
            for k, s in enumerate(spb[:blocks]):
                L = (first + k + 1) * B
                tot += s * max(probe_cache.get(L, 0.0), coef[0] + coef[1] * L + coef[2] * L * L)
            return tot

        if args.ref_tokens:
            n_ref = args.ref_tokens
            why = "set by --ref-tokens"
        else:
            n_ref = choose_reference_tokens(n_new, B, estimate, args.ref_max_seconds)
            why = (f"estimated {estimate(n_new):.0f} s at {n_new} > {args.ref_max_seconds:.0f} s budget"
                   if n_ref < n_new else "full length")
        log(f"reference decoder at {n_ref} new tokens ({why}; estimated {estimate(n_ref):.1f} s), one run")
        t0, c0 = time.perf_counter(), time.process_time()
        ref = ref_mod.decode(denoise, p0, block_size=B, mask_token_id=cfg.mask_token_id, max_new_tokens=n_ref,
                             seed=0, **dec)
        t_ref_wall, t_ref_cpu = time.perf_counter() - t0, time.process_time() - c0
        t_ref = t_ref_cpu if args.clock == "cpu" else t_ref_wall
        if n_ref == n_new:
            cached_case, cached_ro = c["cached"], base
        else:
            log(f"timing the cached decoder at {n_ref} new tokens × {args.repeats} repeat(s)")
            cached_case = time_cases([Case("cached_ref_len", gen([p0], n_ref), gen([p0], warm_new), args.clock)],
                                     args.repeats)[0]
            cached_ro = cached_case.result
        same = ref["response_ids"] == cached_ro.response_ids[0] and ref["step_map"] == cached_ro.step_map[0]
        r_cached = len(cached_ro.response_ids[0]) / cached_case.median
        r_ref = len(ref["response_ids"]) / t_ref
        ratio = r_cached / r_ref
        note = f"{n_ref} new tok" + ("" if n_ref == n_new else f" (reduced: {why})")
        rows.append({
            "row": 1, "name": "cached (generate) vs uncached reference",
            "a": f"{_fmt_rate(r_cached)}", "b": f"{_fmt_rate(r_ref)} [1 run]", "ratio": f"{ratio:.1f}×",
            "check": f"≥10×: {_verdict(ratio >= 10)}; same tokens: {'yes' if same else 'NO'}; {note}",
            "tokens_per_s_cached": r_cached, "tokens_per_s_reference": r_ref, "speedup": ratio,
            "target_met": ratio >= 10, "new_tokens": n_ref,
            "reference_seconds": t_ref_wall, "reference_cpu_seconds": t_ref_cpu,
            "reference_estimated_seconds": estimate(n_ref), "reference_forwards": ref["num_forwards"],
            "cached_forwards": cached_ro.num_forwards, "same_tokens": same,
            "cached_seconds": cached_case.times, "cached_cpu_seconds": cached_case.cpu_times,
        })

    # --- row 2: fused vs unfused commit -----------------------------------------------------
    blocks = decoded_blocks(base)
    saved = unfused.num_forwards - base.num_forwards
    same2 = base.response_ids == unfused.response_ids and base.step_map == unfused.step_map
    ok2 = same2 and saved == blocks
    rows.append({
        "row": 2, "name": "fused vs unfused commit",
        "a": f"{base.num_forwards / blocks:.3f} fwd/blk, {_fmt_rate(rate['cached'])}",
        "b": f"{unfused.num_forwards / blocks:.3f} fwd/blk, {_fmt_rate(rate['unfused'])}",
        "ratio": f"{rate['cached'] / rate['unfused']:.2f}×",
        "check": f"saves {saved}/{blocks} = {saved / blocks:.3f} fwd/blk (exactly 1): {_verdict(ok2)}; "
                 f"same tokens: {'yes' if same2 else 'NO'}",
        "forwards_fused": base.num_forwards, "forwards_unfused": unfused.num_forwards, "blocks": blocks,
        "tokens_per_s_fused": rate["cached"], "tokens_per_s_unfused": rate["unfused"], "target_met": ok2,
    })

    # --- row 3: dynamic vs static --------------------------------------------------------------
    tps_dyn, tps_sta = mean_tokens_per_step(base), mean_tokens_per_step(static)
    rows.append({
        "row": 3, "name": f"dynamic (thr {args.threshold}) vs static (1 tok/step)",
        "a": f"{tps_dyn:.3f} tok/step, {_fmt_rate(rate['cached'])}",
        "b": f"{tps_sta:.3f} tok/step, {_fmt_rate(rate['static'])}",
        "ratio": f"{rate['cached'] / rate['static']:.2f}×",
        "check": f"forwards {base.num_forwards} vs {static.num_forwards}",
        "tokens_per_step_dynamic": tps_dyn, "tokens_per_step_static": tps_sta,
        "tokens_per_s_dynamic": rate["cached"], "tokens_per_s_static": rate["static"],
    })

    # --- row 4: batch 1 vs batch N -------------------------------------------------------------
    bname = f"batch{args.batch}"
    rows.append({
        "row": 4, "name": f"batch {args.batch} vs batch 1",
        "a": f"{_fmt_rate(rate[bname])}", "b": f"{_fmt_rate(rate['cached'])}",
        "ratio": f"{rate[bname] / rate['cached']:.2f}×",
        "check": f"{_n_tokens(batch)} tok in {_fmt_s(c[bname].median)}; {mean_tokens_per_step(batch):.3f} tok/step",
        "tokens_per_s_batch": rate[bname], "tokens_per_s_batch1": rate["cached"],
    })

    # --- row 5: transformers autoregressive generate -----------------------------------------
    rows.append({
        "row": 5, "name": "block diffusion (b1) vs HF AR generate",
        "a": f"{_fmt_rate(rate['cached'])}", "b": f"{_fmt_rate(rate['hf_ar'])}",
        "ratio": f"{rate['cached'] / rate['hf_ar']:.2f}×",
        "check": f"AR: {hf_tokens} tok, 1 tok/forward, greedy, KV cache",
        "tokens_per_s_block_diffusion": rate["cached"], "tokens_per_s_hf_generate": rate["hf_ar"],
    })

    # --- row 6: packed vs per-round rescoring --------------------------------------------------
    if args.rescore_batch > 0:
        ro = generate(model, bench_prompts(tok, args.rescore_batch), max_new_tokens=args.rescore_new_tokens,
                      temperature=1.0, top_k=50, threshold=args.threshold, seeds=list(range(args.rescore_batch)))
        lay = _layout_tokens(ro)

        warm_ro = _subset(ro, min(2, len(ro)))

        def rs(packed, r=ro):
            def run():
                with torch.no_grad():
                    return rescore(model, r, packed=packed)
            return run

        log(f"timing packed vs per-round rescoring of {len(ro)} rollouts × {args.repeats} repeat(s)")
        rc = time_cases([Case("packed", rs(True), rs(True, warm_ro), args.clock),
                         Case("per_round", rs(False), rs(False, warm_ro), args.clock)],
                        args.repeats)
        agree = _agreement(rc[0].result, rc[1].result, ro)
        ratio6 = rc[1].median / rc[0].median
        ok_diff = agree["max_abs_diff"] <= 1e-5
        rows.append({
            "row": 6, "name": f"packed vs per-round rescore ({len(ro)}×{args.rescore_new_tokens} tok)",
            "a": _fmt_s(rc[0].median), "b": _fmt_s(rc[1].median), "ratio": f"{ratio6:.2f}×",
            "check": f"≥1.5×: {_verdict(ratio6 >= 1.5)}; max|Δ| {agree['max_abs_diff']:.1e} ≤ 1e-5: "
                     f"{_verdict(ok_diff)} (vs decoder logp {agree['max_abs_diff_recorded']:.1e}); "
                     f"R≤{lay['max_rounds']}, layout tok {lay['packed']} vs {lay['per_round']} "
                     f"({lay['packed_padded']} vs {lay['per_round_padded']} padded)",
            "seconds_packed": rc[0].median, "seconds_per_round": rc[1].median, "speedup": ratio6,
            "target_met": ratio6 >= 1.5, "max_abs_diff": agree["max_abs_diff"], "diff_met": ok_diff,
            "max_abs_diff_vs_recorded_logp": agree["max_abs_diff_recorded"], "tokens": agree["tokens"],
            "layout": lay,
        })

    return {
        "size": size,
        "params": n_params,
        "config": {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                "num_key_value_heads", "head_dim", "intermediate_size",
                                                "vocab_size", "block_size")},
        "prompt_tokens": len(p0),
        "timings_s": {case.name: case.times for case in cases},
        "cpu_timings_s": {case.name: case.cpu_times for case in cases},
        "rows": rows,
    }


def _print_table(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print(f"\n== {result['size']}: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
          f"{cfg['num_attention_heads']}/{cfg['num_key_value_heads']} heads, MLP {cfg['intermediate_size']}, "
          f"vocab {cfg['vocab_size']}, {result['params'] / 1e6:.2f}M params, B={cfg['block_size']}, "
          f"prompt {result['prompt_tokens']} tok ==")
    head = ("#", "comparison (A vs B)", "A", "B", "A/B", "target / check")
    rows = [(str(r["row"]), r["name"], r["a"], r["b"], r["ratio"], r["check"]) for r in result["rows"]]
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(5)]
    for line in [head] + rows:
        print(" | ".join(x.ljust(w) for x, w in zip(line[:5], widths)) + " | " + line[5])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dirl_min.bench",
        description="Benchmark block-diffusion decoding and DiPO rescoring on CPU (float32), figures measured "
                    "side by side in one run on random models with a sharpened output head.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sizes", default="tiny,mid",
                   help=f"comma-separated model sizes to benchmark, from: {', '.join(SIZES)} "
                        "(tiny = build_tiny defaults; mid = hidden 512, 8 layers, 8/4 heads, MLP 1536)")
    p.add_argument("--new-tokens", type=int, default=256,
                   help="max_new_tokens of every decoding run (whole blocks; no stop tokens, so every run of a "
                        "row decodes the same number of blocks)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed repeats per configuration (after one short warm-up), interleaved across the "
                        "configurations of a row; medians are reported. 2 keeps the default run near 5 minutes "
                        "on 2 busy cores; use 3 or more for steadier figures")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0 = torch's default for this machine). 1 by default: on a "
                        "machine shared with other work, several threads make timings erratic")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="what the figures divide by: 'wall' = time.perf_counter (what a user waits); 'cpu' = "
                        "time.process_time, this process's CPU time, which other processes' load barely "
                        "disturbs when --threads is 1 (with more threads it sums their work). Both are kept in --json")
    p.add_argument("--batch", type=int, default=16, help="batch size of the large-batch row (row 4)")
    p.add_argument("--block-size", type=int, default=4, help="diffusion block size B")
    p.add_argument("--threshold", type=float, default=0.9, help="confidence threshold of the dynamic strategy")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="decoding temperature for rows 1-5 (0 = greedy); rescoring rollouts always use 1.0")
    p.add_argument("--top-k", type=int, default=0, help="top-k for rows 1-5 when sampling (0 = off)")
    p.add_argument("--sharpen", type=float, default=25.0,
                   help="factor applied to the untied lm_head weights so that the random model is confident")
    p.add_argument("--seed", type=int, default=0, help="model weight seed")
    p.add_argument("--ref-max-seconds", type=float, default=60.0,
                   help="if the uncached reference decoder is estimated to take longer than this at "
                        "--new-tokens, halve its token count until it fits (the value used is printed)")
    p.add_argument("--ref-tokens", type=int, default=0,
                   help="new tokens for the reference comparison (row 1), overriding the estimate (0 = auto)")
    p.add_argument("--no-reference", action="store_true", help="skip the uncached reference decoder (row 1)")
    p.add_argument("--rescore-batch", type=int, default=8,
                   help="rollouts rescored in row 6 (sampled: temperature 1, top-k 50, as DiRL's rollouts); "
                        "0 skips the row")
    p.add_argument("--rescore-new-tokens", type=int, default=64, help="new tokens of each rescored rollout")
    p.add_argument("--quick", action="store_true",
                   help="a fast smoke run (about a minute): --new-tokens 64 --repeats 1 --ref-max-seconds 15 "
                        "--rescore-batch 4 --rescore-new-tokens 32 (explicitly given options still win)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write all results (and raw timings) here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


QUICK = {"new_tokens": 64, "repeats": 1, "ref_max_seconds": 15.0, "rescore_batch": 4, "rescore_new_tokens": 32}


def parse_args(argv=None) -> argparse.Namespace:
    """Parse options; ``--quick`` replaces the defaults of :data:`QUICK` but not options given explicitly."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == parser.get_default(k):
                setattr(args, k, v)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad or not sizes:
        parser.error(f"--sizes: unknown size(s) {bad}; choose from {', '.join(SIZES)}")
    args.size_list = sizes
    for name in ("new_tokens", "repeats", "batch", "block_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1")
    return args


def main(argv=None) -> dict[str, Any] | list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--shape" or a.startswith("--shape=") for a in argv):
        from dirl_min import bench_shape  # real-shape training steps: a separate benchmark

        return bench_shape.main(argv)
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass
    t_start = time.perf_counter()
    meta = {
        "device": "cpu",
        "dtype": "float32",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "args": {k: v for k, v in vars(args).items() if k != "size_list"},
    }
    print(f"dirl_min bench — device cpu, float32, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()} (of {os.cpu_count()} CPUs), repeats {args.repeats} (median, "
          f"after a warm-up), clock {'wall (perf_counter)' if args.clock == 'wall' else 'CPU (process_time)'}, "
          f"{args.new_tokens} new tokens, load average {os.getloadavg()[0]:.1f}")
    print(f"models: random weights, untied lm_head ×{args.sharpen:g} (sharpened so that confidences spread "
          f"over (0,1)); {'greedy' if args.temperature <= 0 else f'temperature {args.temperature}'}; "
          f"decoding runs to max_new_tokens with no stop tokens, so every run decodes the same number of blocks; "
          f"rows 1-3 and 5 use batch 1")
    results = []
    for size in args.size_list:
        res = bench_size(size, args)
        _print_table(res)
        results.append(res)
    total = time.perf_counter() - t_start
    print(f"\nA/B: ratio of A to B (tokens/s, or B's time over A's for rescoring); "
          f"total wall time {total:.0f} s")
    out = {"meta": {**meta, "wall_s": total}, "results": results}
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"results written to {path}")
    return out


if __name__ == "__main__":
    main()
