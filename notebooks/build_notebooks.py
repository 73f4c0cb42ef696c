"""Build the tutorial notebooks from the cell sources below (no outputs, deterministic bytes).

    python notebooks/build_notebooks.py           # (re)write notebooks/*.ipynb
    python notebooks/build_notebooks.py --check   # exit 1 if a committed notebook differs

Edit the cells here, not in Jupyter: tests/test_notebooks.py checks that the committed
``.ipynb`` files equal what this script generates and that they carry no outputs. Each
notebook ends with a ``checks`` cell that asserts its key claims and leaves them in the
dict ``CHECKS`` (the test reads it back from the kernel).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def md(src: str) -> tuple[str, str, list[str]]:
    return ("markdown", src, [])


def code(*parts: str, tags: list[str] | None = None) -> tuple[str, str, list[str]]:
    """A code cell; the parts are dedented one by one and joined by blank lines."""
    return ("code", "\n\n".join(_clean(p) for p in parts), tags or [])


def _clean(src: str) -> str:
    return textwrap.dedent(src).strip("\n")


# Every notebook starts with this cell (threads, and the repository on sys.path for `reference/`).
SETUP = r'''
import pathlib
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

torch.set_num_threads(1)  # tiny tensors: one thread is fastest and leaves the other cores alone
T_START = time.perf_counter()

import dirl_min

# `reference/` (slow, loop-by-loop implementations written straight from the SPEC) lives next to
# the package in the repository and is not installed: put the repository on the path.
ROOT = pathlib.Path(dirl_min.__file__).resolve().parents[1]  # an editable install: the repository
if not (ROOT / "reference").is_dir():
    ROOT = pathlib.Path.cwd().parent  # a regular install, notebook opened from notebooks/
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt
'''

# The tiny tokenizer is character-level: one glyph per token makes token sequences readable.
GLYPHS = r'''
GLYPH = {"<|im_start|>": "⟨", "<|im_end|>": "⟩", "<|endoftext|>": "∎", "<|MASK|>": "█", "\n": "⏎"}


def glyphs(ids):
    """One character per token: ⟨ ⟩ = <|im_start|> <|im_end|>, ∎ = <|endoftext|>, █ = mask, ⏎ = newline."""
    return "".join(GLYPH.get(t, t) for t in tok.convert_ids_to_tokens([int(i) for i in ids]))


def in_blocks(text, B, start=0):
    """Insert a bar at every block boundary (blocks are aligned to absolute position 0)."""
    return "|".join(text[max(0, s - start):s - start + B] for s in range((start // B) * B, start + len(text), B))
'''

# ---------------------------------------------------------------------------------------------
# 01 — masks and noise
# ---------------------------------------------------------------------------------------------

NB01 = [
    md(r'''
    # 01 · Masks and noise: how a block-diffusion LM is trained

    A block-diffusion LM (SDAR, TraDo, DiRL) is an ordinary transformer — here a Qwen3 — used in a
    different way from an autoregressive LM:

    * it writes **blocks** of `B` tokens (SDAR/DiRL: `B = 4`). *Across* blocks it is autoregressive:
      a block sees only earlier blocks. *Inside* a block it is a denoiser: every position starts as
      the mask token `M` and is filled in a few parallel steps, attending bidirectionally to the block;
    * there is **no shift**: the logits at position `i` predict the token *at* `i`, not at `i + 1`.

    Both properties live in the **attention mask** and the **noise**, the subject of this notebook
    (SPEC §1–§2). Everything runs on a tiny randomly initialised model in a few seconds.
    '''),
    code(SETUP),
    md(r'''
    ## The block grid

    Blocks are aligned to absolute position 0 of the sequence, **prompt included**: block `k` is
    positions `[kB, (k+1)B)`. We use the tiny character-level tokenizer of `build_tiny()` (one token per
    character, so each token prints as one glyph) and an SFT example of the embedded arithmetic
    task: chat prompt, then `\boxed{answer}<|im_end|><|endoftext|>`, right-padded with the pad token
    (= eos) to a multiple of `B`. Bars mark block boundaries; `p`/`r` mark prompt and response.
    '''),
    code(r'''
    from dirl_min.model import build_tiny, chat_prompt_ids

    model, tok = build_tiny()  # random weights; only its tokenizer and config matter until the last section
    B, M = model.config.block_size, model.config.mask_token_id  # the single source of truth for both
    ''', GLYPHS, r'''
    prompt = chat_prompt_ids(tok, "What is 12 + 7?")
    answer = tok.encode("\\boxed{19}<|im_end|><|endoftext|>", add_special_tokens=False)
    P = len(prompt)
    L = -(-(P + len(answer)) // B) * B  # round up to whole blocks, counted on the whole sequence
    x0 = torch.tensor(prompt + answer + [tok.pad_token_id] * (L - P - len(answer)))
    is_response = torch.arange(L) >= P  # response side: may be masked, carries the loss (pads included)

    print(f"B = {B}, mask id M = {M}, prompt length P = {P}, padded length L = {L}")
    print(in_blocks(glyphs(x0), B))
    print(in_blocks("".join("r" if r else "p" for r in is_response), B))
    print(f"the first response block starts with the prompt's last P mod B = {P % B} tokens:",
          repr(glyphs(x0[(P // B) * B:(P // B + 1) * B])))
    '''),
    md(r'''
    The first block that the model generates is therefore *partly given*: it already holds the
    prompt's tail. Training and decoding must use this same grid — a model trained on blocks that start
    at the response would see a different context at every position when decoding. The two pad tokens
    at the end are trained too: the model learns to fill the last block with eos.

    ## The block-causal mask

    For a clean sequence a query may attend a key iff `blk(k) ≤ blk(q)`: causal between blocks, full
    inside a block. At `B = 1` this is the ordinary causal mask. (Rows are queries, columns keys; blue =
    may attend.) Decoding uses it: the committed blocks go to the KV cache with this mask.
    '''),
    code(r'''
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from dirl_min.masking import block_causal_mask, block_diffusion_mask, packed_rounds_mask


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
    '''),
    md(r'''
    ## The SFT layout `[x_t ; x_0]`

    To train every block in one forward, SFT feeds the noisy sequence `x_t` followed by a clean copy
    `x_0`, both with position ids `0..L-1` (length `2L`). For index `i`: half `h(i) = i ≥ L`,
    position `pos(i) = i − h(i)·L`, block `blk(i) = pos(i) // B`. Query `q` may attend key `k` iff (SPEC §2)

    1. `h(q) = h(k)` and `blk(k) = blk(q)` — inside a block, both halves;
    2. `q` noisy, `k` clean and `blk(k) < blk(q)` — a noisy block sees the earlier *clean* blocks;
    3. `q` clean, `k` clean and `blk(k) ≤ blk(q)` — the clean half is block-causal.

    Left: `block_diffusion_mask` as the library builds it. Right: the same picture coloured by which
    clause allows each entry, computed straight from the three formulas above.
    '''),
    code(r'''
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
    '''),
    md(r'''
    Reading the picture (rows are queries):

    * **Top-left (noisy → noisy), clause 1**: only the diagonal squares. A masked position sees its
      whole block — masked or not — and nothing of other noisy blocks. That is what it sees at decoding
      time: the working block, bidirectionally.
    * **Top-right (noisy → clean), clause 2**: the strictly lower block triangle. Noisy block `k` reads
      clean blocks `< k` — exactly the KV cache it will have when it is decoded.
    * **Bottom-right (clean → clean), clauses 1 + 3**: block-causal. The clean half *is* the
      block-causal pass that fills the cache.
    * **Bottom-left is empty**: clean queries never see noisy keys, so the clean half's hidden states do
      not depend on the noise at all. Checked below on the (random) tiny model: the clean half of the
      layout equals a plain block-causal forward over `x_0`, whatever `x_t` is.
    '''),
    code(r'''
    from dirl_min.forward import backbone_hidden

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
    '''),
    md(r'''
    ## Noise: `add_noise`

    One noise level per **example** (not per block): `t ~ U(0, 1)`, `p = (1 − ε)t + ε` with `ε = 1e-3`;
    each response position becomes `M` independently with probability `p`; if none was drawn, one is
    forced (every example then has a loss term). The prompt is never masked.

    `add_noise` draws `t` itself, one per row. To show chosen levels we draw many rows of the same
    example and pick the rows whose `t` is closest to 0.2, 0.5 and 0.9.
    '''),
    code(r'''
    from dirl_min.masking import add_noise

    eps = 1e-3
    rows = 4000
    noisy, is_masked, p = add_noise(x0.repeat(rows, 1), is_response.repeat(rows, 1), M, eps=eps,
                                    generator=torch.Generator().manual_seed(0))
    t = (p - eps) / (1 - eps)

    print("       ", in_blocks(glyphs(x0), B))
    for target in (0.2, 0.5, 0.9):
        r = int((t - target).abs().argmin())
        print(f"t={float(t[r]):.3f}", in_blocks(glyphs(noisy[r]), B),
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
    '''),
    md(r'''
    ## The `1/p` weight

    The SFT loss is `L = (1/N_resp) · Σ_{i masked} −log q(x0_i | x_t ; x_0) / p`. Why divide by `p`?
    A position is masked with probability `p`, so `E[Σ_masked nll_i] = p · Σ_i nll_i`. Dividing by `p`
    makes the expected loss of an example the *average* per-token NLL over **all** its response
    positions, the same for every noise level — each `t` estimates the same quantity (this is the
    masked-diffusion ELBO weighting). Without it, a row at `p = 0.9` would count nine times as much as one
    at `p = 0.1`.

    Below, a fixed made-up NLL per position of a 64-token response; for many `add_noise` rows we compute
    the loss with and without the weight and average it in bins of `p`.
    '''),
    code(r'''
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
    '''),
    md(r'''
    The weighted loss is flat in `p` (unbiased), the unweighted one grows linearly. The price is
    variance: at small `p` few positions are masked and each is multiplied by a large `1/p` (up to
    `1/ε = 1000`), and the forced single mask (when none was drawn) biases the lowest levels upward —
    the first bin. That is why the trainer draws `t ≥ sft.t_min` (default 0.1): it drops the noisiest
    levels.

    ## Checked live against the reference

    `reference/masking.py` builds each mask with a plain double loop over (query, key) that applies the
    SPEC's clauses literally and shares no code with `dirl_min.masking`. The core must agree on every
    size — including DiPO's packed layout `[x_t^1; …; x_t^R; x_0]` (notebook 03).
    '''),
    code(r'''
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
    '''),
    code(r'''
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
    ''', tags=["checks"]),
]

# ---------------------------------------------------------------------------------------------
# 02 — block decoding
# ---------------------------------------------------------------------------------------------

SHARP_MODEL = r'''
from dirl_min.model import build_tiny, chat_prompt_ids

# A random tiny model predicts almost uniformly (confidence ≈ 1/V), so every step would commit one
# token. Scaling an untied output head by 25 makes its predictions peaked, like a trained model's:
# confidences then spread over (0, 1) and several tokens can be committed in one step.
model, tok = build_tiny(block_size=4, seed=0, tie_word_embeddings=False)
with torch.no_grad():
    model.lm_head.weight.mul_(25.0)
model.eval()
B, M = model.config.block_size, model.config.mask_token_id
STOP = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
QUESTIONS = ["What is 3 + 4?", "What is 13 - 14?", "What is 20 + 7?", "What is 9 - 2?",
             "What is 15 + 15?", "What is 0 - 8?", "What is 11 + 6?", "What is 5 - 19?"]
PROMPTS = [chat_prompt_ids(tok, q) for q in QUESTIONS]
print("prompt lengths:", [len(p) for p in PROMPTS], "→ P mod B:", [len(p) % B for p in PROMPTS])
'''

NB02 = [
    md(r'''
    # 02 · Block decoding

    An autoregressive LM spends one forward per token. A block-diffusion LM decodes a block of `B`
    tokens in a few **denoising steps** (SPEC §3): each step forwards the `B` tokens of the working block
    — committed blocks are in the KV cache — proposes a token for every masked position, and
    **commits** some of them (the confident ones); the others stay `M` for the next step. When the block
    holds no `M`, its K/V enter the cache and the next block starts.

    This notebook runs the engine (`dirl_min.decoding.generate`, batched and KV-cached) on a tiny model,
    shows a rollout step by step, its `step_map`, the unmasking strategies, the tokens-per-step /
    threshold trade-off, the forward count with and without the fused commit, and checks the engine
    against the slow uncached reference decoder.
    '''),
    code(SETUP),
    code(SHARP_MODEL, GLYPHS),
    md(r'''
    Because of this sharpening trick the demos use a dynamic threshold of 0.6 instead of DiRL's 0.9: the
    toy model is less confident than a trained one (see the sweep below).

    ## One denoising step by hand

    The prompt's complete blocks are context; the first working block is the prompt's tail plus `M`s.
    Here the whole sequence is run with the block-causal mask (what the uncached reference does),
    then `propose` gives each masked position a candidate (greedy: the argmax) and its confidence (its
    probability), and `select_unmask` picks what to commit: with `low_confidence_dynamic`, the most
    confident position plus every one with confidence ≥ threshold.
    '''),
    code(r'''
    from dirl_min.decoding import generate, propose, select_unmask
    from dirl_min.forward import backbone_hidden
    from dirl_min.masking import block_causal_mask

    THRESHOLD = 0.6
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

    print("working block:", repr(glyphs(seq[lo:lo + B])))
    for j in range(B):
        if not masked[0, j]:
            print(f"  pos {lo + j}: given {glyphs([seq[lo + j]])!r} (the prompt's tail; never overwritten)")
            continue
        state = "COMMIT" if commit[0, j] else "stays M"
        print(f"  pos {lo + j}: candidate {glyphs([cand[0, j]])!r}  confidence {float(conf[0, j]):.3f}  {state}")
    '''),
    md(r'''
    ## A whole rollout, step by step

    `generate` records for every generated token the global, 1-based step that committed it
    (`step_map`) and its log-probability (`logp`). Replaying the `step_map` prints the working block
    after each step (█ = still masked). The engine's first step commits exactly the positions chosen by
    hand above.
    '''),
    code(r'''
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
        print(f"step {s:2d} | block {blk:2d} | {glyphs(state)} | committed {n_new}")
    print(f"\n{len(resp)} tokens in {out.num_steps(0)} steps: {out.tokens_per_step(0):.2f} tokens per step, "
          f"{out.num_forwards} forwards; text (cut at the first stop token): {out.text[0]!r}")

    first_step_matches_hand = [s == 1 for s in full_steps[lo:lo + B]] == commit[0].tolist()
    print("engine's step 1 == the hand-made step:", first_step_matches_hand)
    '''),
    md(r'''
    The output is gibberish — the weights are random — but the mechanics are those of a real model.
    Stopping is checked only on completed blocks, and the block that holds the stop token is kept whole.

    ## `step_map` as a heat map

    Several sampled sequences (temperature 1, top-k 20). Columns are absolute positions from the start of
    each sequence's first working block; the prompt-tail positions are given (0, white), lines mark
    blocks. Steps grow monotonically across blocks; inside a block the order is the model's choice —
    not left to right — and one step may fill several positions.
    '''),
    code(r'''
    import numpy as np

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
    ax.imshow(grid, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, int(v), ha="center", va="center", fontsize=7, color="w")
    for e in range(0, width + 1, B):
        ax.axvline(e - 0.5, color="k", lw=1)
    ax.set_xticks(range(0, width, B))
    ax.set_xlabel("position (from each sequence's first working block)")
    ax.set_ylabel("sequence")
    ax.set_title("step_map: the global step that committed each token")
    plt.show()
    print("tokens per step:", [round(sampled.tokens_per_step(i), 2) for i in range(len(sampled))])
    '''),
    code(r'''
    # step_map is monotone across blocks: every step of block k comes before every step of block k+1
    monotone = all(
        max(r[s:s + B]) < min(x for x in r[s + B:s + 2 * B] if x > 0)
        for r in rows for s in range(0, len(r) - B, B) if any(x > 0 for x in r[s + B:s + 2 * B])
    )
    print("step_map monotone across blocks:", monotone)
    '''),
    md(r'''
    ## Static vs dynamic unmasking

    * `low_confidence_static`: commit the `k = max(1, B // steps)` most confident positions each step —
      a fixed `steps` per block, whatever the model's confidence.
    * `low_confidence_dynamic` (DiRL): the most confident position plus all with confidence ≥ threshold;
      between 1 and `B` steps per block, chosen by the model's certainty.
    * `sequential`: the leftmost `k` masked positions (`B = steps` gives left-to-right decoding).
    '''),
    code(r'''
    settings = [("low_confidence_static", dict(steps=4)), ("low_confidence_static", dict(steps=2)),
                ("low_confidence_static", dict(steps=1)), ("sequential", dict(steps=4)),
                ("low_confidence_dynamic", dict(threshold=0.6)), ("low_confidence_dynamic", dict(threshold=0.9))]
    print(f"{'strategy':<24}{'setting':<16}{'tokens/step':>12}{'forwards':>10}")
    strategy_tps = {}
    for strategy, kw in settings:
        o = generate(model, PROMPTS, max_new_tokens=24, temperature=0.0, strategy=strategy, **kw)
        tps = sum(o.tokens_per_step(i) for i in range(len(o))) / len(o)
        strategy_tps[f"{strategy} {kw}"] = tps
        print(f"{strategy:<24}{str(kw):<16}{tps:>12.2f}{o.num_forwards:>10}")
    '''),
    md(r'''
    Static decoding with `steps = 2` commits two tokens per step, confident or not (only the partly
    given first block can need an odd step); dynamic decoding commits many tokens where the model is
    sure and one where it is not. (Without early stops,
    the forwards of a batch are the slowest sequence's steps.)

    ## Tokens per step against the threshold

    Tokens per step (TPS) = response tokens / distinct steps, in `[1, B]`. A lower threshold commits
    more per step (faster, riskier); above the model's highest confidences every step commits one token.
    (Even at threshold → 0 TPS stays a little below `B`: the first block holds only `B − P mod B` new
    tokens.)
    '''),
    code(r'''
    thresholds = [0.05, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99]
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
    '''),
    md(r'''
    ## KV cache and the fused commit

    A denoising step forwards only the working block (`B` tokens) against the cache; the block's own K/V
    are *not* kept, since it will change. Once the block is clean its K/V must enter the cache. Peer
    code spends an extra forward on that (a "cache pass"), so a block costs `steps + 1` forwards and
    tokens per forward can never exceed `B/2`. dirl_min **fuses** the pass with the first step of the
    next block: one `2B`-token forward, block-causal between the two blocks — exact, one forward saved
    per block (and the prompt's prefill rides along with the first step). `Rollout.num_forwards` counts
    model calls.
    '''),
    code(r'''
    one = [tok.encode("Hi there")]  # 8 tokens: two complete prompt blocks, so the unfused engine also pays a prefill
    rows_fwd = []
    for th in (0.6, 0.0):  # threshold 0: every step commits the whole block (the best case)
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
    '''),
    md(r'''
    At threshold 0 each block is one step: fused decoding reaches `B` tokens per forward, the unfused
    one is stuck at `B/2`.

    ## Cached == uncached, checked live

    `reference/decoding.py` decodes one sequence with plain loops and **no cache**: every step recomputes
    the whole sequence with a dense block-causal mask. Sampling noise is a hash of (seed, position, step,
    token), so the same seed gives the same draws in both. The engine — batched, cached, fused or not —
    must return the same tokens, the same `step_map` and the same `logp`.
    '''),
    code(r'''
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
    print("response:", repr(glyphs(ref_out["response_ids"])), "step_map:", ref_out["step_map"])
    '''),
    code(r'''
    # Checks: this notebook's claims, asserted (tests/test_notebooks.py reads CHECKS back).
    CHECKS = {
        "first_step_matches_hand": bool(first_step_matches_hand),
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
    assert CHECKS["step_map_monotone"] and CHECKS["tps_in_range"]
    assert CHECKS["tps_low_threshold"] > CHECKS["tps_high_threshold"] == 1.0
    assert CHECKS["static_k1_tps"] == 1.0 and 1.0 < CHECKS["static_k2_tps"] <= 2.0
    assert CHECKS["fused_saves_one_forward_per_block"]
    assert CHECKS["cached_equals_reference"] and CHECKS["max_logp_diff_vs_reference"] < 1e-4
    print(CHECKS)
    ''', tags=["checks"]),
]

# ---------------------------------------------------------------------------------------------
# 03 — DiPO
# ---------------------------------------------------------------------------------------------

NB03 = [
    md(r'''
    # 03 · DiPO: policy optimisation on denoising steps

    DiPO (SPEC §4) is GRPO/DAPO-style RL for a block-diffusion policy: sample `G` responses per prompt,
    reward them, normalise the rewards inside each group, and raise the log-probability of the tokens of
    above-average responses. The diffusion-specific part is *which* log-probability: a token was
    committed at some denoising step, seeing its block partly masked. DiPO scores each token **in that
    very context**, reconstructed from the rollout's `step_map`, so the trainer's `ℓ_j` equals the
    decoder's recorded `logp[j]` (the "unbiased" consistency invariant, checked live at the end).
    '''),
    code(SETUP),
    code(SHARP_MODEL, GLYPHS),
    md(r'''
    ## From `step_map` to step rounds

    In block `k` let `s_k(ρ)` be its `ρ`-th smallest distinct step. **Round** `ρ` shows every block as it
    was just *before* its `ρ`-th step — positions with `step ≥ s_k(ρ)` are `M` — and its **targets** are
    the tokens that step committed. All blocks share a round: a noisy block sees only itself and earlier
    *clean* blocks, so the blocks of one round do not interact. Rounds per response = the most distinct
    steps in any block (≤ `B`).
    '''),
    code(r'''
    from matplotlib.colors import ListedColormap
    import numpy as np

    from dirl_min.decoding import generate
    from dirl_min.dipo import step_rounds

    THRESHOLD = 0.6
    roll = generate(model, PROMPTS, max_new_tokens=16, temperature=1.0, top_k=10, threshold=THRESHOLD,
                    stop_token_ids=STOP, seeds=list(range(100, 100 + len(PROMPTS))))
    i = 0
    p, resp, smap = roll.prompt_ids[i], roll.response_ids[i], roll.step_map[i]
    full_steps = torch.tensor([0] * len(p) + smap)  # 0 = given (prompt)
    noisy, targets = step_rounds(full_steps, B)
    R = noisy.shape[0]
    x0 = torch.tensor(p + resp)
    start = (len(p) // B) * B  # show from the first generated block on
    print(f"{len(resp)} tokens, {roll.num_steps(i)} steps, {R} rounds; step_map: {smap}\n")
    print(f"{'x_0':<10}", in_blocks(glyphs(x0[start:]), B, start))
    for r in range(R):
        xt = torch.where(noisy[r], M, x0)
        print(f"{f'x_t^{r + 1}':<10}", in_blocks(glyphs(xt[start:]), B, start))
        print(f"{'  targets':<10}", in_blocks("".join("^" if t else " " for t in targets[r, start:].tolist()), B, start))

    state = np.zeros((R, len(x0) - start))  # 0 = clean context, 1 = masked, 2 = target
    for r in range(R):
        state[r] = (noisy[r, start:].int() + targets[r, start:].int()).numpy()
    fig, ax = plt.subplots(figsize=(10, 0.6 * R + 1.2))
    ax.imshow(state, cmap=ListedColormap(["#eeeeee", "#555555", "tab:red"]), vmin=0, vmax=2, aspect="auto")
    for (r, j), v in np.ndenumerate(state):
        ax.text(j, r, int(full_steps[start + j]), ha="center", va="center", fontsize=7,
                color="w" if v else "k")
    for e in range(0, state.shape[1] + 1, B):
        ax.axvline(e - 0.5 - (start % B), color="k", lw=1)
    ax.set_yticks(range(R), [f"round {r + 1}" for r in range(R)])
    ax.set_xticks(range(0, state.shape[1], B), range(start, len(x0), B))
    ax.set_xlabel("position (numbers: step_map; red = target, dark = masked, light = visible)")
    plt.show()

    every_token_once = bool((targets.sum(0) == (full_steps > 0).int()).all())
    print("every generated token is a target exactly once:", every_token_once)
    '''),
    md(r'''
    The rounds of one response share `x_0`, so they are packed into **one** forward,
    `[x_t^1; …; x_t^R; x_0]`: each noisy copy sees its own block and earlier clean blocks, never another
    noisy copy (`dirl_min.masking.packed_rounds_mask`, compared with the reference in notebook 01):
    '''),
    code(r'''
    from dirl_min.masking import packed_rounds_mask

    Rs, Ls = 3, 8
    mask = packed_rounds_mask(Rs, Ls, B)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(mask.numpy(), cmap=ListedColormap(["white", "tab:blue"]), interpolation="nearest")
    for c in range(1, Rs + 1):
        ax.axhline(c * Ls - 0.5, color="crimson", lw=2)
        ax.axvline(c * Ls - 0.5, color="crimson", lw=2)
    names = [f"x_t^{r + 1}" for r in range(Rs)] + ["x_0"]
    ax.set_xticks([c * Ls + Ls / 2 - 0.5 for c in range(Rs + 1)], names)
    ax.set_yticks([c * Ls + Ls / 2 - 0.5 for c in range(Rs + 1)], names)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(f"packed_rounds_mask(R={Rs}, L={Ls}, B={B})")
    plt.show()
    '''),
    md(r'''
    ## Group advantages and dynamic sampling

    Per prompt, `G` responses; `A_i = (r_i − mean_G) / (std_G + δ)` with the population std, and `A = 0`
    when the group's rewards are all equal. A group that is all-correct or all-wrong therefore has zero
    advantage everywhere and contributes **no gradient** — pure wasted compute. Dynamic sampling (DAPO)
    drops such groups and samples more prompts, at most `rl.sampling_rounds` times (a cap: peers without
    one loop forever when the model solves everything or nothing). A toy batch of 4 groups, `G = 4`,
    accuracy rewards:
    '''),
    code(r'''
    import reference.dipo as ref
    from dirl_min.dipo import filter_groups, group_advantages

    G = 4
    correct = torch.tensor([1., 0., 0., 0.,   1., 1., 0., 1.,   1., 1., 1., 1.,   0., 0., 0., 0.])
    adv = group_advantages(correct, G)
    keep = filter_groups(correct, G)
    for g in range(len(correct) // G):
        sl = slice(g * G, (g + 1) * G)
        print(f"group {g}: rewards {correct[sl].tolist()}  advantages {[round(a, 3) for a in adv[sl].tolist()]}"
              f"  sum {float(adv[sl].sum()):+.1e}  keep {bool(keep[g])}")

    adv_match = torch.allclose(adv, torch.tensor(ref.group_advantages(correct.tolist(), G)), atol=1e-6)
    keep_match = keep.tolist() == ref.filter_groups(correct.tolist(), G)
    print("advantages and filter == reference:", adv_match, keep_match)
    '''),
    md(r'''
    A single correct answer out of four (group 0) earns a large positive advantage; the three wrong ones
    share the negative mass. Groups 2 and 3 are dropped.

    ## The loss and its gradient

    Per target token `j` of response `i`: `ratio_j = exp(ℓ_j − ℓ_j^old)`,
    `surr_j = min(ratio_j·A_i, clip(ratio_j, 1−ε_low, 1+ε_high)·A_i)`, and `L = −(1/N_tok) Σ surr_j`
    (token mean over the batch, DAPO style). DiRL does one optimisation pass per batch, so
    `ℓ^old = stopgrad(ℓ)`, the ratio is exactly 1 and the clip is inactive; the gradient is then
    `∂L/∂ℓ_j = −A_i / N_tok` on every target and 0 elsewhere — REINFORCE with a group baseline,
    evaluated at the decoding contexts. Autograd confirms it:
    '''),
    code(r'''
    from dirl_min.dipo import dipo_loss

    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(2, 6, generator=g) * 3).requires_grad_()  # ℓ for 2 responses × 6 positions
    target_mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    advantages = torch.tensor([1.5, -0.5])
    loss, stats = dipo_loss(logp, logp.detach(), advantages, target_mask)
    loss.backward()
    n_tok = int(target_mask.sum())
    expected_grad = torch.where(target_mask, -advantages[:, None] / n_tok, torch.zeros(()))
    print(f"loss {float(loss.detach()):+.4f} (= −Σ A / N_tok = {float(-(advantages[:, None] * target_mask).sum() / n_tok):+.4f}),",
          f"stats {stats}")
    print("grad:\n", logp.grad)
    grad_is_minus_A_over_N = torch.allclose(logp.grad, expected_grad)
    print("grad == −A/N_tok on targets, 0 elsewhere:", grad_is_minus_A_over_N)

    ref_loss, _ = ref.dipo_loss(logp.tolist(), logp.tolist(), advantages.tolist(), target_mask.tolist())
    loss_matches_reference = abs(ref_loss - float(loss.detach())) < 1e-6
    print("loss == reference.dipo.dipo_loss:", loss_matches_reference)
    '''),
    md(r'''
    ## Clipping

    With more than one pass per batch (`rl.num_iterations > 1`) the ratio moves away from 1 and the clip
    matters. The curves are `dipo_loss` itself on one token (`ℓ^old = 0`, `ℓ = log ratio`), plotted as
    the surrogate `−L`, with its slope from autograd. For `A > 0` raising the ratio beyond `1 + ε_high`
    gains nothing (zero gradient); for `A < 0` lowering it below `1 − ε_low` gains nothing. The upper
    bound is the looser one (DAPO's "clip-higher", 0.28 vs 0.2): it leaves more room to raise
    the probability of unlikely tokens, which DAPO found keeps the policy's entropy from collapsing.
    '''),
    code(r'''
    EPS_LOW, EPS_HIGH = 0.2, 0.28
    ratios = torch.linspace(0.5, 1.6, 221)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    clip_zero_grad = True
    for ax, A in zip(axes, (1.0, -1.0)):
        surr, slope = [], []
        for r in ratios:
            l = torch.log(r).clone().requires_grad_()
            loss_1, _ = dipo_loss(l.view(1, 1), torch.zeros(1, 1), torch.tensor([A]), torch.ones(1, 1, dtype=torch.bool),
                                  eps_low=EPS_LOW, eps_high=EPS_HIGH)
            (g_l,) = torch.autograd.grad(-loss_1, l)
            surr.append(-float(loss_1))
            slope.append(float(g_l / r))  # d surr / d ratio = (d surr / d ℓ) / ratio
        surr, slope = torch.tensor(surr), torch.tensor(slope)
        ax.plot(ratios, surr, label="surrogate  min(r·A, clip(r)·A)")
        ax.plot(ratios, ratios * A, ":", color="0.5", label="unclipped  r·A")
        ax.plot(ratios, slope, "--", label="d surrogate / d ratio")
        for x in (1 - EPS_LOW, 1 + EPS_HIGH):
            ax.axvline(x, color="crimson", lw=0.8)
        ax.set_title(f"A = {A:+.0f}")
        ax.set_xlabel("ratio")
        ax.legend(fontsize=8)
        flat = ratios > 1 + EPS_HIGH if A > 0 else ratios < 1 - EPS_LOW
        edge = ((ratios - (1 - EPS_LOW)).abs() < 1e-3) | ((ratios - (1 + EPS_HIGH)).abs() < 1e-3)  # ties: skip
        clip_zero_grad &= bool((slope[flat & ~edge] == 0).all() and (slope[~flat & ~edge].abs() > 0).all())
    fig.tight_layout()
    plt.show()
    print("zero gradient exactly in the clipped region:", clip_zero_grad)
    '''),
    md(r'''
    ## The consistency invariant, checked live

    `dipo.rescore(model, rollout)` rebuilds every round from `step_map`, runs the packed layout and
    returns each generated token's log-probability. With the decoder's weights it must equal the
    `logp` recorded during decoding (untempered, untruncated softmax — the policy being trained), up to
    floating-point noise. Any mismatch of mask, positions, block grid or padding breaks it.
    '''),
    code(r'''
    from dirl_min.dipo import rescore

    with torch.no_grad():
        packed = rescore(model, roll)                 # one [x_t^1; …; x_t^R; x_0] row per response
        per_round = rescore(model, roll, packed=False)  # one [x_t^ρ ; x_0] row per round
    max_abs_diff = max(float((packed[k] - torch.tensor(roll.logp[k])).abs().max()) for k in range(len(roll)))
    packed_vs_rounds = max(float((packed[k] - per_round[k]).abs().max()) for k in range(len(roll)))
    n_scored = sum(len(x) for x in packed)
    print(f"{len(roll)} responses, {n_scored} tokens: max |rescore − recorded logp| = {max_abs_diff:.2e}; "
          f"packed vs per-round = {packed_vs_rounds:.2e}")
    '''),
    md(r'''
    The same numbers from the reference pieces only: `reference.dipo.step_rounds` (loops over blocks),
    `reference.masking.block_diffusion_mask` (loops over query/key pairs) and a plain forward of the
    backbone, one `[x_t^ρ ; x_0]` sequence per round — no `dirl_min` layout code involved.
    '''),
    code(r'''
    import reference.masking as ref_masking
    from dirl_min.forward import backbone_hidden


    def reference_rescore(k):
        p_k, r_k = roll.prompt_ids[k], roll.response_ids[k]
        steps_k = [0] * len(p_k) + roll.step_map[k]
        L = len(steps_k)
        x0_k = torch.tensor(p_k + r_k)
        nz, tg = ref.step_rounds(steps_k, B)
        mask = ref_masking.block_diffusion_mask(L, B)
        out = torch.zeros(L)
        for nz_r, tg_r in zip(nz, tg):
            xt = torch.where(torch.tensor(nz_r), M, x0_k)
            with torch.no_grad():
                h = backbone_hidden(model, torch.cat([xt, x0_k])[None], torch.arange(L).repeat(2)[None], mask[None, None])
                lp = torch.log_softmax(model.lm_head(h[0, :L]).float(), -1)
            for j in range(L):
                if tg_r[j]:
                    out[j] = lp[j, x0_k[j]]
        return out[len(p_k):]


    ref_diff = max(float((reference_rescore(k) - packed[k]).abs().max()) for k in range(len(roll)))
    rounds_match = all(
        [r.tolist() for r in step_rounds(torch.tensor([0] * len(roll.prompt_ids[k]) + roll.step_map[k]), B)]
        == list(ref.step_rounds([0] * len(roll.prompt_ids[k]) + roll.step_map[k], B))
        for k in range(len(roll))
    )
    print(f"max |reference rescore − dipo.rescore| = {ref_diff:.2e}; step_rounds == reference: {rounds_match}")
    '''),
    md(r'''
    The invariant has teeth: pretend every token of a response was committed in a single step (a wrong
    `step_map`) and the recomputed log-probabilities no longer match the recorded ones.
    '''),
    code(r'''
    import copy

    wrong = copy.deepcopy(roll)
    wrong.step_map = [[1] * len(s) for s in wrong.step_map]
    with torch.no_grad():
        wrong_scores = rescore(model, wrong)
    wrong_diff = max(float((wrong_scores[k] - torch.tensor(roll.logp[k])).abs().max()) for k in range(len(roll)))
    print(f"with a wrong step_map: max |rescore − recorded logp| = {wrong_diff:.2f}")
    '''),
    code(r'''
    # Checks: this notebook's claims, asserted (tests/test_notebooks.py reads CHECKS back).
    CHECKS = {
        "every_token_target_once": every_token_once,
        "step_rounds_match_reference": bool(rounds_match),
        "advantages_match_reference": bool(adv_match),
        "filter_matches_reference": bool(keep_match),
        "kept_groups": keep.tolist(),
        "grad_is_minus_A_over_N": bool(grad_is_minus_A_over_N),
        "loss_matches_reference": bool(loss_matches_reference),
        "clip_zero_grad": bool(clip_zero_grad),
        "max_abs_diff": max_abs_diff,
        "packed_vs_per_round": packed_vs_rounds,
        "reference_rescore_diff": ref_diff,
        "wrong_step_map_diff": wrong_diff,
        "rounds": int(R),
        "seconds": time.perf_counter() - T_START,
    }
    assert CHECKS["every_token_target_once"] and CHECKS["step_rounds_match_reference"]
    assert CHECKS["advantages_match_reference"] and CHECKS["filter_matches_reference"]
    assert CHECKS["kept_groups"] == [True, True, False, False]
    assert CHECKS["grad_is_minus_A_over_N"] and CHECKS["loss_matches_reference"] and CHECKS["clip_zero_grad"]
    assert CHECKS["max_abs_diff"] < 1e-4, "the consistency invariant is broken"
    assert CHECKS["packed_vs_per_round"] < 1e-5 and CHECKS["reference_rescore_diff"] < 1e-4
    assert CHECKS["wrong_step_map_diff"] > 1e-2 and CHECKS["rounds"] > 1
    print(CHECKS)
    ''', tags=["checks"]),
]

# ---------------------------------------------------------------------------------------------
# 04 — end to end
# ---------------------------------------------------------------------------------------------

NB04 = [
    md(r'''
    # 04 · End to end: SFT, then DiPO, on the embedded task

    `dirl_min.train.main(argv)` is the whole job — evaluate the base model, random-masking SFT (notebook
    01), evaluate, DiPO (notebooks 02–03), evaluate — and returns the summary dict. The embedded task is
    arithmetic (`What is a + b?`, `What is a - b?`, operands 0..20, 88 problems held out for
    evaluation); the model is the tiny Qwen3 from scratch, so it has to learn the answer format and the
    arithmetic itself.

    Here it runs with small step counts to finish in well under a minute on a busy 2-core CPU. The full
    default, `python -m dirl_min.train` (2200 SFT steps and 600 DiPO steps), takes several minutes.
    '''),
    code(SETUP),
    code(r'''
    import json

    import transformers

    from dirl_min.train import main, print_table

    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bars from the checkpoints

    RUN = pathlib.Path("runs") / "notebook04"  # relative to the notebook's folder (ignored by git)
    argv = [
        "--sft.steps", "150", "--sft.batch_size", "16",            # default 2200 × 32
        "--rl.steps", "20", "--rl.prompts_per_step", "8",          # default 600 × 16 (G = 8 responses each)
        "--eval.max_problems", "24", "--eval.samples", "4",        # default 88 × 16
        "--run.log_every", "2", "--run.threads", "1", "--run.out", str(RUN),
        "--overwrite",                                             # running the notebook again replaces its run
    ]
    t0 = time.perf_counter()
    summary = main(argv)
    run_seconds = time.perf_counter() - t0
    # main() switches matplotlib to Agg to write curves.png: show plots inline again
    %matplotlib inline
    print(f"\ntrain.main took {run_seconds:.0f} s (SFT {summary['sft_seconds']:.0f} s, DiPO {summary['rl_seconds']:.0f} s)")
    '''),
    md(r'''
    `--run.out` now holds `summary.json`, `metrics.jsonl` (one JSON row per logged step), TensorBoard
    events, `curves.png` and the final checkpoints. The curves below come from `metrics.jsonl`. The
    default reward is accuracy alone (`--rl.rewards`; DiRL's speed reward is one option), so the reward
    and accuracy curves coincide; the RL numbers are over the rollouts of each step (8 prompts × 8
    samples), not the held-out set.
    '''),
    code(r'''
    rows = [json.loads(line) for line in (RUN / "metrics.jsonl").read_text().splitlines() if line.strip()]
    sft = [r for r in rows if r["stage"] == "sft"]
    rl = [r for r in rows if r["stage"] == "rl"]

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    axes[0].plot([r["step"] for r in sft], [r["loss"] for r in sft], "o-", ms=3)
    axes[0].set_title("SFT loss (1/p-weighted, per response token)")
    axes[0].set_yscale("log")
    axes[1].plot([r["step"] for r in rl], [r["reward"] for r in rl], "o-", ms=4, label="reward")
    axes[1].plot([r["step"] for r in rl], [r["accuracy"] for r in rl], "s--", ms=3, label="accuracy")
    axes[1].set_title("DiPO rollouts: mean reward / accuracy")
    axes[1].legend()
    axes[2].plot([r["step"] for r in rl], [r["kept_fraction"] for r in rl], "o-", ms=3, label="kept groups")
    axes[2].plot([r["step"] for r in rl], [r["tokens_per_step"] / 4 for r in rl], "s-", ms=3, label="tokens per step / B")
    axes[2].set_title("dynamic sampling and decoding speed")
    axes[2].set_ylim(-0.05, 1.05)
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    plt.show()

    print(f"{'step':>5}{'reward':>8}{'acc':>7}{'kept':>7}{'ratio':>8}{'clip':>7}")
    for r in rl:
        print(f"{r['step']:>5}{r['reward']:>8.3f}{r['accuracy']:>7.3f}{r['kept_fraction']:>7.2f}"
              f"{r.get('ratio_mean', float('nan')):>8.3f}{r.get('clip_frac', float('nan')):>7.3f}")
    '''),
    md(r'''
    The summary table: evaluation of the base model, after SFT and after DiPO on the same held-out
    problems, accuracies in percent (`avg@k` = mean accuracy of the `k` samples at temperature 1, with
    its 95% bootstrap interval over problems, `greedy` = one greedy answer, `pass@k` = at least one of
    `k` correct, `tok/step` = tokens per denoising step, `length` = response tokens to the stop token,
    `trunc` = share that hit the length limit), and the paired RL − SFT gain with its interval.
    '''),
    code(r'''
    print(print_table(summary))
    '''),
    md(r'''
    ## What a run this short can and cannot show

    **It shows** that the pipeline works end to end, and the mechanics:

    * the SFT loss falls by about an order of magnitude in the first few dozen steps, then flattens
      (the format `\boxed{…}<|im_end|>` and the pad-filled last block are easy to learn), and the model
      stops running into the length limit (`trunc`);
    * the random base model commits one token per step (its confidences are all tiny), the SFT model
      commits several: confidence is learned, and the dynamic threshold turns it into speed;
    * DiPO is on-policy with one pass per batch: `ratio` is exactly 1 and `clip` 0 on every update
      (notebook 03); dynamic sampling keeps only groups with mixed outcomes — with an accuracy this
      low most groups are all-wrong and dropped, and a step with no kept group makes no update
      (`ratio` and `clip` are blank there).

    **It cannot show** that DiPO improves accuracy. Twenty RL steps on a model that is still mostly wrong
    give few usable groups, and `24 problems × 4 samples` measure accuracy to within several
    percentage points at best, so differences between the rows of the table are noise. For the real
    before/after comparison run the full default, `python -m dirl_min.train` (several minutes;
    `--help` lists every setting).
    '''),
    code(r'''
    # Checks: this notebook's claims, asserted (tests/test_notebooks.py reads CHECKS back).
    B = 4
    updates = [r for r in rl if "ratio_mean" in r]
    CHECKS = {
        "stages": [s for s in ("base", "sft", "rl") if s in summary],
        "sft_rows": len(sft),
        "rl_rows": len(rl),
        "sft_loss_first": sft[0]["loss"],
        "sft_loss_last": sft[-1]["loss"],
        "tps": {s: summary[s]["tokens_per_step"] for s in ("base", "sft", "rl")},
        "trunc": {s: summary[s]["truncation_rate"] for s in ("base", "sft", "rl")},
        "rl_updates": len(updates),
        "mean_kept_fraction": sum(r["kept_fraction"] for r in rl) / len(rl),
        "ratio_is_one": all(abs(r["ratio_mean"] - 1.0) < 1e-6 and r["clip_frac"] == 0.0 for r in updates),
        "run_seconds": run_seconds,
        "seconds": time.perf_counter() - T_START,
    }
    assert CHECKS["stages"] == ["base", "sft", "rl"]
    assert CHECKS["sft_rows"] == 150 // 2 and CHECKS["rl_rows"] == 20 // 2
    assert CHECKS["sft_loss_last"] < CHECKS["sft_loss_first"] / 5, "SFT did not learn"
    assert all(1.0 <= v <= B for v in CHECKS["tps"].values())
    assert CHECKS["tps"]["base"] == 1.0 and CHECKS["tps"]["sft"] > 1.0
    assert CHECKS["trunc"]["sft"] < CHECKS["trunc"]["base"]
    assert CHECKS["ratio_is_one"] and 0 < CHECKS["rl_updates"]
    assert CHECKS["mean_kept_fraction"] < 0.5
    print(CHECKS)
    ''', tags=["checks"]),
]

NOTEBOOKS = {
    "01_masks_and_noise.ipynb": NB01,
    "02_block_decoding.ipynb": NB02,
    "03_dipo.ipynb": NB03,
    "04_end_to_end.ipynb": NB04,
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` (a key of NOTEBOOKS), without outputs and with stable cell ids."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    stem = name.split("_")[0]
    for i, (kind, src, tags) in enumerate(NOTEBOOKS[name]):
        cell = nbformat.v4.new_markdown_cell(_clean(src)) if kind == "markdown" else nbformat.v4.new_code_cell(_clean(src))
        cell.id = f"nb{stem}-{i:02d}"  # stable ids: regenerating gives identical bytes
        if tags:
            cell.metadata["tags"] = list(tags)
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    """The exact text of the committed file."""
    text = nbformat.writes(build(name))
    return text if text.endswith("\n") else text + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    stale = []
    for name in NOTEBOOKS:
        path = HERE / name
        text = render(name)
        if check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8", newline="\n")
            print(f"wrote {path}")
    if stale:
        print("out of date (run python notebooks/build_notebooks.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
