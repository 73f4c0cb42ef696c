"""What each RL objective feeds the model to read a response's log-probabilities.

A diffusion LM has no left-to-right factorisation, so every RL method for it first decides
*in which context* each response token's log-probability is read. Here each choice is a
set of **views** of one response: a context row ``x`` that later blocks see as their
(clean) past, and ``R`` noisy copies of it, each with its masked positions and the
positions read in it — the layout ``[x_t^1; …; x_t^R; x]`` of SPEC §4.5, which
:func:`dirl_min.engine.score.rounds_logp` scores for any views. Every response token is
read exactly once. The four objectives (``rl.objective``):

* ``dipo`` (DiRL) — the step rounds of the recorded step map (:func:`~dirl_min.core.rounds.step_rounds`):
  each token is read in the very state the decoder committed it from. Exact; R = the most
  distinct steps in any block.
* ``tracerl`` (TraceRL, Wang et al. 2025, §3 "shrinkage"): ``s`` consecutive decoding steps
  of each block merged into one round, read from the state before the first of them
  (:func:`merge_rounds`). ``s = 1`` is ``dipo``; a larger ``s`` needs ``⌈R/s⌉`` copies and
  hides from a token up to ``s − 1`` steps' worth of tokens it saw when decoded (biased).
* ``diffu_grpo`` (d1, Zhao et al. 2025, §3.2 "one-step per-token log-probability with
  prompt masking"): one copy, the whole response masked and each prompt token masked with
  probability ``p`` (:func:`one_step_views`). On a block-causal model the context row is
  masked the same way, so a token sees only the partly masked prompt and masks — d1's
  mean-field estimate. The prompt mask is drawn afresh for every optimisation pass.
* ``coupled_grpo`` (DiffuCoder, Gong et al. 2025, §4 "coupled sampling"): two copies whose
  masks over the response are complementary — a ratio ``t ~ U[0.2, 0.8]`` masks each
  response token in the first copy, the rest are masked in the second — so every token is
  read once, with about ``t`` or ``1 − t`` of its block-mates visible
  (:func:`coupled_views`). DiffuCoder's release also averages in a fully masked view and
  weights the two by ``1/t`` and ``1/(1−t)``; the pair alone is what is kept here.

Pure functions: integer and boolean tensors in and out, randomness only from the
``torch.Generator`` passed in.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dirl_min.core.rounds import step_rounds

__all__ = ["OBJECTIVES", "RANDOM_VIEWS", "ObjectiveSpec", "Views", "merge_rounds", "one_step_views",
           "coupled_views", "objective_views", "view_seed", "COUPLED_T_RANGE"]

#: ``rl.objective`` values.
OBJECTIVES = ("dipo", "tracerl", "diffu_grpo", "coupled_grpo")
#: objectives whose views are random (drawn afresh for every optimisation pass).
RANDOM_VIEWS = ("diffu_grpo", "coupled_grpo")
#: coupled_grpo's range of the masking ratio ``t`` (DiffuCoder's release: [0.2, 0.8]).
COUPLED_T_RANGE = (0.2, 0.8)


class ObjectiveSpec(NamedTuple):
    """An objective and its parameters: ``rl.objective``, ``rl.trace_shrinkage``, ``rl.prompt_mask_prob``."""

    name: str = "dipo"
    shrinkage: int = 1
    prompt_mask_prob: float = 0.15


class Views(NamedTuple):
    """The views of one response of length ``L`` (prompt included)."""

    context: torch.Tensor  #: int64 [L]: the row later blocks see as clean (x_0, or x_0 partly masked)
    noisy: torch.Tensor  #: bool [R, L]: the positions each noisy copy masks
    targets: torch.Tensor  #: bool [R, L]: the positions read in each copy (each token once)


def merge_rounds(noisy: torch.Tensor, targets: torch.Tensor, shrinkage: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TraceRL's shrinkage: rounds ``ks … ks + s − 1`` of :func:`step_rounds` become round ``k``.

    Args:
        noisy, targets: bool ``[R, L]`` step rounds.
        shrinkage: ``s >= 1``.

    Returns:
        ``(noisy, targets)``, bool ``[⌈R/s⌉, L]``: merged round ``k`` masks what round ``ks``
        masks (the state before the first merged step) and reads the targets of all ``s``.
    """
    if shrinkage < 1:
        raise ValueError(f"shrinkage must be >= 1, not {shrinkage}")
    starts = range(0, noisy.shape[0], shrinkage)
    merged = [targets[k:k + shrinkage].any(dim=0) for k in starts]
    return noisy[::shrinkage].clone(), torch.stack(merged) if merged else targets[:0].clone()


