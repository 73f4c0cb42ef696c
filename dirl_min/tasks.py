"""Re-export of :mod:`dirl_min.data` (the public names ``dirl_min.tasks.*``): the embedded
arithmetic task and its split (:mod:`dirl_min.data.tasks`), DiRL-format SFT / RL files with
clear errors (:mod:`dirl_min.data.records`)."""

from dirl_min.data import (  # noqa: F401
    RESPONSE_STYLES,
    DataError,
    Problem,
    __all__,
    arithmetic_problems,
    load_problems,
    load_records,
    load_sft,
    read_text,
    render_prompt,
    sft_records,
    split_problems,
    worked_solution,
)
