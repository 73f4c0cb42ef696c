"""Gradient checkpointing: the same loss and gradients as without it, and layers really recomputed."""

from __future__ import annotations

import copy

import torch

from dirl_min.core.rounds import step_rounds
from dirl_min.engine.score import rounds_logp
from dirl_min.model.forward import SelectedLogits
from dirl_min.model import build_tiny


def _rounds_data(seed: int = 0, block: int = 4):
    """Two responses after a 4-token prompt, each with a random step map (several rounds)."""
    g = torch.Generator().manual_seed(seed)
    clean, noisy, targets = [], [], []
    for n_blocks in (3, 2):
        length = 4 + n_blocks * block
        steps = torch.cat([torch.zeros(4, dtype=torch.long),
                           torch.randint(1, 4, (n_blocks * block,), generator=g)])
        nz, tg = step_rounds(steps, block)
        clean.append(torch.randint(0, 90, (length,), generator=g))
        noisy.append(nz)
        targets.append(tg)
    return clean, noisy, targets


class _LayerCalls:
    """Counts decoder-layer bodies run (through their MLP), split into forward and backward: a
    replay is a run inside the backward pass. The MLP class is patched because module hooks do
    not fire when torch's checkpoint replays a layer."""

    def __init__(self, monkeypatch):
        from transformers.models.qwen3 import modeling_qwen3

        self.forward = self.backward = 0
        real = modeling_qwen3.Qwen3MLP.forward

        def counting(mlp, x):
            if torch._C._current_graph_task_id() != -1:
                self.backward += 1
            else:
                self.forward += 1
            return real(mlp, x)

        monkeypatch.setattr(modeling_qwen3.Qwen3MLP, "forward", counting)


def test_checkpointing_gives_the_same_loss_and_gradients_and_recomputes_every_layer(monkeypatch):
    model, tok = build_tiny(num_layers=3)
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable()
    clean, noisy, targets = _rounds_data()
    results = []
    calls = _LayerCalls(monkeypatch)
    for m in (model, ckpt):
        m.train()
        calls.forward = calls.backward = 0
        out = rounds_logp(SelectedLogits(m), clean, noisy, targets, tok.mask_token_id, 4)
        weights = torch.linspace(0.5, 1.5, len(out[0]))
        loss = -(out[0] * weights).sum()
        loss.backward()
        counts = (calls.forward, calls.backward)
        results.append((loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}, counts))
    (loss0, grads0, calls0), (loss1, grads1, calls1) = results
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=1e-5, atol=1e-7, msg=k)
    # two passes (the clean prefix, then the rounds against its K/V) through 3 layers
    assert calls0 == (6, 0)
    assert calls1 == (6, 6)  # every layer of both passes replayed


def test_the_main_job_trains_a_loaded_checkpoint_in_train_mode_with_checkpointing(tmp_path, monkeypatch):
    """load_model returns eval mode; the job must switch to train mode or transformers never
    checkpoints. Checkpointing on: layers replayed in the backward pass, same weights as off."""
    from dirl_min import train
    from dirl_min.model import load_model, save_model

    model, tok = build_tiny(seed=0)
    save_model(model, tok, tmp_path / "init")
    calls = _LayerCalls(monkeypatch)
    args = ["--model.path", str(tmp_path / "init"), "--eval.max_problems", "1", "--eval.samples", "1",
            "--eval.greedy", "false", "--eval.max_new_tokens", "4", "--sft.steps", "2", "--sft.batch_size", "4",
            "--sft.warmup_steps", "1", "--run.stages", "sft"]
    train.main([*args, "--out", str(tmp_path / "off")])
    assert calls.backward == 0 and calls.forward > 0
    train.main([*args, "--out", str(tmp_path / "on"), "--model.gradient_checkpointing", "true"])
    assert calls.backward > 0  # layers replayed in the backward pass
    off = load_model(tmp_path / "off" / "checkpoints" / "sft-final" / "model")[0].state_dict()
    on = load_model(tmp_path / "on" / "checkpoints" / "sft-final" / "model")[0].state_dict()
    init = model.state_dict()
    assert any(not torch.equal(off[k], init[k]) for k in off)
    for k in off:
        torch.testing.assert_close(on[k], off[k], rtol=1e-5, atol=1e-6, msg=k)
