"""The RL objectives, one record each: what each feeds the model to read a response's log-probabilities.

A diffusion LM has no left-to-right factorisation, so every RL method for it first decides
*in which context* each response token's log-probability is read. Here each choice is a
set of **views** of one response: a context row ``x`` that later blocks see as their
(clean) past, and ``R`` noisy copies of it, each with its masked positions and the
positions read in it — the layout ``[x_t^1; …; x_t^R; x]`` of SPEC §4.5, which
:func:`dirl_min.engine.score.rounds_logp` scores for any views. Every response token is
read exactly once. Each objective (``rl.objective``) is one :class:`Objective` record in
:data:`RECORDS` — its views, whether they are random, its parameters and their rules, and
its release's recipe — and nothing else in the package tests an objective's name:

* ``dipo`` (DiRL) — the step rounds of the recorded step map (:func:`~dirl_min.core.rounds.step_rounds`):
  each token is read in the very state the decoder committed it from. Exact; R = the most
  distinct steps in any block.
* ``tracerl`` (TraceRL, Wang et al. 2025): ``s`` consecutive decoding steps of each block merged
  into one round, read from the state before the first of them (:func:`merge_rounds`). TraceRL
  runs block models at ``s = 1`` (its likelihood is then ``dipo``'s; what differs is its recipe);
  ``s > 1`` is its shrinkage for full-attention models, kept here as an ablation
  (``rl.trace_shrinkage``): ``⌈R/s⌉`` copies, a token hidden up to ``s − 1`` steps' worth of what
  it saw when decoded (biased).
* ``diffu_grpo`` (d1, Zhao et al. 2025, §3.2 "one-step per-token log-probability") on a block
  model: one copy with the whole response masked, read against the *clean* prompt and clean
  earlier blocks (:func:`block_one_step_views`): mean-field inside a block, exact across blocks —
  the contexts a block model is trained and decodes with. d1's prompt masking is dropped: on a
  block model every prompt token is in the clean stream, where SFT never put a mask.
* ``diffu_grpo_masked_context`` (an ablation, the old port): d1's view as LLaDA reads it — the
  whole response *and* each prompt token (probability ``p``) masked in the context row, so
  later blocks see masks in their past, a state a block model never saw (:func:`one_step_views`).
* ``coupled_grpo`` (DiffuCoder, Gong et al. 2025, §4 "coupled sampling"): two copies whose
  masks over the response are complementary — a ratio ``t ~ U[0.2, 0.8]`` masks each
  response token in the first copy, the rest are masked in the second — so every token is
  read once, with about ``t`` or ``1 − t`` of its block-mates visible
  (:func:`coupled_views`). DiffuCoder's release also averages in a fully masked view and
  weights the two by ``1/t`` and ``1/(1−t)``; the pair alone is what is kept here.

Random views are drawn afresh for every optimisation pass. Pure functions: integer and boolean
tensors in and out, randomness only from the ``torch.Generator`` passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from dirl_min.core.rounds import step_rounds

__all__ = ["OBJECTIVES", "ABLATIONS", "RECORDS", "Objective", "Param", "record", "ObjectiveSpec",
           "spec_of", "Views", "merge_rounds", "block_one_step_views", "one_step_views", "coupled_views",
           "objective_views", "view_seed", "COUPLED_T_RANGE"]

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


class Param(NamedTuple):
    """A parameter of an objective: the setting, the :class:`ObjectiveSpec` field it fills, and its rule —
    ``lo`` (an integer >= lo when ``integer``), else a number in ``[lo, hi)``; ``why`` in words."""

    setting: str
    spec_field: str
    lo: float
    hi: float | None = None
    integer: bool = False
    why: str = ""


@dataclass(frozen=True)
class Objective:
    """One RL objective, declared in one place (what the loop, the scorer, the settings and
    ``python -m dirl_min.compare`` ask instead of testing its name).

    ``views(spec, ids [L], step_map [L], block_size, mask_token_id, generator) -> Views``;
    ``random``: its views are drawn (a fresh generator per response and pass);
    ``params``: the settings it reads; ``loss_mean``: its release's (``token`` or ``sequence``);
    ``release``: the settings its release runs with on a block model (``compare --recipe release``;
    values and citations in docs/method.md §4.7); ``ablation``: not one of the compared methods;
    ``variants``: ``{label: {spec field: value}}``, parameter ablations (``compare --diagnose`` rows).
    """

    name: str
    views: Callable[..., Views]
    random: bool
    loss_mean: str
    params: tuple[Param, ...] = ()
    release: dict = field(default_factory=dict)
    ablation: bool = False
    variants: dict = field(default_factory=dict)  #: named parameter ablations the diagnosis also reads


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


def block_one_step_views(ids: torch.Tensor, response: torch.Tensor) -> Views:
    """d1's one-step view on a block model: one copy with the whole response masked, a clean context row.

    In the layout a noisy copy sees itself inside its block and the *clean* earlier blocks, so each
    block is read fully masked given the clean prompt and the clean earlier blocks — mean-field
    inside a block, exact across blocks (the view of :func:`merge_rounds` with ``s >= B``).

    Args:
        ids: int64 ``[L]``, prompt + response; response: bool ``[L]``, the positions read.

    Returns:
        :class:`Views` with one copy; ``context`` is ``ids`` (no mask in the clean stream).
    """
    return Views(ids.clone(), response[None].clone(), response[None].clone())


def one_step_views(ids: torch.Tensor, response: torch.Tensor, mask_token_id: int, prompt_mask_prob: float,
                   generator: torch.Generator) -> Views:
    """d1's one-step view as LLaDA reads it (the ``diffu_grpo_masked_context`` ablation): the whole
    response and each prompt token (probability ``p``) masked in the *context row* too.

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


