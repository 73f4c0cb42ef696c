"""Random-masking SFT (SPEC §2): one optimizer step per training step, on any number of processes."""

from __future__ import annotations

import math
import sys
import time

import torch

from dirl_min.data_parallel import backward_micro
from dirl_min.forward import SelectedLogits, _unwrap
from dirl_min.loops.state import EpochSampler
from dirl_min.model import diffusion_settings
from dirl_min.trainer import make_scheduler, sft_loss, sft_noise, tokenize_sft


def _setup(cfg, accel, policy, examples, state):
    """Optimizer, scheduler, wrapped model, noise generator and sampler — resumed from ``state``
    when it is an SFT checkpoint's. Returns ``(params, opt, sched, wrapped, gen, sampler, start)``."""
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.sft.lr, betas=tuple(cfg.sft.betas), weight_decay=cfg.sft.weight_decay)
    sched = make_scheduler(opt, cfg.sft.warmup_steps, cfg.sft.steps, cfg.sft.min_lr_ratio)
    wrapped, opt = accel.prepare(SelectedLogits(policy), opt)
    start = 0
    if state.get("stage") == "sft":
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["step"]
    gen = torch.Generator().manual_seed(cfg.run.seed + 1)
    sampler = EpochSampler(examples, cfg.run.seed + 2)
    if state.get("stage") == "sft":
        gen.set_state(state["noise_rng"])
        sampler.load_state_dict(state["sampler"])
    return params, opt, sched, wrapped, gen, sampler, start


def _accumulate(cfg, accel, wrapped, batch, masks, p, n_resp, M, B) -> float:
    """Backward of this process's share of ``batch`` in ``sft.grad_accum`` micro-batches;
    returns the step's loss summed over all processes."""
    world, rank = accel.num_processes, accel.process_index
    mine = list(range(rank, len(batch), world))
    micro = [mine[i::cfg.sft.grad_accum] for i in range(cfg.sft.grad_accum)]
    total_loss = torch.zeros((), device=accel.device)
    for k, idx in enumerate(micro):
        # losses are normalised by the step's global token count, so gradients add up to the full batch's
        loss, _ = sft_loss(wrapped, [batch[i] for i in idx], M, B, num_response_tokens=n_resp,
                           masks=[masks[i] for i in idx], p=p[idx], pack_tokens=cfg.sft.pack_tokens)
        backward_micro(accel, wrapped, loss, last=k == len(micro) - 1)
        total_loss += loss.detach()
    return float(accel.reduce(total_loss, "sum")) if world > 1 else float(total_loss)


def run_sft(cfg, accel, policy, tok, records, log, state, progress):
    """Random-masking SFT (SPEC §2) for ``cfg.sft.steps`` optimizer steps.

    A generator: yields ``("checkpoint", trainer_state)`` every ``run.save_every`` steps."""
    from tqdm.auto import tqdm

    B, M = diffusion_settings(_unwrap(policy))
    examples, skipped = tokenize_sft(records, tok, B, cfg.sft.max_seq_len)
    if not examples:
        raise ValueError(f"no SFT example fits sft.max_seq_len={cfg.sft.max_seq_len} ({skipped} skipped)")
    params, opt, sched, wrapped, gen, sampler, start = _setup(cfg, accel, policy, examples, state)
    world, rank = accel.num_processes, accel.process_index
    bar = tqdm(range(start, cfg.sft.steps), desc="SFT", disable=not progress or not accel.is_main_process,
               initial=start, total=cfg.sft.steps)
    t0, tokens = time.perf_counter(), 0
    for step in bar:
        # 1. batch: N examples, ids [L_i] each; n_resp, the whole step's response tokens
        batch = sampler.take(cfg.sft.batch_size)
        n_resp = sum(len(e.ids) - e.prompt_len for e in batch)
        # 2. noise: masks [L_i], p [N], drawn for the whole global batch on every process, then
        #    sliced: the update is then the same whatever the number of processes and micro-batches
        masks, p = sft_noise(batch, M, t_min=cfg.sft.t_min, eps=cfg.sft.eps, generator=gen)
        # 3. loss and backward, micro-batch by micro-batch
        total_loss = _accumulate(cfg, accel, wrapped, batch, masks, p, n_resp, M, B)
        if not math.isfinite(total_loss):
            raise FloatingPointError(f"SFT step {step}: the loss is {total_loss}; lower sft.lr or raise sft.t_min")
        # 4. update
        gnorm = accel.clip_grad_norm_(params, cfg.sft.grad_clip) if cfg.sft.grad_clip > 0 else torch.tensor(0.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += sum(len(batch[i].ids) * 2 for i in range(rank, len(batch), world))
        tps = tokens / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{total_loss:.3f}", tok_s=f"{tps:.0f}")
        if (step + 1) % cfg.run.log_every == 0 or step + 1 == cfg.sft.steps:
            log.write("sft", step + 1, {"loss": total_loss, "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm),
                                        "tokens_per_s": tps})
        if cfg.run.save_every and (step + 1) % cfg.run.save_every == 0 and step + 1 < cfg.sft.steps:
            yield "checkpoint", {"stage": "sft", "step": step + 1, "optimizer": opt.state_dict(),
                                 "scheduler": sched.state_dict(), "noise_rng": gen.get_state(),
                                 "sampler": sampler.state_dict()}
    if skipped:
        print(f"SFT: skipped {skipped} examples longer than sft.max_seq_len={cfg.sft.max_seq_len}", file=sys.stderr)
