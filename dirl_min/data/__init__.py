"""Data: the embedded arithmetic task (:mod:`~dirl_min.data.tasks`) and DiRL-format SFT / RL /
evaluation files (:mod:`~dirl_min.data.records`). A low layer: it imports only ``dirl_min.core``
and ``dirl_min.model``. This package re-exports the public names (so does ``dirl_min.tasks``).
"""

from dirl_min.data import records as _records
from dirl_min.data import tasks as _tasks
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

__all__ = [*_tasks.__all__, *_records.__all__]
