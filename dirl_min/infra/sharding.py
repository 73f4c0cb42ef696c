"""Sharded parameters (FSDP2) around the parts of a job that are not one forward per rank.

Under FSDP2 every forward of a sharded unit all-gathers its parameters, a collective that
every rank must join. Training forwards are matched across ranks, but decoding is not: the
number of forwards depends on the sampled tokens (and evaluation may give a rank fewer
problems, or none). :func:`full_parameters` therefore gathers every unit's parameters once,
on all ranks together, and keeps them gathered while the decoder runs any number of forwards
with no collective at all; leaving it frees the gathered copies again.

Backends that cannot run on CPU (DeepSpeed needs CUDA; Accelerate 1.15 turns an FSDP config
into plain CPU data parallelism) are checked with the other settings
(:data:`dirl_min.settings.checks.LAUNCH_RULES`): combinations known to be wrong or never exercised
are refused with a clear message instead of hanging.
"""

from __future__ import annotations

from contextlib import contextmanager


__all__ = ["fsdp_states", "full_parameters", "full_state_dict"]


def fsdp_states(model) -> list:
    """The FSDP2 states (one per ``fully_shard`` call) of ``model``'s modules, outermost first."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch without FSDP2: nothing can be sharded
        return []
    states = {}
    for m in model.modules():
        st = fully_shard.state(m)
        if st is not None:
            states.setdefault(id(st), st)
    return list(states.values())


@contextmanager
def full_parameters(model):
    """Inside: every FSDP2 unit of ``model`` unsharded, forwards free of collectives. Call it
    on every rank (entering is one all-gather per unit); a no-op for unsharded models.

    ``model``: the outermost module (e.g. the prepared trainer module), or the causal LM inside
    it once the outer module has run (its units then lead to the root's).
    """
    states = fsdp_states(model)
    if not states:
        yield model
        return
    # The root must be initialised before any inner unit runs alone (FSDP2 otherwise makes the
    # first unit to run forward a root of its own); it then lists every unit of its tree.
    from torch.distributed.fsdp import fully_shard

    if (root := fully_shard.state(model)) is not None:
        root._lazy_init()
    if any(st._is_root is None for st in states):
        raise RuntimeError("full_parameters: FSDP2 has not initialised these units yet; pass the outermost "
                           "(prepared) module, whose first use makes it the root")
    states = list(states[0]._state_ctx.all_states)  # the root's units (embedding, norm) included
    groups = [g for st in states for g in _param_groups(st)]
    saved = [g.post_forward_mesh_info for g in groups]
    for g in groups:
        g.post_forward_mesh_info = None  # no reshard after each forward (the documented eval setting)
        g.lazy_init()
        g.unshard()
    for g in groups:
        g.wait_for_unshard()
    try:
        yield model
    finally:
        for g, info in zip(groups, saved):
            g.reshard()
            g.post_forward_mesh_info = info


def _param_groups(state) -> list:
    """An FSDP2 unit's parameter groups: a list from torch 2.12 on, one group (or None) before."""
    if hasattr(state, "_fsdp_param_groups"):
        return list(state._fsdp_param_groups)
    return [] if state._fsdp_param_group is None else [state._fsdp_param_group]


def full_state_dict(model) -> dict | None:
    """The full (unsharded) state dict of an FSDP2 model, on the CPU; ``None`` when ``model``
    is not sharded. A collective: call it on every rank."""
    if not fsdp_states(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
