"""Random-masking SFT (SPEC §2): the examples, the noise and the loss, and the loop — one
optimizer step per training step, on any number of processes.

Each optimizer step's loss is normalised by the response-token count of the *whole* step
(all micro-batches, all processes), so accumulation and data parallelism give the same
update as one big batch."""

from __future__ import annotations

import math
import sys
import time

from dataclasses import dataclass
from typing import NamedTuple

import torch

from dirl_min.core.masks import add_noise
from dirl_min.infra.data_parallel import backward_micro
from dirl_min.engine.score import build_layout, layout_logp, rounds_logp
from dirl_min.model.forward import unwrap
from dirl_min.loops.state import IntervalMean, Job, start_stage
from dirl_min.model import diffusion_settings


@dataclass
class SFTExample:
    """Token ids of prompt + response, right-padded with the pad token to whole blocks."""

    ids: torch.Tensor  # int64 [L], L a multiple of B
    prompt_len: int


def tokenize_sft(records: list[dict], tokenizer, block_size: int, max_len: int) -> tuple[list[SFTExample], int]:
    """Tokenise ``{prompt, response}`` records; returns the examples and how many were skipped as too long.

    The response is padded with the pad token to a multiple of B counted on the whole
    sequence; those pad positions are trained (SPEC §2).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out, skipped = [], 0
    for rec in records:
        p = tokenizer.encode(rec["prompt"], add_special_tokens=False)
        r = tokenizer.encode(rec["response"], add_special_tokens=False)
        total = -(-(len(p) + len(r)) // block_size) * block_size
        if total > max_len:
            skipped += 1
            continue
        out.append(SFTExample(torch.tensor(p + r + [pad] * (total - len(p) - len(r)), dtype=torch.long), len(p)))
    return out, skipped


class SFTNoise(NamedTuple):
    """The SFT noise of a batch of N examples (SPEC §2)."""

    masks: list  #: per example, bool [L_i]: the masked response positions
    p: torch.Tensor  #: float [N]: the masking probabilities

    def take(self, idx: list[int]) -> SFTNoise:
        """The noise of examples ``idx`` (a micro-batch's)."""
        return SFTNoise([self.masks[i] for i in idx], self.p[idx])


def sft_noise(examples: list[SFTExample], mask_token_id: int, *, t_min: float = 0.0, eps: float = 1e-3,
              generator: torch.Generator | None = None) -> SFTNoise:
    """Draw the SFT noise (SPEC §2) for a batch: per example a bool ``[L_i]`` mask of the
    masked response positions, and the masking probabilities ``p``, float ``[N]``."""
    width = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    loss_mask = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = e.ids
        loss_mask[i, e.prompt_len: len(e.ids)] = True
    _, is_masked, p = add_noise(ids, loss_mask, mask_token_id, eps=eps, t_min=t_min, generator=generator)
    return SFTNoise([is_masked[i, : len(e.ids)] for i, e in enumerate(examples)], p)


def sft_loss(model, examples: list[SFTExample], mask_token_id: int, block_size: int, noise: SFTNoise, *,
             num_response_tokens: float, pack_tokens: int = 0):
    """The random-masking loss of SPEC §2 on a micro-batch.

    ``L = (1 / N_resp) Σ_{masked i} −log p(x0_i | x_t ; x_0) / p``, with ``N_resp`` the
    response tokens of the whole optimizer step (``num_response_tokens``), so the
    micro-batch losses of one step add up to the step's loss. ``noise`` is the examples'
    (:func:`sft_noise`). ``pack_tokens > 0`` packs
    several examples into one row (see :func:`dirl_min.core.rounds.build_layout`).

    Returns:
        ``(loss, stats)``: scalar tensor (with grad) and floats ``masked`` (count) and
        ``nll`` (mean per masked token, unweighted).
    """
    masks, p = noise
    ids, rounds = [e.ids for e in examples], [m[None] for m in masks]
    if pack_tokens:
        batch = build_layout(ids, rounds, rounds, mask_token_id, block_size, pack_tokens=pack_tokens)
        logp = layout_logp(model, batch)[0]
        owner = batch.example[batch.select]
    else:  # the same numbers, with x_0 run once and x_t's response blocks as queries against it
        scored = rounds_logp(model, ids, rounds, rounds, mask_token_id, block_size)
        logp, owner = scored.logp, scored.resp
    weight = (1.0 / p[owner]).to(logp.device)
    loss = -(logp * weight).sum() / num_response_tokens
    return loss, {"masked": float(len(owner)), "nll": float(-logp.detach().mean())}


def _accumulate(cfg, accel, wrapped, batch, noise: SFTNoise, n_resp: int) -> float:
    """Backward of this process's share of ``batch`` in ``sft.grad_accum`` micro-batches, each loss
    normalised by ``n_resp``, the whole step's response tokens; returns the step's loss summed over all processes."""
    world, rank = accel.num_processes, accel.process_index
    B, M = diffusion_settings(unwrap(wrapped))
    mine = list(range(rank, len(batch), world))
    micro = [mine[i::cfg.sft.grad_accum] for i in range(cfg.sft.grad_accum)]
    total_loss = torch.zeros((), device=accel.device)
    for k, idx in enumerate(micro):
        # losses are normalised by the step's global token count, so gradients add up to the full batch's
        loss, _ = sft_loss(wrapped, [batch[i] for i in idx], M, B, noise.take(idx), num_response_tokens=n_resp,
                           pack_tokens=cfg.sft.pack_tokens)
        backward_micro(accel, wrapped, loss, last=k == len(micro) - 1)
        total_loss += loss.detach()
    return float(accel.reduce(total_loss, "sum")) if world > 1 else float(total_loss)


def run_sft(job: Job, policy, tok, records, state):
    """Random-masking SFT (SPEC §2) for ``cfg.sft.steps`` optimizer steps.

    A generator: yields ``("checkpoint", trainer_state)`` every ``run.save_every`` steps, and after the
    step at which ``job.stop()`` (:class:`~dirl_min.loops.state.Interrupts`) first says to stop; then it ends."""
    from tqdm.auto import tqdm

    cfg, accel = job.cfg, job.accel
    B, M = diffusion_settings(unwrap(policy))
    examples, skipped = tokenize_sft(records, tok, B, cfg.sft.max_seq_len)
    if not examples:
        raise ValueError(f"no SFT example fits sft.max_seq_len={cfg.sft.max_seq_len} ({skipped} skipped)")
    st = start_stage("sft", job, policy, examples, state, cfg.sft.min_lr_ratio)
    world, rank = accel.num_processes, accel.process_index
    bar = tqdm(range(st.start, cfg.sft.steps), desc="SFT", disable=not job.progress or not accel.is_main_process,
               initial=st.start, total=cfg.sft.steps)
    t0, tokens = time.perf_counter(), 0
    interval = IntervalMean(state.get("log_interval") if state.get("stage") == "sft" else None)
    for step in bar:
        # 1. batch: N examples, ids [L_i] each; n_resp, the whole step's response tokens
        batch = st.sampler.take(cfg.sft.batch_size)
        n_resp = sum(len(e.ids) - e.prompt_len for e in batch)
        # 2. noise: masks [L_i], p [N], drawn for the whole global batch on every process, then
        #    sliced: the update is then the same whatever the number of processes and micro-batches
        noise = sft_noise(batch, M, t_min=cfg.sft.t_min, eps=cfg.sft.eps, generator=st.gen)
        # 3. loss and backward, micro-batch by micro-batch
        total_loss = _accumulate(cfg, accel, st.wrapped, batch, noise, n_resp)
        if not math.isfinite(total_loss):
            raise FloatingPointError(f"SFT step {step}: the loss is {total_loss}; lower sft.lr or raise sft.t_min")
        # 4. update
        gnorm = accel.clip_grad_norm_(st.params, cfg.sft.grad_clip) if cfg.sft.grad_clip > 0 else torch.tensor(0.0)
        st.opt.step()
        st.sched.step()
        st.opt.zero_grad(set_to_none=True)
        tokens += sum(len(batch[i].ids) * 2 for i in range(rank, len(batch), world))
        tps = tokens / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{total_loss:.3f}", tok_s=f"{tps:.0f}")
        interval.add({"loss": total_loss, "lr": st.sched.get_last_lr()[0], "grad_norm": float(gnorm), "tokens_per_s": tps})
        save, stop_now = job.end_step("sft", step, cfg.sft.steps, interval)
        if save:
            yield "checkpoint", st.checkpoint(step + 1, interval)
        if stop_now:
            return
    if skipped:
        print(f"SFT: skipped {skipped} examples longer than sft.max_seq_len={cfg.sft.max_seq_len}", file=sys.stderr)
