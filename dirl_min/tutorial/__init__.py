"""The set-up every tutorial notebook (``notebooks/0*.py``) runs in its first cell."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

__all__ = ["setup"]


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


def sharpened_tiny(block_size: int = 4, seed: int = 0, scale: float = 25.0):
    """The tiny model with peaked predictions, for decoding demos; returns ``(model, tokenizer)``, in eval mode.

    A random tiny model predicts almost uniformly (confidence ≈ 1/V), so every decoding step would
    commit one token. Scaling an untied output head by ``scale`` makes its predictions peaked, like
    a trained model's: confidences then spread over (0, 1) and one step can commit several tokens.
    """
    import torch

    from dirl_min.model import build_tiny

    model, tok = build_tiny(block_size=block_size, seed=seed, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
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
