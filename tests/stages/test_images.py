"""Image grids: layout against a hand-built grid, the PNG against sdlight.pixels' 8-bit conversion, and what
each kind of logger receives."""

from __future__ import annotations

import io

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sdlight.pixels import to_uint8
from sdlight.stages.images import log_grid, to_grid


def rows(n_rows: int = 3, n: int = 4, h: int = 5, w: int = 7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(n, 3, h, w, generator=g) * 2.4 - 1.2 for _ in range(n_rows)]  # some values outside [-1, 1]


def test_to_grid_layout():
    rs = rows()
    grid = to_grid(rs)
    h, w = 5, 7
    assert grid.shape == (3, 3 * (h + 1) + 1, 4 * (w + 1) + 1)
    expected = torch.full_like(grid, -1.0)  # padding of 1 pixel, black
    for r, batch in enumerate(rs):
        for c, img in enumerate(batch):
            top, left = 1 + r * (h + 1), 1 + c * (w + 1)
            expected[:, top:top + h, left:left + w] = img.clamp(-1, 1)
    torch.testing.assert_close(grid, expected, rtol=0, atol=0)


class WandbLike:
    def __init__(self):
        self.calls = []

    def log_image(self, key, images, step=None, **kwargs):
        self.calls.append((key, images, step, kwargs))


class TensorBoardLike:
    def __init__(self):
        self.calls = []
        self.experiment = SimpleNamespace(add_image=lambda *a, **k: self.calls.append((a, k)))


def fake_module(root: Path, loggers: list, global_zero: bool = True, step: int = 12):
    trainer = SimpleNamespace(is_global_zero=global_zero, global_step=step, loggers=loggers,
                              default_root_dir=str(root))
    return SimpleNamespace(_trainer=trainer)


def test_log_grid_writes_png_and_feeds_image_loggers(tmp_path):
    wb, tb, csv_like = WandbLike(), TensorBoardLike(), SimpleNamespace(experiment=object())
    grid = to_grid(rows())
    path = log_grid(fake_module(tmp_path, [wb, tb, csv_like]), "val/reconstructions", grid, caption="rows: ...")
    assert path == tmp_path / "images" / "val_reconstructions_0000012.png"
    on_disk = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(on_disk, to_uint8(grid).permute(1, 2, 0).numpy())

    (key, images, step, kwargs), = wb.calls
    assert key == "val/reconstructions" and step == 12 and kwargs == {"caption": ["rows: ..."]}
    assert isinstance(images[0], Image.Image)  # 8-bit: wandb.Image casts float tensors to uint8 unscaled
    np.testing.assert_array_equal(np.asarray(images[0]), on_disk)

    (args, kwargs), = tb.calls
    assert args[0] == "val/reconstructions" and kwargs == {"global_step": 12}
    assert args[1].dtype == torch.uint8 and torch.equal(args[1], to_uint8(grid))


def test_log_grid_only_on_rank_zero_and_with_a_trainer(tmp_path):
    wb = WandbLike()
    assert log_grid(fake_module(tmp_path, [wb], global_zero=False), "k", to_grid(rows())) is None
    assert log_grid(SimpleNamespace(_trainer=None), "k", to_grid(rows())) is None
    assert wb.calls == [] and not (tmp_path / "images").exists()


def test_wandb_receives_the_picture_offline(tmp_path, monkeypatch):
    """A real offline W&B run stores the very PNG we write to disk."""
    pytest.importorskip("wandb")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="sdlight-test")
    try:
        path = log_grid(fake_module(tmp_path, [logger]), "train/reconstructions", to_grid(rows()))
    finally:
        wandb.finish()
    stored, = tmp_path.glob("wandb/offline-run-*/files/media/images/train/reconstructions_*.png")
    np.testing.assert_array_equal(np.asarray(Image.open(stored).convert("RGB")),
                                  np.asarray(Image.open(path).convert("RGB")))


def test_tensorboard_receives_the_picture(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    grid = to_grid(rows())
    log_grid(fake_module(tmp_path, [logger]), "val/reconstructions", grid)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    image, = events.Images("val/reconstructions")
    assert image.step == 12 and (image.height, image.width) == tuple(grid.shape[1:])
    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, to_uint8(grid).permute(1, 2, 0).numpy())
