"""FSDP2 on 2 CPU processes (gloo): no hang where ranks decode differently, the 1-process numbers.

Accelerate 1.15 runs an FSDP config as plain data parallelism on CPU, so the worker
(tests/_fsdp2_worker.py) wraps the model with Accelerate's own FSDP2 function, as on GPU.
A hang fails the test through the timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dirl_min.settings.config import Config
from tests.fixtures.tree import assert_in_tree, tree_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    worker = Path(__file__).with_name("_fsdp2_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(worker), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=tree_env(), cwd=out)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        log, _ = proc.communicate()
        pytest.fail("the 2-process FSDP2 run hung (killed after 240 s)\n" + log[-3000:])
    assert proc.returncode == 0, log[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert_in_tree(res["dirl_min"])
    return out, res


def test_rollouts_with_a_different_number_of_forwards_per_rank_match_the_unsharded_model(fsdp2_run):
    _, res = fsdp2_run
    assert res["forwards"][0] != res["forwards"][1]  # the case that hangs without a gather-once
    assert res["rollout_equal"] == [True, True]
    assert max(res["rollout_logp_diff"]) < 1e-5


def test_a_sharded_sft_and_dipo_update_equals_the_one_process_update(fsdp2_run):
    """Checkpointing on, each rank on half the batch, gradients reduce-scattered: the same step."""
    _, res = fsdp2_run
    assert res["param_moved"] > 1e-2
    assert res["param_diff"] < 1e-4 * res["param_moved"]  # float summation order only


def test_sharded_evaluation_gives_the_one_process_numbers(fsdp2_run):
    _, res = fsdp2_run
    assert res["eval_sharded"] == res["eval_one"]
    assert 0 < res["eval_one"]["mean_length"]


def test_the_gathered_state_dict_saves_the_trained_weights(fsdp2_run):
    from dirl_min.model import load_model

    out, _ = fsdp2_run
    sharded = load_model(out / "sharded")[0].state_dict()
    plain = load_model(out / "plain")[0].state_dict()
    assert sharded.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(sharded[k], plain[k], rtol=0, atol=1e-5, msg=k)


def _accel(kind: str, **plugin):
    from accelerate.utils import DistributedType

    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(**plugin), deepspeed_plugin=SimpleNamespace(**plugin))
    return SimpleNamespace(distributed_type=DistributedType[kind], state=state, num_processes=1)


@pytest.mark.parametrize("kind, plugin, overrides, message", [
    ("DEEPSPEED", {"zero_stage": 3}, {}, "ZeRO-3 is refused"),
    ("FSDP", {"fsdp_version": 1}, {}, "FSDP version 1"),
    ("FSDP", {"fsdp_version": 2}, {}, "two jobs"),  # the default runs SFT and DiPO in one job
    ("FSDP", {"fsdp_version": 2}, {"stages": ["rl"], "resume": True}, "optimizer shard"),
    ("FSDP", {"fsdp_version": 2}, {"stages": ["rl"], "backend": "lmdeploy"}, "local shards"),
    ("FSDP", {"fsdp_version": 2}, {"stages": ["rl"], "beta": 0.01}, "reference model"),
])
def test_untested_or_wrong_backend_combinations_are_refused(kind, plugin, overrides, message):
    from dirl_min.settings.checks import SettingsError, check_launch, launch_of

    cfg = Config()
    cfg.run.stages = overrides.get("stages", cfg.run.stages)
    cfg.run.resume = overrides.get("resume", False)
    cfg.rl.rollout_backend = overrides.get("backend", "native")
    cfg.rl.beta = overrides.get("beta", 0.0)
    with pytest.raises(SettingsError, match=message):
        check_launch(cfg, launch_of(_accel(kind, **plugin)))


@pytest.mark.parametrize("kind, plugin", [("DEEPSPEED", {"zero_stage": 2}), ("FSDP", {"fsdp_version": 2}),
                                          ("MULTI_GPU", {}), ("NO", {})])
def test_supported_backends_pass(kind, plugin):
    from dirl_min.settings.checks import LAUNCH_RULES, check_launch, launch_of

    cfg = Config()
    cfg.run.stages = ["rl"] if kind == "FSDP" else cfg.run.stages
    launch = launch_of(_accel(kind, **plugin))
    assert (launch.backend, launch.zero_stage, launch.fsdp_version) == (
        kind, plugin.get("zero_stage", 0), plugin.get("fsdp_version", 0))
    assert [m for rule in LAUNCH_RULES for m in rule(cfg, launch)] == []
    check_launch(cfg, launch)  # raises on any message
