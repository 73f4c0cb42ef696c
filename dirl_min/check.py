"""``python -m dirl_min.check``: is DiPO unbiased on *your* checkpoint and hardware?

Decodes a few prompts with the rollout engine, then recomputes every generated token's
log-probability the way the trainer does (from ``step_map``, SPEC §4) and reports how
far the two disagree. On CPU in float32 they agree to about 1e-6; in bf16 on a GPU the
two computations round differently, and this command measures by how much. Run it
before trusting a long RL run: a mismatch of masks, positions, block grid, tokenisation
or padding shows up here as differences of order 1, not 1e-3.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dirl_min.settings.commands import CheckCommand

DEFAULT_PROMPTS = [
    "Solve: If x + 5 = 12, what is x?",
    "What is 17 + 25?",
    "Compute the sum of the first 10 positive integers.",
    "What is 3 - 9?",
]


def consistency(model, tokenizer, prompts, *, max_new_tokens: int, temperature: float, threshold: float,
                seed: int = 0) -> dict:
    """Decode ``prompts`` and compare recorded with recomputed log-probs.

    Returns:
        dict with ``max_abs_diff``, ``mean_abs_diff``, ``tokens`` (compared),
        ``tokens_per_step`` and ``forwards``.
    """
    from dirl_min.engine.decode import generate_text
    from dirl_min.engine.score import rescore

    model.eval()
    out = generate_text(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        threshold=threshold, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        recomputed = rescore(model, out)
    diffs = torch.cat([(r - torch.tensor(l)).abs() for r, l in zip(recomputed, out.logp)])
    return {
        "max_abs_diff": float(diffs.max()),
        "mean_abs_diff": float(diffs.mean()),
        "tokens": int(diffs.numel()),
        "tokens_per_step": sum(out.tokens_per_step(i) for i in range(len(out))) / len(out),
        "forwards": out.num_forwards,
    }


def engine_agreement(native, other) -> dict:
    """How far two engines' greedy rollouts of the same prompts agree (tokens *and* step map).

    Returns:
        ``sequences``: fraction of responses identical in both; ``tokens``: fraction of the
        native engine's response tokens before the first position where they differ.
    """
    same = agree = total = 0
    for a, sa, b, sb in zip(native.response_ids, native.step_map, other.response_ids, other.step_map):
        pairs_a, pairs_b = list(zip(a, sa)), list(zip(b, sb))
        same += pairs_a == pairs_b
        agree += next((j for j, (x, y) in enumerate(zip(pairs_a, pairs_b)) if x != y), min(len(a), len(b)))
        total += len(a)
    return {"sequences": same / max(1, len(native)), "tokens": agree / max(1, total)}


def lmdeploy_agreement(model, tokenizer, model_path: str, prompts, *, max_new_tokens: int, threshold: float) -> dict:
    """Greedy decoding by LMDeploy (with the step hook) vs the native engine (CUDA only)."""
    from dirl_min.engine.decode import generate
    from dirl_min.engine.lmdeploy_engine import make_engine
    from dirl_min.model import chat_prompt_ids, stop_token_ids

    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    kw = dict(max_new_tokens=max_new_tokens, threshold=threshold, temperature=0.0, stop_token_ids=stop_token_ids(tokenizer))
    native = generate(model, ids, **kw)
    engine = make_engine(model_path, model, threshold=threshold)
    try:
        return engine_agreement(native, engine.generate(ids, **kw))
    finally:
        engine.close()


def _parser_kw() -> dict:
    from dirl_min.settings.commands import CHECK_ALIASES, CheckCommand

    return dict(description=__doc__.split("\n\n")[0], prog="python -m dirl_min.check", root=CheckCommand,
                aliases=CHECK_ALIASES)


def build_parser() -> argparse.ArgumentParser:
    """The command line: :class:`dirl_min.settings.commands.CheckCommand`'s settings and their flags."""
    from dirl_min.settings.config import build_parser as config_parser

    return config_parser(**_parser_kw())


def parse_args(argv=None) -> tuple[CheckCommand, list[str]]:
    """The settings (:class:`dirl_min.settings.commands.CheckCommand`, checked by
    :data:`dirl_min.settings.checks.CHECK_RULES`) and the prompts; errors exit with status 2."""
    from dirl_min.settings.commands import parse_command
    from dirl_min.settings.checks import CHECK_CROSS_RULES, CHECK_RULES
    from dirl_min.data import DataError, read_text

    cfg = parse_command(argv, CHECK_RULES, CHECK_CROSS_RULES, **_parser_kw())
    parser = build_parser()
    if cfg.check.lmdeploy:
        from dirl_min.engine.lmdeploy_engine import lmdeploy_missing

        if why := lmdeploy_missing():  # before the model is loaded
            parser.error(f"--lmdeploy {why}")

    prompts = DEFAULT_PROMPTS
    if path := cfg.rollout.prompts:
        try:
            prompts = [line for line in read_text(path).splitlines() if line.strip()]
        except DataError as e:
            parser.error(f"--prompts: {e}")
        if not prompts:
            parser.error(f"--prompts: {path} holds no prompt")
    return cfg, prompts


def main(argv=None) -> dict:
    cfg, prompts = parse_args(argv)
    from dirl_min.infra.errors import about, one_line_errors
    from dirl_min.model import build_tiny, load_model, resolve_dtype

    path, ro = cfg.model.path, cfg.rollout
    dtype = resolve_dtype(cfg.model.dtype)
    if path:
        with one_line_errors("check"), about("--model"):
            model, tok = load_model(path, dtype=dtype)
    else:
        model, tok = build_tiny(dtype=dtype)
    if torch.cuda.is_available():
        model.cuda()
    result = consistency(model, tok, prompts, max_new_tokens=ro.max_new_tokens, temperature=ro.temperature,
                         threshold=ro.threshold, seed=ro.seed)
    if cfg.check.lmdeploy:
        result["lmdeploy_agreement"] = lmdeploy_agreement(model, tok, path, prompts, threshold=ro.threshold,
                                                          max_new_tokens=ro.max_new_tokens)
    tolerance = cfg.check.tolerance or (1e-4 if dtype == torch.float32 else 0.1)
    result.update(model=path or "tiny", dtype=str(dtype).replace("torch.", ""), tolerance=tolerance,
                  ok=result["max_abs_diff"] <= tolerance)
    print(json.dumps(result, indent=2))
    if not result["ok"]:
        print(f"dirl_min.check: recorded and recomputed log-probs differ by up to {result['max_abs_diff']:.3g} "
              f"(> {tolerance:g}): DiPO's ratio would not be 1 on-policy here", file=sys.stderr)
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
