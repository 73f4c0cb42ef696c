"""What the rows of one model size share, and the small formatting helpers of the table."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from dirl_min.engine.decode import generate


def _fmt_rate(x: float) -> str:
    return f"{x:,.1f} tok/s" if x < 1000 else f"{x:,.0f} tok/s"


def _fmt_s(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"  · {msg}", file=sys.stderr, flush=True)


@dataclass
class Bench:
    """One model size under test: its model and tokenizer, the prompts, the command's settings
    (``cfg``: :class:`dirl_min.settings.commands.BenchCommand`) and the decoding options of rows 1-5 (``dec``)."""

    size: str
    cfg: Any
    model: Any
    tok: Any
    prompts: list[list[int]]
    dec: dict[str, Any]

    @property
    def B(self) -> int:
        return self.cfg.model.block_size

    @property
    def p0(self) -> list[int]:
        return self.prompts[0]

    @property
    def n_new(self) -> int:
        return self.cfg.decode.new_tokens

    @property
    def warm_new(self) -> int:
        return 2 * self.B  # warm-ups decode two blocks

    def log(self, m: str) -> None:
        _log(f"[{self.size}] {m}", self.cfg.run.quiet)

    def gen(self, prompt_list, n, **kw):
        """A closure decoding ``prompt_list`` to ``n`` new tokens with ``dec`` updated by ``kw``."""
        opts = {**self.dec, **kw}
        return lambda: generate(self.model, prompt_list, max_new_tokens=n, seeds=list(range(len(prompt_list))),
                                **opts)
