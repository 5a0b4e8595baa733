"""The W&B dashboard callbacks: a tiny LDM run logging offline to W&B, read back from the run's own files (the
`.wandb` record log, the table files and the artifact staging copies); the no-W&B path; parameter counts against
hand counts; multirun jobs grouped by their sweep through the real CLI."""

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset

from sdlight.callbacks.dashboard import (ModelStatsCallback, SampleTableCallback, batch_image_count, flat_counts,
                                         parameter_counts)

LOG_CONDITIONS = ["a red circle in the center on a white background",
                  "a blue square at the top left on a black background",
                  "a green triangle at the bottom right on a gray background"]


def wandb_records(run_dir: Path, timeout: float = 20.0) -> list:
    """The records of a finished offline run, waiting for W&B's writer process to flush its exit record."""
    deadline = time.monotonic() + timeout
    while True:
        records = parse_wandb_log(next(run_dir.glob("run-*.wandb")).read_bytes())
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def parse_wandb_log(data: bytes) -> list:
    """The records of a ``run-*.wandb`` file: a LevelDB-style log (32 KiB blocks of chunks with a 7-byte header:
    crc32, length, type 1=full 2=first 3=middle 4=last) of ``wandb_internal_pb2.Record``s."""
    from wandb.proto import wandb_internal_pb2

    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record still being written
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def of_type(records, kind):
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history_rows(records) -> list[dict]:
    rows = []
    for history in of_type(records, "history"):
        row = {}
        for item in history.item:
            key = "/".join(item.nested_key) if item.nested_key else item.key
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def config_values(records) -> dict:
    out = {}
    for config in of_type(records, "config"):
        out.update({u.key: json.loads(u.value_json) for u in config.update})
    return out


