"""What a run saves and resumes: data order, checkpoints, RNG state, the metrics log."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dirl_min.infra.atomic import atomic_dir, atomic_write, is_temporary
from dirl_min.model.forward import SelectedLogits, unwrap
from dirl_min.model import TRAIN_CHECKPOINT_MODEL_DIR, TRAINER_STATE_FILE, save_model
from dirl_min.infra.progress import ProgressLines
from dirl_min.infra.sharding import full_state_dict


class MetricsLog:
    """metrics.jsonl + TensorBoard (if importable); appends, so a resumed run continues the file.
    With ``lines``, each written row also prints a progress line (:mod:`dirl_min.infra.progress`).

    On resume (``summary`` given, the log already cut back to the checkpoint: :func:`resume`) the
    TensorBoard events are written again from ``metrics.jsonl`` and the summary's evaluations, so a
    resumed run has each point once (appending would repeat the steps after the checkpoint)."""

    def __init__(self, out: Path, enabled: bool, lines: bool = False, summary: dict | None = None):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.progress = ProgressLines() if enabled and lines else None
        self.tb = None
        if enabled:
            if summary is not None:
                shutil.rmtree(out / "tensorboard", ignore_errors=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except Exception:  # tensorboard missing: JSONL still has everything
                self.tb = None
        if self.tb is not None and summary is not None:
            for row in read_jsonl(self.path):
                self._scalars(row["stage"], row["step"], row)
            for stage, result in summary.items():
                if stage in EVALUATED:
                    self.evaluation(stage, result)

    def _scalars(self, stage: str, step: int, values: dict) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("stage", "step"):
                self.tb.add_scalar(f"{stage}/{k}", v, step)

    def write(self, stage: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"stage": stage, "step": step, **values}) + "\n")
        if self.progress is not None:
            self.progress.show(stage, step, values)
        if self.tb is not None:
            self._scalars(stage, step, values)

    def evaluation(self, stage: str, result: dict) -> None:
        """A stage's held-out evaluation in TensorBoard: ``eval/<metric>`` at x = the stage's
        position (0 base, 1 sft, 2 rl), so the points form the before/after curve."""
        if self.tb is not None:
            self._scalars("eval", EVALUATED.index(stage), result)
            self.tb.flush()

    def begin(self, stage: str, start: int, total: int) -> None:
        """A stage runs from step ``start`` to ``total`` (for the progress lines' remaining time)."""
        if self.progress is not None:
            self.progress.begin(stage, start, total)

    def close(self):
        if self.tb is not None:
            self.tb.close()


#: the evaluated stages, in order (their x position in TensorBoard's ``eval/*``)
EVALUATED = ("base", "sft", "rl")


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON Lines file written here (none when it is missing)."""
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()] if path.exists() else []


class IntervalMean:
    """The rows of the steps since the last logged one, averaged into the logged row (as TRL and verl
    log): every step counts, not only each ``run.log_every``-th. A value is averaged over the steps
    that have it (an RL step with no group kept has no loss); ``LAST`` keys (a schedule's value, a
    running rate) and non-numbers take the last value. Its state is saved with a checkpoint, so a
    resumed run logs the same rows as an uninterrupted one."""

    LAST = frozenset({"lr", "tokens_per_s"})

    def __init__(self, state: dict | None = None):
        state = state or {"sums": {}, "counts": {}, "last": {}}
        self.sums, self.counts, self.last = dict(state["sums"]), dict(state["counts"]), dict(state["last"])

    def add(self, row: dict) -> None:
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in self.LAST:
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
                self.counts[k] = self.counts.get(k, 0) + 1
            else:
                self.last[k] = v

    def take(self) -> dict:
        """The interval's row (means and last values), and a fresh interval."""
        row = {**{k: v / self.counts[k] for k, v in self.sums.items()}, **self.last}
        self.sums, self.counts, self.last = {}, {}, {}
        return row

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts), "last": dict(self.last)}


