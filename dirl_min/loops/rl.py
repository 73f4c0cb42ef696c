"""RL with any objective (SPEC §4; DiPO by default): roll out groups, reward them, score the kept
responses, update — on any number of processes, with the rollouts decoded natively or by an external engine."""

from __future__ import annotations

import copy
import math
import time
from typing import NamedTuple

import torch

from dirl_min.core.estimates import record
from dirl_min.core.objectives import filter_groups, group_advantages
from dirl_min.infra.data_parallel import all_ranks, backward_micro, equal_micro_batches
from dirl_min.engine.rollouts import rollout_and_reward
from dirl_min.model.forward import unwrap
from dirl_min.loops.policy import MicroBatch, PolicySettings, StepTotals, policy_step
from dirl_min.loops.state import IntervalMean, Job, StageState, start_stage
from dirl_min.infra.sharding import full_parameters


def make_rollout_engine(cfg, policy):
    """None for the native decoder; an :class:`LMDeployEngine` for ``rl.rollout_backend: lmdeploy``."""
    if cfg.rl.rollout_backend == "native":
        return None
    # the backend's name, its need for model.path and for lmdeploy + CUDA are settings (settings/checks.py)
    from dirl_min.engine.lmdeploy_engine import make_engine

    return make_engine(cfg.model.path, unwrap(policy), strategy=cfg.decode.strategy, threshold=cfg.decode.threshold,
                       steps=cfg.decode.steps)


def _roll_out(cfg, accel, st: StageState, tok, chosen, engine, times):
    """This process's share of ``chosen`` (prompts r, r + world, …), G responses each.

    Returns ``(roll, rewards [n·G], correct [n·G])``."""
    world, rank, G = accel.num_processes, accel.process_index, cfg.rl.group_size
    mine = chosen[rank::world]
    # sampling seeds for the global batch, then this process's share: same samples for any world size
    seeds = torch.randint(0, 2**32, (len(chosen), G), generator=st.gen)[rank::world].reshape(-1).tolist()
    # native: the engine decodes with the module being trained, so the weight sync is free
    with full_parameters(st.wrapped):  # FSDP2: one gather, then decoding free of collectives
        roll, rewards, correct, _ = rollout_and_reward(
            unwrap(st.wrapped), tok, mine, group_size=G, prompt_template=cfg.data.prompt_template,
            decode_cfg=cfg.decode, temperature=cfg.rl.temperature, top_k=cfg.rl.top_k, top_p=cfg.rl.top_p,
            max_new_tokens=cfg.rl.max_new_tokens, rewards=cfg.rl.rewards, seeds=seeds,
            reward_workers=cfg.rl.reward_workers, timings=times, engine=engine)
    return roll, rewards, correct


