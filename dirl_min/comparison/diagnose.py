"""Each objective's likelihood estimate against the exact one, on one checkpoint and one batch of rollouts
(``python -m dirl_min.compare --diagnose``).

DiPO's per-token log-probabilities are exact (each token read in the state it was decoded from),
so on the same rollouts the bias of every other estimate can be measured directly. For every
objective record (and its named variants, e.g. TraceRL's shrinkage ablation) it reports:

* ``logp_gap``: mean ``|ℓ_j − ℓ_j^exact|`` over the response tokens, and ``logp_gap_by_position``
  the same by position inside the block (``position mod B``; blocks start at absolute position 0);
* ``grad_cosine``: the cosine between its policy gradient and the exact one, both with the same
  advantages and the same token-mean weighting (``∇ −Σ_j A_j ℓ_j / N_tok``, the gradient of the
  clipped loss at ratio 1), so only the likelihood estimate differs;
* ``grad_cosine_std``: for random views, the spread of that cosine over ``draws`` independent draws
  (``None`` for deterministic views);
* ``copies``: the noisy copies it scores for the batch (one draw), and ``copies_per_response``.

The exact reference is scored by :func:`~dirl_min.engine.score.rescore` with one row per round
(``packed=False``), a path independent of the two-pass scoring the objectives use, and is checked
against the decoder's own recorded log-probabilities (``decoder_gap``).
"""

from __future__ import annotations

import math

import torch

from dirl_min.core.estimates import RECORDS, ObjectiveSpec
from dirl_min.engine.score import rescore, rollout_views, rounds_logp

__all__ = ["diagnose", "diagnosis_rows", "text_table", "plot"]


def diagnosis_rows() -> dict[str, ObjectiveSpec]:
    """The rows: each record with its defaults, then its named variants (``Objective.variants``)."""
    rows = {}
    for obj in RECORDS.values():
        rows[obj.name] = ObjectiveSpec(obj.name)
        for label, params in obj.variants.items():
            rows[label] = ObjectiveSpec(obj.name)._replace(**params)
    return rows


def _flat_grad(model) -> torch.Tensor:
    """float64 ``[num_params]``: the accumulated gradient (zeros where none), then cleared."""
    out = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten()
                     for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return out


def _exact(model, rollout, adv: torch.Tensor, n_tok: float, batch: int):
    """Per response, the exact log-probs ``[len(response_i)]`` (detached), and the exact gradient."""
    model.zero_grad(set_to_none=True)
    logps = []
    for s in range(0, len(rollout), batch):
        part = _slice(rollout, range(s, min(s + batch, len(rollout))))
        got = rescore(model, part, packed=False, batch_size=batch)
        loss = -sum(float(adv[s + k]) * lp.sum() for k, lp in enumerate(got)) / n_tok
        if loss.requires_grad:
            loss.backward()
        logps += [lp.detach() for lp in got]
    return logps, _flat_grad(model)


def _slice(rollout, idx):
    """The rollout restricted to responses ``idx``, as far as scoring reads it (a shallow copy)."""
    import copy

    part = copy.copy(rollout)
    for name in ("prompt_ids", "response_ids", "step_map", "seeds"):
        setattr(part, name, [getattr(rollout, name)[i] for i in idx])
    return part


def _estimate(model, rollout, spec: ObjectiveSpec, adv, n_tok: float, iteration: int, batch: int):
    """One draw of ``spec``'s views: ``(logp [targets], response, position-in-response, copies, gradient)``."""
    model.zero_grad(set_to_none=True)
    logps, owners, where, copies = [], [], [], 0
    M, B = rollout.mask_token_id, rollout.block_size
    for s in range(0, len(rollout), batch):
        idx = list(range(s, min(s + batch, len(rollout))))
        views, labels = zip(*(rollout_views(rollout, i, spec, iteration) for i in idx))
        ctx, noisy, targets = zip(*views)
        r = rounds_logp(model, ctx, noisy, targets, M, B, labels=labels)
        owner = torch.tensor(idx)[r.resp.cpu()]
        loss = -(adv[owner].to(r.logp) * r.logp).sum() / n_tok
        if loss.requires_grad:
            loss.backward()
        prompt = torch.tensor([len(rollout.prompt_ids[i]) for i in idx])[r.resp.cpu()]
        logps.append(r.logp.detach().cpu())
        owners.append(owner)
        where.append(r.position.cpu() - prompt)
        copies += sum(len(n) for n in noisy)
    return torch.cat(logps), torch.cat(owners), torch.cat(where), copies, _flat_grad(model)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    na, nb = float(a.norm()), float(b.norm())
    return None if na == 0 or nb == 0 else float(a @ b) / (na * nb)


