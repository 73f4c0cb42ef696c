"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see dirl_min/__init__.py

REPO_ROOT = Path(__file__).resolve().parents[1]


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
def shared_dir() -> Path:
    """``<repo>/../shared`` (SPEC, reference data); tests needing it skip when it is absent."""
    path = REPO_ROOT.parent / "shared"
    if not path.is_dir():
        pytest.skip(f"shared folder not found at {path} (tests needing SDAR metadata or SPEC data skip)")
    return path


@pytest.fixture(scope="session")
def sdar_source(shared_dir: Path) -> Path:
    """The real SDAR-4B-Chat metadata folder (config, tokenizer files, weight index; no weights)."""
    path = shared_dir / "data" / "sdar-4b-chat"
    if not (path / "config.json").is_file():
        pytest.skip(f"SDAR-4B-Chat metadata not found at {path}")
    return path
