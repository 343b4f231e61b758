"""The optimizer every stage builds (optim.build_optimizer): AdamW with the fused kernel where torch has one."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from rlhf_cli.training.optim import build_optimizer

CFG = SimpleNamespace(lr=1e-2, betas=[0.9, 0.95], weight_decay=0.1)


def test_fused_adamw_on_cpu_takes_the_steps_of_the_reference_adamw():
    """Fused on CPU, for tensors and for param groups alike, and the same update as torch's default AdamW
    (the multi-tensor path) to fp32 rounding over several steps with weight decay."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    twin.load_state_dict(model.state_dict())
    initial = [p.detach().clone() for p in model.parameters()]
    ours = build_optimizer(model.parameters(), CFG)
    assert ours.defaults["fused"] is True
    assert build_optimizer([{"params": list(twin.parameters())}], CFG).defaults["fused"] is True
    reference = torch.optim.AdamW(twin.parameters(), lr=CFG.lr, betas=tuple(CFG.betas), weight_decay=CFG.weight_decay)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    for _ in range(5):
        for net, opt in ((model, ours), (twin, reference)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    for a, b, start in zip(model.parameters(), twin.parameters(), initial):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert (a - start).abs().max() > 1e-3  # five steps of lr 1e-2 moved every tensor


def test_frozen_parameters_are_left_out():
    model = torch.nn.Linear(4, 4)
    model.bias.requires_grad_(False)
    opt = build_optimizer(model.parameters(), CFG)
    assert [p for g in opt.param_groups for p in g["params"]] == [model.weight]
