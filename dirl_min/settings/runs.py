"""One run per output folder: fresh runs never mix with earlier ones, resumed runs keep their settings.

* A fresh run into a folder holding another run's outputs is refused unless
  ``run.overwrite`` (which deletes exactly the files in :data:`OUTPUTS`, nothing else).
* ``run.resume`` continues only with the saved run's settings: every setting outside
  :data:`MAY_CHANGE_ON_RESUME` must equal the saved one (:func:`config_differences`).
* A checkpoint that cannot be read (a truncated file) is reported by file name and the
  previous complete one is used (:func:`load_latest`).
* Data files are identified by content: ``config.json`` and every checkpoint record the SHA-256
  of each (:func:`run_record`); on resume the content must be the same, wherever the file now is.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from dirl_min.infra.atomic import atomic_write, is_temporary
from dirl_min.settings.config import Config, SettingsError
from dirl_min.model import TRAIN_CHECKPOINT_MODEL_DIR, TRAINER_STATE_FILE

__all__ = ["OUTPUTS", "MAY_CHANGE_ON_RESUME", "DATA_FILES", "file_sha256", "run_record", "config_differences",
           "check_out", "start_fresh", "load_latest"]

#: what dirl_min.train writes in ``run.out`` (and ``run.overwrite`` deletes)
OUTPUTS = ("config.json", "summary.json", "metrics.jsonl", "curves.png", "tensorboard", "checkpoints")

#: settings a resumed run may change: none of them changes the trained weights or the reported
#: numbers (run.threads: at most the rounding of threaded CPU kernels, see the README)
MAY_CHANGE_ON_RESUME = frozenset({
    "run.resume", "run.overwrite", "run.out", "run.threads", "run.save_every", "run.log_every", "run.keep_checkpoints",
    "rl.reward_workers", "eval.batch_size", "model.gradient_checkpointing",
})


#: the data-file settings, identified by content (:func:`run_record`)
DATA_FILES = ("data.sft_data", "data.rl_data", "data.eval_data")
#: the key of :func:`run_record` that holds the data files' hashes
DATA_HASHES = "data_sha256"


def file_sha256(path) -> str | None:
    """The SHA-256 (hex) of a file's bytes; None when it is not a readable file (the data loader says why)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def run_record(cfg) -> dict:
    """What ``config.json`` and every checkpoint record of a run: its settings, and under
    :data:`DATA_HASHES` the SHA-256 of each data file given (``""`` for none: the embedded task)."""
    flat = _flat(cfg.to_dict())
    return {**cfg.to_dict(), DATA_HASHES: {k: file_sha256(flat[k]) if flat[k] else "" for k in DATA_FILES}}


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"sft": {"lr": 1}}`` -> ``{"sft.lr": 1}`` (one level of sections; the data hashes left out)."""
    return {f"{prefix}{s}.{k}": v for s, sub in d.items() if s != DATA_HASHES for k, v in sub.items()}


def config_differences(saved: dict, given: dict) -> list[str]:
    """``"name: saved -> given"`` for each setting (outside :data:`MAY_CHANGE_ON_RESUME`) that differs.

    A setting missing from ``saved`` (a run saved before the setting existed) counts as its default.
    Data files: when both records hold their hashes (:func:`run_record`), the contents are compared
    and the paths may differ (the same file from another working folder, or by its absolute path);
    a record without them (a run saved before hashes were recorded, or a bare ``cfg.to_dict()``)
    compares the paths only. A file that cannot be read (None) is left to the data loader's message.
    """
    defaults = _flat(Config().to_dict())
    a, b = _flat(saved), _flat(given)
    by_content = DATA_HASHES in saved and DATA_HASHES in given
    out = []
    for k in sorted(a.keys() | b.keys()):
        if k in MAY_CHANGE_ON_RESUME or (by_content and k in DATA_FILES):
            continue
        old, new = a.get(k, defaults.get(k)), b.get(k, defaults.get(k))
        if old != new:
            out.append(f"{k}: {old!r} -> {new!r}")
    if by_content:
        for k in DATA_FILES:
            old, new = saved[DATA_HASHES].get(k), given[DATA_HASHES].get(k)
            if new is not None and old != new:
                out.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}, not the same content (sha256 "
                           f"{(old or 'none')[:12]} -> {(new or 'none')[:12]})")
    return sorted(out)


def _mismatch(where, diffs: list[str]) -> SettingsError:
    return SettingsError(f"run.resume: {where} was saved with other settings (saved -> given):\n  " + "\n  ".join(diffs)
                         + "\nresume with the saved settings, or start a new run (another --out, or --overwrite)")


def check_out(cfg, record: dict | None = None) -> None:
    """Refuse an output folder that would mix runs; reads only (call before any work).
    ``record``: :func:`run_record` of ``cfg`` when already computed (it reads every data file).

    Raises:
        SettingsError: a fresh run into a folder holding another run (without ``run.overwrite``),
            ``run.resume`` with settings other than the saved run's, or both flags at once.
    """
    out = Path(cfg.run.out)
    if cfg.run.resume and cfg.run.overwrite:
        raise SettingsError("run.resume and run.overwrite exclude each other: resume continues the run in "
                            "run.out, overwrite deletes it")
    if out.exists() and not out.is_dir():
        raise SettingsError(f"run.out = {str(out)!r}: is a file; expected a folder")
    found = [n for n in OUTPUTS if (out / n).exists()]
    if cfg.run.resume:
        saved = out / "config.json"
        if saved.is_file():
            given, record = record, json.loads(saved.read_text())
            diffs = config_differences(record, given or run_record(cfg))
            if diffs:
                raise _mismatch(saved, diffs)
            if DATA_HASHES not in record and any(_flat(record).get(k) for k in DATA_FILES):
                print(f"run.resume: {saved} records no hash of its data files (saved by an older dirl_min): "
                      "they are checked by path only, not by content", file=sys.stderr)
    elif found and not cfg.run.overwrite:
        raise SettingsError(f"run.out = {str(out)!r} holds another run ({', '.join(found)}); use --resume to continue "
                            "it, --overwrite to replace it, or another --out")


def start_fresh(out: Path, cfg, record: dict | None = None) -> None:
    """Delete an earlier run's outputs (only the names in :data:`OUTPUTS`) and record the settings."""
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    atomic_write(out / "config.json", json.dumps(record or run_record(cfg), indent=2))


