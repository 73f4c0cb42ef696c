"""The tiny randomly initialised Qwen3 block-diffusion model used by tests, notebooks and benchmarks."""

from __future__ import annotations

import torch

from dirl_min.model.checkpoints import diffusion_settings
from dirl_min.model.tokenizers import build_tiny_tokenizer


def build_tiny(
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 256,
    block_size: int = 4,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised tiny Qwen3 block-diffusion model and its tokenizer (offline, milliseconds).

    Args:
        hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size: Qwen3 sizes.
        block_size: diffusion block size written to ``config.block_size``.
        tie_word_embeddings: share the embedding and ``lm_head`` matrices.
        seed: weights are a deterministic function of the seed (the global RNG is left untouched).
        tokenizer: defaults to :func:`build_tiny_tokenizer`; must define eos and mask tokens.
        dtype: parameter dtype.

    Returns:
        (Qwen3ForCausalLM, tokenizer): ``vocab_size == len(tokenizer)``; config carries ``block_size``,
        ``mask_token_id`` (= ``tokenizer.mask_token_id``), eos/pad/bos ids, sdpa attention,
        rope_theta 1e6 and rms_norm_eps 1e-6 as in SDAR. Training/eval mode is left to the caller.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if tokenizer is None:
        tokenizer = build_tiny_tokenizer()
    if tokenizer.mask_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("build_tiny: the tokenizer must define a mask token and an eos token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.eos_token_id,  # SDAR: bos = eos = <|endoftext|>, never prepended
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        attention_bias=False,
        use_cache=False,
        block_size=int(block_size),
        mask_token_id=int(tokenizer.mask_token_id),
    )
    config._attn_implementation = "sdpa"
    # fork_rng: seeding must not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.to(dtype)
    diffusion_settings(model)
    return model, tokenizer
