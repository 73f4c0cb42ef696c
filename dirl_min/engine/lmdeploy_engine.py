"""Rollouts on LMDeploy's PyTorch engine, with the step map DiPO needs (GPU path).

Released lmdeploy (0.18) decodes block diffusion (``dllm_*`` settings) but does not
say *when* each token was committed. Every decoding step ends in
``SchedulerSequenceDLLM._update_token_ids_decode(token_ids, dllm_mask)``, which writes the
new state of the sequence's working block: a position whose state goes from MASKED to
UNMASKED there was committed by that step. :func:`step_hook` wraps that one method
(and refuses lmdeploy versions it was not written against); :class:`StepRecorder`
keeps, per session, each committed position's step and token. :func:`rollout_from_records`
turns that into the :class:`dirl_min.decoding.Rollout` the trainer consumes, so DiPO
rescoring (SPEC §4) sees exactly the contexts LMDeploy decoded in.

Weight sync goes through memory, not disk: :meth:`LMDeployEngine.load_weights` sends
the trainer's parameters as flattened same-dtype buckets (:func:`weight_buckets`) through
``update_params``; :meth:`LMDeployEngine.release` puts the engine to sleep (level 2:
weights and KV cache freed) so the update has the GPU memory.

Everything that touches CUDA lives in :class:`LMDeployEngine`; the hook, the recorder,
the rollout conversion and the buckets are tested on CPU against lmdeploy's real
sequence classes (``pip install --no-deps lmdeploy==0.18.0`` plus its light imports).
lmdeploy is imported lazily: the CPU install never needs it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from dirl_min.engine.decode import Rollout
from dirl_min.model import checkpoint_folder, diffusion_settings

__all__ = ["SUPPORTED_VERSIONS", "check_version", "lmdeploy_missing", "require_lmdeploy", "StepRecorder", "step_hook",
           "rollout_from_records", "weight_buckets", "LMDeployEngine", "make_engine"]

# lmdeploy releases whose DLLM sequence update the hook was written against and tested on
SUPPORTED_VERSIONS = ("0.18.0",)


def check_version(version: str) -> None:
    """Raise ``RuntimeError`` unless ``version`` is one the step hook knows."""
    if version not in SUPPORTED_VERSIONS:
        raise RuntimeError(
            f"dirl_min's LMDeploy step-map hook supports lmdeploy {', '.join(SUPPORTED_VERSIONS)}; found {version}. "
            "Its DLLM sequence update may differ, and a wrong step map silently biases DiPO. Install "
            f"lmdeploy=={SUPPORTED_VERSIONS[-1]} or use the native engine (rl.rollout_backend: native).")


def lmdeploy_missing() -> str | None:
    """Why LMDeploy cannot decode here, as words that follow what asked for it ("… needs a CUDA
    GPU …"), or None when it can: the package, a version the step hook knows, a CUDA GPU."""
    try:
        import lmdeploy
    except ImportError:
        return (f"needs the lmdeploy package: pip install -e '.[lmdeploy]' on a CUDA machine (lmdeploy "
                f"{SUPPORTED_VERSIONS[-1]} needs torch <= 2.12.1)")
    try:
        check_version(lmdeploy.__version__)
    except RuntimeError as e:
        return f"needs a supported lmdeploy: {str(e).rstrip('.')}"  # callers end the sentence
    if not torch.cuda.is_available():
        return "needs a CUDA GPU and none is visible"
    return None


def require_lmdeploy(asked_by: str, instead: str = "") -> None:
    """Exit with one clear message unless LMDeploy can decode here (:func:`lmdeploy_missing`).

    ``asked_by``: the command and option that chose LMDeploy (``"dirl_min.eval: --backend lmdeploy"``);
    ``instead``: what to use otherwise, appended to the message.
    """
    if why := lmdeploy_missing():
        raise SystemExit(f"{asked_by} {why}." + (f" {instead}" if instead else ""))


@dataclass
class StepRecorder:
    """Per LMDeploy session: the step and token that committed each position.

    ``records[session][position] = (step, token)`` with 1-based steps counted per session
    over the updates that committed at least one token (the native engine's numbering).
    """

    records: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)

    def observe(self, session_id, start: int, before: np.ndarray, after: np.ndarray, token_ids: np.ndarray,
                masked: int) -> None:
        """One update of a session's working window ``[start, start + len(after))``.

        ``before`` / ``after``: the window's DLLM states around the update; ``token_ids`` the
        tokens written; ``masked``: lmdeploy's MASKED state value.
        """
        committed = np.nonzero((before == masked) & (after != masked))[0]
        if len(committed) == 0:
            return
        step = self.steps.get(session_id, 0) + 1
        self.steps[session_id] = step
        rec = self.records.setdefault(session_id, {})
        for j in committed.tolist():
            rec[start + j] = (step, int(token_ids[j]))

    def pop(self, session_id) -> dict:
        """The records of a finished session (and forget it)."""
        self.steps.pop(session_id, None)
        return self.records.pop(session_id, {})


