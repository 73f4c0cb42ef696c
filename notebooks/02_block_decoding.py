# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Block decoding
#
# An autoregressive LM spends one forward per token. A block-diffusion LM decodes a block of `B`
# tokens in a few **denoising steps** (SPEC §3): each step forwards the `B` tokens of the working block
# — committed blocks are in the KV cache — proposes a token for every masked position, and
# **commits** some of them (the confident ones); the others stay `M` for the next step. When the block
# holds no `M`, its K/V enter the cache and the next block starts.
#
# This notebook does one step by hand, writes the whole decode loop in 20 lines and checks it against
# the engine (`dirl_min.engine.decode.generate`, batched and KV-cached), then shows a rollout step by
# step, forward by forward, its `step_map`, the unmasking strategies, the tokens-per-step / threshold
# trade-off, the forward count with and without the fused commit, and checks the engine against the
# slow uncached reference decoder.

# %%
import time

import matplotlib.pyplot as plt
import torch

from dirl_min.tutorial import setup

# one torch thread, tqdm's ipywidgets warning off, and the repository on sys.path for `reference/`
ROOT, T_START = setup()

# %%
from dirl_min.model import chat_prompt_ids
from dirl_min.tutorial import DEMO_QUESTIONS, glyphs, in_blocks, trained_tiny

# glyphs(tok, ids): one character per token (⟨ ⟩ = <|im_start|> <|im_end|>, ∎ = <|endoftext|>, █ = mask,
# ⏎ = newline); in_blocks(text, B) puts a bar at every block boundary

# The tiny model after a 150-step random-masking SFT on the embedded task (notebook 01's loss; a few
# seconds, cached between notebooks). It has learned the answer format and is confident about it;
# the arithmetic itself needs a much longer run (`python -m dirl_min.train`), so most answers are wrong.
model, tok = trained_tiny()
B, M = model.config.block_size, model.config.mask_token_id
STOP = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
PROMPTS = [chat_prompt_ids(tok, q) for q in DEMO_QUESTIONS]
print("prompt lengths:", [len(p) for p in PROMPTS], "→ P mod B:", [len(p) % B for p in PROMPTS])

# %% [markdown]
# ## One denoising step by hand
#
# The prompt's complete blocks are context; the first working block is the prompt's tail plus `M`s.
# Here the whole sequence is run with the block-causal mask (what the uncached reference does),
# then `propose` gives each masked position a candidate (greedy: the argmax) and its confidence (its
# probability), and `select_unmask` picks what to commit: with `low_confidence_dynamic`, the most
# confident position plus every one with confidence ≥ threshold (DiRL's 0.9).

# %%
from dirl_min.core.masks import block_causal_mask
from dirl_min.core.unmask import propose, select_unmask
from dirl_min.engine.decode import generate
from dirl_min.model.forward import backbone_hidden
from dirl_min.tutorial import confidence_bars

