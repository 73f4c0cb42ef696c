"""The LMDeploy backend's CPU-testable parts, against lmdeploy's real DLLM classes.

lmdeploy's engine needs CUDA, but its DLLM sequence class (where tokens go from masked
to unmasked) and its unmasking processor run on CPU. ``lmdeploy_decode`` below drives
them exactly as the engine loop does (prefill, then one block per forward; a finished
block is cached by the next forward), with the tiny model's logits, while the step hook
records. Greedy decoding must then give the native engine's tokens *and* step map, and
DiPO's rescoring of that rollout must reproduce the native decoder's log-probs.

Needs ``pip install --no-deps lmdeploy==0.18.0 xgrammar apache-tvm-ffi`` and
``pip install mmengine-lite pybase64 shortuuid`` (what ``.ci/run`` installs); skipped otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dirl_min.decoding import generate
from dirl_min.dipo import rescore
from dirl_min.model.forward import dense_denoiser
from dirl_min.engine.lmdeploy_engine import (
    StepRecorder,
    check_version,
    rollout_from_records,
    step_hook,
    weight_buckets,
)
from dirl_min.masking import block_causal_mask
from dirl_min.model import build_tiny


def _lmdeploy():
    try:
        import lmdeploy
        from lmdeploy.pytorch.strategies.dllm.sequence import SchedulerSequenceDLLM  # noqa: F401
    except Exception as exc:  # not installed, or a missing light dependency
        pytest.skip(f"lmdeploy's DLLM classes do not import here ({type(exc).__name__}: {exc}); "
                    "install them with: pip install --no-deps lmdeploy==0.18.0 xgrammar apache-tvm-ffi && "
                    "pip install mmengine-lite pybase64 shortuuid")
    return lmdeploy


def sharp_tiny(block_size: int, seed: int = 0):
    model, tok = build_tiny(block_size=block_size, seed=seed, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)  # peaked distributions: several tokens per step
    return model.eval(), tok


def lmdeploy_decode(model, prompt, *, end: int, threshold: float, session_id: int):
    """Greedy decoding through lmdeploy's real sequence class and unmasking processor,
    until every position before ``end`` (a block boundary) is committed."""
    from lmdeploy.pytorch import consts
    from lmdeploy.pytorch.config import DLLMConfig, UnmaskingStrategy
    from lmdeploy.pytorch.messages import SchedulerSession, SequenceMeta, UpdateTokenMode
    from lmdeploy.pytorch.strategies.dllm.sequence import DLLMSequenceStrategy
    from lmdeploy.pytorch.strategies.dllm.unmasking import UnmaskingProcessor

    B, M = model.config.block_size, model.config.mask_token_id
    meta = SequenceMeta(block_size=64, strategy=DLLMSequenceStrategy(block_size=B, dllm_mask_token=M))
    # what SchedulerSession.add_sequence does, minus the scheduler's paging bookkeeping
    seq = meta.strategy.make_sequence(seq_id=0, session=SchedulerSession(session_id, meta, lifecycle=None))
    seq.update_token_ids(np.array(prompt), mode=UpdateTokenMode.INPUTS)
    unmask = UnmaskingProcessor(DLLMConfig(block_length=B, confidence_threshold=threshold,
                                           unmasking_strategy=UnmaskingStrategy.LOW_CONFIDENCE_DYNAMIC))
    denoise = dense_denoiser(model)
    mode = UpdateTokenMode.PREFILL
    forwards = 0
    while True:
        total = seq.num_history_ids + seq.num_token_ids
        ids = torch.as_tensor(np.array(seq.history_cache[:total]), dtype=torch.long)
        state = torch.as_tensor(np.array(seq.history_dllm_mask[:total]))
        ids[state == consts.DLLM_MASKED] = M
        logits = denoise(ids, block_causal_mask(total, B))[-B:]  # the engine samples the last block only
        mask, tokens = unmask(logits, ids[-B:], logits.argmax(-1), state[-B:].clone())
        seq.update_token_ids(tokens, dllm_mask=mask, mode=mode)
        mode, forwards = UpdateTokenMode.DECODE, forwards + 1
        if total >= end and bool((mask == consts.DLLM_UNMASKED).all()):
            return forwards
        assert forwards < 200


@pytest.mark.parametrize("block_size", [2, 4, 8])
def test_hooked_lmdeploy_decoding_gives_the_native_step_map_and_log_probs(block_size):
    lmdeploy = _lmdeploy()
    model, tok = sharp_tiny(block_size)
    prompts = [tok.encode(p) for p in ["What is 2+3?", "Hi", "Solve: If x + 5 = 12, what is x?"]]
    native = generate(model, prompts, max_new_tokens=16, threshold=0.6, temperature=0.0, fused_commit=False)
    assert max(native.tokens_per_step(i) for i in range(len(native))) > 1.0  # multi-token steps are covered
    recorder = StepRecorder()
    with step_hook(recorder):
        for i, p in enumerate(prompts):
            lmdeploy_decode(model, p, end=len(p) + len(native.response_ids[i]), threshold=0.6, session_id=100 + i)
    assert lmdeploy.__version__ == "0.18.0"
    records = [recorder.pop(100 + i) for i in range(len(prompts))]
    roll = rollout_from_records(prompts, records, block_size=block_size, mask_token_id=model.config.mask_token_id,
                                max_new_tokens=16)
    assert roll.response_ids == native.response_ids
    assert roll.step_map == native.step_map
    rescored = rescore(model, roll)
    for i in range(len(prompts)):
        assert torch.allclose(rescored[i], torch.tensor(native.logp[i]), atol=1e-4)


def test_the_hook_is_removed_and_refuses_unknown_versions(monkeypatch):
    lmdeploy = _lmdeploy()
    from lmdeploy.pytorch.strategies.dllm.sequence import SchedulerSequenceDLLM

    original = SchedulerSequenceDLLM._update_token_ids_decode
    with step_hook(StepRecorder()):
        assert SchedulerSequenceDLLM._update_token_ids_decode is not original
    assert SchedulerSequenceDLLM._update_token_ids_decode is original
    monkeypatch.setattr(lmdeploy, "__version__", "0.19.0")
    with pytest.raises(RuntimeError, match=r"supports lmdeploy 0\.18\.0; found 0\.19\.0"):
        with step_hook(StepRecorder()):
            pass
    assert SchedulerSequenceDLLM._update_token_ids_decode is original


def test_recorder_counts_committing_updates_only():
    rec = StepRecorder()
    M, U, C = 0, 1, 2
    rec.observe(5, 8, np.array([U, M, M, M]), np.array([U, U, M, M]), np.array([7, 40, 0, 0]), M)
    rec.observe(5, 8, np.array([U, U, M, M]), np.array([U, U, U, U]), np.array([7, 40, 41, 42]), M)
    rec.observe(5, 8, np.array([U, U, U, U]), np.array([C, C, C, C]), np.array([7, 40, 41, 42]), M)  # caching only
    rec.observe(5, 12, np.array([M, M, M, M]), np.array([M, U, M, M]), np.array([0, 50, 0, 0]), M)
    assert rec.pop(5) == {9: (1, 40), 10: (2, 41), 11: (2, 42), 13: (3, 50)}
    assert rec.pop(5) == {}


def test_rollout_from_records_keeps_whole_blocks_and_refuses_gaps():
    prompt = [1, 2, 3, 4, 5, 6]  # B = 4: the response starts mid-block, at position 6
    rec = {6: (1, 10), 7: (1, 99), 8: (2, 11), 9: (3, 12), 10: (2, 13), 11: (3, 14)}  # 99 = stop token
    roll = rollout_from_records([prompt], [rec], block_size=4, mask_token_id=0, max_new_tokens=8, stop_token_ids=[99])
    assert roll.response_ids == [[10, 99, 11, 12, 13, 14]]  # tokens after the stop in its block are kept
    assert roll.step_map == [[1, 1, 2, 3, 2, 3]]
    assert roll.stopped_at == [1] and roll.truncated == [False] and roll.text_lengths == [1]
    del rec[9]
    with pytest.raises(ValueError, match=r"no committed token at positions \[9\]"):
        rollout_from_records([prompt], [rec], block_size=4, mask_token_id=0, max_new_tokens=8)


def test_weight_buckets_cover_every_tensor_once_within_size_and_dtype():
    named = [("a", torch.zeros(10)), ("b", torch.zeros(20)), ("c", torch.zeros(5, dtype=torch.bfloat16)),
             ("d", torch.zeros(100)), ("e", torch.zeros(3)), ("f", torch.zeros(4))]
    buckets = weight_buckets(named, bucket_bytes=128)
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]
    for b in buckets:
        assert len({t.dtype for _, t in b}) == 1
        assert len(b) == 1 or sum(t.numel() * t.element_size() for _, t in b) <= 128
    assert [[n for n, _ in b] for b in buckets] == [["a", "b"], ["c"], ["d"], ["e", "f"]]


def test_check_version_names_the_supported_release():
    check_version("0.18.0")
    with pytest.raises(RuntimeError, match="lmdeploy==0.18.0"):
        check_version("0.17.1")


def test_lmdeploy_missing_names_what_is_missing_on_this_machine(monkeypatch):
    import sys

    from dirl_min.engine.lmdeploy_engine import lmdeploy_missing, require_lmdeploy

    monkeypatch.setitem(sys.modules, "lmdeploy", None)  # an import of it now raises ImportError
    assert "needs the lmdeploy package: pip install -e '.[lmdeploy]'" in lmdeploy_missing()
    assert "torch <= 2.12.1" in lmdeploy_missing()
    with pytest.raises(SystemExit, match=r"^dirl_min.eval: --backend lmdeploy needs the lmdeploy package.*Use native\.$"):
        require_lmdeploy("dirl_min.eval: --backend lmdeploy", "Use native.")
    monkeypatch.undo()
    lmdeploy = _lmdeploy()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert lmdeploy_missing() == "needs a CUDA GPU and none is visible"
    monkeypatch.setattr(lmdeploy, "__version__", "0.19.0")
    assert "needs a supported lmdeploy" in lmdeploy_missing() and "found 0.19.0" in lmdeploy_missing()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(lmdeploy, "__version__", "0.18.0")
    assert lmdeploy_missing() is None
    require_lmdeploy("anyone")  # no exit