def summary_values(records) -> dict:
    out = {}
    for summary in of_type(records, "summary"):
        for u in summary.update:
            out["/".join(u.nested_key) if u.nested_key else u.key] = json.loads(u.value_json)
    return out


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    """Two steps of a tiny text LDM with logger=wandb (offline) and callbacks=[default,dashboard]."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import train_tiny_text_ldm

    root = tmp_path_factory.mktemp("dashboard")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.delenv("WANDB_API_KEY", raising=False)
        for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
            mp.setenv(var, str(root / "wandb-home"))
        _, objects = train_tiny_text_ldm(root, [
            "logger=wandb", "trainer.log_every_n_steps=1",
            f"model.log_conditions=[{','.join(repr(c) for c in LOG_CONDITIONS)}]", "callbacks=[default,dashboard]",
            "callbacks.sample_table.every_n_steps=1", "callbacks.sample_table.steps=2",
            "callbacks.throughput.window_size=2"])
    run_dir = next((root / "wandb").glob("offline-run-*"))
    return root, run_dir, wandb_records(run_dir), objects


def test_sample_table_rows_and_images_match_the_grid_on_disk(wandb_run):
    root, run_dir, records, objects = wandb_run
    tables = [row for row in history_rows(records) if row.get("samples/table/_type") == "table-file"]
    assert len(tables) == 2  # every_n_steps=1 over two steps; at train end the step was already evaluated
    assert all(t["samples/table/nrows"] == 3 and t["samples/table/ncols"] == 5 for t in tables)
    assert [t["trainer/global_step"] for t in tables] == [1, 2]
    assert len(list((run_dir / "files" / "media" / "table" / "samples").glob("table_*.table.json"))) == 2

    # the full table and its images are staged as a run_table artifact: read the last one back
    artifact = [a for a in of_type(records, "artifact") if a.type == "run_table"][-1]
    files = {c.path: Path(c.local_path) for c in artifact.manifest.contents}
    table = json.loads(files["samples/table.table.json"].read_text())
    assert table["columns"] == ["step", "index", "seed", "condition", "sample"]
    assert [row[3] for row in table["data"]] == LOG_CONDITIONS and {row[0] for row in table["data"]} == {2}
    grid = np.asarray(Image.open(root / "images" / "samples_grid_0000002.png").convert("RGB"))
    assert (root / "images" / "samples_grid_0000001.png").is_file()
    for i, row in enumerate(table["data"]):
        assert row[4]["_type"] == "image-file" and row[4]["caption"] == LOG_CONDITIONS[i]
        sample = np.asarray(Image.open(files[row[4]["path"]]).convert("RGB"))
        tile = grid[1:33, 1 + 33 * i: 33 + 33 * i]  # make_grid with padding 1
        assert np.array_equal(sample, tile)


def test_parameter_counts_in_config_and_summary_match_hand_counts(wandb_run):
    _, _, records, objects = wandb_run
    model = objects["model"]

    def count(module, trainable=None):
        return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)

    unet, vae, text = model.net.model.diffusion_model, model.net.first_stage_model, model.net.cond_stage_model
    params = config_values(records)["params"]
    assert params["parts"]["model.diffusion_model"] == {"total": count(unet), "trainable": count(unet)}
    assert params["parts"]["first_stage_model"] == {"total": count(vae), "trainable": 0}
    assert params["parts"]["cond_stage_model"]["total"] == count(text)
    assert params["total"] == count(unet) + count(vae) + count(text)  # the EMA copy is not counted twice
    assert params["trainable"] == count(unet) + count(text, True) and params["frozen"] == count(vae)
    assert params["ema"] == count(model.model_ema)
    summary = summary_values(records)
    assert summary["params/total"] == params["total"]
    assert summary["params/model.diffusion_model"] == count(unet)


def test_throughput_in_images_per_second(wandb_run):
    _, _, records, _ = wandb_run
    rows = [r for r in history_rows(records) if "train/samples" in r]
    assert [r["train/samples"] for r in rows] == [8, 16]  # images, counted by batch_image_count
    rates = [r["train/device/samples_per_sec"] for r in rows if "train/device/samples_per_sec" in r]
    assert len(rates) == 1 and rates[0] > 0  # from the second batch on (window_size=2)
    last = rows[-1]
    assert rates[0] == pytest.approx(8 / (last["train/time"] - rows[0]["train/time"]), rel=1e-6)


class CaptionedTestDataset(Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return {"image": torch.full((3, 4, 4), i / 6 - 0.5), "label": i, "text": f"caption {i}"}


class LabelTestModule(L.LightningModule):
    """Test double of a label-conditioned stage 2: ``generate`` paints each label's value; records its calls."""

    condition_keys = ["label"]

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.calls = []

    def training_step(self, batch, batch_idx):
        return self.layer(batch["image"].flatten(1)[:, :2]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(CaptionedTestDataset(), batch_size=2)

    def val_dataloader(self):
        return DataLoader(CaptionedTestDataset(), batch_size=4)

    def generate(self, conditions, num_samples=None, *, steps=None, guidance_scale=None, generator=None,
                 use_ema=True):
        conditions = conditions["label"]
        self.calls.append({"labels": conditions.tolist(), "use_ema": use_ema, "steps": steps})
        return (conditions.float() * 0.29 - 0.93).view(-1, 1, 1, 1).expand(-1, 3, 4, 4)


def fit(module, callbacks, logger, tmp_path):
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=logger, callbacks=callbacks, default_root_dir=tmp_path,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module)
    return trainer


def test_without_wandb_only_the_grid_is_written(tmp_path):
    module = LabelTestModule()
    callback = SampleTableCallback(every_n_steps=None, num_samples=5, batch_size=2, steps=3)
    fit(module, [callback], CSVLogger(tmp_path), tmp_path)
    assert callback.tables_logged == 0 and callback.evaluations == 1  # at train end only
    assert [c["labels"] for c in module.calls] == [[0, 1], [2, 3], [4]]  # the first val items, in order
    assert all(c["use_ema"] and c["steps"] == 3 for c in module.calls)
    grid = np.asarray(Image.open(tmp_path / "images" / "samples_grid_0000002.png"))
    expected = [round((label * 0.29 - 0.93 + 1) / 2 * 255) for label in range(5)]
    assert [int(grid[2, 1 + 5 * i, 0]) for i in range(5)] == expected


