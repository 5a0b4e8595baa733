"""Shared stage pieces: the training-FLOPs count that feeds Lightning's ThroughputMonitor."""

import warnings

import torch
from torch import nn

from sdlight.stages.common import TrainingFlops

from .conftest import shapes_loader, tiny_ldm, tiny_trainer


def test_training_flops_of_a_linear_layer_are_three_times_its_forward_matmul():
    layer, x = nn.Linear(16, 8), torch.randn(4, 16)
    flops = TrainingFlops()
    assert flops(False, layer, x).shape == (4, 8) and flops.value is None  # not counted outside training
    flops(True, layer, x)
    assert flops.value == 3 * (2 * 4 * 16 * 8)  # forward: 2·B·in·out multiply-adds; backward: twice that
    flops(True, layer, torch.randn(100, 16))
    assert flops.value == 3 * (2 * 4 * 16 * 8)  # counted once, on the first batch


def test_latent_diffusion_reports_flops_per_batch_to_the_throughput_monitor(tmp_path):
    from lightning.pytorch.callbacks import ThroughputMonitor

    module = tiny_ldm()
    assert module.flops_per_batch is None
    monitor = ThroughputMonitor(batch_size_fn=lambda b: len(b["image"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_trainer(tmp_path, max_steps=2, callbacks=[monitor]).fit(module, shapes_loader(8, 4))
    assert not [w for w in caught if "flops_per_batch" in str(w.message)]
    unet = module.model.diffusion_model
    z = torch.randn(4, *module.latent_shape)
    ctx = module.cond_stage_model(["a red circle"] * 4)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(z, torch.zeros(4, dtype=torch.long), context=ctx)
    assert module.flops_per_batch == 3 * counter.get_total_flops() > 0