def one_step_views(ids: torch.Tensor, response: torch.Tensor, mask_token_id: int, prompt_mask_prob: float,
                   generator: torch.Generator) -> Views:
    """d1's one-step view: the whole response masked, each prompt token masked with probability ``p``.

    Args:
        ids: int64 ``[L]``, prompt + response.
        response: bool ``[L]``, the response positions (the tokens read).
        mask_token_id: M.
        prompt_mask_prob: ``p``.
        generator: the source of the prompt mask.

    Returns:
        :class:`Views` with one copy; ``context`` is ``ids`` with M on the response and the drawn
        prompt positions, so no block sees a response token.
    """
    drawn = torch.rand(ids.shape[0], generator=generator) < prompt_mask_prob
    return Views(ids.masked_fill(response | drawn, mask_token_id), response[None].clone(), response[None].clone())


def coupled_views(ids: torch.Tensor, response: torch.Tensor, generator: torch.Generator,
                  t_range: tuple[float, float] = COUPLED_T_RANGE) -> Views:
    """DiffuCoder's coupled pair: complementary random masks of the response.

    Args:
        ids: int64 ``[L]``; response: bool ``[L]``.
        generator: the source of ``t ~ U[t_range]`` and of the mask.

    Returns:
        :class:`Views` with two copies; ``noisy[0] | noisy[1] == response`` and
        ``noisy[0] & noisy[1]`` is empty; each copy reads the tokens it masks.
    """
    lo, hi = t_range
    t = lo + (hi - lo) * float(torch.rand((), generator=generator))
    first = (torch.rand(ids.shape[0], generator=generator) < t) & response
    pair = torch.stack([first, response & ~first])
    return Views(ids.clone(), pair, pair.clone())


def objective_views(spec: ObjectiveSpec, ids: torch.Tensor, step_map: torch.Tensor, block_size: int,
                    mask_token_id: int, generator: torch.Generator | None = None) -> Views:
    """The views ``spec.name`` scores for one response.

    Args:
        spec: the objective and its parameters.
        ids: int64 ``[L]``, prompt + response.
        step_map: int64 ``[L]``: 0 on the prompt, the decoding step of each generated token.
        block_size, mask_token_id: B and M.
        generator: needed by the random views (:data:`RANDOM_VIEWS`).

    Returns:
        :class:`Views`; the tokens read are the generated ones (``step_map > 0``) for every objective.
    """
    if spec.name in ("dipo", "tracerl"):
        noisy, targets = step_rounds(step_map, block_size)
        if spec.name == "tracerl":
            noisy, targets = merge_rounds(noisy, targets, spec.shrinkage)
        return Views(ids, noisy, targets)
    if generator is None:
        raise ValueError(f"objective {spec.name} draws random views: pass a generator")
    response = step_map > 0
    if spec.name == "diffu_grpo":
        return one_step_views(ids, response, mask_token_id, spec.prompt_mask_prob, generator)
    if spec.name == "coupled_grpo":
        return coupled_views(ids, response, generator)
    raise ValueError(f"rl.objective must be one of {OBJECTIVES}, not {spec.name!r}")


def view_seed(sample_seed: int, iteration: int) -> int:
    """The seed of a response's random views in optimisation pass ``iteration``: from the seed the
    response was sampled with, so it is the same on any number of processes, and new each pass."""
    return (int(sample_seed) * 1_000_003 + 7_919 * (iteration + 1)) % (2**63 - 1)