def _exact(spec, ids, step_map, block_size, mask_token_id, generator) -> Views:
    return Views(ids, *step_rounds(step_map, block_size))


def _merged(spec, ids, step_map, block_size, mask_token_id, generator) -> Views:
    return Views(ids, *merge_rounds(*step_rounds(step_map, block_size), spec.shrinkage))


def _one_step(spec, ids, step_map, block_size, mask_token_id, generator) -> Views:
    return block_one_step_views(ids, step_map > 0)


def _one_step_masked(spec, ids, step_map, block_size, mask_token_id, generator) -> Views:
    return one_step_views(ids, step_map > 0, mask_token_id, spec.prompt_mask_prob, generator)


def _coupled(spec, ids, step_map, block_size, mask_token_id, generator) -> Views:
    return coupled_views(ids, step_map > 0, generator)


_SHRINKAGE = Param("rl.trace_shrinkage", "shrinkage", 1, integer=True, why="1 = the exact trace")
_PROMPT_MASK = Param("rl.prompt_mask_prob", "prompt_mask_prob", 0.0, 1.0)
#: the settings of the releases' recipes that need no name of an objective: d1 and DiffuCoder
#: (both TRL GRPO trainers): symmetric clip 0.5, KL to a reference synced every 64 steps, r − mean
#: (DiffuCoder's leave-one-out baseline is G/(G−1) times it), token mean over the micro-batch, no filter
_TRL_GRPO = {"rl.eps_low": 0.5, "rl.eps_high": 0.5, "rl.kl_reference": "initial", "rl.ref_sync_every": 64,
             "rl.scale_advantages": False, "rl.loss_mean": "token", "rl.group_filter": "none"}
_D1 = {**_TRL_GRPO, "rl.beta": 0.04, "rl.num_iterations": 12}

#: every objective, by name: the compared ones first, in the order the comparison lists them
RECORDS: dict[str, Objective] = {o.name: o for o in (
    Objective("dipo", _exact, random=False, loss_mean="token", release={
        "rl.eps_low": 0.2, "rl.eps_high": 0.28, "rl.beta": 0.1, "rl.kl_reference": "initial", "rl.ref_sync_every": 0,
        "rl.scale_advantages": True, "rl.loss_mean": "token", "rl.group_filter": "reward_std",
        "rl.num_iterations": 1, "rl.updates_per_pass": 1}),
    Objective("tracerl", _merged, random=False, loss_mean="sequence", params=(_SHRINKAGE,),
              variants={"tracerl_s2": {"shrinkage": 2}}, release={
        "rl.trace_shrinkage": 1, "rl.eps_low": 0.2, "rl.eps_high": 0.2, "rl.beta": 0.01, "rl.kl_reference": "old",
        "rl.ref_sync_every": 0, "rl.scale_advantages": True, "rl.loss_mean": "sequence",
        "rl.group_filter": "accuracy_band", "rl.num_iterations": 1, "rl.updates_per_pass": 4}),
    Objective("diffu_grpo", _one_step, random=False, loss_mean="token",
              release={**_D1, "rl.updates_per_pass": 1}),
    Objective("coupled_grpo", _coupled, random=True, loss_mean="token", release={
        **_TRL_GRPO, "rl.beta": 0.01, "rl.num_iterations": 2, "rl.updates_per_pass": 1}),
    Objective("diffu_grpo_masked_context", _one_step_masked, random=True, loss_mean="token", params=(_PROMPT_MASK,),
              release={**_D1, "rl.prompt_mask_prob": 0.15, "rl.updates_per_pass": 1}, ablation=True,
              variants={"diffu_grpo_masked_context_p0": {"prompt_mask_prob": 0.0}}),
)}
#: ``rl.objective`` values compared by default (``python -m dirl_min.compare``), and the ablations
OBJECTIVES = tuple(n for n, o in RECORDS.items() if not o.ablation)
ABLATIONS = tuple(n for n, o in RECORDS.items() if o.ablation)


def record(name: str) -> Objective:
    """The :class:`Objective` named ``name`` (``ValueError`` for an unknown one)."""
    if name not in RECORDS:
        raise ValueError(f"rl.objective must be one of {', '.join(RECORDS)}, not {name!r}")
    return RECORDS[name]


def spec_of(rl) -> ObjectiveSpec:
    """The :class:`ObjectiveSpec` of an RL settings section (``rl.objective`` and the parameters its record reads)."""
    obj = record(rl.objective)
    return ObjectiveSpec(obj.name, **{p.spec_field: getattr(rl, p.setting.split(".", 1)[1]) for p in obj.params})


def objective_views(spec: ObjectiveSpec, ids: torch.Tensor, step_map: torch.Tensor, block_size: int,
                    mask_token_id: int, generator: torch.Generator | None = None) -> Views:
    """The views ``spec.name`` scores for one response (its record's ``views``).

    Args:
        spec: the objective and its parameters.
        ids: int64 ``[L]``, prompt + response.
        step_map: int64 ``[L]``: 0 on the prompt, the decoding step of each generated token.
        block_size, mask_token_id: B and M.
        generator: needed by random views (``record(spec.name).random``).

    Returns:
        :class:`Views`; the tokens read are the generated ones (``step_map > 0``) for every objective.
    """
    obj = record(spec.name)
    if obj.random and generator is None:
        raise ValueError(f"objective {spec.name} draws random views: pass a generator")
    return obj.views(spec, ids, step_map, block_size, mask_token_id, generator)


def view_seed(sample_seed: int, iteration: int) -> int:
    """The seed of a response's random views in optimisation pass ``iteration``: from the seed the
    response was sampled with, so it is the same on any number of processes, and new each pass."""
    return (int(sample_seed) * 1_000_003 + 7_919 * (iteration + 1)) % (2**63 - 1)
