"""What the tutorial notebooks (``notebooks/0*.py``) share: the set-up of their first cell, a briefly
trained tiny model, printing helpers and the pictures (matplotlib, imported inside each function)."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

__all__ = ["setup", "trained_tiny", "glyphs", "in_blocks", "DEMO_QUESTIONS", "masking_picture", "draw_mask",
           "confidence_bars", "decode_timeline", "timeline_legend", "step_map_heatmap", "rounds_picture",
           "objective_views_figure"]


def setup() -> tuple[Path, float]:
    """Prepare a notebook's kernel; returns ``(repository root, time.perf_counter() at the start)``.

    * one torch thread: the tensors are tiny, so one thread is fastest and leaves the other
      cores alone;
    * tqdm's "IProgress not found" warning silenced (progress bars without ipywidgets);
    * the repository on ``sys.path``: ``reference/`` (slow, loop-by-loop implementations written
      straight from the SPEC) lives next to the package and is not installed. With an editable
      install the repository is the package's parent; otherwise the notebook is assumed to be
      opened from ``notebooks/``, so it is the working directory's parent.
    """
    import torch

    import dirl_min

    warnings.filterwarnings("ignore", message="IProgress not found")
    torch.set_num_threads(1)
    root = Path(dirl_min.__file__).resolve().parents[1]
    if not (root / "reference").is_dir():
        root = Path.cwd().parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root, time.perf_counter()


def trained_tiny(steps: int = 150, batch_size: int = 16, seed: int = 0, block_size: int = 4):
    """The tiny model after a short random-masking SFT on the embedded task; returns ``(model, tokenizer)``, eval mode.

    A random model predicts almost uniformly, so decoding demos on it show nothing of the
    threshold rule. ``steps`` SFT steps (the trainer's loss and learning-rate schedule, every problem
    of :func:`dirl_min.data.arithmetic_problems` at its defaults, whatever size the task has) take a
    few seconds on one CPU thread and give real confidences and ``\\boxed{}`` answers — mostly wrong
    ones: the arithmetic itself needs the full run (notebook 04).

    The weights are cached in the temporary directory, keyed by every input (settings, the SFT
    records, the torch version), so the notebooks of one test run train it once.
    """
    import hashlib
    import os
    import tempfile

    import torch

    from dirl_min.data import arithmetic_problems, sft_records
    from dirl_min.loops.sft import sft_loss, sft_noise, tokenize_sft
    from dirl_min.loops.state import EpochSampler, make_scheduler
    from dirl_min.model import build_tiny

    model, tok = build_tiny(block_size=block_size, seed=seed)
    B, M = model.config.block_size, model.config.mask_token_id
    records = sft_records(arithmetic_problems(), tok)
    key = hashlib.sha256(repr((steps, batch_size, seed, block_size, records, torch.__version__)).encode()).hexdigest()
    cache = Path(tempfile.gettempdir()) / "dirl_min_tutorial" / f"trained_tiny_{key[:16]}.pt"
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval(), tok
    examples, _ = tokenize_sft(records, tok, B, max_len=2048)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.01)  # sft.* defaults
    sched = make_scheduler(opt, min(20, steps // 5), steps, 0.1)
    noise, sampler = torch.Generator().manual_seed(seed + 1), EpochSampler(examples, seed + 2)
    model.train()
    for _ in range(steps):
        batch = sampler.take(batch_size)
        n_resp = sum(len(e.ids) - e.prompt_len for e in batch)
        drawn = sft_noise(batch, M, t_min=0.1, generator=noise)
        loss, _ = sft_loss(model, batch, M, B, drawn, num_response_tokens=n_resp)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, cache)  # atomic: a notebook running beside this one reads a whole file or none
    return model.eval(), tok


#: the eight questions of the decoding demos (notebooks 02 and 03): prompt lengths that are not all
#: multiples of the block size, answers from -11 to 30
DEMO_QUESTIONS = ("What is 3 + 4?", "What is 13 - 14?", "What is 20 + 7?", "What is 9 - 2?",
                  "What is 15 + 15?", "What is 0 - 8?", "What is 11 + 6?", "What is 5 - 19?")

#: how :func:`glyphs` prints the special tokens and the newline
GLYPH = {"<|im_start|>": "⟨", "<|im_end|>": "⟩", "<|endoftext|>": "∎", "<|MASK|>": "█", "\n": "⏎"}


def glyphs(tokenizer, ids) -> str:
    """One character per token of the tiny (character-level) tokenizer: ⟨ ⟩ = <|im_start|> <|im_end|>,
    ∎ = <|endoftext|>, █ = mask, ⏎ = newline. ``ids``: ints or an int64 ``[T]`` tensor."""
    return "".join(GLYPH.get(t, t) for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids]))


def in_blocks(text: str, block_size: int, start: int = 0) -> str:
    """``text`` (one character per position, the first at position ``start``) with a bar at every
    block boundary; blocks are aligned to absolute position 0."""
    B = block_size
    return "|".join(text[max(0, s - start):s - start + B] for s in range((start // B) * B, start + len(text), B))


# ---- pictures (matplotlib is imported inside each, so the package does not depend on it) ----------------

def _cells(ax, state, colours, text=None, text_dark=None, B=None, offset=0):
    """Draw an int ``[rows, cols]`` state grid with one colour per code, optional per-cell text
    (``text[r][c]``; '' = none), and block lines every ``B`` columns starting ``offset`` columns in."""
    import numpy as np
    from matplotlib.colors import ListedColormap

    state = np.asarray(state)
    ax.imshow(state, cmap=ListedColormap(colours), vmin=0, vmax=len(colours) - 1, aspect="auto",
              interpolation="nearest")
    if text is not None:
        for (r, c), v in np.ndenumerate(state):
            if text[r][c] != "":
                ax.text(c, r, text[r][c], ha="center", va="center", fontsize=7,
                        color="k" if text_dark is None or v in text_dark else "w")
    if B:
        for e in range(offset, state.shape[1] + 1, B):
            ax.axvline(e - 0.5, color="k", lw=0.8)


def masking_picture(tokenizer, x0, is_response, levels=(0.0, 0.3, 0.7, 1.0), seed=0, B=None, start=0):
    """The forward (noising) process on one example and decoding as its reverse; returns the figure.

    One uniform draw ``u_i`` per response position, masked at level ``t`` iff ``u_i < t``: the
    masks are nested, so the rows read top to bottom as one noising path and bottom to top as
    one denoising path. ``x0``: int64 ``[L]``; ``is_response``: bool ``[L]``; with ``B``, block
    lines are drawn, ``x0[0]`` being at absolute position ``start``."""
    import matplotlib.pyplot as plt
    import torch

    u = torch.rand(len(x0), generator=torch.Generator().manual_seed(seed))
    chars = glyphs(tokenizer, x0)
    state, text = [], []
    for t in levels:
        masked = is_response & (u < t)
        state.append(torch.where(~is_response, 0, torch.where(masked, 2, 1)).tolist())
        text.append(["█" if m else ch for ch, m in zip(chars, masked.tolist())])
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(levels) + 1.3))
    _cells(ax, state, ["#9ecae1", "#f0f0f0", "#404040"], text, text_dark={0, 1}, B=B, offset=(-start) % (B or 1))
    ax.set_yticks(range(len(levels)), [f"t = {t:g}" for t in levels])
    ax.set_xticks([])
    ax.set_xlabel("position (blue = prompt, never masked; light = response token; dark = mask █; lines = blocks)")
    kw = dict(xycoords="axes fraction", textcoords="axes fraction", fontsize=9, va="center")
    ax.annotate("", xy=(1.02, 0.05), xytext=(1.02, 0.95), arrowprops=dict(arrowstyle="->", color="crimson"), **kw)
    ax.annotate("noise (training)", xy=(1.03, 0.5), xytext=(1.03, 0.5), color="crimson", rotation=-90, **kw)
    ax.annotate("", xy=(1.09, 0.95), xytext=(1.09, 0.05), arrowprops=dict(arrowstyle="->", color="tab:green"), **kw)
    ax.annotate("denoise (decoding)", xy=(1.10, 0.5), xytext=(1.10, 0.5), color="tab:green", rotation=-90, **kw)
    ax.set_title("masking is the noise; decoding runs it backwards")
    fig.tight_layout()
    return fig


def draw_mask(ax, mask, B, L, title, copies=1, colours=("white", "tab:blue")):
    """Draw an attention mask (rows = queries): ticks at block centres, thin lines at block
    edges, thick lines between the ``copies`` of a layout of ``copies · L`` positions."""
    import numpy as np
    from matplotlib.colors import ListedColormap

    n = mask.shape[0]
    ax.imshow(np.asarray(mask, dtype=float), cmap=ListedColormap(list(colours)), vmin=0, vmax=len(colours) - 1,
              interpolation="nearest")
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


def confidence_bars(ax, confidence, labels, threshold, commit):
    """One bar per masked position of a step: its confidence, coloured by whether it is committed,
    against the threshold line. ``labels``: one string per bar (position and candidate)."""
    colours = ["tab:red" if c else "0.6" for c in commit]
    ax.bar(range(len(confidence)), confidence, color=colours)
    ax.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold}")
    ax.set_xticks(range(len(confidence)), labels)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("confidence (probability of the candidate)")
    ax.legend(handles=[*ax.get_legend_handles_labels()[0], _patch("tab:red", "committed"),
                       _patch("0.6", "stays masked")], fontsize=8, loc="lower right")


def _patch(colour, label):
    from matplotlib.patches import Patch

    return Patch(color=colour, label=label)


#: the states of :func:`decode_timeline`, in colour order
TIMELINE = ("not yet written", "in the KV cache", "K/V written to the cache by this forward",
            "working block: masked", "working block: committed by this forward",
            "working block: given (prompt tail) or committed earlier")


def decode_timeline(ax, full_steps, B, first=0, chars=None):
    """Forward by forward, what the fused engine holds for one sequence (rows = forwards,
    columns = positions from ``first``). ``full_steps``: int ``[L]``, 0 for the prompt, else the
    1-based step that committed the token. With the fused commit, forward ``f`` is step ``f``,
    and the first step of a block also writes the previous clean block (or, at forward 1, the
    prompt's complete blocks) into the cache. ``chars``: one glyph per position, printed on the
    cells that hold a token."""
    import numpy as np

    steps = np.asarray(full_steps)
    L, n = len(steps), int(steps.max())
    state = np.zeros((n, L), dtype=int)
    blk_of = np.arange(L) // B
    cached_upto = 0  # positions [0, cached_upto) are in the cache before this forward
    for f in range(1, n + 1):
        k = int(blk_of[np.argmax(steps == f)])
        lo, hi = k * B, min((k + 1) * B, L)
        state[f - 1, :cached_upto] = 1
        state[f - 1, cached_upto:lo] = 2
        work = steps[lo:hi]
        state[f - 1, lo:hi] = np.where(work == f, 4, np.where((work > 0) & (work < f), 5,
                                       np.where(work == 0, 5, 3)))
        cached_upto = lo
    text = None if chars is None else [[chars[first + j] if v not in (0, 3) else "" for j, v in enumerate(row)]
                                        for row in state[:, first:]]
    _cells(ax, state[:, first:], ["white", "#d9d9d9", "tab:blue", "#404040", "tab:red", "#fcbba1"],
           text, text_dark={1, 5}, B=B, offset=(-first) % B)
    ax.set_yticks(range(n), [f"forward {f}" for f in range(1, n + 1)], fontsize=7)
    ax.set_xticks(range(0, L - first, B), range(first, L, B))
    ax.set_xlabel("position")
    return state


def timeline_legend(fig):
    colours = ["white", "#d9d9d9", "tab:blue", "#404040", "tab:red", "#fcbba1"]
    fig.legend(handles=[_patch(c, s) for c, s in zip(colours, TIMELINE)][1:], loc="lower center", ncol=3,
               fontsize=8, frameon=False)


def step_map_heatmap(ax, grid, B):
    """``grid``: float ``[rows, cols]`` of steps (NaN = given or past the end). Numbers are black
    on light cells and white on dark ones."""
    import numpy as np

    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    top = np.nanmax(grid)
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, int(v), ha="center", va="center", fontsize=7, color="k" if v > 0.6 * top else "w")
    for e in range(0, grid.shape[1] + 1, B):
        ax.axvline(e - 0.5, color="k", lw=1)
    ax.set_xticks(range(0, grid.shape[1], B))
    return im


def rounds_picture(noisy, targets, full_steps, B, start):
    """DiPO's rounds of one response: one row per round, from position ``start`` (a block start)
    on. ``noisy``, ``targets``: bool ``[R, L]``; ``full_steps``: int ``[L]``. Returns the figure."""
    import matplotlib.pyplot as plt

    R = noisy.shape[0]
    state = (noisy[:, start:].int() + targets[:, start:].int()).numpy()  # 0 visible, 1 masked, 2 target
    steps = full_steps[start:].tolist()
    text = [[str(s) if s else "" for s in steps] for _ in range(R)]
    fig, ax = plt.subplots(figsize=(10, 0.6 * R + 1.4))
    _cells(ax, state, ["#eeeeee", "#555555", "tab:red"], text, text_dark={0}, B=B)
    ax.set_yticks(range(R), [f"round {r + 1}" for r in range(R)])
    ax.set_xticks(range(0, state.shape[1], B), range(start, start + state.shape[1], B))
    ax.set_xlabel("position (numbers: step_map; red = target, dark = masked, light = visible)")
    return fig


#: the cell codes of :func:`objective_views_figure`, in colour order
VIEW_STATES = ("prompt", "visible response token", "masked (M)", "masked and read (target)")


def objective_views_figure(views: dict, steps, prompt_len: int, first: int, B: int, M: int):
    """Per objective, the context row and the noisy copies of one response (rows), from position
    ``first`` (a block start). ``views``: name -> a view with ``context`` int64 ``[L]``, ``noisy``
    and ``targets`` bool ``[R, L]``; ``steps``: int ``[L]`` decoding steps (0 = prompt)."""
    import matplotlib.pyplot as plt
    import torch

    colours = ["#9ecae1", "#e5e5e5", "#525252", "tab:red"]
    heights = [1 + len(v.noisy) for v in views.values()]
    fig, axes = plt.subplots(len(views), 1, figsize=(10, 0.4 * sum(heights) + 2.2),
                             gridspec_kw={"height_ratios": heights}, sharex=True)
    for ax, (name, v) in zip(axes, views.items()):
        rows = torch.stack([v.context] + [v.context.masked_fill(nz, M) for nz in v.noisy])
        state = torch.where(torch.arange(rows.shape[1]) < prompt_len, 0, 1).repeat(len(rows), 1)
        state[rows == M] = 2
        state[1:][v.targets] = 3
        state = state[:, first:]
        text = [[str(int(s)) if j + first >= prompt_len else "" for j, s in enumerate(steps[first:])]] * len(rows)
        _cells(ax, state, colours, text, text_dark={0, 1}, B=B)
        ax.axhline(0.5, color="k", lw=2)
        ax.set_yticks(range(len(rows)), ["context"] + [f"copy {r}" for r in range(1, len(rows))], fontsize=8)
        ax.set_title(f"{name}: {len(rows) - 1} noisy cop{'y' if len(rows) == 2 else 'ies'}", fontsize=9, loc="left")
    axes[-1].set_xticks(range(0, state.shape[1], B), range(first, first + state.shape[1], B))
    axes[-1].set_xlabel(f"position (blocks of {B}; the first {first} prompt positions are not drawn; "
                        "numbers: the decoding step of each response token)", fontsize=8)
    fig.legend(handles=[_patch(c, s) for c, s in zip(colours, VIEW_STATES)], loc="lower center", ncol=4,
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig
