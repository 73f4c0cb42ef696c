"""One training step = one optimizer step, with the same collective calls on every process.

Two rules for the loops in :mod:`dirl_min.train`:

* A step's micro-batches accumulate into one update on every Accelerate backend.
  Accelerate's DeepSpeed wrapper runs ``engine.step()`` inside ``backward`` whenever
  ``sync_gradients`` is true, so :func:`backward_micro` keeps it false until the step's
  last micro-batch (an explicit accumulation boundary: DiPO's micro-batch count varies
  from step to step, a fixed accumulation count cannot describe it).
* Anything that decides how many forwards, backwards or collectives a process runs is
  computed from every process's values (:func:`all_ranks`), never from one process's own.
"""

from __future__ import annotations

from contextlib import nullcontext

__all__ = ["all_ranks", "backward_micro", "equal_micro_batches"]


def all_ranks(accel, value) -> list:
    """``[value of process 0, value of process 1, …]`` on every process (picklable ``value``).

    A collective: every process must call it, in the same order.
    """
    if accel.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def backward_micro(accel, model, loss, *, last: bool) -> None:
    """Backward of one micro-batch whose loss is normalised for the whole global step.

    The losses of a step's micro-batches, summed over micro-batches and processes, are the
    step's loss; so the gradients must add up. Data-parallel backends average over processes
    and Accelerate (or DeepSpeed's engine) divides by its accumulation count: the factor
    ``num_processes · gradient_accumulation_steps`` undoes both. Gradients are synchronised,
    and under DeepSpeed the optimizer steps, only when ``last`` is true.
    """
    scale = accel.num_processes * accel.gradient_accumulation_steps
    accel.sync_gradients = last
    try:
        with nullcontext() if last else accel.no_sync(model):
            accel.backward(loss * scale)
    finally:
        accel.sync_gradients = True  # Accelerate's optimizer wrapper skips step() while it is false


def equal_micro_batches(micro: list, count: int, filler) -> list[tuple]:
    """``micro`` tagged ``(…, True)``, then ``count - len(micro)`` copies of ``(*filler, False)``.

    Every process must run the same number of forwards and backwards (DDP and ZeRO reduce
    in each backward; ZeRO-3 and FSDP gather parameters in each forward): a process with
    fewer micro-batches than ``count`` (the largest over processes) runs ``filler``, a real
    micro-batch whose loss the caller multiplies by zero.
    """
    if count < len(micro):
        raise ValueError(f"count={count} is below this process's {len(micro)} micro-batches")
    return [(*m, True) for m in micro] + [(*filler, False)] * (count - len(micro))