def diagnose(model, rollout, advantages, *, draws: int = 8, batch: int = 16, rows=None) -> tuple[dict, dict]:
    """The diagnosis of every row of :func:`diagnosis_rows` (or ``rows``) on one batch of rollouts.

    Args:
        model: the policy (a causal LM); its parameters get gradients, which are cleared.
        rollout: a :class:`~dirl_min.engine.decode.Rollout`.
        advantages: float ``[len(rollout)]``, one per response (e.g. group z-scores).
        draws: independent draws of random views.
        batch: responses per forward.

    Returns:
        ``(table, batch_info)``: ``table[row] = {logp_gap, logp_gap_by_position [B], grad_cosine,
        grad_cosine_std, copies, copies_per_response, draws}``; ``batch_info``: responses, tokens,
        ``decoder_gap`` (max |exact − the decoder's recorded log-prob|) and ``grad_norm`` (exact).
    """
    adv = torch.as_tensor(advantages, dtype=torch.float64).cpu()
    B, n_tok = rollout.block_size, float(sum(len(r) for r in rollout.response_ids))
    exact, g_exact = _exact(model, rollout, adv, n_tok, batch)
    exact_pad = torch.nn.utils.rnn.pad_sequence(exact, batch_first=True) if exact else torch.zeros(0, 0)
    table = {}
    for label, spec in (rows or diagnosis_rows()).items():
        n_draws = draws if RECORDS[spec.name].random else 1
        gaps, by_pos, cosines, copies = [], torch.zeros(B, dtype=torch.float64), [], 0
        counts = torch.zeros(B, dtype=torch.float64)
        for d in range(n_draws):
            logp, owner, j, copies, grad = _estimate(model, rollout, spec, adv, n_tok, d, batch)
            want = exact_pad[owner, j]
            gap = (logp.double() - want.double()).abs()
            pos = (j + torch.tensor([len(rollout.prompt_ids[int(i)]) for i in owner])) % B
            by_pos += torch.zeros(B, dtype=torch.float64).index_add_(0, pos, gap)
            counts += torch.bincount(pos, minlength=B).double()
            gaps.append(float(gap.mean()) if len(gap) else 0.0)
            cosines.append(_cosine(grad, g_exact))
        known = [c for c in cosines if c is not None]
        table[label] = {
            "logp_gap": sum(gaps) / len(gaps),
            "logp_gap_by_position": [float(x) if c else None for x, c in zip(by_pos / counts.clamp(min=1), counts)],
            "grad_cosine": sum(known) / len(known) if known else None,
            "grad_cosine_std": (float(torch.tensor(known).std()) if len(known) > 1 else 0.0) if n_draws > 1 else None,
            "copies": copies, "copies_per_response": copies / max(len(rollout), 1), "draws": n_draws}
    recorded = [abs(float(a) - b) for e, r in zip(exact, rollout.logp) for a, b in zip(e, r)]
    info = {"responses": len(rollout), "tokens": int(n_tok), "block_size": B,
            "decoder_gap": max(recorded, default=0.0), "grad_norm": float(g_exact.norm())}
    return table, info


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def text_table(table: dict) -> str:
    """The table printed on stdout: one row per objective."""
    head = f"{'objective':<28}{'logp_gap':>10}{'grad_cosine':>13}{'cos_std':>9}{'copies/resp':>13}  gap by position in block"
    lines = [head, "-" * len(head)]
    for name, r in table.items():
        pos = " ".join(_fmt(x, ".3f") for x in r["logp_gap_by_position"])
        lines.append(f"{name:<28}{_fmt(r['logp_gap'], '.4f'):>10}{_fmt(r['grad_cosine'], '.4f'):>13}"
                     f"{_fmt(r['grad_cosine_std'], '.4f'):>9}{r['copies_per_response']:>13.2f}  {pos}")
    return "\n".join(lines)