def _sample_groups(cfg, accel, st: StageState, tok, engine, times):
    """Dynamic sampling (SPEC §4.3) over all processes: rounds of ``rl.prompts_per_step`` prompts
    until that many groups pass ``rl.group_filter``, at most ``rl.sampling_rounds`` rounds.

    Process r decodes prompts r, r + world, … of each round. Whether to stop and which groups to
    keep are decided on all processes' groups in the round's order, so every process runs the
    same rounds (the samplers stay in step) and the groups kept are those one process would keep.

    Returns:
        ``(kept, rolls, n_kept)``: this process's kept groups, each a :class:`MicroBatch` of G
        responses with its ``place`` among all processes' kept groups; its (rollout, rewards,
        correct) per round; the kept count over all processes.
    """
    world, rank, G, P = accel.num_processes, accel.process_index, cfg.rl.group_size, cfg.rl.prompts_per_step
    kept, rolls, n_kept = [], [], 0
    for _ in range(cfg.rl.sampling_rounds):  # at least 1 (its rule)
        # 1. roll out: P prompts over all processes, G responses each
        chosen = st.sampler.take(P)
        roll, rewards, correct = _roll_out(cfg, accel, st, tok, chosen, engine, times)
        rolls.append((roll, rewards, correct))
        # 2. rewards and advantages: adv [n·G]; the filter's verdict per group, gathered in round order
        adv = group_advantages(rewards, G, scale=cfg.rl.scale_advantages)
        keep = filter_groups(rewards, G, correct=correct, rule=cfg.rl.group_filter)
        mixed = all_ranks(accel, keep.tolist())  # per process, its groups in order
        for g in [g for g in range(len(chosen)) if mixed[g % world][g // world]][: P - n_kept]:
            if g % world == rank:
                i = g // world
                kept.append(MicroBatch(roll, list(range(i * G, (i + 1) * G)), adv[i * G:(i + 1) * G], place=n_kept))
            n_kept += 1
        if n_kept >= P:
            break
    return kept, rolls, n_kept


def _rollout_metrics(accel, rolls, n_kept, prompts_per_step) -> dict:
    """Reward, accuracy, lengths and kept fraction over all processes' rollouts of a step."""
    per_rank = all_ranks(accel, [(r.tolist(), c.tolist(), [roll.tokens_per_step(i) for i in range(len(roll))],
                                  [len(x) for x in roll.response_ids]) for roll, r, c in rolls])
    rew, acc, tps, lengths = (sum((list(part[j]) for rank in per_rank for part in rank), []) for j in range(4))
    return {
        "reward": float(torch.tensor(rew).mean()), "accuracy": float(torch.tensor(acc).mean()),
        "tokens_per_step": sum(tps) / len(acc), "response_length": sum(lengths) / len(acc),
        "kept_fraction": n_kept / (len(rolls) * prompts_per_step), "sampling_rounds": len(rolls),
        "cap_hit": int(n_kept < prompts_per_step),
    }


class StepBatches(NamedTuple):
    """A share of the step's kept responses, cut into micro-batches (:func:`_micro_batches`)."""

    micro: list  #: MicroBatch: this process's, real ones first, then zero-weight fillers
    totals: StepTotals  #: the share's response tokens and responses over all processes
    n_real: int  #: this process's real micro-batches


def _micro_batches(cfg, accel, kept, rolls) -> StepBatches:
    """The kept responses in micro-batches: of one rollout each, at most ``rl.micro_batch`` responses,
    padded with zero-weight fillers to the same count on every process (one collective schedule)."""
    micro = []
    for roll in {id(k.rollout): k.rollout for k in kept}.values():
        idx = [i for k in kept if k.rollout is roll for i in k.indices]
        adv = torch.cat([k.advantages for k in kept if k.rollout is roll])
        size = cfg.rl.micro_batch or len(idx)
        micro += [(roll, idx[s:s + size], adv[s:s + size]) for s in range(0, len(idx), size)]
    counts = all_ranks(accel, (sum(len(roll.response_ids[i]) for roll, idx, _ in micro for i in idx), len(micro),
                               sum(len(idx) for _, idx, _ in micro)))
    totals = StepTotals(tokens=float(sum(c[0] for c in counts)), sequences=float(sum(c[2] for c in counts)))
    last = rolls[-1][0]  # a filler for a process with fewer micro-batches than another: a non-empty response
    filler = (last, [max(range(len(last)), key=lambda i: len(last.response_ids[i]))], torch.zeros(1))
    micro = [MicroBatch(*m) for m in equal_micro_batches(micro, max(c[1] for c in counts), filler)]
    return StepBatches(micro, totals, sum(m.real for m in micro))


def _score_and_backward(cfg, accel, st: StageState, batches: StepBatches, logp_old: list, it: int, times):
    """One pass (``it``) over the micro-batches: the objective's loss (SPEC §4.4) and backward of each.
    ``logp_old`` (one entry per micro-batch) is filled on the first pass when later passes reuse it.

    Returns ``(loss, stats)``: the loss summed over all processes; this process's mean stats, and
    ``score_copies``, the noisy copies scored over all processes."""
    loss_total, stats, copies = 0.0, {}, 0.0
    settings = PolicySettings.from_rl(cfg.rl)
    for k, mb in enumerate(batches.micro):
        t_score = time.perf_counter()
        loss, stats_k, logp = policy_step(st.wrapped, mb, batches.totals, settings=settings, ref_model=st.ref_model,
                                          logp_old=logp_old[k], iteration=it)
        times["scoring"] += time.perf_counter() - t_score
        if it == 0 and cfg.rl.num_iterations > 1 and logp_old[k] is None:
            logp_old[k] = logp  # the sampling policy's log-probs, computed once and reused
        backward_micro(accel, st.wrapped, loss if mb.real else loss * 0.0, last=k == len(batches.micro) - 1)
        if mb.real:
            copies += stats_k.pop("copies")
            loss_total += float(loss.detach())
            stats = {key: stats.get(key, 0.0) + v / batches.n_real for key, v in stats_k.items()}
    return sum(all_ranks(accel, loss_total)), {**stats, "score_copies": sum(all_ranks(accel, copies))}


def _fresh_logp_old(cfg, wrapped, batches: StepBatches, it: int) -> list:
    """Random views (d1, coupled) are drawn afresh in every pass, so each pass's ``logp_old`` is read
    under its own views, from the sampling policy: before the first update (d1's practice)."""
    settings = PolicySettings.from_rl(cfg.rl).without_kl()  # only the log-probs are kept
    with torch.no_grad():
        return [policy_step(wrapped, mb, batches.totals, settings=settings, iteration=it)[2] for mb in batches.micro]


def _update(cfg, accel, st: StageState, batches: StepBatches, times, step: int) -> dict:
    """``rl.num_iterations`` optimizer steps on the step's micro-batches, then one scheduler step.

    Returns the row's ``lr`` (of these updates), ``loss``, ``grad_norm`` and stats (last pass)."""
    fresh = cfg.rl.num_iterations > 1 and record(cfg.rl.objective).random
    if fresh:  # one list per pass, read before any update
        olds = [_fresh_logp_old(cfg, st.wrapped, batches, it) for it in range(cfg.rl.num_iterations)]
    else:  # one list, filled by the first pass and reused by the later ones
        olds = [[None] * len(batches.micro)] * cfg.rl.num_iterations
    copies = 0.0
    for it in range(cfg.rl.num_iterations):
        # 3. score: log-probs of the kept responses under the policy, the loss, its gradient
        loss_total, stats = _score_and_backward(cfg, accel, st, batches, olds[it], it, times)
        copies += stats.pop("score_copies")
        if not math.isfinite(loss_total):
            raise FloatingPointError(f"RL step {step}: the loss is {loss_total}; lower rl.lr")
        # 4. update
        gnorm = accel.clip_grad_norm_(st.params, cfg.rl.grad_clip) if cfg.rl.grad_clip > 0 else torch.tensor(0.0)
        st.opt.step()
        st.opt.zero_grad(set_to_none=True)
    lr = st.sched.get_last_lr()[0]  # the rate of this update; warm-up counts updates
    st.sched.step()
    return {"lr": lr, "loss": loss_total, "grad_norm": float(gnorm), "score_copies": copies, **stats}


def _sync_reference(ref_model, wrapped) -> None:
    """Copy the policy's weights into the KL reference (d1's and DiffuCoder's ``ref_model_sync_steps``)."""
    with torch.no_grad(), full_parameters(wrapped):
        for ref, p in zip(ref_model.parameters(), unwrap(wrapped).parameters()):
            ref.copy_(p.detach().to(ref.dtype))


def _setup(job: Job, policy, problems, state) -> StageState:
    """The RL stage's state (:func:`~dirl_min.loops.state.start_stage`; DiRL's schedule: warm-up, then
    constant) and, with β > 0 and ``rl.kl_reference: initial``, the reference model."""
    st = start_stage("rl", job, policy, problems, state, 1.0)
    if job.cfg.rl.beta > 0 and job.cfg.rl.kl_reference == "initial":
        st.ref_model = copy.deepcopy(unwrap(policy)).eval().requires_grad_(False)
    return st


def run_rl(job: Job, policy, tok, problems, state):
    """RL (``cfg.rl.objective``, SPEC §4) for ``cfg.rl.steps`` steps.

    A generator: yields ``("checkpoint", trainer_state)`` every ``run.save_every`` steps, and after the
    step at which ``job.stop()`` (:class:`~dirl_min.loops.state.Interrupts`) first says to stop; then it ends."""
    from tqdm.auto import tqdm

    cfg, accel = job.cfg, job.accel
    st = _setup(job, policy, problems, state)
    engine = make_rollout_engine(cfg, policy)
    bar = tqdm(range(st.start, cfg.rl.steps), desc="RL", disable=not job.progress or not accel.is_main_process,
               initial=st.start, total=cfg.rl.steps)
    interval = IntervalMean(state.get("log_interval") if state.get("stage") == "rl" else None)
    for step in bar:
        times = {"rollout": 0.0, "rewards": 0.0, "scoring": 0.0}  # seconds of this step
        if engine is not None:
            engine.load_weights(unwrap(st.wrapped))  # this step's policy, sent through memory
        # 1. roll out, 2. rewards and advantages: rounds of groups until P groups are kept
        kept, rolls, n_kept = _sample_groups(cfg, accel, st, tok, engine, times)
        if engine is not None:
            engine.release()  # the update gets the rollout's GPU memory
        row = _rollout_metrics(accel, rolls, n_kept, cfg.rl.prompts_per_step)
        t = time.perf_counter()
        # 3. score, 4. update: on micro-batches of the kept responses, in rl.updates_per_pass shares
        row["score_copies"] = 0.0  # no group kept: nothing scored, no update
        # share u: the kept groups whose place among all processes' is u mod U (the same shares on any world size)
        U = cfg.rl.updates_per_pass
        for share in ([k for k in kept if k.place % U == u] for u in range(U)):
            batches = _micro_batches(cfg, accel, share, rolls)
            if batches.totals.tokens > 0:
                done = row["score_copies"]
                row.update(_update(cfg, accel, st, batches, times, step))
                row["score_copies"] += done
        if st.ref_model is not None and cfg.rl.ref_sync_every and (step + 1) % cfg.rl.ref_sync_every == 0:
            _sync_reference(st.ref_model, st.wrapped)
        times["update"] = time.perf_counter() - t - times["scoring"]  # backward + optimizer
        row.update({f"time_{k}": v for k, v in times.items()})
        bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}", kept=f"{row['kept_fraction']:.2f}")
        interval.add(row)
        save, stop_now = job.end_step("rl", step, cfg.rl.steps, interval)
        if save:
            yield "checkpoint", st.checkpoint(step + 1, interval)
        if stop_now:
            return
