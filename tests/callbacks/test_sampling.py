"""Shared machinery of the sample-quality callbacks: rank split, item loading, schedule, eval mode, logging."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset, IterableDataset

from sdlight.callbacks.sampling import (SampleEvaluationCallback, concat_batches, load_items, log_metrics,
                                        progress_bar, rank_chunks, rank_slice)


class ItemsTestDataset(Dataset):
    """Item i is ``{image: full of i, label: i, text: "item i"}``."""

    def __init__(self, n: int = 10):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": torch.full((3, 2, 2), float(i)), "label": i, "text": f"item {i}"}


class StreamTestDataset(IterableDataset):
    def __init__(self, n: int = 10):
        self.items = ItemsTestDataset(n)

    def __iter__(self):
        return (self.items[i] for i in range(len(self.items)))


class RecordingTestModule(L.LightningModule):
    """A test double of the stage-2 module: ``generate`` records what it was asked and how it was called."""

    condition_keys = ["label"]

    def __init__(self, val_size: int = 10, two_optimizers: bool = False):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.val_size = val_size
        self.calls = []
        self.two_optimizers = two_optimizers
        if two_optimizers:
            self.automatic_optimization = False
            self.other = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(torch.ones(1, 2)).sum()
        if not self.two_optimizers:
            return loss
        for opt, lyr in zip(self.optimizers(), (self.layer, self.other)):  # two optimizer steps per batch
            opt.zero_grad()
            self.manual_backward(lyr(torch.ones(1, 2)).sum())
            opt.step()

    def configure_optimizers(self):
        if self.two_optimizers:
            return [torch.optim.SGD(self.layer.parameters(), lr=0.1), torch.optim.SGD(self.other.parameters(), lr=0.1)]
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(ItemsTestDataset(100), batch_size=2)

    def val_dataloader(self):
        return DataLoader(ItemsTestDataset(self.val_size), batch_size=4)

    def generate(self, conditions, num_samples=None, *, steps=None, guidance_scale=None, generator=None,
                 use_ema=True):
        self.calls.append(dict(conditions=conditions, n=num_samples, steps=steps, guidance=guidance_scale,
                               training=self.training, grad=torch.is_grad_enabled(), use_ema=use_ema,
                               noise=torch.randn(1, generator=generator).item()))
        return torch.zeros(num_samples, 3, 4, 4)


class CountingTestCallback(SampleEvaluationCallback):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps_seen = []

    def evaluate(self, trainer, pl_module):
        self.steps_seen.append(trainer.global_step)
        for _ in self.generate(trainer, pl_module, self.conditions(trainer, ["label"]), "test"):
            pass
        return {"val/count": float(len(self.steps_seen))}


def fit(module, callback, tmp_path, **kwargs):
    trainer = L.Trainer(accelerator="cpu", logger=CSVLogger(tmp_path), callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, **kwargs)
    trainer.fit(module)
    return trainer


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_rank_slices_partition_in_order(world_size):
    for total in range(0, 23):
        slices = [rank_slice(total, r, world_size) for r in range(world_size)]
        assert [i for s in slices for i in s] == list(range(total))
        sizes = [len(s) for s in slices]
        assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("dataset", [ItemsTestDataset(10), StreamTestDataset(10)])
def test_load_items_cycles_rebatches_and_keeps_keys(dataset):
    loader = DataLoader(dataset, batch_size=3)
    batches = list(load_items(loader, range(7, 24), ["label", "text"], batch_size=4))
    assert [len(b["label"]) for b in batches] == [4, 4, 4, 4, 1]
    joined = concat_batches(batches)
    assert set(joined) == {"label", "text"}
    expected = [i % 10 for i in range(7, 24)]
    assert joined["label"].tolist() == expected and joined["text"] == [f"item {i}" for i in expected]
    with pytest.raises(KeyError, match="attributes"):
        next(load_items(loader, range(3), ["attributes"]))


def test_schedule_eval_mode_conditions_and_logging(tmp_path):
    module = RecordingTestModule(val_size=10)
    callback = CountingTestCallback(every_n_steps=3, num_samples=7, batch_size=3, steps=5, guidance_scale=2.0)
    trainer = fit(module, callback, tmp_path, max_steps=7)
    assert callback.steps_seen == [3, 6, 7]  # every 3 steps, then at the end
    calls = module.calls
    assert len(calls) == 9 and [c["n"] for c in calls[:3]] == [3, 3, 1]
    assert torch.cat([c["conditions"]["label"] for c in calls[:3]]).tolist() == list(range(7))  # first val items, in order
    assert all(not c["training"] and not c["grad"] and c["use_ema"] for c in calls)
    assert all(c["steps"] == 5 and c["guidance"] == 2.0 for c in calls)
    # re-seeded at every evaluation: the same noise each time
    assert calls[0]["noise"] == calls[3]["noise"] == calls[6]["noise"] != calls[1]["noise"]
    assert module.training  # train mode restored
    assert float(trainer.callback_metrics["val/count"]) == 3.0
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "val/count" in logged


def test_no_duplicate_evaluation_at_end_and_two_optimizer_steps_per_batch(tmp_path):
    callback = CountingTestCallback(every_n_steps=3, num_samples=2, batch_size=2)
    fit(RecordingTestModule(), callback, tmp_path, max_steps=6)
    assert callback.steps_seen == [3, 6]
    # manual optimization with two optimizers: global_step moves by 2 per batch and skips odd multiples
    callback = CountingTestCallback(every_n_steps=3, num_samples=2, batch_size=2, at_train_end=False)
    fit(RecordingTestModule(two_optimizers=True), callback, tmp_path, max_steps=12)
    assert callback.steps_seen == [4, 6, 10, 12]


def test_fast_dev_run_skips_evaluation(tmp_path):
    callback = CountingTestCallback(every_n_steps=1, num_samples=2)
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=2, callbacks=[callback], enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(RecordingTestModule())
    assert callback.steps_seen == []


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_rank_chunks_partition_in_whole_chunks(world_size):
    for total in range(0, 23):
        shares = [rank_chunks(total, 4, r, world_size) for r in range(world_size)]
        assert [i for s in shares for i in s] == list(range(total))
        assert all(s.start % 4 == 0 for s in shares if len(s))


def test_ranks_share_the_chunks_and_sample_what_one_process_samples():
    module = RecordingTestModule(val_size=10)
    loader = module.val_dataloader()

    def sampled(world: int) -> list[tuple[list[int], float]]:
        calls = []
        for rank in range(world):
            trainer = SimpleNamespace(global_rank=rank, world_size=world, is_global_zero=rank == 0, datamodule=None,
                                      val_dataloaders=loader, lightning_module=module, progress_bar_callback=None)
            callback = CountingTestCallback(num_samples=13, batch_size=2)
            module.calls.clear()
            list(callback.generate(trainer, module, callback.conditions(trainer, ["label"]), "test"))
            calls += [(c["conditions"]["label"].tolist(), c["noise"]) for c in module.calls]
        return calls

    one = sampled(1)
    assert [label for labels, _ in one for label in labels] == [i % 10 for i in range(13)]  # val set reused
    assert len({noise for _, noise in one}) == 7  # 7 chunks of 2, each its own generator
    assert sampled(3) == one == sampled(2)


def test_progress_joins_a_running_rich_progress(monkeypatch):
    from rich.console import Console
    from rich.progress import Progress

    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    shared = Progress(console=Console(file=open("/dev/null", "w"), force_terminal=True))
    shared.start()
    try:
        trainer = SimpleNamespace(is_global_zero=True, progress_bar_callback=SimpleNamespace(progress=shared))
        with progress_bar(trainer, "sampling", total=4) as advance:
            (task,) = shared.tasks
            advance(3)
            assert task.completed == 3 and task.total == 4
        assert not shared.tasks
    finally:
        shared.stop()
    # not rank zero: a silent bar
    trainer = SimpleNamespace(is_global_zero=False, progress_bar_callback=SimpleNamespace(progress=shared))
    with progress_bar(trainer, "sampling", total=4) as advance:
        advance(4)
    assert not shared.tasks


def test_log_metrics_reaches_loggers_and_callback_metrics(tmp_path):
    logger = CSVLogger(tmp_path, name="x", version=0)
    trainer = L.Trainer(accelerator="cpu", logger=logger, enable_progress_bar=False, enable_model_summary=False)
    log_metrics(trainer, {"val/fid": 12.5})
    logger.save()
    assert float(trainer.callback_metrics["val/fid"]) == 12.5
    assert "val/fid" in (tmp_path / "x" / "version_0" / "metrics.csv").read_text()


def test_progress_without_a_terminal_is_logged_in_plain_lines(caplog, monkeypatch):
    import logging
    import sys

    from sdlight.callbacks.sampling import StandaloneTrainer, progress_bar

    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)  # a SLURM log, CI, nohup
    with caplog.at_level(logging.INFO, logger="sdlight"):
        with progress_bar(StandaloneTrainer(val_dataloaders=None), "FID: sampling", 25) as advance:
            for _ in range(25):
                advance(1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("FID: sampling")]
    assert [ln.split(" (")[0] for ln in lines] == [f"FID: sampling: {n}/25" for n in (2, 4, 6, 8, 10, 12, 14, 16,
                                                                                      18, 20, 22, 24, 25)]
