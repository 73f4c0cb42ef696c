"""Row 1: the KV-cached decoder against the uncached reference decoder (``reference.decoding``).

The reference decoder is slow (one full forward per step, masks built in Python), so its time
is estimated first from a few probe forwards and its token count halved until it fits the budget.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dirl_min.speed.context import Bench, _fmt_rate, _verdict
from dirl_min.speed.measures import choose_reference_tokens, steps_per_block
from dirl_min.speed.timing import Case, time_cases
from dirl_min.model.forward import dense_denoiser


def _import_reference():
    """``reference.decoding`` (shipped next to the package in the repository, not installed)."""
    try:
        from reference import decoding
    except ImportError:
        root = Path(__file__).resolve().parents[2]
        if not (root / "reference" / "decoding.py").is_file():
            return None
        sys.path.insert(0, str(root))
        try:
            from reference import decoding
        except ImportError:
            return None
    return decoding


def _reference_estimate(bench: Bench, ref_mod, denoise, spb: list[int]) -> Callable[[int], float]:
    """Estimated seconds of the reference decoder at ``n`` new tokens, from probe forwards."""
    B, p0, cfg = bench.B, bench.p0, bench.model.config
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

    return estimate


def _skipped_row(no_reference: bool) -> dict[str, Any]:
    return {"row": 1, "name": "cached vs uncached reference", "skipped": True,
            "a": "-", "b": "-", "ratio": "-",
            "check": "skipped (--no-reference)" if no_reference else
            "skipped: reference/ not found (run from the repository checkout)"}


def row_reference(bench: Bench, c: dict[str, Case]) -> dict[str, Any]:
    """Row 1; ``c`` holds the timed decoding cases (``c["cached"]`` at ``--new-tokens``)."""
    ref_cfg, run = bench.cfg.reference, bench.cfg.run
    B, p0, n_new, cfg = bench.B, bench.p0, bench.n_new, bench.model.config
    base = c["cached"].result
    ref_mod = None if ref_cfg.skip else _import_reference()
    if ref_mod is None:
        return _skipped_row(ref_cfg.skip)
    denoise = dense_denoiser(bench.model)
    spb = steps_per_block(base)  # the reference runs the same steps (same tokens, tested)
    estimate = _reference_estimate(bench, ref_mod, denoise, spb)

    if ref_cfg.tokens:
        n_ref = ref_cfg.tokens
        why = "set by --ref-tokens"
    else:
        n_ref = choose_reference_tokens(n_new, B, estimate, ref_cfg.max_seconds)
        why = (f"estimated {estimate(n_new):.0f} s at {n_new} > {ref_cfg.max_seconds:.0f} s budget"
               if n_ref < n_new else "full length")
    bench.log(f"reference decoder at {n_ref} new tokens ({why}; estimated {estimate(n_ref):.1f} s), one run")
    t0, c0 = time.perf_counter(), time.process_time()
    ref = ref_mod.decode(denoise, p0, block_size=B, mask_token_id=cfg.mask_token_id, max_new_tokens=n_ref,
                         seed=0, **bench.dec)
    t_ref_wall, t_ref_cpu = time.perf_counter() - t0, time.process_time() - c0
    t_ref = t_ref_cpu if run.clock == "cpu" else t_ref_wall
    if n_ref == n_new:
        cached_case, cached_ro = c["cached"], base
    else:
        bench.log(f"timing the cached decoder at {n_ref} new tokens × {run.repeats} repeat(s)")
        cached_case = time_cases([Case("cached_ref_len", bench.gen([p0], n_ref), bench.gen([p0], bench.warm_new),
                                       run.clock)], run.repeats)[0]
        cached_ro = cached_case.result
    same = ref["response_ids"] == cached_ro.response_ids[0] and ref["step_map"] == cached_ro.step_map[0]
    r_cached = len(cached_ro.response_ids[0]) / cached_case.median
    r_ref = len(ref["response_ids"]) / t_ref
    ratio = r_cached / r_ref
    note = f"{n_ref} new tok" + ("" if n_ref == n_new else f" (reduced: {why})")
    return {
        "row": 1, "name": "cached (generate) vs uncached reference",
        "a": f"{_fmt_rate(r_cached)}", "b": f"{_fmt_rate(r_ref)} [1 run]", "ratio": f"{ratio:.1f}×",
        "check": f"≥10×: {_verdict(ratio >= 10)}; same tokens: {'yes' if same else 'NO'}; {note}",
        "tokens_per_s_cached": r_cached, "tokens_per_s_reference": r_ref, "speedup": ratio,
        "target_met": ratio >= 10, "new_tokens": n_ref,
        "reference_seconds": t_ref_wall, "reference_cpu_seconds": t_ref_cpu,
        "reference_estimated_seconds": estimate(n_ref), "reference_forwards": ref["num_forwards"],
        "cached_forwards": cached_ro.num_forwards, "same_tokens": same, "correct": same,
        "cached_seconds": cached_case.times, "cached_cpu_seconds": cached_case.cpu_times,
    }