def test_val_items_give_caption_and_val_image_columns(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    module = LabelTestModule()
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="sdlight-test")
    callback = SampleTableCallback(every_n_steps=2, num_samples=3, batch_size=4, at_train_end=False)
    stats = ModelStatsCallback()
    fit(module, [callback, stats], logger, tmp_path)
    logger.experiment.finish()
    assert callback.tables_logged == 1
    records = wandb_records(next((tmp_path / "wandb").glob("offline-run-*")))
    artifact = [a for a in of_type(records, "artifact") if a.type == "run_table"][-1]
    files = {c.path: Path(c.local_path) for c in artifact.manifest.contents}
    table = json.loads(files["samples/table.table.json"].read_text())
    assert table["columns"] == ["step", "index", "seed", "condition", "caption", "sample", "val image"]
    assert [row[3:5] for row in table["data"]] == [["0", "caption 0"], ["1", "caption 1"], ["2", "caption 2"]]
    reference = np.asarray(Image.open(files[table["data"][2][6]["path"]]).convert("RGB"))
    assert (reference == round((2 / 6 - 0.5 + 1) / 2 * 255)).all()  # the val image of item 2
    assert config_values(records)["params"]["total"] == 3 and stats.counts["trainable"] == 3


def test_parameter_counts_look_through_wrappers_and_leave_out_averaged_copies():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = nn.Linear(3, 4)  # 16

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Wrapper()
            self.first_stage_model = nn.Conv2d(2, 2, 1).requires_grad_(False)  # 6
            self.model_ema = AveragedModel(self.model).requires_grad_(False)
            self.metrics = nn.ModuleList([nn.Identity()])  # no parameters: not a part

    counts = parameter_counts(Model())
    assert counts == {"total": 22, "trainable": 16, "frozen": 6, "ema": 16,
                      "parts": {"model.diffusion_model": {"total": 16, "trainable": 16},
                                "first_stage_model": {"total": 6, "trainable": 0},
                                "model_ema": {"total": 16, "trainable": 0}}}
    flat = flat_counts(counts)
    assert flat["params/total"] == 22 and flat["params/first_stage_model/trainable"] == 0


def test_batch_image_count():
    assert batch_image_count({"image": torch.zeros(5, 3, 2, 2), "text": ["a"] * 5}) == 5
    assert batch_image_count({"latent": torch.zeros(7, 4, 2, 2), "text": ["a"] * 7}) == 7
    assert batch_image_count(torch.zeros(3, 1)) == 3
    with pytest.raises(TypeError, match="cannot count"):
        batch_image_count({"text": ["a"]})


def test_multirun_jobs_are_grouped_by_their_sweep_in_wandb(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", SDLIGHT_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               SDLIGHT_ROOT=str(tmp_path), WANDB_DATA_DIR=str(tmp_path / "wandb-home"),
               WANDB_CACHE_DIR=str(tmp_path / "wandb-home"), WANDB_CONFIG_DIR=str(tmp_path / "wandb-home"))
    env.pop("WANDB_API_KEY", None)
    args = [sys.executable, "-m", "sdlight.train", "-m", "+experiment=quickstart_vae", "data.train_size=8",
            "data.val_size=8", "logger=wandb", "callbacks=none", "train=false", "optimized_metric=null",
            "extras.print_config=false", "seed=1,2"]
    out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = next((tmp_path / "logs" / "quickstart_vae" / "multiruns").iterdir())
    groups, seeds = [], []
    for job in ("0", "1"):
        run = next((sweep / job / "wandb").glob("offline-run-*"))
        records = wandb_records(run)
        groups += [r.run_group for r in of_type(records, "run")]
        seeds.append(config_values(records)["seed"])
    assert groups == [sweep.name, sweep.name] and seeds == [1, 2]


def test_default_wandb_is_default_plus_dashboard(train_cfg):
    import hydra

    listed = train_cfg(["callbacks=[default,dashboard]"]).callbacks
    combined = train_cfg(["callbacks=default_wandb"]).callbacks
    assert listed == combined and {"sample_table", "model_stats", "throughput"} <= set(combined)
    monitor = hydra.utils.instantiate(combined.throughput)
    assert monitor.batch_size_fn({"image": torch.zeros(3, 3, 2, 2)}) == 3 and monitor.kwargs == {"window_size": 20}
