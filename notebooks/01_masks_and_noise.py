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
# # 01 · Masks and noise: how a block-diffusion LM is trained
#
# **Why "diffusion".** A diffusion model learns to undo a noising process. For text the noise is
# *masking*: at noise level `t ∈ [0, 1]` each response token is replaced by a mask token `M` with
# probability `t` — at `t = 0` the answer is intact, at `t = 1` it is all masks. The model is trained
# to predict the masked tokens from what is left; decoding runs the process backwards, from all masks
# to a clean answer, committing a few confident tokens per step (the picture below, read bottom-up).
#
# **Why blocks.** A model that denoises the whole answer at once needs its length in advance and cannot
# reuse a KV cache. SDAR (*Synergistic Diffusion-AutoRegression*, Cheng et al. 2025), the model family
# DiRL post-trains, cuts the sequence into blocks of `B` tokens (`B = 4`): *across* blocks it is
# autoregressive — a block sees only earlier blocks, so finished blocks go to a KV cache and
# generation stops when a block holds the end token — and *inside* a block it is a masked-diffusion
# denoiser that fills its `B` positions in a few parallel steps, attending bidirectionally within the
# block. SDAR obtains such a model by brief further training of an ordinary autoregressive transformer
# (a Qwen3, as here); there is **no shift**: the logits at position `i` predict the token *at* `i`.
#
# **Why a clean copy.** Training must show every noisy block exactly what decoding will show it: the
# *clean* earlier blocks, and its own partly masked block. Feeding `x_t` alone would let block `k` see
# noisy earlier blocks; giving each block its own clean prefix would cost one forward per block. SFT
# instead appends a clean copy `x_0` to the noisy sequence and lets the attention mask route each noisy
# block to the clean copy's earlier blocks: one forward trains every block.
#
# **What the loss is.** For a masked position `i` in block `b`, the model's prediction is
# `p_θ(x0_i | x_t^(b), x_0^(<b))`: the token, given the noisy block and the clean *earlier* blocks —
# never the clean token itself, which the mask hides. The loss sums `−log p_θ` over the masked
# positions, divided by the masking probability `p`. Averaged over `t`, this is the *masked-diffusion
# ELBO*: an upper bound on the negative log-likelihood `−log p_θ(x_0)` of the answer (an evidence lower
# bound on the log-likelihood, hence the name), just as next-token cross-entropy is the exact NLL for an
# autoregressive model. The `1/p` weight is what makes it a bound on the NLL (section "The `1/p`
# weight").
#
# This notebook builds those pieces — the block grid, the attention masks, the noise and the weight —
# and checks them against slow reference implementations (SPEC §1–§2). It runs in seconds. Notebook 02
# writes the decode loop out in 20 lines, notebook 03 DiPO's step rounds, both checked against the
# library.

# %%
import time

import matplotlib.pyplot as plt
import torch

from dirl_min.tutorial import setup

# one torch thread, tqdm's ipywidgets warning off, and the repository on sys.path for `reference/`
ROOT, T_START = setup()

# %%
from dirl_min.model import build_tiny, chat_prompt_ids
from dirl_min.tutorial import glyphs, in_blocks, masking_picture

model, tok = build_tiny()  # random weights; only its tokenizer and config matter until the last sections
B, M = model.config.block_size, model.config.mask_token_id  # the single source of truth for both

