"""The same run on 1 or 2 processes: every random draw of a training sample is keyed by (seed, step, the sample's
dataset index), the data order is one seeded permutation split over ranks, so a global batch of 16 on one process
and 2 x 8 under ``trainer=ddp_sim`` end with the same weights (up to float reduction order); a run started on one
process and resumed on two ends where the one-process run ends."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sdlight.checkpoints import read_checkpoint
from sdlight.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # resume_helpers: also in the processes ddp_spawn starts
from conftest import compose_train, random_stage1_checkpoint  # noqa: E402

QUIET = ["logger=none", "~callbacks.rich_progress_bar", "~callbacks.model_summary", "trainer.num_sanity_val_steps=0",
         "+trainer.limit_val_batches=0", "seed=3"]
VAE = ["+experiment=quickstart_vae", "data.train_size=64", "data.val_size=8", "model.image_log_every_n_steps=0",
       "trainer.max_steps=8"]  # 4 batches of 16, 2 optimizer steps each; the discriminator starts far later
LDM = ["+experiment=quickstart_ldm", "data.train_size=64", "data.val_size=8", "model.sample_every_n_steps=0",
       "model.unet.model_channels=32", "model.conditioning.width=32", "model.conditioning.heads=2",
       "model.conditioning.max_length=16", "model.scale_factor_batches=2", "+model.lr_scheduler.total_steps=4",
       "model.lr_scheduler.warmup_steps=1"]
ONE, TWO = ["data.batch_size=16"], ["trainer=ddp_sim", "data.batch_size=8"]


def _run(root: Path, args: list[str]) -> dict[str, torch.Tensor]:
    train(compose_train([*QUIET, *args], root))
    return read_checkpoint(root / "checkpoints" / "last.ckpt")


def _difference(a: dict, b: dict) -> tuple[float, float]:
    """(largest absolute difference, norm of the differences relative to the weights' norm) of two checkpoints'
    floating tensors (EMA included)."""
    assert a["global_step"] == b["global_step"]
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys()
    # the PatchGAN's BatchNorm statistics are per process (SyncBatchNorm is GPU-only); D trains later
    floats = [k for k in sa if sa[k].is_floating_point() and not k.startswith("loss.discriminator.")]
    worst = max((sa[k].double() - sb[k].double()).abs().max().item() for k in floats)
    norm = sum((sa[k].double() - sb[k].double()).square().sum().item() for k in floats)
    return worst, (norm / sum(sa[k].double().square().sum().item() for k in floats)) ** 0.5


def _assert_same_weights(a: dict, b: dict) -> None:
    """Equal up to float reduction order: a gradient summed in another order moves Adam's first steps on
    near-zero gradients by a few 1e-5 at lr 1e-3 (measured: 2.7e-5 at most, 1.1e-6 of the weights' norm)."""
    worst, relative = _difference(a, b)
    assert worst < 2e-4 and relative < 1e-5, (worst, relative)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    return random_stage1_checkpoint(tmp_path_factory.mktemp("stage1") / "vae.ckpt")


def test_the_autoencoder_ends_the_same_on_one_or_two_processes(tmp_path):
    """With SGD the weights agree to float32 rounding (measured 7e-9). With the shipped Adam, whose first steps
    are ~lr * sign(gradient), near-zero gradients summed in another order flip: two processes then differ from one
    exactly as much as one process accumulating two half batches does (both 3.9e-4 of the weights' norm)."""
    sgd = ["model.optimizer._target_=torch.optim.SGD", "~model.optimizer.betas", "model.optimizer.lr=1e-6",
           "model.disc_optimizer.betas=[0.5,0.9]"]
    worst, relative = _difference(_run(tmp_path / "sgd1", VAE + sgd + ONE), _run(tmp_path / "sgd2", VAE + sgd + TWO))
    assert worst < 1e-6 and relative < 1e-7, (worst, relative)
    one = _run(tmp_path / "one", VAE + ONE)
    two = _difference(one, _run(tmp_path / "two", VAE + TWO))
    split = _difference(one, _run(tmp_path / "acc", VAE + ["data.batch_size=8", "model.accumulate_grad_batches=2"]))
    assert two[1] < 2 * split[1] and two[1] < 1e-3, (two, split)


def _files(root: Path) -> set[str]:
    """Every file under a run's folder, by relative path (a timestamped event file by its folder)."""
    return {str(p.relative_to(root).parent if "events.out" in p.name else p.relative_to(root))
            for p in root.rglob("*") if p.is_file()}


def test_the_diffusion_model_ends_the_same_on_one_or_two_processes(tmp_path, stage1):
    # with a logger and sample grids, so that the second rank has something it could write: it writes nothing
    args = LDM + [f"model.first_stage.ckpt={stage1}", "trainer.max_steps=4", "logger=csv",
                  "model.sample_every_n_steps=2"]
    one = _run(tmp_path / "one", args + ONE)
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    two = _run(tmp_path / "two", args + TWO + ["+callbacks.ranks._target_=resume_helpers.SaveRankStates",
                                               f"+callbacks.ranks.out_dir={ranks}"])
    # every rank ends with the same weights and EMA, bit for bit (the EMA averages the all-reduced weights)
    first, second = (torch.load(ranks / f"rank{r}.pt") for r in (0, 1))
    assert first.keys() == second.keys() and any(k.startswith("model_ema.") for k in first)
    assert all(torch.equal(first[k], second[k]) for k in first)
    # only rank 0 writes: the two-process run leaves exactly the files of the one-process run
    files = _files(tmp_path / "one")
    assert {f.split("/")[0] for f in files} == {"csv", "checkpoints", "images"}
    assert _files(tmp_path / "two") == files
    assert one["state_dict"]["scale_factor"] == pytest.approx(float(two["state_dict"]["scale_factor"]), rel=1e-6)
    _assert_same_weights(one, two)
    # a control: another seed moves the weights by far more than the processes' difference
    other = _run(tmp_path / "other", args + ONE + ["seed=4"])
    worst, relative = _difference(one, other)
    assert worst > 1e-3 and relative > 1e-3, (worst, relative)


def test_a_run_resumed_on_two_processes_ends_where_the_one_process_run_ends(tmp_path, stage1):
    args = LDM + [f"model.first_stage.ckpt={stage1}"]
    full = _run(tmp_path / "full", args + ONE + ["trainer.max_steps=4"])
    _run(tmp_path / "part", args + ONE + ["trainer.max_steps=2"])
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    resumed = _run(tmp_path / "part", args + TWO + ["trainer.max_steps=4", f"ckpt_path={ckpt}"])
    _assert_same_weights(full, resumed)


@pytest.mark.parametrize("world, batch, total, expected", [(1, 8, 16, (8, 2)), (2, 8, 16, (8, 1)), (2, 32, 16, (8, 1)),
                                                           (4, 4, 64, (4, 4)), (1, 32, None, (32, 1))])
def test_global_batch_size_sets_the_batch_and_the_accumulation(world, batch, total, expected):
    from sdlight.data.datamodules import ShapesDataModule

    dm = ShapesDataModule(batch_size=batch, global_batch_size=total)
    accumulate = dm.fit_global_batch(world)
    assert (dm.batch_size, accumulate) == expected


@pytest.mark.parametrize("world, batch, total, needle", [(2, 8, 15, "does not split over 2 processes"),
                                                         (1, 6, 16, "give data.batch_size=4")])
def test_a_global_batch_size_that_does_not_fit_is_one_line(world, batch, total, needle):
    from sdlight.data.datamodules import ShapesDataModule
    from sdlight.errors import UsageError

    with pytest.raises(UsageError, match=needle):
        ShapesDataModule(batch_size=batch, global_batch_size=total).fit_global_batch(world)


def test_a_global_batch_accumulated_on_one_process_ends_as_on_two(tmp_path, stage1):
    """data.global_batch_size=16: 8 per process x 2 accumulated on one process, 8 x 2 processes under ddp_sim."""
    args = LDM + [f"model.first_stage.ckpt={stage1}", "trainer.max_steps=4", "data.global_batch_size=16",
                  "data.batch_size=8"]
    _assert_same_weights(_run(tmp_path / "acc", args), _run(tmp_path / "two", args + ["trainer=ddp_sim"]))
    _, objects = train(compose_train([*QUIET, *VAE, "data.global_batch_size=16", "data.batch_size=16",
                                      "trainer.max_steps=1"], tmp_path / "vae"))
    assert objects["datamodule"].batch_size == 16 and objects["model"].accumulate_grad_batches == 1
    _, objects = train(compose_train([*QUIET, *VAE, "data.global_batch_size=16", "data.batch_size=8",
                                      "trainer.max_steps=1"], tmp_path / "vae2"))
    assert objects["model"].accumulate_grad_batches == 2  # stage 1 accumulates itself (manual optimization)


def test_sample_metrics_are_the_same_on_one_or_two_processes(tmp_path, stage1):
    """The adherence callback on 1 process and on 2: each rank samples whole chunks of the 12 samples, each chunk
    from its own generator, so the two runs sample the same images and score the same. The weights are kept equal
    (lr 0, a given scale factor) so that only the sampling is compared; FID and KID: tests/callbacks/test_fid.py."""
    args = LDM + [f"model.first_stage.ckpt={stage1}", "trainer.max_steps=1", "model.optimizer.lr=0",
                  "model.scale_factor=1.0", "callbacks=[default,adherence]", "callbacks.adherence.num_samples=12",
                  "callbacks.adherence.batch_size=4", "callbacks.adherence.steps=3",
                  "callbacks.adherence.every_n_steps=null",
                  "callbacks.adherence._target_=resume_helpers.RecordingAdherence"]
    scores, images = [], []
    for name, world in (("one", ONE), ("two", TWO)):
        out = tmp_path / f"{name}_images"
        out.mkdir()
        metrics, _ = train(compose_train([*QUIET, *args, *world, f"+callbacks.adherence.out_dir={out}"],
                                         tmp_path / name))
        scores.append({k: float(v) for k, v in metrics.items() if k.startswith("val/adherence/")})
        images.append(torch.cat([torch.load(f) for f in sorted(out.glob("rank*.pt"))]))
    assert [len(i) for i in images] == [12, 12]
    # equal up to float reduction order (each spawned process runs on fewer threads: measured 2e-6 at most)
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=2e-5)
    assert len(scores[0]) >= 5 and scores[0] == scores[1], scores
