"""dirl_min.infra.atomic: the one helper for atomic writes (files and folders), and its users."""

from __future__ import annotations

import os

import pytest
import torch

from dirl_min.infra.atomic import atomic_dir, atomic_write, is_temporary


def test_atomic_write_replaces_the_file_or_leaves_it_whole(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    atomic_write(target, "old\n")
    assert target.read_text() == "old\n"

    def disk_full(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", disk_full)  # the data is written, the flush to disk fails
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "new, never complete\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no partial temporary left
    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "fresh.jsonl", b"{}\n")
    assert not (tmp_path / "fresh.jsonl").exists()

    monkeypatch.undo()
    atomic_write(target, "new\n".encode())
    assert target.read_bytes() == b"new\n"


def test_atomic_dir_keeps_the_old_folder_when_the_writer_raises(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("writer failed")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert (target / "a").read_text() == "1"
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"]  # replaced as a whole, not merged


def test_an_interrupted_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch):
    from dirl_min.loops import state as S

    def fake_save_model(model, tok, path, state_dict=None):
        path.mkdir()
        (path / "model.safetensors").write_bytes(model)

    monkeypatch.setattr(S, "save_model", fake_save_model)
    ck = tmp_path / "checkpoints" / "sft-000001"
    S.save_checkpoint(ck, b"first", None, {"step": 1})
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        S.save_checkpoint(ck, b"second", None, {"step": 2})
    assert (ck / "model" / "model.safetensors").read_bytes() == b"first"
    assert [p.name for p in ck.parent.iterdir()] == ["sft-000001"]


def test_resume_never_picks_a_temporary_left_by_a_crash(tmp_path):
    from dirl_min.settings import runs

    # what a SIGKILL during atomic_dir leaves: a complete-looking folder under a temporary name
    left = tmp_path / "checkpoints" / ".rl-000002.tmp-x1y2z3"
    (left / "model").mkdir(parents=True)
    torch.save({"ckpt_index": 2, "stage": "rl", "step": 2}, left / "trainer_state.pt")
    assert is_temporary(left)
    assert runs.load_latest(tmp_path, {}, lambda p: "weights") is None
