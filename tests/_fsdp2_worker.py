"""One rank of the 2-process FSDP2 test (tests/test_sharding.py), started by torch.distributed.run.

Accelerate 1.15 turns an FSDP config into plain data parallelism on CPU, so the model is
wrapped here by Accelerate's own FSDP2 function (``fsdp2_prepare_model``, as on GPU) over gloo.
Every rank also keeps an unsharded copy: the 1-process reference. Rank 0 writes results.json.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch


def prepare(model, rank):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    from dirl_min.model.forward import SelectedLogits

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["Qwen3DecoderLayer"],
        reshard_after_forward=True, state_dict_type="FULL_STATE_DICT")
    accel = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None, mixed_precision="no",
                            is_main_process=rank == 0, device=torch.device("cpu"))
    return fsdp2_prepare_model(accel, SelectedLogits(model))


def update(net, params, loss_fn, world):
    """backward(loss · world) (FSDP averages over ranks, as DDP), clip, one SGD step (linear in
    the gradient, so the comparison is not blurred by Adam's normalisation of tiny gradients)."""
    opt = torch.optim.SGD(params, lr=1.0)
    (loss_fn(net) * world).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main(out: Path):
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from dirl_min import tasks
    from dirl_min.settings.config import DecodeConfig
    from dirl_min.decoding import generate
    from dirl_min.model import build_tiny, save_model
    from dirl_min.infra.sharding import full_parameters, full_state_dict
    from dirl_min.trainer import (MicroBatch, PolicySettings, StepTotals, dipo_step, evaluate, rollout_and_reward,
                                  sft_loss, sft_noise, tokenize_sft)

    state = PartialState(cpu=True)
    rank, world = state.process_index, state.num_processes
    torch.set_num_threads(1)
    model, tok = build_tiny(seed=0)
    model.gradient_checkpointing_enable()  # the sharded update with layers replayed, against the plain one
    ref = copy.deepcopy(model)
    model.train(), ref.train()
    net = prepare(model, rank)
    res = {}

    # 1. Rollouts before any training forward, a different number of decoder forwards per rank.
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]][: 3 - 2 * rank]
    kw = dict(max_new_tokens=12 if rank == 0 else 4, temperature=1.0, seeds=list(range(len(prompts))))
    with full_parameters(net):
        mine = generate(model, prompts, **kw)
    plain = generate(ref, prompts, **kw)
    res["rollout_equal"] = gather_object([mine.response_ids == plain.response_ids and mine.step_map == plain.step_map])
    res["rollout_logp_diff"] = gather_object([max(abs(a - b) for x, y in zip(mine.logp, plain.logp) for a, b in zip(x, y))])
    res["forwards"] = gather_object([mine.num_forwards])

    # 2. One SFT step and one DiPO step, each rank on its share of the global batch.
    examples, _ = tokenize_sft(tasks.sft_records(tasks.arithmetic_problems()[:4], tok), tok, 4, 256)
    noise = sft_noise(examples, tok.mask_token_id, generator=torch.Generator().manual_seed(1))
    n_resp = sum(len(e.ids) - e.prompt_len for e in examples)

    def sft(ids):
        return lambda m: sft_loss(m, [examples[i] for i in ids], tok.mask_token_id, 4, noise.take(ids),
                                  num_response_tokens=n_resp)[0]

    mine_ids = list(range(rank, len(examples), world))
    update(net, list(net.parameters()), sft(mine_ids), world)
    update(ref, list(ref.parameters()), sft(list(range(len(examples)))), 1)
    problems = tasks.arithmetic_problems()[:2]
    roll, _, _, _ = rollout_and_reward(ref, tok, problems, group_size=2, prompt_template="{question}",
                                       decode_cfg=DecodeConfig(), temperature=1.0, top_k=0, top_p=1.0,
                                       max_new_tokens=8, rewards={"accuracy": 1.0}, seeds=[1, 2, 3, 4])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    n_tok = sum(len(r) for r in roll.response_ids)

    def dipo(ids):
        return lambda m: dipo_step(m, MicroBatch(roll, ids, adv[ids]), StepTotals(n_tok),
                                   PolicySettings(eps_low=0.2, eps_high=0.28))[0]

    update(net, list(net.parameters()), dipo(mine_ids), world)
    update(ref, list(ref.parameters()), dipo([0, 1, 2, 3]), 1)
    full = full_state_dict(model)  # on rank 0 (a collective: every rank calls it)
    if rank == 0:
        init, ref_sd = build_tiny(seed=0)[0].state_dict(), ref.state_dict()
        res["param_diff"] = max(float((full[k] - ref_sd[k]).abs().max()) for k in ref_sd)
        res["param_moved"] = max(float((ref_sd[k] - init[k]).abs().max()) for k in ref_sd)
        save_model(model, tok, out / "sharded", state_dict=full)
        save_model(ref, tok, out / "plain")

    # 3. Evaluation: problems sharded (rank 0 gets two, rank 1 one), results gathered.
    ev = dict(samples=2, temperature=1.0, top_k=0, top_p=1.0, greedy=True, max_new_tokens=8,
              decode_cfg=DecodeConfig(), prompt_template="{question}", seed=7, batch_size=2)
    eval_problems = tasks.arithmetic_problems()[4:7]
    with full_parameters(model):
        sharded = evaluate(model, tok, eval_problems, rank=rank, world=world, gather=gather_object, **ev)
    one = evaluate(ref, tok, eval_problems, **ev)
    res["eval_sharded"] = {k: v for k, v in sharded.items() if k != "seconds"}
    res["eval_one"] = {k: v for k, v in one.items() if k != "seconds"}
    if rank == 0:
        import dirl_min

        res["dirl_min"] = dirl_min.__file__  # the test checks that the workers ran the tree under test
        (out / "results.json").write_text(json.dumps(res, indent=2))
    state.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
