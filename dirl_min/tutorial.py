"""The set-up every tutorial notebook (``notebooks/0*.py``) runs in its first cell."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

__all__ = ["setup"]


def setup() -> tuple[Path, float]:
    """Prepare a notebook's kernel; returns ``(repository root, time.perf_counter() at the start)``.

    * one torch thread: the tensors are tiny, so one thread is fastest and leaves the other
      cores alone;
    * tqdm's "IProgress not found" warning silenced (progress bars without ipywidgets);
    * the repository on ``sys.path``: ``reference/`` (slow, loop-by-loop implementations written
      straight from the SPEC) lives next to the package and is not installed. With an editable
      install the repository is the package's parent; otherwise the notebook is assumed to be
      opened from ``notebooks/``, so it is the working directory's parent.
    """
    import torch

    import dirl_min

    warnings.filterwarnings("ignore", message="IProgress not found")
    torch.set_num_threads(1)
    root = Path(dirl_min.__file__).resolve().parents[1]
    if not (root / "reference").is_dir():
        root = Path.cwd().parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root, time.perf_counter()