def plot(table: dict, path, title: str = "") -> None:
    """Two panels: logp_gap by position in the block (one line per objective), and grad_cosine
    (± grad_cosine_std for random views)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for name, r in table.items():
        ys = [float("nan") if y is None else y for y in r["logp_gap_by_position"]]
        left.plot(range(len(ys)), ys, marker="o", label=name)
    left.set(xlabel="position in block", ylabel="mean |logp − exact| (nats)", title="log-prob gap", yscale="log")
    left.legend(fontsize=7)
    names = list(table)
    cos = [table[n]["grad_cosine"] if table[n]["grad_cosine"] is not None else float("nan") for n in names]
    err = [table[n]["grad_cosine_std"] or 0.0 for n in names]
    right.barh(names, cos, xerr=err, color="tab:blue")
    low = min([0.0] + [c for c in cos if not math.isnan(c)])
    right.set(xlabel="cosine to DiPO's exact gradient", title="policy gradient", xlim=(low - 0.05, 1.05))
    right.tick_params(axis="y", labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def diagnose_checkpoint(cfg, ckpt: str, out, *, draws: int = 8, seed: int = 0) -> tuple[dict, dict]:
    """Roll out ``rl.prompts_per_step`` training problems × ``rl.group_size`` from checkpoint ``ckpt``
    with the RL stage's sampling settings (seed ``seed``), take their group advantages
    (``rl.rewards``, ``rl.scale_advantages``) and :func:`diagnose` them; writes ``diagnosis.json``
    (objectives as keys), ``diagnosis_batch.json`` and ``diagnosis.png`` in ``out``.

    Raises:
        ValueError: every group's rewards are equal (no advantage to weight a gradient with).
    """
    import json
    from pathlib import Path

    from dirl_min.infra.atomic import atomic_write
    from dirl_min.core.objectives import group_advantages
    from dirl_min.data import tasks
    from dirl_min.engine.rollouts import rollout_and_reward
    from dirl_min.model import load_model

    model, tok = load_model(ckpt, dtype=torch.float32)
    problems = tasks.arithmetic_problems(cfg.data.task_max_operand, tuple(cfg.data.task_levels))
    train_p, _ = tasks.split_problems(problems, cfg.data.held_out, cfg.data.split_seed)
    if cfg.data.rl_data:
        train_p = tasks.load_problems(cfg.data.rl_data)
    gen = torch.Generator().manual_seed(seed)
    chosen = [train_p[int(i)] for i in torch.randperm(len(train_p), generator=gen)[:cfg.rl.prompts_per_step]]
    G = cfg.rl.group_size
    roll, rewards, correct, _ = rollout_and_reward(
        model, tok, chosen, group_size=G, prompt_template=cfg.data.prompt_template, decode_cfg=cfg.decode,
        temperature=cfg.rl.temperature, top_k=cfg.rl.top_k, top_p=cfg.rl.top_p, max_new_tokens=cfg.rl.max_new_tokens,
        rewards=cfg.rl.rewards, generator=gen)
    adv = group_advantages(rewards, G, scale=cfg.rl.scale_advantages)
    if not bool((adv != 0).any()):
        raise ValueError(f"every group of {len(chosen)} x {G} rollouts from {ckpt} has equal rewards: no advantage "
                         "to weight the gradients with; raise rl.prompts_per_step or rl.group_size")
    table, info = diagnose(model, roll, adv, draws=draws)
    info.update({"checkpoint": str(ckpt), "prompts": len(chosen), "group_size": G, "seed": seed,
                 "accuracy": float(correct.mean()), "draws": draws})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "diagnosis.json", json.dumps(table, indent=2) + "\n")
    atomic_write(out / "diagnosis_batch.json", json.dumps(info, indent=2) + "\n")
    plot(table, out / "diagnosis.png", f"{ckpt}: {info['responses']} responses, {info['tokens']} tokens, "
                                        f"B = {info['block_size']}, {draws} draws of random views")
    return table, info
