"""The warm-up + cosine LR schedule against its closed form, and how the stages fill in the run's length."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from sdlight.optim import WarmupCosine, warmup_cosine
from sdlight.optim import build_scheduler


def lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def optimizer(lr: float = 2.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize("final", [0.0, 0.1])
def test_warmup_cosine_matches_closed_form(final):
    warmup, total, lr = 4, 14, 2.0
    got = lrs(warmup_cosine(optimizer(lr), warmup_steps=warmup, total_steps=total, final_factor=final), 20)
    for n, value in enumerate(got):
        if n < warmup:
            expected = lr * (n + 1) / warmup
        else:
            progress = min((n - warmup) / (total - warmup), 1.0)
            expected = lr * (final + (1 - final) * (1 + math.cos(math.pi * progress)) / 2)
        assert value == pytest.approx(expected, abs=1e-12), n
    assert got[warmup] == pytest.approx(lr)                               # the peak, right after the warm-up
    assert got[warmup + 5] == pytest.approx(lr * (1 + final) / 2)         # half-way down
    assert got[total:] == pytest.approx([lr * final] * (20 - total))     # held at the end


def test_warmup_cosine_arguments_are_checked():
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine(optimizer(), warmup_steps=10)
    with pytest.raises(ValueError, match="total_steps >= 1"):
        WarmupCosine(10, 0)


def test_a_run_shorter_than_its_warmup_only_warms_up():
    factor = WarmupCosine(warmup_steps=100, total_steps=3)  # e.g. fast_dev_run on a config with a long warm-up
    assert [factor(n) for n in range(3)] == pytest.approx([0.01, 0.02, 0.03])


def test_build_scheduler_fills_in_the_run_length_only_where_unset():
    filled = build_scheduler(partial(warmup_cosine, warmup_steps=0), optimizer(1.0), 10.0)
    assert filled.lr_lambdas[0].total_steps == 10
    kept = build_scheduler(partial(warmup_cosine, total_steps=6), optimizer(1.0), 10.0)
    assert kept.lr_lambdas[0].total_steps == 6
    other = build_scheduler(partial(torch.optim.lr_scheduler.LinearLR, start_factor=0.5, total_iters=2),
                            optimizer(1.0), 10.0)
    assert isinstance(other, torch.optim.lr_scheduler.LinearLR)
    with pytest.raises(ValueError, match="max_steps"):
        build_scheduler(partial(warmup_cosine), optimizer(1.0), float("inf"))


# ------------------------------------------------------------------------------------ the optimizers' CPU kernel
def _params(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(7, 5, dtype=dtype)), torch.nn.Parameter(torch.randn(5, dtype=dtype))]


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_build_optimizer_fuses_adam_left_at_torchs_choice_on_the_cpu(cls):
    from sdlight.optim import build_optimizer

    params = _params()
    groups = [{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}]
    fused = build_optimizer(partial(cls, lr=1e-2, foreach=None, fused=None), iter(groups))  # an iterator, too
    assert fused.defaults["fused"] is True and len(fused.param_groups) == 2
    # the fused kernel takes the same step as torch's per-parameter loop
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loop = cls([{"params": twins[:1]}, {"params": twins[1:], "weight_decay": 0.0}], lr=1e-2, foreach=False)
    for opt, ps in ((fused, params), (loop, twins)):
        for step in range(3):
            for p in ps:
                p.grad = torch.full_like(p, 0.1 * (step + 1)) + p.detach()
            opt.step()
    for a, b in zip(params, twins):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factory, dtype", [
    (partial(torch.optim.AdamW, lr=1e-3, fused=False), torch.float32),  # an explicit choice stands
    (partial(torch.optim.AdamW, lr=1e-3, foreach=True), torch.float32),
    (partial(torch.optim.AdamW, lr=1e-3), torch.float64),  # fused only where it was measured
    (partial(torch.optim.SGD, lr=1e-3), torch.float32),
])
def test_build_optimizer_leaves_other_choices_alone(factory, dtype):
    from sdlight.optim import build_optimizer

    opt = build_optimizer(factory, _params(dtype))
    assert not opt.defaults.get("fused")