prompt = chat_prompt_ids(tok, "What is 12 + 7?")
answer = tok.encode("\\boxed{19}<|im_end|><|endoftext|>", add_special_tokens=False)
P = len(prompt)
L = -(-(P + len(answer)) // B) * B  # round up to whole blocks, counted on the whole sequence
x0 = torch.tensor(prompt + answer + [tok.pad_token_id] * (L - P - len(answer)))
is_response = torch.arange(L) >= P  # response side: may be masked, carries the loss (pads included)

# the prompt's last 12 tokens, then the response
masking_picture(tok, x0[P - 12:], is_response[P - 12:], B=B, start=P - 12)
plt.show()

# %% [markdown]
# One example, an arithmetic question and its answer `\boxed{19}` with end tokens, at four noise levels.
# The masks are nested (a token masked at `t = 0.3` is masked at `0.7` too), so top to bottom is one
# path of the noising process and bottom to top one path of decoding. Training draws one `t` per
# example and asks the model for the masked tokens of that row. Decoding does not unmask the whole
# answer at once: it runs this reverse path one block (vertical lines) at a time, left to right.
# %% [markdown]
# ## The block grid
#
# Blocks are aligned to absolute position 0 of the sequence, **prompt included**: block `k` is
# positions `[kB, (k+1)B)`. We use the tiny character-level tokenizer of `build_tiny()` (one token per
# character, so each token prints as one glyph) and an SFT example of the embedded arithmetic
# task: chat prompt, then `\boxed{answer}<|im_end|><|endoftext|>`, right-padded with the pad token
# (= eos) to a multiple of `B`. Bars mark block boundaries; `p`/`r` mark prompt and response.

# %%
# glyphs(tok, ids): one character per token (⟨ ⟩ = <|im_start|> <|im_end|>, ∎ = <|endoftext|>, █ = mask,
# ⏎ = newline); in_blocks(text, B) puts a bar at every block boundary
print(f"B = {B}, mask id M = {M}, prompt length P = {P}, padded length L = {L}")
print(in_blocks(glyphs(tok, x0), B))
print(in_blocks("".join("r" if r else "p" for r in is_response), B))
print(f"the first response block starts with the prompt's last P mod B = {P % B} tokens:",
      repr(glyphs(tok, x0[(P // B) * B:(P // B + 1) * B])))

# %% [markdown]
# The first block that the model generates is therefore *partly given*: it already holds the
# prompt's tail. Training and decoding must use this same grid — a model trained on blocks that start
# at the response would see a different context at every position when decoding. The two pad tokens
# at the end are trained too: the model learns to fill the last block with eos.
#
# ## The block-causal mask
#
# For a clean sequence a query may attend a key iff `blk(k) ≤ blk(q)`: causal between blocks, full
# inside a block. At `B = 1` this is the ordinary causal mask. (Rows are queries, columns keys; blue =
# may attend.) Decoding uses it: the committed blocks go to the KV cache with this mask.

# %%
import numpy as np
from matplotlib.patches import Patch

from dirl_min.core.masks import block_causal_mask, block_diffusion_mask, packed_rounds_mask
from dirl_min.tutorial import draw_mask  # imshow of a mask with block lines and x_t / x_0 labels


Ls, Bs = 12, 4  # a short sequence keeps the pictures readable
fig, axes = plt.subplots(1, 2, figsize=(8, 4))
draw_mask(axes[0], block_causal_mask(Ls, 1), 1, Ls, "B = 1: the causal mask")
draw_mask(axes[1], block_causal_mask(Ls, Bs), Bs, Ls, f"B = {Bs}: block-causal")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The SFT layout `[x_t ; x_0]`
#
# To train every block in one forward, SFT feeds the noisy sequence `x_t` followed by a clean copy
# `x_0`, both with position ids `0..L-1` (length `2L`). For index `i`: half `h(i) = i ≥ L`,
# position `pos(i) = i − h(i)·L`, block `blk(i) = pos(i) // B`. Query `q` may attend key `k` iff (SPEC §2)
#
# 1. `h(q) = h(k)` and `blk(k) = blk(q)` — inside a block, both halves;
# 2. `q` noisy, `k` clean and `blk(k) < blk(q)` — a noisy block sees the earlier *clean* blocks;
# 3. `q` clean, `k` clean and `blk(k) ≤ blk(q)` — the clean half is block-causal.
#
# Left: `block_diffusion_mask` as the library builds it. Right: the same picture coloured by which
# clause allows each entry, computed straight from the three formulas above.

# %%
core = block_diffusion_mask(Ls, Bs)

i = np.arange(2 * Ls)
h = i >= Ls
blk = (i - h * Ls) // Bs
hq, hk, bq, bk = h[:, None], h[None, :], blk[:, None], blk[None, :]
clause1 = (hq == hk) & (bk == bq)
clause2 = ~hq & hk & (bk < bq)
clause3 = hq & hk & (bk <= bq)
which = np.where(clause1, 1, np.where(clause2, 2, np.where(clause3, 3, 0)))

colours = ["white", "tab:blue", "tab:orange", "tab:green"]
fig, axes = plt.subplots(1, 2, figsize=(12, 6))
draw_mask(axes[0], core, Bs, Ls, "block_diffusion_mask(12, 4)", copies=2)
draw_mask(axes[1], which, Bs, Ls, "which clause allows each entry", copies=2, colours=colours)
axes[1].legend(handles=[Patch(color=c, label=l) for c, l in zip(colours[1:], [
    "1: same block, same half", "2: noisy → earlier clean blocks", "3: clean half, block-causal"])],
    loc="lower left", fontsize=8)
fig.tight_layout()
plt.show()

union = torch.from_numpy(clause1 | clause2 | clause3)
print("core mask == union of the three clauses:", torch.equal(core, union))

# %% [markdown]
# Reading the picture (rows are queries):
#
# * **Top-left (noisy → noisy), clause 1**: only the diagonal squares. A masked position sees its
#   whole block — masked or not — and nothing of other noisy blocks. That is what it sees at decoding
#   time: the working block, bidirectionally.
# * **Top-right (noisy → clean), clause 2**: the strictly lower block triangle. Noisy block `k` reads
#   clean blocks `< k` — exactly the KV cache it will have when it is decoded.
# * **Bottom-right (clean → clean), clauses 1 + 3**: block-causal. The clean half *is* the
#   block-causal pass that fills the cache.
# * **Bottom-left is empty**: clean queries never see noisy keys, so the clean half's hidden states do
#   not depend on the noise at all. Checked below on the (random) tiny model: the clean half of the
#   layout equals a plain block-causal forward over `x_0`, whatever `x_t` is.

# %%
from dirl_min.model.forward import backbone_hidden

g = torch.Generator().manual_seed(0)
xs0 = torch.randint(0, 95, (Ls,), generator=g)  # some clean tokens
xst = xs0.masked_fill(torch.rand(Ls, generator=g) < 0.5, M)  # a noisy copy
pos = torch.arange(Ls)
with torch.no_grad():
    layout = backbone_hidden(model, torch.cat([xst, xs0])[None], pos.repeat(2)[None],
                             block_diffusion_mask(Ls, Bs)[None, None])
    plain = backbone_hidden(model, xs0[None], pos[None], block_causal_mask(Ls, Bs)[None, None])
clean_half_diff = float((layout[0, Ls:] - plain[0]).abs().max())
print(f"max |clean half of [x_t ; x_0]  -  block-causal pass over x_0| = {clean_half_diff:.2e}")

# %% [markdown]
# ## Noise: `add_noise`
#
# One noise level per **example** (not per block): the SPEC (after DiRL) draws `t ~ U(0, 1]`, and
# `p = (1 − ε)t + ε` with `ε = 1e-3`; each response position becomes `M` independently with probability
# `p`; if none was drawn, one is forced (every example then has a loss term). The prompt is never
# masked. (The trainer's default `sft.t_min = 0.1` draws `t` from `[0.1, 1]` instead; see below.)
#
# `add_noise` draws `t` itself, one per row. To show chosen levels we draw many rows of the same
# example and pick the rows whose `t` is closest to 0.2, 0.5 and 0.9.

# %%
from dirl_min.core.masks import add_noise

eps = 1e-3
rows = 4000
noisy, is_masked, p = add_noise(x0.repeat(rows, 1), is_response.repeat(rows, 1), M, eps=eps,
                                generator=torch.Generator().manual_seed(0))
t = (p - eps) / (1 - eps)

print("       ", in_blocks(glyphs(tok, x0), B))
for target in (0.2, 0.5, 0.9):
    r = int((t - target).abs().argmin())
    print(f"t={float(t[r]):.3f}", in_blocks(glyphs(tok, noisy[r]), B),
          f" {int(is_masked[r].sum())}/{int(is_response.sum())} masked (expected p·N = {float(p[r]) * int(is_response.sum()):.1f})")

prompt_never_masked = not bool(is_masked[:, ~is_response].any())
every_row_masked = bool(is_masked.any(dim=1).all())
print("prompt never masked:", prompt_never_masked, "| every row has a masked position:", every_row_masked)

fig, ax = plt.subplots(figsize=(4.5, 3.5))
ax.scatter(p[:400], is_masked[:400].sum(1) / is_response.sum(), s=6, alpha=0.5)
ax.plot([0, 1], [0, 1], "k--", lw=1)
ax.set_xlabel("p (drawn per row)")
ax.set_ylabel("fraction of response masked")
ax.set_title("add_noise: masked fraction ≈ p")
plt.show()

# %% [markdown]
# ## The `1/p` weight
#
# The SFT loss of one example is `L = (1/N_resp) · Σ_{i masked} −log p_θ(x0_i | x_t^(b), x_0^(<b)) / p`
# (`b` the block of `i`, `N_resp` its response tokens). Why divide by `p`? A position is masked with
# probability `p`, so `E[Σ_masked nll_i] = p · Σ_i nll_i`: dividing by `p` turns the masked sum into an
# unbiased estimate of the per-token NLL summed over **all** response positions — each NLL taken at
# that noise level. Without it, a row at `p = 0.9` would count nine times as much as one at `p = 0.1`.
# Averaging over `t` gives the masked-diffusion ELBO of the introduction.
#
# The weight does *not* make every noise level give the same loss: a real model's NLL grows with the
# masking (less is visible), so its weighted loss still rises with `p`. Left, the weight alone: a
# fixed made-up NLL per position of a 64-token response, held the same at every `p`, so that only the
# masking changes; for many `add_noise` rows the loss with and without the weight, in bins of `p`.
# Right, a real model: the tiny model after a 150-step SFT (`dirl_min.tutorial.trained_tiny`, a few
# seconds), its weighted loss on training answers masked at fixed levels.

# %%
n_resp, n_rows = 64, 20000
nll = torch.rand(n_resp, generator=torch.Generator().manual_seed(1)) * 4  # a made-up NLL per position
_, m, pp = add_noise(torch.zeros(n_rows, n_resp, dtype=torch.long), torch.ones(n_rows, n_resp, dtype=torch.bool),
                     M, eps=eps, generator=torch.Generator().manual_seed(2))
summed = (m.float() * nll).sum(1)
weighted, unweighted = summed / pp / n_resp, summed / n_resp

edges = torch.linspace(0, 1, 11)
centres, w_mean, w_lo, w_hi, w_std, u_mean = [], [], [], [], [], []
for lo, hi in zip(edges[:-1], edges[1:]):
    sel = (pp >= lo) & (pp < hi)
    centres.append(float((lo + hi) / 2))
    w_mean.append(float(weighted[sel].mean()))
    w_lo.append(float(weighted[sel].quantile(0.1)))
    w_hi.append(float(weighted[sel].quantile(0.9)))
    w_std.append(float(weighted[sel].std()))
    u_mean.append(float(unweighted[sel].mean()))

# %% [markdown]
# The real model's loss at fixed masking levels: 96 training answers, each response token masked with
# probability `p` (at least one), through the trainer's own `sft_loss`.

# %%
from dirl_min.data import arithmetic_problems, sft_records
from dirl_min.loops.sft import SFTNoise, sft_loss, tokenize_sft
from dirl_min.tutorial import trained_tiny

sft_model, _ = trained_tiny()
examples, _ = tokenize_sft(sft_records(arithmetic_problems()[::4][:96], tok), tok, B, max_len=2048)
levels, real_loss = [0.1, 0.3, 0.5, 0.7, 0.9, 1.0], []
with torch.no_grad():
    for lev in levels:
        gen = torch.Generator().manual_seed(3)
        masks = [(torch.rand(len(e.ids), generator=gen) < lev) & (torch.arange(len(e.ids)) >= e.prompt_len)
                 for e in examples]
        for e, mk in zip(examples, masks):
            mk[e.prompt_len] |= not mk.any()  # at least one masked position, as add_noise forces
        n_resp = sum(len(e.ids) - e.prompt_len for e in examples)
        noise = SFTNoise(masks, torch.full((len(examples),), lev))
        loss, _ = sft_loss(sft_model, examples, M, B, noise, num_response_tokens=n_resp)
        real_loss.append(float(loss))

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
ax = axes[0]
ax.fill_between(centres, w_lo, w_hi, alpha=0.25, label="with 1/p: 10–90% of single rows")
ax.plot(centres, w_mean, "o-", label="with 1/p: mean")
ax.plot(centres, u_mean, "s-", label="without 1/p: mean")
ax.axhline(float(nll.mean()), color="k", ls="--", lw=1, label="mean NLL over all positions")
ax.set_xlabel("masking probability p")
ax.set_ylabel("loss per response token")
ax.set_ylim(bottom=0)
ax.set_title("the weight alone (NLL held fixed)")
ax.legend(fontsize=8)
axes[1].plot(levels, real_loss, "o-", color="tab:purple")
axes[1].set_xlabel("masking probability p")
axes[1].set_ylabel("weighted loss per response token")
axes[1].set_ylim(bottom=0)
axes[1].set_title("a real (briefly trained) model: the loss rises with masking")
fig.tight_layout()
plt.show()

# relative error of the weighted bin means, ignoring the lowest bin (see below)
weight_rel_err = max(abs(w - float(nll.mean())) / float(nll.mean()) for w in w_mean[1:])
print(f"weighted loss (NLL held fixed): bins p ≥ 0.1 within {100 * weight_rel_err:.1f}% of the mean NLL")
print(f"std of one row's weighted loss: {w_std[0]:.2f} at p < 0.1 vs {w_std[-1]:.2f} at p > 0.9")
print("real model, weighted loss per token at p =", dict(zip(levels, [round(v, 3) for v in real_loss])))

# %% [markdown]
# With the NLL held fixed, the weighted loss is flat in `p` (unbiased) and the unweighted one grows
# linearly; with a real model the weighted loss grows with `p`, because each prediction sees less. The
# price of the weight is variance: at small `p` few positions are masked and each is multiplied by a
# large `1/p` (up to `1/ε = 1000`; the wide band on the left), and the forced single mask (when none was
# drawn) biases the lowest levels upward — the first bin. That is why the trainer draws `t ≥ sft.t_min`
# (default 0.1, a measured choice, see `--help`): it drops the *least* noisy levels, where few tokens
# are masked and the weights are largest — a departure from the SPEC's `t ∈ (0, 1]`.
#
# ## Checked live against the reference
#
# `reference/masking.py` builds each mask with a plain double loop over (query, key) that applies the
# SPEC's clauses literally and shares no code with `dirl_min.masking`. The core must agree on every
# size — including DiPO's packed layout `[x_t^1; …; x_t^R; x_0]` (notebook 03).

# %%
import reference.masking as ref

cases = 0
masks_match_reference = True
for L_ in (1, 3, 8, 12):
    for B_ in (1, 2, 4, 8):
        masks_match_reference &= torch.equal(block_causal_mask(L_, B_), ref.block_causal_mask(L_, B_))
        masks_match_reference &= torch.equal(block_diffusion_mask(L_, B_), ref.block_diffusion_mask(L_, B_))
        for R in (1, 2, 3):
            masks_match_reference &= torch.equal(packed_rounds_mask(R, L_, B_), ref.packed_rounds_mask(R, L_, B_))
        cases += 5
print(f"{cases} masks compared with the reference; all equal: {masks_match_reference}")

# %% tags=["checks"] jupyter={"source_hidden": true}
# Checks: this notebook's claims, asserted (tests/test_notebooks.py reads CHECKS back).
CHECKS = {
    "masks_match_reference": bool(masks_match_reference),
    "mask_is_union_of_clauses": bool(torch.equal(core, union)),
    "clean_queries_never_see_noisy_keys": not bool(core[Ls:, :Ls].any()),
    "clean_half_equals_block_causal_pass": clean_half_diff,
    "prompt_never_masked": prompt_never_masked,
    "every_row_masked": every_row_masked,
    "weighted_loss_rel_err": float(weight_rel_err),
    "real_loss_by_level": dict(zip(levels, real_loss)),
    "seconds": time.perf_counter() - T_START,
}
assert CHECKS["masks_match_reference"]
assert CHECKS["mask_is_union_of_clauses"] and CHECKS["clean_queries_never_see_noisy_keys"]
assert CHECKS["clean_half_equals_block_causal_pass"] < 1e-5
assert CHECKS["prompt_never_masked"] and CHECKS["every_row_masked"]
assert CHECKS["weighted_loss_rel_err"] < 0.05
assert real_loss[-1] > real_loss[0], "a real model's loss should grow with the masking"
print(CHECKS)