class Interrupts:
    """SIGINT / SIGTERM while a run trains (a context manager).

    The first signal asks the loops to stop after the current step: they save a checkpoint there and
    the job exits saying how to continue. A second one stops at once (``KeyboardInterrupt``). Whether
    to stop is decided on all processes together (:meth:`__call__`), so every process stops after
    the same step and their collectives stay matched. Outside the main thread no handler is installed."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, accel):
        self.accel, self.signum, self.stopping, self.saved = accel, None, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.saved = {s: signal.signal(s, self._first) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.saved.items():
            signal.signal(s, handler)

    def _first(self, signum, frame) -> None:
        self.signum = signum
        for s in self.SIGNALS:
            signal.signal(s, self._again)
        # os.write, not print: a handler that prints while the interrupted code prints raises "reentrant call"
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after the current step and saving a checkpoint "
                    "(send it again to stop at once, without one)\n".encode())

    def _again(self, signum, frame) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def __call__(self) -> bool:
        """Whether to stop now: a signal reached any process (one all-reduce when there are several)."""
        mine = self.signum is not None
        if self.accel.num_processes > 1:
            mine = bool(self.accel.reduce(torch.tensor(float(mine), device=self.accel.device), "sum") > 0)
        self.stopping = self.stopping or mine
        return self.stopping


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


def truncate_log(path: Path, state: dict) -> None:
    """Drop log rows written after the checkpoint being resumed, so no step appears twice."""
    if not path.exists():
        return
    done, stage, step = set(state.get("done", [])), state["stage"], state["step"]
    keep = [row for row in read_jsonl(path) if row["stage"] in done or (row["stage"] == stage and row["step"] <= step)]
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in keep))  # a crash here must not lose the log


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def restore_rng(state: dict) -> None:
    """The global RNGs as a checkpoint's :func:`rng_state` saved them."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(path: Path, model, tokenizer, state: dict, state_dict: dict | None = None) -> None:
    """Model (HF format) + optimizer, scheduler, RNG, data cursor, step — written atomically
    (:func:`dirl_min.infra.atomic.atomic_dir`): a crash mid-save leaves the previous checkpoint intact."""
    with atomic_dir(path) as tmp:
        save_model(model, tokenizer, tmp / TRAIN_CHECKPOINT_MODEL_DIR, state_dict=state_dict)
        torch.save(state, tmp / TRAINER_STATE_FILE)


class Checkpoints:
    """Writes ``<out>/checkpoints/<name>``, numbered so that "latest" is the highest index.

    ``summary`` is the run's summary dict, saved (as it is at each save) with every checkpoint;
    ``record``, what each checkpoint records as the run's settings (``runs.run_record``: with the
    data files' hashes; default ``cfg.to_dict()``)."""

    def __init__(self, out: Path, cfg, accel, model, tok, summary: dict, record: dict | None = None):
        self.out, self.cfg, self.accel, self.model, self.tok = out, cfg, accel, model, tok
        self.summary, self.record = summary, record if record is not None else cfg.to_dict()
        self.index = 0  # the last checkpoint's number: a resumed run sets its checkpoint's ``ckpt_index``
        self.last: Path | None = None

    def save(self, name: str, st: dict) -> None:
        self.index += 1
        full = full_state_dict(self.model)  # FSDP2: gathered by every process; None otherwise
        self.last = self.out / "checkpoints" / name
        if self.accel.is_main_process:
            st.update(rng=rng_state(), summary=self.summary, ckpt_index=self.index, config=self.record)
            save_checkpoint(self.last, unwrap(self.model), self.tok, st, state_dict=full)
            self._prune()
        self.accel.wait_for_everyone()

    def _prune(self) -> None:
        """``run.keep_checkpoints`` > 0: delete the step checkpoints (``<stage>-<step>``) older than the
        newest N, in run order (stage in ``run.stages``, then step); ``<stage>-final`` ones stay."""
        keep = self.cfg.run.keep_checkpoints
        if keep <= 0:
            return
        order = {stage: i for i, stage in enumerate(self.cfg.run.stages)}
        steps = []
        for ck in (self.out / "checkpoints").iterdir():
            stage, _, step = ck.name.rpartition("-")
            if ck.is_dir() and not is_temporary(ck) and stage in order and step.isdigit():
                steps.append(((order[stage], int(step)), ck))
        for _, ck in sorted(steps)[:-keep]:
            shutil.rmtree(ck)