def _verify(ck: Path) -> None:
    """Open every file of a checkpoint that a truncation would break; the error names the file."""
    from safetensors import safe_open

    for f in sorted((ck / TRAIN_CHECKPOINT_MODEL_DIR).glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:
            raise OSError(f"{f}: {type(e).__name__}: {e}") from None


def _state(f: Path, *, mmap: bool = False) -> dict:
    import torch

    try:
        return torch.load(f, weights_only=True, mmap=mmap)
    except Exception as e:
        raise OSError(f"{f}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def load_latest(out: Path, given: dict, load_weights: Callable[[Path], object]):
    """The latest complete checkpoint of ``out``: ``(folder, trainer state, load_weights(folder / "model"))``,
    or None when there is none. Unreadable checkpoints are reported (file name) and skipped.

    Raises:
        SettingsError: the checkpoint was saved with settings other than ``given`` (a config dict).
    """
    index = {}
    for ck in sorted((out / "checkpoints").glob("*-*")):
        # a temporary of an interrupted save is never a checkpoint (".tmp": the name before dirl_min.infra.atomic)
        temporary = is_temporary(ck) or ck.name.endswith(".tmp")
        if ck.is_dir() and not temporary and (ck / TRAINER_STATE_FILE).is_file():
            try:
                # mapped, not read: only the index is needed, not every checkpoint's optimizer state
                index[ck] = _state(ck / TRAINER_STATE_FILE, mmap=True)["ckpt_index"]
            except OSError as e:
                print(f"run.resume: skipping checkpoint {ck.name}, a file is unreadable (truncated?): {e}", file=sys.stderr)
    for ck in sorted(index, key=index.get, reverse=True):
        state = _state(ck / TRAINER_STATE_FILE)
        if "config" in state and (diffs := config_differences(state["config"], given)):
            raise _mismatch(ck, diffs)
        try:
            _verify(ck)
            weights = load_weights(ck / TRAIN_CHECKPOINT_MODEL_DIR)
        except Exception as e:
            print(f"run.resume: skipping checkpoint {ck.name}, a file is unreadable (truncated?): {e}", file=sys.stderr)
            continue
        return ck, state, weights
    return None
