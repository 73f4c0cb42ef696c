"""Real-shape training steps: ``python -m dirl_min.bench --shape qwen3-0.6b`` (``--help``).

A randomly initialised Qwen3 with a real checkpoint's width, heads and vocabulary (151,936)
and the real Qwen tokenizer (rebuilt offline by :func:`dirl_min.model.qwen_tokenizer`) runs
one random-masking SFT step and one DiPO step (forward, backward, AdamW) on
``--responses`` responses of ``--response-tokens`` tokens, through the trainer's own code
(:func:`dirl_min.trainer.sft_loss`, :func:`dirl_min.trainer.dipo_step`: the shared-K/V scorer,
log-probs 4,096 targets at a time). Each configuration runs in a fresh child process, so
its peak resident memory (``ru_maxrss``) is its own: checkpointing on and off are measured
side by side in one run. ``--layers`` keeps only the first layers (the width and vocabulary
stay real); the printout says so. On CUDA an untimed step runs first, since flex_attention
compiles its kernels on its first call: the timed step is a steady one.

DiPO's step maps are synthetic: every 4-token block is committed in two steps of two tokens
(2 tokens per step, as DiRL's dynamic decoding reaches), so each response has two rounds.
"""

from __future__ import annotations

import os
import resource
import time

import torch

# Published shapes (config.json of Qwen/Qwen3-0.6B and JetLM/SDAR-1.7B-Chat = Qwen3-1.7B).
SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "sdar-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    # not a checkpoint: the real vocabulary on a toy body, for dry runs of the scripts
    "toy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
}
VOCAB = 151_936  # the checkpoints' embedding rows (the tokenizer uses 151,670 of them)
BLOCK = 4


