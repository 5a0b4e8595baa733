"""trainer=fsdp_sim: the latent diffusion stage fully sharded (FSDP2, Lightning's ModelParallelStrategy) over 2 CPU
processes, through the real CLI (the strategy starts its processes by re-running the command). The run ends with
the weights and EMA of the same run on one process, in a checkpoint with the same keys; stopped and resumed, it ends
bit for bit where it ends uninterrupted; the export reads its checkpoint; each process holds half the UNet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdlight.checkpoints import read_checkpoint

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from conftest import random_stage1_checkpoint  # noqa: E402
from test_distributed import LDM, _assert_same_weights  # noqa: E402
from test_resume import _command, _env, _train, assert_same_end_state  # noqa: E402

# validation after step 2 of 4 (EMA weights swapped in and out of the sharded UNet mid-run); checkpoints only at
# the epoch's end, so that no checkpoint's gather puts the UNet back into its shards after that validation
ARGS = LDM + ["seed=3", "trainer.num_sanity_val_steps=0", "trainer.val_check_interval=2", "+trainer.limit_val_batches=1",
              "callbacks.model_checkpoint.save_on_train_epoch_end=true"]
FSDP = ["trainer=fsdp_sim", "data.batch_size=8", "model.gradient_checkpointing=true"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    random_stage1_checkpoint(root / "vae.ckpt")
    return root


def _args(root: Path, *more: str) -> list[str]:
    return ARGS + [f"model.first_stage.ckpt={root / 'vae.ckpt'}", *more]


@pytest.fixture(scope="module")
def sharded_run(root) -> Path:
    """4 steps of 2 x 8 under fsdp_sim, each rank recording the parameters it holds (resume_helpers.RecordShards)."""
    return _train(root, "fsdp", _args(root, *FSDP, "trainer.max_steps=4", f"+callbacks.shards.out_dir={root}",
                                      "+callbacks.shards._target_=resume_helpers.RecordShards"))


def test_a_sharded_run_ends_as_the_one_process_run(root, sharded_run):
    """Same keys (CompVis' names, EMA and scale factor included) and, up to float reduction order, the same values
    as one process with batches of 16; gradient checkpointing on in the sharded run only (it changes no number).
    A training text encoder left unsharded (never averaged over the processes) misses this by 1.3e-3."""
    one = read_checkpoint(_train(root, "one", _args(root, "data.batch_size=16", "trainer.max_steps=4")))
    sharded = read_checkpoint(sharded_run)
    assert one["state_dict"]["scale_factor"] == pytest.approx(float(sharded["state_dict"]["scale_factor"]), rel=1e-6)
    assert any(k.startswith("model_ema.") for k in sharded["state_dict"])
    _assert_same_weights(one, sharded)
    # the optimizer states too, keyed alike (by position in the optimizer): either checkpoint resumes on the other
    a, b = one["optimizer_states"][0], sharded["optimizer_states"][0]
    assert a["state"].keys() == b["state"].keys()
    assert [g["params"] for g in a["param_groups"]] == [g["params"] for g in b["param_groups"]]
    for i in a["state"]:
        torch.testing.assert_close(b["state"][i]["exp_avg"], a["state"][i]["exp_avg"], rtol=0, atol=1e-6)


def test_a_sharded_run_resumed_ends_bit_for_bit_as_uninterrupted(root, sharded_run):
    """Weights, EMA, optimizer and scheduler states, step and every rank's random states. (Stopped at step 3, between
    validations: stopped at step 2, where one is due, the torch generator's state ends one draw apart, on one process
    as well; the weights do not.)"""
    part = _train(root, "part", _args(root, *FSDP, "trainer.max_steps=3"))
    assert read_checkpoint(part)["global_step"] == 3
    resumed = _train(root, "part", _args(root, *FSDP, "trainer.max_steps=4", "ckpt_path=last"))
    assert "Resuming from" in (root / "part.log").read_text()
    assert_same_end_state(sharded_run, resumed)


def test_each_process_holds_half_of_the_trained_weights(root, sharded_run):
    ranks = [json.loads((root / f"shards_rank{r}.json").read_text()) for r in (0, 1)]
    for part in ("unet", "text"):  # every parameter split in two along its first dimension
        whole = ranks[0][part]["whole"]
        assert sum(r[part]["local"] for r in ranks) == whole
        assert all(abs(r[part]["local"] - whole / 2) < 0.01 * whole for r in ranks), ranks
    assert all(r["vae"]["local"] == r["vae"]["whole"] for r in ranks)  # frozen: whole on every process


def test_the_export_reads_a_sharded_runs_checkpoint(root, sharded_run):
    out = root / "export" / "model.safetensors"
    done = subprocess.run([sys.executable, "-m", "sdlight.export", f"ckpt={sharded_run}", "format=single_file",
                           f"out={out}", f"hydra.run.dir={root / 'export'}"], cwd=root, env=_env(root),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    exported, state = load_file(out), read_checkpoint(sharded_run)["state_dict"]
    unet = [k for k in exported if k.startswith("model.diffusion_model.")]
    assert len(unet) > 100
    for key in unet:  # the EMA's weights, by default
        assert torch.equal(exported[key], state["model_ema.module.0." + key[len("model."):]]), key


def test_sampling_during_a_sharded_run_takes_every_rank(root):
    """Sample grids (drawn for rank 0's log) and the adherence callback: every forward gathers weights from both
    processes, so both sample, in equal shares; the run ends instead of waiting for ever."""
    args = _args(root, *FSDP, "trainer.max_steps=2", "model.sample_every_n_steps=1", "callbacks=[default,adherence]",
                 "callbacks.adherence.num_samples=8",
                 "callbacks.adherence.batch_size=4", "callbacks.adherence.steps=2", "callbacks.adherence.every_n_steps=1")
    _train(root, "sampling", args)
    log = (root / "sampling.log").read_text()
    assert list((root / "sampling" / "images").glob("samples_*.png")), log[-2000:]
    # 12 samples make 3 chunks of 4, two for one process and one for the other: refused in one line, not a hang
    done = subprocess.run(_command(root / "unequal", args[:-4] + ["callbacks.adherence.num_samples=12",
                                                                  "callbacks.adherence.batch_size=4",
                                                                  "callbacks.adherence.steps=2",
                                                                  "callbacks.adherence.every_n_steps=1"]),
                          cwd=root, env=_env(root), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "give num_samples a multiple of 8" in done.stderr, done.stderr[-3000:]


def test_a_loss_spike_rolls_the_sharded_run_back(root):
    """Weights turned to NaNs right after the step-2 checkpoint: the next step's loss is non-finite on every rank, is
    skipped (Lightning refuses a skipped step on several processes: the gradients are dropped instead), and the
    weights and optimizer states roll back to that checkpoint, each rank taking its shards of the whole tensors; the
    run goes on and ends finite."""
    last = _train(root, "rollback", _args(root, *FSDP, "trainer.max_steps=5", "trainer.limit_val_batches=0",
                                          "callbacks.model_checkpoint.every_n_train_steps=2",
                                          "callbacks.model_checkpoint.every_n_epochs=null",
                                          "callbacks.rollback.after_nonfinite=1",
                                          "+callbacks.poison._target_=resume_helpers.PoisonWeights",
                                          "+callbacks.poison.step=2"))
    log = (root / "rollback.log").read_text()
    assert log.count("rolled back to") == 1 and log.count("Non-finite loss at step 2") == 1  # rank 0 says it
    state = read_checkpoint(last)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_every_backbone_is_sharded_block_by_block():
    """The units that trainer=fsdp shards: each block of the UNet and of the transformers, then the backbone."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sdlight.stages.sharding import sharding_units

    conf = Path(__file__).resolve().parents[2] / "conf" / "model" / "unet"
    for name, blocks in (("tiny", None), ("mmdit_tiny", "joint_blocks")):
        backbone = instantiate(OmegaConf.load(conf / f"{name}.yaml"))
        units = sharding_units(backbone)
        assert units[-1] is backbone
        if blocks is None:
            assert units[:-1] == [*backbone.input_blocks, backbone.middle_block, *backbone.output_blocks]
        else:
            assert units[:-1] == list(getattr(backbone, blocks)) and len(units) > 2
