"""Checks that need CUDA (marker ``gpu``): skipped without it, run by the GPU check
(``python -m pytest -m gpu tests/test_gpu.py``).

On CPU the flex_attention path has no backward and runs uncompiled; on a GPU it is the
training path, compiled into a fused kernel, and the model runs in bf16. These tests hold
that path to what the CPU suite proves for SDPA in float32.
"""

from __future__ import annotations

import pytest
import torch

from dirl_min.engine.decode import generate
from dirl_min.engine.score import rescore
from dirl_min.model import build_tiny

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = ["What is 2+3?", "Hi", "Solve: If x + 5 = 12, what is x?"]
#: the bf16 tolerance of the consistency check (``python -m dirl_min.check`` on a bf16 model)
BF16_TOLERANCE = 0.1


def _sharp_tiny(dtype):
    """The tiny model with a sharpened head (multi-token steps), on the GPU."""
    model, tok = build_tiny(block_size=4, seed=0, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
    return model.to("cuda", dtype).eval(), tok


def _rollout(model, tok):
    return generate(model, [tok.encode(p) for p in PROMPTS], max_new_tokens=32, temperature=1.0, threshold=0.6,
                    generator=torch.Generator().manual_seed(0))


def test_flex_attention_rescoring_equals_sdpa_on_cuda():
    """float32, TF32 off: the compiled flex_attention kernel scores a rollout as SDPA does."""
    model, tok = _sharp_tiny(torch.float32)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out = _rollout(model, tok)
        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            sdpa = rescore(model, out)
            model.set_attn_implementation("flex_attention")
            flex = rescore(model, out)
    finally:
        model.set_attn_implementation("sdpa")
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert max(out.tokens_per_step(i) for i in range(len(out))) > 1.0  # multi-token steps: rounds with several targets
    for a, b in zip(sdpa, flex):
        assert (a.float() - b.float()).abs().max() <= 1e-4


@pytest.mark.parametrize("attn", ["flex_attention", "sdpa"])
def test_consistency_invariant_holds_in_bf16_on_cuda(attn):
    """SPEC §4: the trainer's log-probs, rebuilt from the step map, equal the decoder's, here to the
    bf16 tolerance; a wrong step map is still told apart (the check has teeth at that tolerance)."""
    model, tok = _sharp_tiny(torch.bfloat16)
    model.set_attn_implementation(attn)
    try:
        out = _rollout(model, tok)
        with torch.no_grad():
            got = rescore(model, out)
            diffs = [float((g.float().cpu() - torch.tensor(out.logp[i])).abs().max()) for i, g in enumerate(got)]
            i = max(range(len(out)), key=lambda k: out.num_steps(k))
            out.step_map[i] = [1] * len(out.step_map[i])  # everything committed at once: wrong
            wrong = float((rescore(model, out)[i].float().cpu() - torch.tensor(out.logp[i])).abs().max())
    finally:
        model.set_attn_implementation("sdpa")
    assert max(diffs) <= BF16_TOLERANCE, diffs
    assert wrong > BF16_TOLERANCE
