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
# A block-diffusion LM (SDAR, TraDo, DiRL) is an ordinary transformer — here a Qwen3 — used in a
# different way from an autoregressive LM:
#
# * it writes **blocks** of `B` tokens (SDAR/DiRL: `B = 4`). *Across* blocks it is autoregressive:
#   a block sees only earlier blocks. *Inside* a block it is a denoiser: every position starts as
#   the mask token `M` and is filled in a few parallel steps, attending bidirectionally to the block;
# * there is **no shift**: the logits at position `i` predict the token *at* `i`, not at `i + 1`.
#
# Both properties live in the **attention mask** and the **noise**, the subject of this notebook
# (SPEC §1–§2). Everything runs on a tiny randomly initialised model in a few seconds.

# %%
import time

import matplotlib.pyplot as plt
import torch

from dirl_min.tutorial import setup

# one torch thread, tqdm's ipywidgets warning off, and the repository on sys.path for `reference/`
ROOT, T_START = setup()

# %% [markdown]
# ## The block grid
#
# Blocks are aligned to absolute position 0 of the sequence, **prompt included**: block `k` is
# positions `[kB, (k+1)B)`. We use the tiny character-level tokenizer of `build_tiny()` (one token per
# character, so each token prints as one glyph) and an SFT example of the embedded arithmetic
# task: chat prompt, then `\boxed{answer}<|im_end|><|endoftext|>`, right-padded with the pad token
# (= eos) to a multiple of `B`. Bars mark block boundaries; `p`/`r` mark prompt and response.

# %%
from dirl_min.model import build_tiny, chat_prompt_ids
from dirl_min.tutorial import glyphs, in_blocks

model, tok = build_tiny()  # random weights; only its tokenizer and config matter until the last section
B, M = model.config.block_size, model.config.mask_token_id  # the single source of truth for both

# glyphs(tok, ids): one character per token (⟨ ⟩ = <|im_start|> <|im_end|>, ∎ = <|endoftext|>, █ = mask,
# ⏎ = newline); in_blocks(text, B) puts a bar at every block boundary