@contextmanager
def step_hook(recorder: StepRecorder):
    """While active, every lmdeploy DLLM sequence update reports to ``recorder``.

    Raises ``RuntimeError`` on an lmdeploy version the hook does not know.
    """
    import lmdeploy
    from lmdeploy.pytorch import consts
    from lmdeploy.pytorch.strategies.dllm.sequence import SchedulerSequenceDLLM

    check_version(lmdeploy.__version__)
    original = SchedulerSequenceDLLM._update_token_ids_decode

    def update_and_record(seq, token_ids, dllm_mask):
        start = seq.num_history_ids
        before = np.array(seq.history_dllm_mask[start:start + len(dllm_mask)])  # copy: the update overwrites it
        original(seq, token_ids, dllm_mask)
        recorder.observe(seq.session.session_id, start, before, np.asarray(dllm_mask), np.asarray(token_ids),
                         consts.DLLM_MASKED)

    SchedulerSequenceDLLM._update_token_ids_decode = update_and_record
    try:
        yield recorder
    finally:
        SchedulerSequenceDLLM._update_token_ids_decode = original


def rollout_from_records(prompts: list[list[int]], records: list[dict], *, block_size: int, mask_token_id: int,
                         max_new_tokens: int, stop_token_ids=(), tokenizer=None, seeds=None) -> Rollout:
    """A :class:`Rollout` from the recorder's per-sequence records.

    The response runs from the end of the prompt to the end of the last block that has a
    committed token (tokens after a stop token inside its block were generated and are kept,
    as in the native engine). ``logp`` is not recorded by LMDeploy; it is filled with NaN
    (the trainer recomputes log-probs; ``python -m dirl_min.check`` measures agreement).
    """
    stops = set(stop_token_ids)
    out = Rollout(prompt_ids=[], response_ids=[], step_map=[], logp=[], truncated=[], stopped_at=[],
                  block_size=block_size, mask_token_id=mask_token_id, text=[] if tokenizer else None,
                  seeds=list(seeds or []), text_lengths=[])
    for prompt, rec in zip(prompts, records):
        start = len(prompt)
        end = -(-(max(rec) + 1) // block_size) * block_size if rec else start
        missing = [p for p in range(start, end) if p not in rec]
        if missing:
            raise ValueError(f"LMDeploy record has no committed token at positions {missing[:8]} (prompt length "
                             f"{start}): the step hook missed an update; refusing to train on a partial step map")
        response = [rec[p][1] for p in range(start, end)]
        stop = next((j for j, t in enumerate(response) if t in stops), None)
        out.prompt_ids.append(list(prompt))
        out.response_ids.append(response)
        out.step_map.append([rec[p][0] for p in range(start, end)])
        out.logp.append([float("nan")] * len(response))
        out.stopped_at.append(stop)
        out.truncated.append(stop is None)
        visible = response if stop is None else response[:stop]
        out.text_lengths.append(len(visible))
        if tokenizer is not None:
            out.text.append(tokenizer.decode(visible, skip_special_tokens=True))
    return out


def weight_buckets(named_tensors, bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` pairs, in order, into buckets of one dtype and at most
    ``bucket_bytes`` each (a larger tensor gets a bucket of its own)."""
    buckets: list[list[tuple[str, torch.Tensor]]] = []
    size = 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        if not buckets or buckets[-1][0][1].dtype != t.dtype or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append((name, t))
        size += nbytes
    return buckets


class LMDeployEngine:
    """LMDeploy's PyTorch engine as dirl_min's rollout engine (needs CUDA and lmdeploy 0.18).

    Args:
        model_path: the checkpoint folder the engine loads first (SDAR / DiRL / TraDo, or a
            dirl_min.train checkpoint: :func:`dirl_min.model.checkpoint_folder`).
        block_size, mask_token_id: the model's (SPEC §3); the engine's DLLM block length.
        strategy, threshold, steps: the unmasking rule (as :class:`dirl_min.settings.config.DecodeConfig`).
        tp: tensor-parallel GPUs; cache_max_entry_count: fraction of free memory for the KV cache.
    """

    def __init__(self, model_path: str, *, block_size: int, mask_token_id: int, strategy: str = "low_confidence_dynamic",
                 threshold: float = 0.9, steps: int = 0, tp: int = 1, cache_max_entry_count: float = 0.5,
                 session_len: int = 16384, bucket_bytes: int = 512 << 20):
        if why := lmdeploy_missing():
            raise RuntimeError(f"the LMDeploy engine {why}")
        from lmdeploy import PytorchEngineConfig
        from lmdeploy.pytorch.engine import Engine

        config = PytorchEngineConfig(tp=tp, session_len=session_len, cache_max_entry_count=cache_max_entry_count,
                                     dllm_block_length=block_size, dllm_unmasking_strategy=strategy,
                                     dllm_denoising_steps=steps or block_size, dllm_confidence_threshold=threshold)
        # the same folder rule as load_model: a dirl_min.train checkpoint means its model/ subfolder
        self.engine = Engine.from_pretrained(str(checkpoint_folder(model_path)), engine_config=config)
        self.instance = self.engine.create_instance()
        self.block_size, self.mask_token_id, self.bucket_bytes = block_size, mask_token_id, bucket_bytes
        self.rule = {"strategy": strategy, "threshold": threshold, "steps": steps or None}
        self.recorder = StepRecorder()
        self._next_session = 1
        self.sleeping = False

    def _run(self, coro):
        return self.instance.req_sender.run_until_complete(coro)

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, stop_token_ids=(), seeds=None, tokenizer=None, strategy=None, threshold=None,
                 steps=None, fused_commit=None) -> Rollout:
        """Decode ``prompts`` (token ids) concurrently; the same record as :func:`dirl_min.decoding.generate`.

        The unmasking rule is the engine's own (fixed when it was built); asking for another is an
        error rather than a silent mismatch. ``fused_commit`` does not apply: LMDeploy caches a
        finished block with one more forward.
        """
        import asyncio

        asked = {"strategy": strategy, "threshold": threshold, "steps": steps}
        wrong = {k: v for k, v in asked.items() if v is not None and v != self.rule[k]}
        if wrong:
            raise ValueError(f"this LMDeploy engine decodes with {self.rule}; asked for {wrong}: build another engine")

        from lmdeploy import GenerationConfig

        seeds = list(seeds) if seeds is not None else [None] * len(prompts)
        max_new = -(-max_new_tokens // self.block_size) * self.block_size  # whole blocks, as natively
        sessions = list(range(self._next_session, self._next_session + len(prompts)))
        self._next_session += len(prompts)
        configs = [GenerationConfig(max_new_tokens=max_new, temperature=temperature if temperature > 0 else 1.0,
                                    top_k=1 if temperature == 0 else top_k,  # top-1: greedy top_p=top_p, random_seed=seed,
                                    stop_token_ids=list(stop_token_ids) or None, skip_special_tokens=False)
                   for seed in seeds]

        async def all_sessions():
            return await asyncio.gather(*(self.instance.async_infer(s, p, gen_config=c)
                                          for s, p, c in zip(sessions, prompts, configs)))

        with step_hook(self.recorder):
            self._run(all_sessions())
        records = [self.recorder.pop(s) for s in sessions]
        return rollout_from_records(prompts, records, block_size=self.block_size, mask_token_id=self.mask_token_id,
                                    max_new_tokens=max_new, stop_token_ids=stop_token_ids, tokenizer=tokenizer,
                                    seeds=[s if s is not None else -1 for s in seeds])

    def release(self) -> None:
        """Free the engine's weights and KV cache (sleep level 2) before the training update."""
        self._run(self.engine.sleep(2))
        self.sleeping = True

    @torch.no_grad()
    def load_weights(self, model) -> None:
        """Wake the engine with ``model``'s current parameters, sent through memory in buckets."""
        from lmdeploy.serve.openai.protocol import UpdateParamsRequest
        from lmdeploy.utils import FlattenedTensorBucket, serialize_state_dict

        if not self.sleeping:
            self.release()  # wakeup expects a sleeping engine; level 2 also drops the stale weights
        self.engine.wakeup(["weights"])
        named = [(n, p.detach().to(device="cuda").contiguous()) for n, p in model.named_parameters()]
        buckets = weight_buckets(named, self.bucket_bytes)
        for k, bucket in enumerate(buckets):
            flat = FlattenedTensorBucket(named_tensors=bucket)
            payload = {"metadata": flat.metadata, "flattened_tensor": flat.flattened_tensor, "require_clone": True}
            self.engine.update_params(UpdateParamsRequest(serialized_named_tensors=serialize_state_dict(payload),
                                                          load_format="flattened_bucket",
                                                          finished=k == len(buckets) - 1))
        self.engine.wakeup(["kv_cache"])
        self.sleeping = False

    def close(self) -> None:
        self.engine.close()


def make_engine(path, model, *, strategy: str = "low_confidence_dynamic", threshold: float = 0.9, steps: int = 0,
                **engine_kw) -> LMDeployEngine:
    """The one way dirl_min builds an :class:`LMDeployEngine`: on the checkpoint folder ``path``
    (:func:`dirl_min.model.checkpoint_folder`), with ``model``'s block size and mask token (the
    model's config is their single source, SPEC §3) and the unmasking rule ``strategy`` /
    ``threshold`` / ``steps`` (as :class:`dirl_min.settings.config.DecodeConfig`; 0 steps = block size).
    ``engine_kw``: the engine's other options (``tp``, ``cache_max_entry_count``, …)."""
    block, mask_id = diffusion_settings(model)
    return LMDeployEngine(str(path), block_size=block, mask_token_id=mask_id, strategy=strategy, threshold=threshold,
                          steps=steps, **engine_kw)
