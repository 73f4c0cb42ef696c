"""Data: the embedded arithmetic task (:mod:`~dirl_min.data.tasks`) and DiRL-format SFT / RL /
evaluation files (:mod:`~dirl_min.data.records`). A low layer: it imports only ``dirl_min.core``
and ``dirl_min.model``. This package re-exports the public names (so does ``dirl_min.tasks``).
"""

from dirl_min.data.records import DataError, load_problems, load_records, load_sft, read_text
from dirl_min.data.tasks import (
    RESPONSE_STYLES,
    Problem,
    arithmetic_problems,
    render_prompt,
    sft_records,
    split_problems,
    worked_solution,
)

__all__ = [
    "Problem",
    "RESPONSE_STYLES",
    "arithmetic_problems",
    "split_problems",
    "sft_records",
    "worked_solution",
    "render_prompt",
    "DataError",
    "read_text",
    "load_records",
    "load_problems",
    "load_sft",
]
