"""The main job: evaluate the base model, SFT, evaluate, DiPO, evaluate, print a table.

    python -m dirl_min.train                      # the embedded default (tiny model, CPU, < 10 min)
    python -m dirl_min.train --help               # every setting, its meaning and default
    python -m dirl_min.train --config configs/sdar-8b-dirl.yaml --model.path /ckpt/SDAR-8B-Chat
    accelerate launch --num_processes 8 -m dirl_min.train --config ...

Outputs under ``--run.out``: ``summary.json``, ``metrics.jsonl``, TensorBoard events,
``curves.png``, and ``checkpoints/`` (resumable with ``--run.resume true``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from dirl_min.config import Config, SettingsError, parse_config
from dirl_min.data_parallel import all_ranks, backward_micro, equal_micro_batches
from dirl_min.forward import SelectedLogits, _unwrap
from dirl_min.model import build_tiny, diffusion_settings, load_model, resolve_dtype, save_model
from dirl_min import runs, tasks
from dirl_min.progress import ProgressLines, progress_mode
from dirl_min.settings import check_processes, validate
from dirl_min.sharding import check_backend, full_parameters, full_state_dict
from dirl_min.trainer import (
    dipo_step,
    evaluate,
    make_scheduler,
    rollout_and_reward,
    sft_loss,
    sft_noise,
    tokenize_sft,
)
from dirl_min.dipo import filter_groups, group_advantages
from dirl_min.metrics import bootstrap_ci
from dirl_min.report import plot_curves, print_table  # noqa: F401  (print_table: part of this module's API)


class MetricsLog:
    """metrics.jsonl + TensorBoard (if importable); appends, so a resumed run continues the file.
    With ``lines``, each written row also prints a progress line (:mod:`dirl_min.progress`)."""

    def __init__(self, out: Path, enabled: bool, lines: bool = False):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.progress = ProgressLines() if enabled and lines else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except Exception:  # tensorboard missing: JSONL still has everything
                self.tb = None

    def write(self, stage: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"stage": stage, "step": step, **values}) + "\n")
        if self.progress is not None:
            self.progress.show(stage, step, values)
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{stage}/{k}", v, step)

    def begin(self, stage: str, start: int, total: int) -> None:
        """A stage runs from step ``start`` to ``total`` (for the progress lines' remaining time)."""
        if self.progress is not None:
            self.progress.begin(stage, start, total)

    def close(self):
        if self.tb is not None:
            self.tb.close()


class EpochSampler:
    """Draws items in seeded random order, epoch after epoch; its state resumes exactly."""

    def __init__(self, items: list, seed: int):
        self.items, self.rng, self.order, self.cursor = items, random.Random(seed), [], 0

    def take(self, n: int) -> list:
        out = []
        for _ in range(n):
            if self.cursor >= len(self.order):
                self.order, self.cursor = self.rng.sample(range(len(self.items)), len(self.items)), 0
            out.append(self.items[self.order[self.cursor]])
            self.cursor += 1
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "order": self.order, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.order, self.cursor = state["order"], state["cursor"]


def _truncate_log(path: Path, state: dict) -> None:
    """Drop log rows written after the checkpoint being resumed, so no step appears twice."""
    if not path.exists():
        return
    done, stage, step = set(state.get("done", [])), state["stage"], state["step"]
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and ((row := json.loads(line))["stage"] in done or (row["stage"] == stage and row["step"] <= step))]
    path.write_text("".join(line + "\n" for line in keep))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def save_checkpoint(path: Path, model, tokenizer, state: dict, state_dict: dict | None = None) -> None:
    """Model (HF format) + optimizer, scheduler, RNG, data cursor, step — written atomically:
    everything goes to a temporary folder that is renamed into place, so a crash mid-save
    leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, tokenizer, tmp / "model", state_dict=state_dict)
    torch.save(state, tmp / "trainer_state.pt")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def build(cfg: Config):
    """Model, tokenizer and the three data sets (SFT records, RL problems, eval problems).

    The data files are read before the model is loaded, so that their errors come first."""
    problems = tasks.arithmetic_problems(cfg.data.task_max_operand, tuple(cfg.data.task_levels))
    train_p, test_p = tasks.split_problems(problems, cfg.data.held_out, cfg.data.split_seed)
    sft_raw = tasks.load_records(cfg.data.sft_data) if cfg.data.sft_data else None
    rl = tasks.load_problems(cfg.data.rl_data) if cfg.data.rl_data else train_p
    ev = tasks.load_problems(cfg.data.eval_data) if cfg.data.eval_data else test_p
    if cfg.model.path:
        model, tok = load_model(
            cfg.model.path,
            block_size=cfg.model.block_size or None,
            mask_token_id=cfg.model.mask_token_id if cfg.model.mask_token_id >= 0 else None,
            dtype=resolve_dtype(cfg.model.dtype),
        )
    else:
        model, tok = build_tiny(
            hidden_size=cfg.model.hidden_size, num_layers=cfg.model.num_layers, num_heads=cfg.model.num_heads,
            num_kv_heads=cfg.model.num_kv_heads, head_dim=max(1, cfg.model.hidden_size // cfg.model.num_heads),
            intermediate_size=cfg.model.intermediate_size, block_size=cfg.model.block_size or 4, seed=cfg.run.seed,
        )
    attn = cfg.model.attn_implementation
    if attn == "auto":
        attn = "flex_attention" if torch.cuda.is_available() else "sdpa"  # CPU flex has no backward
    model.set_attn_implementation(attn)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    sft = (tasks.load_sft(cfg.data.sft_data, tok, sft_raw) if sft_raw is not None
           else tasks.sft_records(train_p, tok, cfg.data.prompt_template, cfg.data.response_style))
    rl = _fitting_prompts(rl, tok, cfg.data.prompt_template, cfg.data.max_prompt_tokens, "rl")
    ev = _fitting_prompts(ev, tok, cfg.data.prompt_template, cfg.data.max_prompt_tokens, "eval")  # as in training
    if cfg.eval.max_problems:
        ev = ev[: cfg.eval.max_problems]
    return model, tok, sft, rl, ev


def _fitting_prompts(problems, tok, template, limit, what):
    """Problems whose chat prompt fits ``limit`` tokens; the others are skipped and counted."""
    from dirl_min.model import chat_prompt_ids

    kept = [p for p in problems if len(chat_prompt_ids(tok, tasks.render_prompt(template, p.question))) <= limit]
    if len(kept) < len(problems):
        print(f"{what}: skipped {len(problems) - len(kept)} of {len(problems)} prompts longer than "
              f"data.max_prompt_tokens={limit}", file=sys.stderr)
    if not kept:
        raise SettingsError(f"{what}: no prompt fits data.max_prompt_tokens={limit}")
    return kept


def run_eval(cfg, accel, model, tok, problems, name, seed_offset):
    """Evaluation on every process: problems sharded, parameters gathered once (FSDP2), the
    results gathered, so each process returns the 1-process numbers."""
    from accelerate.utils import gather_object

    with full_parameters(model):
        return evaluate(
            _unwrap(model), tok, problems, samples=cfg.eval.samples, temperature=cfg.eval.temperature,
            top_k=cfg.eval.top_k, top_p=cfg.eval.top_p, greedy=cfg.eval.greedy, max_new_tokens=cfg.eval.max_new_tokens,
            decode_cfg=cfg.decode, prompt_template=cfg.data.prompt_template, seed=cfg.run.seed * 1000 + seed_offset,
            batch_size=cfg.eval.batch_size, rank=accel.process_index, world=accel.num_processes, gather=gather_object,
        )


def run_sft(cfg, accel, policy, tok, records, log, state, progress):
    """Random-masking SFT (SPEC §2) for ``cfg.sft.steps`` optimizer steps."""
    from tqdm.auto import tqdm

    B, M = diffusion_settings(_unwrap(policy))
    examples, skipped = tokenize_sft(records, tok, B, cfg.sft.max_seq_len)
    if not examples:
        raise ValueError(f"no SFT example fits sft.max_seq_len={cfg.sft.max_seq_len} ({skipped} skipped)")
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
    world, rank = accel.num_processes, accel.process_index
    bar = tqdm(range(start, cfg.sft.steps), desc="SFT", disable=not progress or not accel.is_main_process,
               initial=start, total=cfg.sft.steps)
    t0, tokens = time.perf_counter(), 0
    for step in bar:
        batch = sampler.take(cfg.sft.batch_size)
        n_resp = sum(len(e.ids) - e.prompt_len for e in batch)  # the whole step's response tokens
        # Noise is drawn for the whole global batch on every process, then sliced: the update
        # is then the same whatever the number of processes and micro-batches.
        masks, p = sft_noise(batch, M, t_min=cfg.sft.t_min, eps=cfg.sft.eps, generator=gen)
        mine = list(range(rank, len(batch), world))
        micro = [mine[i::cfg.sft.grad_accum] for i in range(cfg.sft.grad_accum)]
        total_loss = torch.zeros((), device=accel.device)
        for k, idx in enumerate(micro):
            # losses are normalised by the step's global token count, so gradients add up to the full batch's
            loss, _ = sft_loss(wrapped, [batch[i] for i in idx], M, B, num_response_tokens=n_resp,
                               masks=[masks[i] for i in idx], p=p[idx], pack_tokens=cfg.sft.pack_tokens)
            backward_micro(accel, wrapped, loss, last=k == len(micro) - 1)
            total_loss += loss.detach()
        total_loss = float(accel.reduce(total_loss, "sum")) if world > 1 else float(total_loss)
        if not math.isfinite(total_loss):
            raise FloatingPointError(f"SFT step {step}: the loss is {total_loss}; lower sft.lr or raise sft.t_min")
        gnorm = accel.clip_grad_norm_(params, cfg.sft.grad_clip) if cfg.sft.grad_clip > 0 else torch.tensor(0.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += sum(len(batch[i].ids) * 2 for i in mine)
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


def make_rollout_engine(cfg, policy):
    """None for the native decoder; an :class:`LMDeployEngine` for ``rl.rollout_backend: lmdeploy``."""
    if cfg.rl.rollout_backend == "native":
        return None
    if cfg.rl.rollout_backend != "lmdeploy":
        raise SystemExit(f"rl.rollout_backend must be native or lmdeploy, not {cfg.rl.rollout_backend!r}")
    if not cfg.model.path:
        raise SystemExit("rl.rollout_backend lmdeploy needs --model: a checkpoint folder LMDeploy can load")
    try:
        from dirl_min.lmdeploy_engine import LMDeployEngine
        import lmdeploy  # noqa: F401
    except ImportError:
        raise SystemExit("rl.rollout_backend lmdeploy needs the lmdeploy package (pip install -e '.[lmdeploy]' on a "
                         "CUDA machine; lmdeploy 0.18 needs torch <= 2.12.1)") from None
    block, mask_id = diffusion_settings(_unwrap(policy))
    return LMDeployEngine(cfg.model.path, block_size=block, mask_token_id=mask_id, strategy=cfg.decode.strategy,
                          threshold=cfg.decode.threshold, steps=cfg.decode.steps)


def _sample_groups(cfg, accel, wrapped, tok, sampler, gen, engine, times):
    """Dynamic sampling (SPEC §4.3) over all processes: rounds of ``rl.prompts_per_step`` prompts
    until that many groups with mixed accuracy are kept, at most ``rl.sampling_rounds`` rounds.

    Process r decodes prompts r, r + world, … of each round. Whether to stop and which groups to
    keep are decided on all processes' groups in the round's order, so every process runs the
    same rounds (the samplers stay in step) and the groups kept are those one process would keep.

    Returns:
        ``(kept, rolls, n_kept)``: this process's kept groups as (rollout, response indices,
        advantages [G]); its (rollout, rewards, correct) per round; the kept count over all processes.
    """
    world, rank, G, P = accel.num_processes, accel.process_index, cfg.rl.group_size, cfg.rl.prompts_per_step
    kept, rolls, n_kept = [], [], 0
    for _ in range(max(1, cfg.rl.sampling_rounds)):
        chosen = sampler.take(P)
        mine = chosen[rank::world]
        # sampling seeds for the global batch, then this process's share: same samples for any world size
        seeds = torch.randint(0, 2**32, (len(chosen), G), generator=gen)[rank::world].reshape(-1).tolist()
        # native: the engine decodes with the module being trained, so the weight sync is free
        with full_parameters(wrapped):  # FSDP2: one gather, then decoding free of collectives
            roll, rewards, correct, _ = rollout_and_reward(
                _unwrap(wrapped), tok, mine, group_size=G, prompt_template=cfg.data.prompt_template,
                decode_cfg=cfg.decode, temperature=cfg.rl.temperature, top_k=cfg.rl.top_k, top_p=cfg.rl.top_p,
                max_new_tokens=cfg.rl.max_new_tokens, rewards=cfg.rl.rewards, seeds=seeds,
                reward_workers=cfg.rl.reward_workers, timings=times, engine=engine)
        rolls.append((roll, rewards, correct))
        adv = group_advantages(rewards, G)
        keep = filter_groups(rewards, G, correct=correct, rule=cfg.rl.group_filter)
        mixed = all_ranks(accel, keep.tolist())  # per process, its groups in order
        for g in [g for g in range(len(chosen)) if mixed[g % world][g // world]][: P - n_kept]:
            if g % world == rank:
                i = g // world
                kept.append((roll, list(range(i * G, (i + 1) * G)), adv[i * G:(i + 1) * G]))
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


def run_rl(cfg, accel, policy, tok, problems, log, state, progress):
    """DiPO (SPEC §4) for ``cfg.rl.steps`` steps."""
    from tqdm.auto import tqdm

    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.rl.lr, betas=tuple(cfg.rl.betas), weight_decay=cfg.rl.weight_decay)
    sched = make_scheduler(opt, cfg.rl.warmup_steps, cfg.rl.steps, 1.0)  # DiRL: warm-up, then constant
    wrapped, opt = accel.prepare(SelectedLogits(policy), opt)
    ref_model = None
    if cfg.rl.beta > 0:
        ref_model = copy.deepcopy(_unwrap(policy)).eval().requires_grad_(False)
    start = 0
    gen = torch.Generator().manual_seed(cfg.run.seed + 3)
    sampler = EpochSampler(problems, cfg.run.seed + 4)
    if state.get("stage") == "rl":
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["step"]
        gen.set_state(state["sample_rng"])
        sampler.load_state_dict(state["sampler"])
    engine = make_rollout_engine(cfg, policy)
    bar = tqdm(range(start, cfg.rl.steps), desc="DiPO", disable=not progress or not accel.is_main_process,
               initial=start, total=cfg.rl.steps)
    for step in bar:
        times = {"rollout": 0.0, "rewards": 0.0, "scoring": 0.0}  # seconds of this step
        if engine is not None:
            engine.load_weights(_unwrap(wrapped))  # this step's policy, sent through memory
        kept, rolls, n_kept = _sample_groups(cfg, accel, wrapped, tok, sampler, gen, engine, times)
        if engine is not None:
            engine.release()  # the update gets the rollout's GPU memory
        row = _rollout_metrics(accel, rolls, n_kept, cfg.rl.prompts_per_step)
        t = time.perf_counter()
        # micro-batches: kept responses of one rollout, at most rl.micro_batch of them per forward
        micro = []
        for roll in {id(k[0]): k[0] for k in kept}.values():
            idx = [i for r, ids, _ in kept if r is roll for i in ids]
            adv = torch.cat([a for r, _, a in kept if r is roll])
            size = cfg.rl.micro_batch or len(idx)
            micro += [(roll, idx[s:s + size], adv[s:s + size]) for s in range(0, len(idx), size)]
        counts = all_ranks(accel, (sum(len(roll.response_ids[i]) for roll, idx, _ in micro for i in idx), len(micro)))
        n_tok = float(sum(c[0] for c in counts))  # the step's response tokens, all processes
        last = rolls[-1][0]  # a filler for a process with fewer micro-batches than another: a non-empty response
        filler = (last, [max(range(len(last)), key=lambda i: len(last.response_ids[i]))], torch.zeros(1))
        micro = equal_micro_batches(micro, max(c[1] for c in counts), filler)
        n_real = sum(m[3] for m in micro)
        if n_tok > 0:
            logp_old = [None] * len(micro)
            for it in range(cfg.rl.num_iterations):
                loss_total, stats = 0.0, {}
                for k, (roll, idx, adv, real) in enumerate(micro):
                    t_score = time.perf_counter()
                    loss, stats_k, logp = dipo_step(
                        wrapped, roll, idx, adv, num_tokens=n_tok, eps_low=cfg.rl.eps_low, eps_high=cfg.rl.eps_high,
                        beta=cfg.rl.beta, ref_model=ref_model, logp_old=logp_old[k])
                    times["scoring"] += time.perf_counter() - t_score
                    if it == 0 and cfg.rl.num_iterations > 1:
                        logp_old[k] = logp  # the sampling policy's log-probs, computed once and reused
                    backward_micro(accel, wrapped, loss if real else loss * 0.0, last=k == len(micro) - 1)
                    if real:
                        loss_total += float(loss.detach())
                        stats = {key: stats.get(key, 0.0) + v / n_real for key, v in stats_k.items()}
                loss_total = sum(all_ranks(accel, loss_total))
                if not math.isfinite(loss_total):
                    raise FloatingPointError(f"DiPO step {step}: the loss is {loss_total}; lower rl.lr")
                gnorm = accel.clip_grad_norm_(params, cfg.rl.grad_clip) if cfg.rl.grad_clip > 0 else torch.tensor(0.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            row["lr"] = sched.get_last_lr()[0]  # the rate of this update; warm-up counts updates
            sched.step()
            row.update(loss=loss_total, grad_norm=float(gnorm), **stats)
        times["update"] = time.perf_counter() - t - times["scoring"]  # backward + optimizer
        row.update({f"time_{k}": v for k, v in times.items()})
        bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}", kept=f"{row['kept_fraction']:.2f}")
        if (step + 1) % cfg.run.log_every == 0 or step + 1 == cfg.rl.steps:
            log.write("rl", step + 1, row)
        if cfg.run.save_every and (step + 1) % cfg.run.save_every == 0 and step + 1 < cfg.rl.steps:
            yield "checkpoint", {"stage": "rl", "step": step + 1, "optimizer": opt.state_dict(),
                                 "scheduler": sched.state_dict(), "sample_rng": gen.get_state(), "sampler": sampler.state_dict()}


def _start(argv):
    """Settings, output folder, model and data — every check before any work; nothing is written
    to ``run.out`` until all of them pass. Returns ``(cfg, accel, out, built, state)``."""
    try:
        cfg = parse_config(argv, description=__doc__.split("\n\n")[0], prog="python -m dirl_min.train")
        validate(cfg)
        progress_mode(sys.stderr.isatty(), os.environ.get("DIRL_PROGRESS"))  # a bad value fails here, not later
        runs.check_out(cfg)
    except SettingsError as e:
        raise SystemExit(f"dirl_min.train: error: {e}") from None
    from accelerate import Accelerator

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    _seed_everything(cfg.run.seed)
    accel = Accelerator(cpu=not torch.cuda.is_available())
    check_backend(accel, cfg)
    out = Path(cfg.run.out)
    try:
        check_processes(cfg, accel.num_processes)
        built = build(cfg)
        found = runs.load_latest(out, cfg.to_dict(), lambda p: load_model(p)[0].state_dict()) if cfg.run.resume else None
    except (tasks.DataError, SettingsError) as e:
        raise SystemExit(f"dirl_min.train: error: {e}") from None
    state = {}
    if found is not None:
        ck, state, weights = found
        built[0].load_state_dict(weights)
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        print(f"resumed from {ck} ({state['stage']} step {state['step']})", file=sys.stderr)
    elif cfg.run.resume:
        print(f"run.resume: {out} holds no complete checkpoint; starting fresh", file=sys.stderr)
    if accel.is_main_process:
        if found is not None:
            _truncate_log(out / "metrics.jsonl", state)
        else:
            runs.start_fresh(out, cfg)  # a fresh run starts a fresh log (an earlier run's files: run.overwrite)
    accel.wait_for_everyone()
    return cfg, accel, out, built, state


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    cfg, accel, out, built, state = _start(argv)
    model, tok, sft_data, rl_problems, eval_problems = built
    model.to(accel.device)
    # Train mode for the updates (transformers checkpoints layers only in train mode; load_model
    # returns eval mode); rollouts and evaluation switch to eval mode themselves.
    model.train()
    summary = state.get("summary", {})
    mode = progress_mode(sys.stderr.isatty(), os.environ.get("DIRL_PROGRESS"))
    progress = mode == "bar"
    log = MetricsLog(out, accel.is_main_process, lines=mode == "lines")
    ckpt_index = state.get("ckpt_index", 0)  # orders checkpoints: "latest" = highest index

    def checkpoint(name, st):
        nonlocal ckpt_index
        ckpt_index += 1
        full = full_state_dict(model)  # FSDP2: gathered by every process; None otherwise
        if accel.is_main_process:
            st.update(rng=_rng_state(), summary=summary, ckpt_index=ckpt_index, config=cfg.to_dict())
            save_checkpoint(out / "checkpoints" / name, _unwrap(model), tok, st, state_dict=full)
        accel.wait_for_everyone()

    done = set(state.get("done", []))
    if "base" not in summary:
        summary["base"] = run_eval(cfg, accel, model, tok, eval_problems, "base", 0)
        if accel.is_main_process:
            print(f"base: {json.dumps({k: v for k, v in summary['base'].items() if k != 'per_problem'})}", file=sys.stderr)
    stages = {"sft": lambda st: run_sft(cfg, accel, model, tok, sft_data, log, st, progress),
              "rl": lambda st: run_rl(cfg, accel, model, tok, rl_problems, log, st, progress)}
    for stage in cfg.run.stages:
        steps = getattr(cfg, stage).steps
        if stage in done or steps <= 0:
            continue
        t0 = time.perf_counter()
        st = state if state.get("stage") == stage else {}
        log.begin(stage, st.get("step", 0), steps)
        for _, ck_state in stages[stage](st):
            checkpoint(f"{stage}-{ck_state['step']:06d}", {**ck_state, "done": sorted(done)})
        done.add(stage)
        summary[f"{stage}_seconds"] = summary.get(f"{stage}_seconds", 0.0) + time.perf_counter() - t0
        summary[stage] = run_eval(cfg, accel, model, tok, eval_problems, stage, len(done))
        if accel.is_main_process:
            print(f"{stage}: {json.dumps({k: v for k, v in summary[stage].items() if k != 'per_problem'})}", file=sys.stderr)
        checkpoint(f"{stage}-final", {"stage": f"{stage}-done", "step": steps, "done": sorted(done)})
    summary["wall_seconds"] = summary.get("wall_seconds", 0.0) + time.perf_counter() - t_start
    summary["samples"] = cfg.eval.samples
    if "sft" in summary and "rl" in summary:  # paired: the same problems before and after DiPO
        diff = [b - a for a, b in zip(summary["sft"]["per_problem"], summary["rl"]["per_problem"])]
        summary["rl_minus_sft"] = {"mean": sum(diff) / len(diff), "ci": list(bootstrap_ci(diff))}
    summary["seed"] = cfg.run.seed
    if accel.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.close()
        plot_curves(out)
        print(print_table(summary))
        print(f"wall time {summary['wall_seconds']:.0f} s; outputs in {out}/ (summary.json, metrics.jsonl, curves.png)")
    return summary


if __name__ == "__main__":
    main()