prompt = chat_prompt_ids(tok, "What is 12 + 7?")
answer = tok.encode("\\boxed{19}<|im_end|><|endoftext|>", add_special_tokens=False)
P = len(prompt)
L = -(-(P + len(answer)) // B) * B  # round up to whole blocks, counted on the whole sequence
x0 = torch.tensor(prompt + answer + [tok.pad_token_id] * (L - P - len(answer)))
is_response = torch.arange(L) >= P  # response side: may be masked, carries the loss (pads included)

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
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from dirl_min.core.masks import block_causal_mask, block_diffusion_mask, packed_rounds_mask


def draw_mask(ax, mask, B, L, title, copies=1, cmap=ListedColormap(["white", "tab:blue"]), vmax=1):
    """Draw a mask; ticks at block centres, thin lines at block edges, thick lines between copies."""
    n = mask.shape[0]
    ax.imshow(np.asarray(mask, dtype=float), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
    for e in range(0, n + 1, B):
        ax.axhline(e - 0.5, color="0.8", lw=0.5)
        ax.axvline(e - 0.5, color="0.8", lw=0.5)
    for c in range(1, copies):
        ax.axhline(c * L - 0.5, color="crimson", lw=2)
        ax.axvline(c * L - 0.5, color="crimson", lw=2)
    names = ["x_t", "x_0"] if copies == 2 else [f"x_t^{r + 1}" for r in range(copies - 1)] + ["x_0"]
    centres = [s + (B - 1) / 2 for s in range(0, n, B)]
    labels = [(f"{names[s // L]} " if copies > 1 else "") + f"b{(s % L) // B}" for s in range(0, n, B)]
    ax.set_xticks(centres, labels, rotation=90, fontsize=7)
    ax.set_yticks(centres, labels, fontsize=7)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title)


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
draw_mask(axes[1], which, Bs, Ls, "which clause allows each entry", copies=2,
          cmap=ListedColormap(colours), vmax=3)
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
# One noise level per **example** (not per block): `t ~ U(0, 1)`, `p = (1 − ε)t + ε` with `ε = 1e-3`;
# each response position becomes `M` independently with probability `p`; if none was drawn, one is
# forced (every example then has a loss term). The prompt is never masked.
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
# The SFT loss is `L = (1/N_resp) · Σ_{i masked} −log q(x0_i | x_t ; x_0) / p`. Why divide by `p`?
# A position is masked with probability `p`, so `E[Σ_masked nll_i] = p · Σ_i nll_i`. Dividing by `p`
# makes the expected loss of an example the *average* per-token NLL over **all** its response
# positions, the same for every noise level — each `t` estimates the same quantity (this is the
# masked-diffusion ELBO weighting). Without it, a row at `p = 0.9` would count nine times as much as one
# at `p = 0.1`.
#
# Below, a fixed made-up NLL per position of a 64-token response; for many `add_noise` rows we compute
# the loss with and without the weight and average it in bins of `p`.

# %%
n_resp, n_rows = 64, 20000
nll = torch.rand(n_resp, generator=torch.Generator().manual_seed(1)) * 4  # a made-up NLL per position
_, m, pp = add_noise(torch.zeros(n_rows, n_resp, dtype=torch.long), torch.ones(n_rows, n_resp, dtype=torch.bool),
                     M, eps=eps, generator=torch.Generator().manual_seed(2))
summed = (m.float() * nll).sum(1)
weighted, unweighted = summed / pp / n_resp, summed / n_resp

edges = torch.linspace(0, 1, 11)
centres, w_mean, w_std, u_mean = [], [], [], []
for lo, hi in zip(edges[:-1], edges[1:]):
    sel = (pp >= lo) & (pp < hi)
    centres.append(float((lo + hi) / 2))
    w_mean.append(float(weighted[sel].mean()))
    w_std.append(float(weighted[sel].std()))
    u_mean.append(float(unweighted[sel].mean()))

fig, ax = plt.subplots(figsize=(5.5, 3.5))
ax.errorbar(centres, w_mean, yerr=w_std, fmt="o-", capsize=3, label="with 1/p (± std of one row)")
ax.plot(centres, u_mean, "s-", label="without 1/p")
ax.axhline(float(nll.mean()), color="k", ls="--", lw=1, label="mean NLL over all positions")
ax.set_xlabel("p")
ax.set_ylabel("loss of one example")
ax.legend(fontsize=8)
plt.show()

# relative error of the weighted bin means, ignoring the lowest bin (see below)
weight_rel_err = max(abs(w - float(nll.mean())) / float(nll.mean()) for w in w_mean[1:])
print(f"weighted loss: bins p ≥ 0.1 within {100 * weight_rel_err:.1f}% of the mean NLL")
print(f"std of one row's weighted loss: {w_std[0]:.2f} at p < 0.1 vs {w_std[-1]:.2f} at p > 0.9")

# %% [markdown]
# The weighted loss is flat in `p` (unbiased), the unweighted one grows linearly. The price is
# variance: at small `p` few positions are masked and each is multiplied by a large `1/p` (up to
# `1/ε = 1000`), and the forced single mask (when none was drawn) biases the lowest levels upward —
# the first bin. That is why the trainer draws `t ≥ sft.t_min` (default 0.1): it drops the noisiest
# levels.
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

# %% tags=["checks"]
# Checks: this notebook's claims, asserted (tests/test_notebooks.py reads CHECKS back).
CHECKS = {
    "masks_match_reference": bool(masks_match_reference),
    "mask_is_union_of_clauses": bool(torch.equal(core, union)),
    "clean_queries_never_see_noisy_keys": not bool(core[Ls:, :Ls].any()),
    "clean_half_equals_block_causal_pass": clean_half_diff,
    "prompt_never_masked": prompt_never_masked,
    "every_row_masked": every_row_masked,
    "weighted_loss_rel_err": float(weight_rel_err),
    "seconds": time.perf_counter() - T_START,
}
assert CHECKS["masks_match_reference"]
assert CHECKS["mask_is_union_of_clauses"] and CHECKS["clean_queries_never_see_noisy_keys"]
assert CHECKS["clean_half_equals_block_causal_pass"] < 1e-5
assert CHECKS["prompt_never_masked"] and CHECKS["every_row_masked"]
assert CHECKS["weighted_loss_rel_err"] < 0.05
print(CHECKS)
