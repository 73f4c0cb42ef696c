"""What a run saves and resumes: data order, checkpoints, RNG state, the metrics log."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import torch

from dirl_min.infra.atomic import atomic_dir, atomic_write
from dirl_min.model.forward import unwrap
from dirl_min.model import TRAIN_CHECKPOINT_MODEL_DIR, TRAINER_STATE_FILE, save_model
from dirl_min.infra.progress import ProgressLines
from dirl_min.infra.sharding import full_state_dict


class MetricsLog:
    """metrics.jsonl + TensorBoard (if importable); appends, so a resumed run continues the file.
    With ``lines``, each written row also prints a progress line (:mod:`dirl_min.infra.progress`)."""

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


def truncate_log(path: Path, state: dict) -> None:
    """Drop log rows written after the checkpoint being resumed, so no step appears twice."""
    if not path.exists():
        return
    done, stage, step = set(state.get("done", [])), state["stage"], state["step"]
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and ((row := json.loads(line))["stage"] in done or (row["stage"] == stage and row["step"] <= step))]
    atomic_write(path, "".join(line + "\n" for line in keep))  # a crash here must not lose the log


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

    ``summary`` is the run's summary dict, saved (as it is at each save) with every checkpoint."""

    def __init__(self, out: Path, cfg, accel, model, tok, summary: dict, index: int = 0):
        self.out, self.cfg, self.accel, self.model, self.tok = out, cfg, accel, model, tok
        self.summary, self.index = summary, index

    def save(self, name: str, st: dict) -> None:
        self.index += 1
        full = full_state_dict(self.model)  # FSDP2: gathered by every process; None otherwise
        if self.accel.is_main_process:
            st.update(rng=rng_state(), summary=self.summary, ckpt_index=self.index, config=self.cfg.to_dict())
            save_checkpoint(self.out / "checkpoints" / name, unwrap(self.model), self.tok, st, state_dict=full)
        self.accel.wait_for_everyone()


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