def build_shaped(shape: str, layers: int, dtype: torch.dtype, seed: int = 0):
    """A random ``Qwen3ForCausalLM`` of ``SHAPES[shape]`` (first ``layers`` layers; 0 = all) and the Qwen tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from dirl_min.model import SDAR_MASK_TOKEN_ID, diffusion_settings, qwen_tokenizer

    tok = qwen_tokenizer()
    sizes = dict(SHAPES[shape])
    if layers:
        sizes["num_hidden_layers"] = min(layers, sizes["num_hidden_layers"])
    config = Qwen3Config(vocab_size=VOCAB, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         use_cache=False, block_size=BLOCK, mask_token_id=SDAR_MASK_TOKEN_ID, **sizes)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).to(dtype)
    diffusion_settings(model)
    return model, tok


def synthetic_batch(tok, n: int, response_tokens: int, seed: int = 0):
    """``n`` chat prompts (real tokenizer) with random responses of ``response_tokens`` tokens (a multiple of 4).

    Returns:
        ``(sft_examples, rollout)``: :class:`~dirl_min.trainer.SFTExample` list and a
        :class:`~dirl_min.decoding.Rollout` whose step map commits each block in two steps.
    """
    from dirl_min.engine.decode import Rollout
    from dirl_min.model import chat_prompt_ids
    from dirl_min.loops.sft import SFTExample

    g = torch.Generator().manual_seed(seed)
    prompts, responses, steps = [], [], []
    for i in range(n):
        p = chat_prompt_ids(tok, f"Problem {i}: compute the sum of the first {10 + i} positive integers.")
        p = p + [tok.pad_token_id] * (-len(p) % BLOCK)  # whole prompt blocks: the response starts a block
        prompts.append(p)
        responses.append(torch.randint(0, 151_643, (response_tokens,), generator=g).tolist())
        order = torch.stack([torch.randperm(BLOCK, generator=g) for _ in range(response_tokens // BLOCK)])
        steps.append((2 * torch.arange(response_tokens // BLOCK)[:, None] + 1 + (order >= BLOCK // 2)).reshape(-1).tolist())
    sft = [SFTExample(torch.tensor(p + r, dtype=torch.long), len(p)) for p, r in zip(prompts, responses)]
    roll = Rollout(prompt_ids=prompts, response_ids=responses, step_map=steps,
                   logp=[[0.0] * response_tokens for _ in range(n)], truncated=[False] * n, stopped_at=[None] * n,
                   block_size=BLOCK, mask_token_id=tok.mask_token_id)
    return sft, roll


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_step(shape: str, layers: int, dtype: str, stage: str, checkpointing: bool, responses: int,
             response_tokens: int, device: str = "cpu", attn: str = "sdpa", peak_tflops: float = 989.0,
             engine_path: str = "") -> dict:
    """One optimizer step of ``stage`` ("sft" or "dipo"), or one batch of rollouts ("rollout");
    seconds, memory and model FLOPs of this process."""
    from dirl_min.model.forward import SelectedLogits
    from dirl_min.model import resolve_dtype
    from dirl_min.loops.policy import MicroBatch, PolicySettings, StepTotals, dipo_step
    from dirl_min.loops.sft import sft_loss, sft_noise

    model, tok = build_shaped(shape, layers, resolve_dtype(dtype))
    model.to(device).train()
    model.set_attn_implementation(attn)
    if checkpointing:
        model.gradient_checkpointing_enable()
    sft, roll = synthetic_batch(tok, responses, response_tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    net = SelectedLogits(model)
    rss_model = _rss_gib()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    backbone_tokens = []  # tokens through the backbone per forward call (for the FLOP count)
    model.model.register_forward_pre_hook(lambda m, a, kw: backbone_tokens.append(kw["input_ids"].numel()),
                                          with_kwargs=True)

    def step():
        if stage == "rollout":
            return None, _rollout(model, tok, roll, response_tokens, engine_path)
        if stage == "sft":
            n_resp = sum(len(e.ids) - e.prompt_len for e in sft)
            noise = sft_noise(sft, tok.mask_token_id, generator=torch.Generator().manual_seed(0))
            loss, _ = sft_loss(net, sft, tok.mask_token_id, BLOCK, noise, num_response_tokens=n_resp)
        else:
            n_resp = responses * response_tokens
            batch = MicroBatch(roll, list(range(responses)), torch.linspace(-1, 1, responses))
            loss, _, _ = dipo_step(net, batch, StepTotals(n_resp), PolicySettings(eps_low=0.2, eps_high=0.28))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss, n_resp

    if device == "cuda":  # an untimed step first: flex_attention compiles its kernels on the first call
        step()
        backbone_tokens.clear()
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    loss, trained = step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    out = {"shape": shape, "layers": model.config.num_hidden_layers, "dtype": dtype, "stage": stage,
           "checkpointing": checkpointing, "seconds": seconds, "cpu_seconds": cpu_seconds, "trained_tokens": trained,
           "params": sum(p.numel() for p in model.parameters()), "rss_after_build_gib": rss_model,
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "loss": float(loss) if stage != "rollout" else None}
    # model FLOPs (attention scores excluded): 2·N per token and matmul forward, ×3 with the backward
    body = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    head = model.config.hidden_size * model.config.vocab_size
    mult = 2 if stage == "rollout" else 6
    out["model_tflop"] = mult * (body * sum(backbone_tokens) + head * trained) / 1e12
    if device == "cuda":
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["mfu"] = out["model_tflop"] / seconds / peak_tflops
    return out


def _rollout(model, tok, roll, max_new_tokens: int, engine_path: str = "") -> int:
    """Decode the batch's prompts (native engine, or LMDeploy from ``engine_path``); tokens generated.
    A random model is never confident: dynamic decoding commits about one token per step."""
    from dirl_min.engine.decode import generate

    kw = dict(max_new_tokens=max_new_tokens, temperature=1.0, seeds=list(range(len(roll))))
    if engine_path:
        from dirl_min.engine.lmdeploy_engine import make_engine

        engine = make_engine(engine_path, model)
        out = engine.generate(roll.prompt_ids, **kw)
    else:
        model.eval()
        with torch.no_grad():
            out = generate(model, roll.prompt_ids, **kw)
    return sum(len(r) for r in out.response_ids)