THRESHOLD = 0.9
prompt = PROMPTS[0]
P = len(prompt)
lo = (P // B) * B  # start of the first working block
seq = torch.tensor(prompt + [M] * (lo + B - P))
with torch.no_grad():
    hidden = backbone_hidden(model, seq[None], torch.arange(len(seq))[None],
                             block_causal_mask(len(seq), B)[None, None])
    logits = model.lm_head(hidden[:, lo:lo + B])  # [1, B, V]: no shift, position i predicts token i
cand, conf, lp = propose(logits, temperature=0.0, exclude_token=M)
masked = (seq[lo:lo + B] == M)[None]
commit = select_unmask(conf, masked, "low_confidence_dynamic", threshold=THRESHOLD)

print("working block:", repr(glyphs(tok, seq[lo:lo + B])))
for j in range(B):
    if not masked[0, j]:
        print(f"  pos {lo + j}: given {glyphs(tok, [seq[lo + j]])!r} (the prompt's tail; never overwritten)")
        continue
    state = "COMMIT" if commit[0, j] else "stays M"
    print(f"  pos {lo + j}: candidate {glyphs(tok, [cand[0, j]])!r}  confidence {float(conf[0, j]):.3f}  {state}")

shown = masked[0].nonzero().flatten().tolist()
fig, ax = plt.subplots(figsize=(5, 3))
confidence_bars(ax, [float(conf[0, j]) for j in shown],
                [f"pos {lo + j}\n{glyphs(tok, [cand[0, j]])!r}" for j in shown], THRESHOLD,
                [bool(commit[0, j]) for j in shown])
ax.set_title("the first step: confidence against the threshold")
plt.show()
hand_commits_by_threshold = int(((conf[0] >= THRESHOLD) & masked[0]).sum())
print(f"committed by the threshold rule in this one step: {hand_commits_by_threshold} tokens")

# %% [markdown]
# ## The decode loop, written out
#
# That step, repeated: append a block of `M`s, step until it holds none, stop after a block that holds
# a stop token. This version is greedy and uncached — every step re-runs the whole sequence with the
# block-causal mask — but it is the whole algorithm; the engine below returns the same tokens and the
# same step for every token.

# %%
def decode_by_hand(prompt, threshold, max_new_tokens=16):
    """Greedy dynamic decoding of one prompt, uncached; returns (response ids, step of each)."""
    seq, given, step, step_of = list(prompt), len(prompt), 0, {}
    for blk in range(given // B, given // B + -(-max_new_tokens // B)):
        lo, hi = blk * B, (blk + 1) * B
        seq += [M] * (hi - len(seq))  # the working block: the prompt's tail (if any), then masks
        while M in seq[lo:hi]:
            step += 1
            with torch.no_grad():
                h = backbone_hidden(model, torch.tensor(seq)[None], torch.arange(hi)[None],
                                    block_causal_mask(hi, B)[None, None])
                probs = model.lm_head(h[0, lo:hi]).softmax(-1)  # [B, V]; position i predicts token i
            probs[:, M] = 0  # never propose the mask token
            conf, cand = probs.max(-1)  # greedy candidate and its probability, per position
            masked = torch.tensor(seq[lo:hi]) == M
            conf = torch.where(masked, conf, -1.0)
            commit = masked & ((conf >= threshold) | (torch.arange(B) == conf.argmax()))  # at least one
            for j in commit.nonzero().flatten().tolist():
                seq[lo + j], step_of[lo + j] = int(cand[j]), step
        if any(t in STOP for t in seq[max(lo, given):hi]):  # stop only on a completed block
            break
    return seq[given:], [step_of[j] for j in range(given, len(seq))]


by_hand = decode_by_hand(prompt, THRESHOLD)
print("by hand:", repr(glyphs(tok, by_hand[0])), by_hand[1])

# %% [markdown]
# ## A whole rollout, step by step
#
# `generate` records for every generated token the global, 1-based step that committed it
# (`step_map`) and its log-probability (`logp`). Replaying the `step_map` prints the working block
# after each step (█ = still masked). The engine's first step commits exactly the positions chosen by
# hand above, and its whole rollout is the hand-written loop's.

# %%
out = generate(model, [prompt], max_new_tokens=16, temperature=0.0, threshold=THRESHOLD,
               stop_token_ids=STOP, tokenizer=tok)
resp, steps = out.response_ids[0], out.step_map[0]
full_ids = prompt + resp
full_steps = [0] * P + steps  # 0 = given (prompt)

for s in sorted(set(steps)):
    blk = next(j for j in range(len(full_steps)) if full_steps[j] == s) // B
    block = range(blk * B, (blk + 1) * B)
    state = [full_ids[j] if full_steps[j] <= s else M for j in block]
    n_new = sum(full_steps[j] == s for j in block)
    print(f"step {s:2d} | block {blk:2d} | {glyphs(tok, state)} | committed {n_new}")
print(f"\n{len(resp)} tokens in {out.num_steps(0)} steps: {out.tokens_per_step(0):.2f} tokens per step, "
      f"{out.num_forwards} forwards; text (cut at the first stop token): {out.text[0]!r}")

first_step_matches_hand = [s == 1 for s in full_steps[lo:lo + B]] == commit[0].tolist()
loop_matches_engine = by_hand == (resp, steps)
print("engine's step 1 == the hand-made step:", first_step_matches_hand,
      "| engine == decode_by_hand (tokens and steps):", loop_matches_engine)

# %% [markdown]
# A real answer in the trained format — compare it with the question: 150 SFT steps teach the format,
# not yet the arithmetic. Note the order inside the last block: the closing `}` and `⟩` can be
# committed before the digits, which the model is least sure of. Stopping is checked only on completed
# blocks, and the block that holds the stop token is kept whole (here filled with end-of-text pads, as
# in training).
#
# ## Forward by forward: cache, working block, commit
#
# What the engine holds at each forward of this rollout. Each forward runs only the working block
# against the KV cache. A block's K/V enter the cache once it is clean — not in a forward of their
# own, but **fused** into the first step of the next block (blue): that forward carries the `2B`
# tokens of both blocks (the prompt's complete blocks ride along with the first forward the same way).

# %%
from dirl_min.tutorial import decode_timeline, timeline_legend

fig, ax = plt.subplots(figsize=(10, 0.35 * out.num_steps(0) + 1.6))
timeline = decode_timeline(ax, full_steps, B, first=max(0, (P // B - 2) * B), chars=glyphs(tok, full_ids))
ax.set_title("the fused engine, one row per forward (the first prompt positions are not drawn)")
timeline_legend(fig)
fig.tight_layout(rect=(0, 0.1, 1, 1))
plt.show()
print(f"forwards: {out.num_forwards} = steps: {out.num_steps(0)}")
#
# ## `step_map` as a heat map
#
# Several sampled sequences (temperature 1, top-k 20). Columns are absolute positions from the start of
# each sequence's first working block; the prompt-tail positions are given (0, white), lines mark
# blocks. Steps grow monotonically across blocks; inside a block the order is the model's choice —
# not left to right — and one step may fill several positions.

# %%
import numpy as np

from dirl_min.tutorial import step_map_heatmap

sampled = generate(model, PROMPTS[:6], max_new_tokens=20, temperature=1.0, top_k=20, threshold=THRESHOLD,
                   stop_token_ids=STOP, seeds=[1, 2, 3, 4, 5, 6])
rows = []
for i, p in enumerate(sampled.prompt_ids):
    fs = [0] * len(p) + sampled.step_map[i]
    rows.append(fs[(len(p) // B) * B:])
width = max(len(r) for r in rows)
grid = np.full((len(rows), width), np.nan)
for i, r in enumerate(rows):
    grid[i, :len(r)] = r
grid[grid == 0] = np.nan  # given tokens blank

fig, ax = plt.subplots(figsize=(10, 3))
step_map_heatmap(ax, grid, B)
ax.set_xlabel("position (from each sequence's first working block)")
ax.set_ylabel("sequence")
ax.set_title("step_map: the global step that committed each token")
plt.show()
print("tokens per step:", [round(sampled.tokens_per_step(i), 2) for i in range(len(sampled))])

# %%
# step_map is monotone across blocks: every step of block k comes before every step of block k+1
monotone = all(
    max(r[s:s + B]) < min(x for x in r[s + B:s + 2 * B] if x > 0)
    for r in rows for s in range(0, len(r) - B, B) if any(x > 0 for x in r[s + B:s + 2 * B])
)
print("step_map monotone across blocks:", monotone)

# %% [markdown]
# ## Static vs dynamic unmasking
#
# * `low_confidence_static`: commit the `k = max(1, B // steps)` most confident positions each step —
#   a fixed `steps` per block, whatever the model's confidence.
# * `low_confidence_dynamic` (DiRL): the most confident position plus all with confidence ≥ threshold;
#   between 1 and `B` steps per block, chosen by the model's certainty.
# * `sequential`: the leftmost `k` masked positions (`B = steps` gives left-to-right decoding).

# %%
settings = [("low_confidence_static", dict(steps=4)), ("low_confidence_static", dict(steps=2)),
            ("low_confidence_static", dict(steps=1)), ("sequential", dict(steps=4)),
            ("low_confidence_dynamic", dict(threshold=0.5)), ("low_confidence_dynamic", dict(threshold=0.9))]
print(f"{'strategy':<24}{'setting':<16}{'tokens/step':>12}{'forwards':>10}")
strategy_tps = {}
for strategy, kw in settings:
    o = generate(model, PROMPTS, max_new_tokens=24, temperature=0.0, strategy=strategy, **kw)
    tps = sum(o.tokens_per_step(i) for i in range(len(o))) / len(o)
    strategy_tps[f"{strategy} {kw}"] = tps
    print(f"{strategy:<24}{str(kw):<16}{tps:>12.2f}{o.num_forwards:>10}")

# %% [markdown]
# Static decoding with `steps = 2` commits two tokens per step, confident or not (only the partly
# given first block can need an odd step); dynamic decoding commits many tokens where the model is
# sure and one where it is not. (Without early stops,
# the forwards of a batch are the slowest sequence's steps.)
#
# ## Tokens per step against the threshold
#
# Tokens per step (TPS) = response tokens / distinct steps, in `[1, B]`. A lower threshold commits
# more per step (faster, riskier); above the model's highest confidences every step commits one token
# (a threshold above 1 leaves only the "at least one" rule). Even at threshold → 0 TPS stays a little
# below `B`: the first block holds only `B − P mod B` new tokens. The trained model is very sure of the
# format tokens, so even 0.99 commits several of them at once.

# %%
thresholds = [0.05, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.01]
sweep_tps, sweep_fwd = [], []
for th in thresholds:
    o = generate(model, PROMPTS, max_new_tokens=24, temperature=0.0, threshold=th)
    sweep_tps.append(sum(o.tokens_per_step(i) for i in range(len(o))) / len(o))
    sweep_fwd.append(o.num_forwards)

fig, ax = plt.subplots(figsize=(5.5, 3.5))
ax.plot(thresholds, sweep_tps, "o-")
ax.axhline(1, color="k", lw=0.8, ls=":")
ax.axhline(B, color="k", lw=0.8, ls=":")
ax.set_xlabel("dynamic threshold")
ax.set_ylabel("tokens per step (mean over 8 prompts)")
ax.set_title(f"B = {B}: TPS lies in [1, B]")
plt.show()
print("forwards per batch:", dict(zip(thresholds, sweep_fwd)))
print("tokens per step:", {th: round(v, 2) for th, v in zip(thresholds, sweep_tps)})

# %% [markdown]
# ## KV cache and the fused commit
#
# A denoising step forwards only the working block (`B` tokens) against the cache; the block's own K/V
# are *not* kept, since it will change. Once the block is clean its K/V must enter the cache. Peer
# code spends an extra forward on that (a "cache pass"), so a block costs `steps + 1` forwards and
# tokens per forward can never exceed `B/2`. dirl_min **fuses** the pass with the first step of the
# next block: one `2B`-token forward, block-causal between the two blocks — exact, one forward saved
# per block (and the prompt's prefill rides along with the first step). `Rollout.num_forwards` counts
# model calls.

# %%
one = [tok.encode("Hi there")]  # 8 tokens: two complete prompt blocks, so the unfused engine also pays a prefill
rows_fwd = []
for th in (THRESHOLD, 0.0):  # threshold 0: every step commits the whole block (the best case)
    f = generate(model, one, max_new_tokens=24, temperature=0.0, threshold=th, fused_commit=True)
    u = generate(model, one, max_new_tokens=24, temperature=0.0, threshold=th, fused_commit=False)
    assert f.response_ids == u.response_ids and f.step_map == u.step_map  # same tokens either way
    n_tok, n_blocks = len(f.response_ids[0]), len(f.response_ids[0]) // B
    rows_fwd.append((th, n_tok, n_blocks, f.num_steps(0), f.num_forwards, u.num_forwards))
    print(f"threshold {th}: {n_tok} tokens, {n_blocks} blocks, {f.num_steps(0)} steps | forwards: "
          f"fused {f.num_forwards} ({n_tok / f.num_forwards:.2f} tok/fwd), "
          f"unfused {u.num_forwards} ({n_tok / u.num_forwards:.2f} tok/fwd)")
fused_saves_one_per_block = all(u - f == nb for _, _, nb, _, f, u in rows_fwd)
print("unfused − fused forwards == blocks:", fused_saves_one_per_block)

# %% [markdown]
# At threshold 0 each block is one step: fused decoding reaches `B` tokens per forward, the unfused
# one is stuck at `B/2`.
#
# ## Cached == uncached, checked live
#
# `reference/decoding.py` decodes one sequence with plain loops and **no cache**: every step recomputes
# the whole sequence with a dense block-causal mask. Sampling noise is a hash of (seed, position, step,
# token), so the same seed gives the same draws in both. The engine — batched, cached, fused or not —
# must return the same tokens, the same `step_map` and the same `logp`.

# %%
from reference.decoding import decode


def denoiser(ids, mask):
    """The reference's interface over the same weights: full sequence, dense mask, all logits."""
    with torch.no_grad():
        hidden = backbone_hidden(model, ids[None], torch.arange(len(ids))[None], mask[None, None])
        return model.lm_head(hidden)[0]


kw = dict(max_new_tokens=16, temperature=1.0, top_k=10, threshold=THRESHOLD, stop_token_ids=STOP)
ref_out = decode(denoiser, PROMPTS[1], block_size=B, mask_token_id=M, seed=7, **kw)
cached_equals_reference, logp_diffs = True, []
for fused in (True, False):
    eng = generate(model, [PROMPTS[1]], seeds=[7], fused_commit=fused, **kw)
    cached_equals_reference &= eng.response_ids[0] == ref_out["response_ids"]
    cached_equals_reference &= eng.step_map[0] == ref_out["step_map"]
    logp_diffs.append(max(abs(a - b) for a, b in zip(eng.logp[0], ref_out["logp"])))
    print(f"fused={fused}: same tokens and step_map: {cached_equals_reference}, "
          f"max |logp - reference logp| = {logp_diffs[-1]:.2e}, forwards {eng.num_forwards} "
          f"(reference: {ref_out['num_forwards']} full-sequence passes)")
print("response:", repr(glyphs(tok, ref_out["response_ids"])), "step_map:", ref_out["step_map"])

# %% tags=["checks"] jupyter={"source_hidden": true}
# Checks: this notebook's claims, asserted (tests/test_notebooks.py reads CHECKS back).
CHECKS = {
    "first_step_matches_hand": bool(first_step_matches_hand),
    "hand_commits_by_threshold": hand_commits_by_threshold,
    "loop_matches_engine": bool(loop_matches_engine),
    "answer_is_boxed": out.text[0].startswith("\\boxed{") and out.text[0].endswith("}"),
    "timeline_forwards": int(timeline.shape[0]) == out.num_forwards,
    "some_step_commits_several": max(out.tokens_per_step(0), *sweep_tps) > 1.0,
    "step_map_monotone": bool(monotone),
    "tps_in_range": all(1.0 <= v <= B for v in sweep_tps),
    "tps_low_threshold": sweep_tps[0],
    "tps_high_threshold": sweep_tps[-1],
    "static_k1_tps": strategy_tps["low_confidence_static {'steps': 4}"],
    "static_k2_tps": strategy_tps["low_confidence_static {'steps': 2}"],
    "fused_saves_one_forward_per_block": bool(fused_saves_one_per_block),
    "cached_equals_reference": bool(cached_equals_reference),
    "max_logp_diff_vs_reference": max(logp_diffs),
    "seconds": time.perf_counter() - T_START,
}
assert CHECKS["first_step_matches_hand"] and CHECKS["some_step_commits_several"]
assert CHECKS["hand_commits_by_threshold"] >= 2, "the threshold rule should commit several tokens in one step"
assert CHECKS["loop_matches_engine"] and CHECKS["answer_is_boxed"] and CHECKS["timeline_forwards"]
assert CHECKS["step_map_monotone"] and CHECKS["tps_in_range"]
assert CHECKS["tps_low_threshold"] > CHECKS["tps_high_threshold"] == 1.0
assert CHECKS["static_k1_tps"] == 1.0 and 1.0 < CHECKS["static_k2_tps"] <= 2.0
assert CHECKS["fused_saves_one_forward_per_block"]
assert CHECKS["cached_equals_reference"] and CHECKS["max_logp_diff_vs_reference"] < 1e-4
print(CHECKS)