def resume(out: Path, model, found, cfg, is_main: bool) -> dict:
    """The trainer state of ``found`` (``runs.load_latest``'s answer, or None: ``{}``), its
    weights loaded into ``model`` and its RNG state restored; the log cut back to its step."""
    state = {}
    if found is not None:
        ck, state, weights = found
        model.load_state_dict(weights)
        restore_rng(state["rng"])
        print(f"resumed from {ck} ({state['stage']} step {state['step']})", file=sys.stderr)
    elif cfg.run.resume:
        print(f"run.resume: {out} holds no complete checkpoint; starting fresh", file=sys.stderr)
    if is_main and found is not None:
        truncate_log(out / "metrics.jsonl", state)
    return state


def make_scheduler(optimizer, warmup: int, total: int, min_ratio: float):
    """Linear warm-up, then cosine decay to ``min_ratio`` of the peak learning rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Job:
    """What a training loop gets from the job around it."""

    cfg: object  #: the run's :class:`~dirl_min.settings.config.Config`
    accel: object  #: the Accelerator
    log: MetricsLog
    progress: bool = False  #: show a tqdm bar (main process only)
    stop: Callable[[], bool] | None = None  #: says when to stop after a step (:class:`Interrupts`)

    def end_step(self, stage: str, step: int, steps: int, interval: IntervalMean) -> tuple[bool, bool]:
        """After 0-based ``step`` of ``steps``: the log row when one is due (the interval's mean),
        then ``(save, stop)``: whether to checkpoint here, and whether the loop ends after it.
        ``stop()`` is asked on every process at every step (it is a collective)."""
        run, done = self.cfg.run, step + 1
        if done % run.log_every == 0 or done == steps:
            self.log.write(stage, done, interval.take())  # the mean over the steps since the last row
        stop = self.stop is not None and self.stop()
        return stop or bool(run.save_every and done % run.save_every == 0 and done < steps), stop


#: per stage: (the seed offsets of its generator and its sampler, the checkpoint key of the generator)
_STAGE_RNG = {"sft": (1, 2, "noise_rng"), "rl": (3, 4, "sample_rng")}


@dataclass
class StageState:
    """A training stage's state (SFT or RL): what it updates, draws with and resumes from."""

    name: str  #: ``sft`` or ``rl``
    params: list  #: the trained parameters
    opt: object  #: the optimizer (prepared by the Accelerator)
    sched: object  #: the learning-rate scheduler
    wrapped: object  #: the policy as :class:`SelectedLogits`, prepared for distribution
    gen: torch.Generator  #: SFT's noise or RL's sampling seeds
    sampler: EpochSampler  #: the examples (SFT) or prompts (RL)
    start: int = 0  #: the first step to run (a resumed checkpoint's step)
    ref_model: object = None  #: RL's KL reference (beta > 0, ``rl.kl_reference: initial``)

    def checkpoint(self, step: int, interval: IntervalMean) -> dict:
        """The trainer state a checkpoint after ``step`` saves (:func:`start_stage` resumes it)."""
        return {"stage": self.name, "step": step, "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), _STAGE_RNG[self.name][2]: self.gen.get_state(),
                "sampler": self.sampler.state_dict(), "log_interval": interval.state_dict()}


def start_stage(name: str, job: Job, policy, items: list, state: dict, min_lr_ratio: float) -> StageState:
    """AdamW and the scheduler (warm-up, then cosine to ``min_lr_ratio``) from the stage's settings
    section, the wrapped model, the generator and the sampler — resumed from ``state`` when it is
    this stage's checkpoint's."""
    section, (gen_seed, sampler_seed, rng_key) = getattr(job.cfg, name), _STAGE_RNG[name]
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=section.lr, betas=tuple(section.betas), weight_decay=section.weight_decay)
    sched = make_scheduler(opt, section.warmup_steps, section.steps, min_lr_ratio)
    wrapped, opt = job.accel.prepare(SelectedLogits(policy), opt)
    st = StageState(name, params, opt, sched, wrapped, torch.Generator().manual_seed(job.cfg.run.seed + gen_seed),
                    EpochSampler(items, job.cfg.run.seed + sampler_seed))
    if state.get("stage") == name:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        st.start = state["step"]
        st.gen.set_state(state[rng_key])
        st.sampler.load_state_dict(state["sampler"])
    return st
