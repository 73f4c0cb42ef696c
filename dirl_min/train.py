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
from contextlib import nullcontext
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from dirl_min.config import Config, parse_config
from dirl_min.forward import SelectedLogits, _unwrap
from dirl_min.model import build_tiny, diffusion_settings, load_model, resolve_dtype, save_model
from dirl_min import tasks
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


class MetricsLog:
    """metrics.jsonl + TensorBoard (if importable); appends, so a resumed run continues the file."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
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
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{stage}/{k}", v, step)

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


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted(p for p in (out / "checkpoints").glob("*-*") if (p / "trainer_state.pt").is_file() and not p.name.endswith(".tmp"))
    return max(ckpts, key=lambda p: torch.load(p / "trainer_state.pt", weights_only=True)["ckpt_index"], default=None)


def build(cfg: Config):
    """Model, tokenizer and the three data sets (SFT records, RL problems, eval problems)."""
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
    problems = tasks.arithmetic_problems(cfg.data.task_max_operand, tuple(cfg.data.task_levels))
    train_p, test_p = tasks.split_problems(problems, cfg.data.held_out, cfg.data.split_seed)
    sft = tasks.load_sft(cfg.data.sft_data, tok) if cfg.data.sft_data else tasks.sft_records(train_p, tok, cfg.data.prompt_template)
    rl = tasks.load_problems(cfg.data.rl_data) if cfg.data.rl_data else train_p
    rl = _fitting_prompts(rl, tok, cfg.data.prompt_template, cfg.data.max_prompt_tokens, "rl")
    ev = tasks.load_problems(cfg.data.eval_data) if cfg.data.eval_data else test_p
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
        raise ValueError(f"{what}: no prompt fits data.max_prompt_tokens={limit}")
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
            # losses are normalised by the step's global token count; DDP averages over
            # processes, which the factor `world` undoes, so gradients add up to the full batch's
            loss, _ = sft_loss(wrapped, [batch[i] for i in idx], M, B, num_response_tokens=n_resp,
                               masks=[masks[i] for i in idx], p=p[idx], pack_tokens=cfg.sft.pack_tokens)
            with accel.no_sync(wrapped) if k < len(micro) - 1 else nullcontext():
                accel.backward(loss * world)
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


def run_rl(cfg, accel, policy, tok, problems, log, state, progress):
    """DiPO (SPEC §4) for ``cfg.rl.steps`` steps."""
    from tqdm.auto import tqdm

    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.rl.lr, betas=tuple(cfg.rl.betas), weight_decay=cfg.rl.weight_decay)
    wrapped, opt = accel.prepare(SelectedLogits(policy), opt)
    ref_model = None
    if cfg.rl.beta > 0:
        ref_model = copy.deepcopy(_unwrap(policy)).eval().requires_grad_(False)
    start = 0
    gen = torch.Generator().manual_seed(cfg.run.seed + 3)
    sampler = EpochSampler(problems, cfg.run.seed + 4)
    if state.get("stage") == "rl":
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        gen.set_state(state["sample_rng"])
        sampler.load_state_dict(state["sampler"])
    world, rank = accel.num_processes, accel.process_index
    G = cfg.rl.group_size
    engine = make_rollout_engine(cfg, policy)
    bar = tqdm(range(start, cfg.rl.steps), desc="DiPO", disable=not progress or not accel.is_main_process,
               initial=start, total=cfg.rl.steps)
    for step in bar:
        times = {"rollout": 0.0, "rewards": 0.0, "scoring": 0.0}  # seconds of this step
        t = time.perf_counter()
        kept = []  # (rollout, response indices, their advantages), one entry per kept group
        metrics_rows, sampled_groups, n_rounds = [], 0, 0
        want = max(1, cfg.rl.prompts_per_step // world)  # groups this process trains on
        if engine is not None:
            engine.load_weights(_unwrap(wrapped))  # this step's policy, sent through memory
        for _ in range(max(1, cfg.rl.sampling_rounds)):
            n_rounds += 1
            chosen = sampler.take(cfg.rl.prompts_per_step)
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
            sampled_groups += len(mine)
            adv = group_advantages(rewards, G)
            metrics_rows.append((roll, rewards, correct))
            for g in filter_groups(correct, G).nonzero()[:, 0].tolist():
                kept.append((roll, list(range(g * G, (g + 1) * G)), adv[g * G:(g + 1) * G]))
            if len(kept) >= want:
                break
        if engine is not None:
            engine.release()  # the update gets the rollout's GPU memory
        cap_hit = len(kept) < want
        kept = kept[:want]
        rew = torch.cat([r for _, r, _ in metrics_rows])
        acc = torch.cat([c for _, _, c in metrics_rows])
        rolls = [r for r, _, _ in metrics_rows]
        row = {
            "reward": float(rew.mean()), "accuracy": float(acc.mean()),
            "tokens_per_step": sum(r.tokens_per_step(i) for r in rolls for i in range(len(r))) / len(acc),
            "response_length": sum(len(x) for r in rolls for x in r.response_ids) / len(acc),
            "kept_fraction": len(kept) / max(1, sampled_groups), "sampling_rounds": n_rounds,
            "cap_hit": int(cap_hit),
        }
        t = time.perf_counter()
        # micro-batches: kept responses of one rollout, at most rl.micro_batch of them per forward
        micro = []
        for roll in {id(k[0]): k[0] for k in kept}.values():
            idx = [i for r, ids, _ in kept if r is roll for i in ids]
            adv = torch.cat([a for r, _, a in kept if r is roll])
            size = cfg.rl.micro_batch or len(idx)
            micro += [(roll, idx[s:s + size], adv[s:s + size]) for s in range(0, len(idx), size)]
        n_tok_local = sum(len(roll.response_ids[i]) for roll, idx, _ in micro for i in idx)
        n_tok = float(accel.reduce(torch.tensor(float(n_tok_local), device=accel.device), "sum")) if world > 1 else float(n_tok_local)
        if micro and n_tok > 0:
            logp_old = [None] * len(micro)
            for it in range(cfg.rl.num_iterations):
                loss_total, stats = 0.0, {}
                for k, (roll, idx, adv) in enumerate(micro):
                    t_score = time.perf_counter()
                    loss, stats_k, logp = dipo_step(
                        wrapped, roll, idx, adv, num_tokens=n_tok, eps_low=cfg.rl.eps_low, eps_high=cfg.rl.eps_high,
                        beta=cfg.rl.beta, ref_model=ref_model, logp_old=logp_old[k])
                    times["scoring"] += time.perf_counter() - t_score
                    if it == 0 and cfg.rl.num_iterations > 1:
                        logp_old[k] = logp  # the sampling policy's log-probs, computed once and reused
                    with accel.no_sync(wrapped) if k < len(micro) - 1 else nullcontext():
                        accel.backward(loss * world)
                    loss_total += float(loss.detach())
                    stats = {key: stats.get(key, 0.0) + v / len(micro) for key, v in stats_k.items()}
                if not math.isfinite(loss_total):
                    raise FloatingPointError(f"DiPO step {step}: the loss is {loss_total}; lower rl.lr")
                gnorm = accel.clip_grad_norm_(params, cfg.rl.grad_clip) if cfg.rl.grad_clip > 0 else torch.tensor(0.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            row.update(loss=loss_total, grad_norm=float(gnorm), **stats)
        times["update"] = time.perf_counter() - t - times["scoring"]  # backward + optimizer
        row.update({f"time_{k}": v for k, v in times.items()})
        bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}", kept=f"{row['kept_fraction']:.2f}")
        if (step + 1) % cfg.run.log_every == 0 or step + 1 == cfg.rl.steps:
            log.write("rl", step + 1, row)
        if cfg.run.save_every and (step + 1) % cfg.run.save_every == 0 and step + 1 < cfg.rl.steps:
            yield "checkpoint", {"stage": "rl", "step": step + 1, "optimizer": opt.state_dict(),
                                 "sample_rng": gen.get_state(), "sampler": sampler.state_dict()}


def print_table(summary: dict) -> str:
    cols = [("accuracy", "avg@k"), ("greedy_accuracy", "greedy"), (f"pass@{summary.get('samples', 8)}", "pass@k"),
            ("tokens_per_step", "tok/step"), ("mean_length", "length"), ("truncation_rate", "trunc")]
    lines = [f"{'stage':<8}" + "".join(f"{h:>10}" for _, h in cols)]
    for stage in ("base", "sft", "rl"):
        if stage in summary:
            r = summary[stage]
            lines.append(f"{stage:<8}" + "".join(f"{r.get(k, float('nan')):>10.3f}" for k, _ in cols))
    return "\n".join(lines)


def plot_curves(out: Path) -> None:
    """curves.png: SFT loss, RL reward/accuracy, tokens per step, kept-group fraction."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (e.g. a notebook's) alone

    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()] if (out / "metrics.jsonl").exists() else []
    sft = [r for r in rows if r["stage"] == "sft"]
    rl = [r for r in rows if r["stage"] == "rl"]
    fig = Figure(figsize=(18, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    panels = [(axes[0], sft, ["loss"], "SFT loss"), (axes[1], rl, ["reward", "accuracy"], "DiPO reward / accuracy"),
              (axes[2], rl, ["tokens_per_step"], "tokens per step (rollouts)"), (axes[3], rl, ["kept_fraction"], "kept-group fraction")]
    for ax, data, keys, title in panels:
        for k in keys:
            ax.plot([r["step"] for r in data if k in r], [r[k] for r in data if k in r], label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)


def main(argv=None) -> dict:
    cfg = parse_config(argv, description=__doc__.split("\n\n")[0])
    from accelerate import Accelerator

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    _seed_everything(cfg.run.seed)
    accel = Accelerator(cpu=not torch.cuda.is_available())
    check_backend(accel, cfg)
    out = Path(cfg.run.out)
    if accel.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    t_start = time.perf_counter()
    model, tok, sft_data, rl_problems, eval_problems = build(cfg)
    model.to(accel.device)
    # Train mode for the updates (transformers checkpoints layers only in train mode; load_model
    # returns eval mode); rollouts and evaluation switch to eval mode themselves.
    model.train()
    state, summary = {}, {}
    if cfg.run.resume and (ck := latest_checkpoint(out)) is not None:
        loaded, _ = load_model(ck / "model")
        model.load_state_dict(loaded.state_dict())
        state = torch.load(ck / "trainer_state.pt", weights_only=True)
        summary = state.get("summary", {})
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        print(f"resumed from {ck} ({state['stage']} step {state['step']})", file=sys.stderr)
        if accel.is_main_process:
            _truncate_log(out / "metrics.jsonl", state)
    elif accel.is_main_process and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a fresh run starts a fresh log
    log = MetricsLog(out, accel.is_main_process)
    progress = sys.stderr.isatty() or os.environ.get("DIRL_PROGRESS") == "1"
    ckpt_index = state.get("ckpt_index", 0)  # orders checkpoints: "latest" = highest index

    def checkpoint(name, st):
        nonlocal ckpt_index
        ckpt_index += 1
        full = full_state_dict(model)  # FSDP2: gathered by every process; None otherwise
        if accel.is_main_process:
            st.update(rng=_rng_state(), summary=summary, ckpt_index=ckpt_index)
            save_checkpoint(out / "checkpoints" / name, _unwrap(model), tok, st, state_dict=full)
        accel.wait_for_everyone()

    done = set(state.get("done", []))
    if "base" not in summary:
        summary["base"] = run_eval(cfg, accel, model, tok, eval_problems, "base", 0)
        if accel.is_main_process:
            print(f"base: {json.dumps(summary['base'])}", file=sys.stderr)
    stages = {"sft": lambda st: run_sft(cfg, accel, model, tok, sft_data, log, st, progress),
              "rl": lambda st: run_rl(cfg, accel, model, tok, rl_problems, log, st, progress)}
    for stage in cfg.run.stages:
        if stage not in stages:
            raise ValueError(f"run.stages: unknown stage {stage!r}; expected sft and/or rl")
        steps = getattr(cfg, stage).steps
        if stage in done or steps <= 0:
            continue
        t0 = time.perf_counter()
        st = state if state.get("stage") == stage else {}
        for _, ck_state in stages[stage](st):
            checkpoint(f"{stage}-{ck_state['step']:06d}", {**ck_state, "done": sorted(done)})
        done.add(stage)
        summary[f"{stage}_seconds"] = summary.get(f"{stage}_seconds", 0.0) + time.perf_counter() - t0
        summary[stage] = run_eval(cfg, accel, model, tok, eval_problems, stage, len(done))
        if accel.is_main_process:
            print(f"{stage}: {json.dumps(summary[stage])}", file=sys.stderr)
        checkpoint(f"{stage}-final", {"stage": f"{stage}-done", "step": steps, "done": sorted(done)})
    summary["wall_seconds"] = summary.get("wall_seconds", 0.0) + time.perf_counter() - t_start
    summary["samples"] = cfg.eval.samples
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
