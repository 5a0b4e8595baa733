"""The training recipe's pieces: the FLOPs count that feeds Lightning's ThroughputMonitor, the weight-decay
groups, the EMA held through a validation epoch, the schedule's tables moved once."""

import warnings
from functools import partial

import torch
from torch import nn

from sdlight.stages.flops import TrainingFlops

from .conftest import shapes_loader, tiny_ldm, tiny_trainer


def test_training_flops_of_a_linear_layer_are_three_times_its_forward_matmul():
    layer, x, owner = nn.Linear(16, 8), torch.randn(4, 16), nn.Module().eval()
    flops = TrainingFlops()
    flops.watch(layer, owner)
    assert layer(x).shape == (4, 8) and flops.value is None  # not counted outside training
    owner.train()
    layer(x)
    assert flops.value == 3 * (2 * 4 * 16 * 8)  # forward: 2·B·in·out multiply-adds; backward: twice that
    layer(torch.randn(100, 16))
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
    unet = module.net.model.diffusion_model
    z = torch.randn(4, *module.net.latent_shape)
    ctx = module.net.cond_stage_model.single(["a red circle"] * 4)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(z, torch.zeros(4, dtype=torch.long), context=ctx)
    assert module.flops_per_batch == 3 * counter.get_total_flops() > 0


def test_no_weight_decay_on_biases_norms_and_embeddings():
    from sdlight.optim import decay_groups

    module = tiny_ldm("class")
    module.net.cond_stage_model.requires_grad_(True)
    decay, rest = decay_groups(module)
    names = {id(p): n for n, p in module.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in rest["params"]}
    assert rest["weight_decay"] == 0.0 and "weight_decay" not in decay  # the optimizer's own value applies
    assert all(n.endswith(".weight") for n in decayed)
    assert any(".norm" in n or "norm" in n for n in kept) and any(n.endswith(".bias") for n in kept)
    assert any("embedding" in n for n in kept) and not any("embedding" in n for n in decayed)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert decayed | kept == trainable and not decayed & kept  # every trainable parameter once, frozen ones none
    assert not any(n.startswith("net.first_stage_model.") or n.startswith("model_ema.") for n in decayed | kept)
    # through configure_optimizers with AdamW(weight_decay=0.01)
    module.optimizer_factory = partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]


def test_a_validation_epoch_holds_the_ema_once_and_live_weights_are_reachable(tmp_path):
    """The EMA goes in once at the epoch's start and out at its end (no copy per batch); a callback that samples
    with use_ema=False at the epoch's end sees the live weights; afterwards the live weights are back exactly."""
    import lightning as L

    from sdlight.stages.ema import WeightSwap

    module = tiny_ldm(ema_decay=0.5, lr=2e-2)
    tiny_trainer(tmp_path, max_steps=3).fit(module, shapes_loader(12, 4))
    out_w = lambda: module.net.model.diffusion_model.out[-1].weight.detach().clone()  # noqa: E731
    live, ema = out_w(), module.model_ema.module[0].diffusion_model.out[-1].weight.detach().clone()
    assert not torch.equal(live, ema)
    seen, swaps = {}, []
    original = WeightSwap.begin

    class Probe(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen.setdefault("batches", []).append(out_w())

        def on_validation_epoch_end(self, trainer, pl_module):
            with pl_module.ema_weights(enabled=False):
                seen["live_inside"] = out_w()
            seen["after_live"] = out_w()

    WeightSwap.begin = lambda *a: swaps.append(1) or original(*a)
    try:
        trainer = tiny_trainer(tmp_path, callbacks=[Probe()], limit_val_batches=1.0)
        trainer.validate(module, shapes_loader(12, 4, split="val"), verbose=False)
    finally:
        WeightSwap.begin = original
    assert len(seen["batches"]) == 3 and all(torch.equal(w, ema) for w in seen["batches"])
    assert swaps == [1]  # once for the epoch, no swap per batch
    assert torch.equal(seen["live_inside"], live) and torch.equal(seen["after_live"], ema)
    assert torch.equal(out_w(), live)  # the live weights came back exactly


def test_the_training_schedule_is_moved_to_the_device_once():
    module = tiny_ldm()
    schedule = module.net.objective.schedule
    moves = []
    original = type(schedule).to

    def spy(self, device):
        moves.append(str(device))
        return original(self, device)

    type(schedule).to = spy
    try:
        batch = next(iter(shapes_loader(4, 4)))
        for _ in range(3):
            module.net.losses(batch)
    finally:
        type(schedule).to = original
    assert moves == []  # on the CPU the tables are already where the latents are: never copied per step
