"""The latent cache: sdlight.encode's shards read back by data=latents, one training step from the cache equal to
one from images, the manifest's refusals, cached text contexts, broken shards, restarts, DDP and resume."""

import copy
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from sdlight.data.datamodules import ShapesDataModule
from sdlight.data.latents import LatentsDataModule, from_bytes, read_manifest
from sdlight.data.shapes import ShapesDataset
from sdlight.encode import encode_dataset
from sdlight.errors import UsageError
from sdlight.models.latents import CachedContexts, check_cache

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS / "data")]
from conftest import compose_train, random_stage1_checkpoint, train_tiny_text_ldm  # noqa: E402
from imagefiles import under_trainer  # noqa: E402


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stages = _module(TESTS / "stages" / "conftest.py", "stages_conftest")  # tiny_ldm, tiny_vae, SIZE
clip = _module(TESTS / "conditioning" / "test_open_clip.py", "open_clip_tests")  # tiny_clip


def shapes(n_train: int = 16, n_val: int = 8, **kwargs) -> ShapesDataModule:
    return ShapesDataModule(train_size=n_train, val_size=n_val, image_size=stages.SIZE, batch_size=4, **kwargs)


def frozen_text_encoder(seed: int = 0):
    from sdlight.conditioning import OpenCLIPTextEncoder

    return OpenCLIPTextEncoder(arch="ViT-B-32", layer="penultimate", max_length=16, model=clip.tiny_clip(seed))


def cached_and_images(out: Path, dtype: str, text_encoder=None):
    """Encodes shapes with tiny_vae(0) into ``out``; returns (manifest, the first 4 val items as a cached batch,
    the same items as an image batch)."""
    manifest = encode_dataset(stages.tiny_vae(0), shapes(), out, dtype=dtype, text_encoder=text_encoder,
                              shard_size=6, progress=False)
    dm = LatentsDataModule(root=str(out), batch_size=4)
    dm.setup()
    cached = dm.on_before_batch_transfer(next(iter(dm.val_dataloader())), 0)
    val = ShapesDataset("val", 8, image_size=stages.SIZE)
    images = default_collate([val[int(k)] for k in cached["key"]])
    assert cached["text"] == images["text"]
    return manifest, cached, images


def test_encode_writes_shards_and_a_manifest_that_data_latents_reads(tmp_path):
    manifest, cached, images = cached_and_images(tmp_path, "float16")
    assert manifest["splits"]["train"]["samples"] == 16 and manifest["splits"]["val"]["samples"] == 8
    assert manifest["splits"]["train"]["shards"] == [f"train-00000{i}.tar" for i in range(3)]  # shard_size 6
    assert manifest["latent_shape"] == [4, 4, 4] and manifest["image_size"] == stages.SIZE
    assert manifest["dtype"] == "float16" and manifest["bytes_per_image"] > 0
    assert 0 < manifest["storage_error"]["std_rel"] < 2 ** -10  # float16: half an ulp, 2^-11 relative
    assert manifest == {**json.loads((tmp_path / "manifest.json").read_text())}
    assert not (tmp_path / "progress.json").exists()
    posterior = stages.tiny_vae(0).encode(images["image"])
    torch.testing.assert_close(cached["latent_mean"].float(), posterior.mean, rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(cached["latent_std"].float(), posterior.std, rtol=2e-3, atol=0)
    assert torch.equal(cached["attributes"], images["attributes"]) and torch.equal(cached["label"], images["label"])
    dm = LatentsDataModule(root=str(tmp_path), batch_size=4, train_size=None)
    dm.setup()
    assert len(dm.train_dataloader()) == 4  # the cache's 16 training samples per epoch
    assert not dm.has_images
    dm = under_trainer(LatentsDataModule(root=str(tmp_path), batch_size=32))
    with pytest.raises(UsageError, match=re.escape(
            f"data.root={tmp_path} holds 16 training samples (and 8 for validation), fewer than one batch "
            "(data.batch_size=32 x 1 rank): lower data.batch_size, or encode the cache with a smaller validation")):
        dm.setup("fit")


def one_step(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss of one training step (posterior sample, dropout, t and noise from seed 0) and the weights after
    its optimizer step."""
    optimizer = model.configure_optimizers()
    loss = model.net.losses(batch, torch.Generator().manual_seed(0), p_uncond=0.5)[0].mean()
    loss.backward()
    optimizer.step()
    return loss.detach(), [p.detach().clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float16", 2e-3)])
@pytest.mark.parametrize("text", ["learned", "frozen"])
def test_one_training_step_from_the_cache_equals_one_from_images(tmp_path, dtype, tol, text):
    encoder = frozen_text_encoder() if text == "frozen" else None
    manifest, cached, images = cached_and_images(tmp_path, dtype, encoder)
    conditioning = frozen_text_encoder() if text == "frozen" else "text"
    from_images = stages.tiny_ldm(conditioning, first_stage=stages.tiny_vae(0))
    from_cache = copy.deepcopy(from_images)
    net = from_cache.net
    uses_contexts = check_cache(manifest, net.first_stage_model, net.cond_stage_model, False)
    assert uses_contexts == (text == "frozen") and ("context" in cached) == (text == "frozen")
    net.cached_contexts = CachedContexts() if uses_contexts else None
    if uses_contexts:  # the text tower is not run for cached contexts (only once, for the null context)
        calls = []
        net.cond_stage_model.single.register_forward_hook(lambda *a: calls.append(1))
    loss_i, weights_i = one_step(from_images, images)
    loss_c, weights_c = one_step(from_cache, cached)
    torch.testing.assert_close(loss_c, loss_i, rtol=tol, atol=tol)
    for a, b in zip(weights_c, weights_i):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    if uses_contexts:
        assert len(calls) == 1


def test_a_cache_of_another_autoencoder_or_text_encoder_is_refused(tmp_path):
    manifest = encode_dataset(stages.tiny_vae(0), shapes(8, 4), tmp_path, text_encoder=frozen_text_encoder(0),
                              progress=False)
    model = stages.tiny_ldm(frozen_text_encoder(0), first_stage=stages.tiny_vae(1))
    with pytest.raises(UsageError, match=rf"another autoencoder.*sha256 {manifest['first_stage']['sha256'][:16]}"):
        check_cache(manifest, model.net.first_stage_model, model.net.cond_stage_model, False, "other.ckpt")
    model = stages.tiny_ldm(frozen_text_encoder(1), first_stage=stages.tiny_vae(0))
    with pytest.raises(UsageError, match="text contexts of another text encoder"):
        check_cache(manifest, model.net.first_stage_model, model.net.cond_stage_model, False)
    with pytest.raises(UsageError, match="model.concat"):
        check_cache(manifest, model.net.first_stage_model, model.net.cond_stage_model, True)


def test_options_that_cannot_be_cached_are_refused(tmp_path):
    from sdlight.data.folder import FolderDataModule

    with pytest.raises(UsageError, match="data.flip=true"):
        encode_dataset(stages.tiny_vae(0), FolderDataModule(root=str(tmp_path), flip=True), tmp_path / "o")
    with pytest.raises(UsageError, match="dtype=int8"):
        encode_dataset(stages.tiny_vae(0), shapes(), tmp_path / "o", dtype="int8")
    with pytest.raises(UsageError, match="learned one"):
        encode_dataset(stages.tiny_vae(0), shapes(), tmp_path / "o", text_encoder=stages.tiny_conditioning("text"))
    with pytest.raises(UsageError, match="no manifest.json"):
        LatentsDataModule(root=str(tmp_path))
    encode_dataset(stages.tiny_vae(0), shapes(4, 0), tmp_path / "c", progress=False)
    with pytest.raises(UsageError, match="data.image_size=32 .* 16 px"):
        LatentsDataModule(root=str(tmp_path / "c"), image_size=32)


def test_an_interrupted_encode_finishes_where_it_stopped(tmp_path, monkeypatch):
    import sdlight.encode as encode

    real, calls = encode._write_shard, []

    def fail_after_one(path, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(encode, "_write_shard", fail_after_one)
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(stages.tiny_vae(0), shapes(), tmp_path, shard_size=6, progress=False)
    assert calls == ["train-000000.tar"] and (tmp_path / "progress.json").is_file()
    with pytest.raises(UsageError, match="unfinished latent cache.*again to finish"):
        read_manifest(tmp_path)
    with pytest.raises(UsageError, match="other settings"):
        encode_dataset(stages.tiny_vae(0), shapes(), tmp_path, shard_size=6, dtype="bfloat16", progress=False)
    first = (tmp_path / "train-000000.tar").stat().st_mtime_ns
    monkeypatch.setattr(encode, "_write_shard", real)
    manifest = encode_dataset(stages.tiny_vae(0), shapes(), tmp_path, shard_size=6, progress=False)
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns == first  # kept, not encoded again
    assert manifest["splits"]["train"]["samples"] == 16 and manifest["splits"]["val"]["samples"] == 8
    assert encode_dataset(stages.tiny_vae(0), shapes(), tmp_path, shard_size=6, progress=False) == manifest


def test_broken_images_are_skipped_and_broken_or_missing_shards_counted(tmp_path):
    from imagefiles import make_image_folder

    from sdlight.data.folder import FolderDataModule

    src = make_image_folder(tmp_path / "src", per_class=6)
    (src / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    (src / "cat" / "broken.txt").write_text("broken")
    folder = FolderDataModule(root=str(src), val_fraction=0.25, image_size=16, max_skip_fraction=0.5)
    manifest = encode_dataset(stages.tiny_vae(0), folder, tmp_path / "c", shard_size=2, num_workers=2,
                              progress=False)  # images decoded in DataLoader workers
    splits = manifest["splits"]
    assert splits["train"]["samples"] + splits["val"]["samples"] == 12 and len(splits["train"]["shards"]) >= 4
    assert splits["train"]["skipped"] + splits["val"]["skipped"] == 1
    assert "broken.jpg" in " ".join(splits["train"]["skipped_examples"] + splits["val"]["skipped_examples"])
    cache = tmp_path / "c"
    shards = sorted(cache.glob("train-*.tar"))
    shards[0].write_bytes(shards[0].read_bytes()[:700])  # truncated: its first sample's latent is cut
    shards[1].unlink()  # missing
    dm = LatentsDataModule(root=str(cache), batch_size=2, train_size=8, num_workers=0, max_skip_fraction=0.9)
    dm.setup()
    got = [dm.on_before_batch_transfer(b, 0) for b in dm.train_dataloader()]
    assert len(got) == 4 and all(b["latent_mean"].shape == (2, 4, 4, 4) for b in got)
    assert dm.skips.skipped > 0 and any("train-00000" in e for e in dm.skips.examples)
    with pytest.raises(ValueError, match="bytes, expected"):
        from_bytes(b"\0" * 10, torch.float16, (2, 4, 4, 4), "x.latent")


def test_shards_are_encoded_once_each_with_the_held_out_validation_samples_apart(tmp_path):
    from imagefiles import write_shards

    from sdlight.data.shards import WebDataModule

    write_shards(tmp_path / "s", 12, maxcount=5)
    shards = WebDataModule(urls=str(tmp_path / "s" / "s-{0000..0002}.tar"), val_size=4, image_size=16,
                           crop="random", num_workers=0)
    manifest = encode_dataset(stages.tiny_vae(0), shards, tmp_path / "c", shard_size=5, progress=False)
    assert [manifest["splits"][s]["samples"] for s in ("train", "val")] == [8, 4]
    dm = LatentsDataModule(root=str(tmp_path / "c"), batch_size=4, resampled=False, shuffle_buffer=1)
    dm.setup()
    train = [t for b in dm.train_dataloader() for t in dm.on_before_batch_transfer(b, 0)["text"]]
    val = [t for b in dm.val_dataloader() for t in dm.on_before_batch_transfer(b, 0)["text"]]
    assert sorted(train) == sorted(f"caption {i}" for i in range(4, 12)) and val == [f"caption {i}" for i in range(4)]


# ------------------------------------------------------------------------------ training through train()
TRAIN = ["data=latents", "data.num_workers=0", "logger=none"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Shapes at 32 px encoded with the random stage 1 that train_tiny_text_ldm writes (same seed, same hash)."""
    from sdlight.checkpoints import load_first_stage

    root = tmp_path_factory.mktemp("cache")
    vae = random_stage1_checkpoint(root / "vae.ckpt")
    encode_dataset(load_first_stage(vae), ShapesDataModule(train_size=16, val_size=8, image_size=32), root / "c",
                   first_stage_ckpt=str(vae), shard_size=4, progress=False)
    return root / "c"


def test_stage_two_trains_from_the_cache_without_the_vae_encoder(tmp_path, cache, monkeypatch):
    from sdlight.nn.autoencoder import AutoencoderKL

    calls = []
    real = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x: calls.append(1) or real(self, x))
    _, objects = train_tiny_text_ldm(tmp_path, [*TRAIN, f"data.root={cache}"])
    trainer = objects["trainer"]
    assert trainer.state.finished and trainer.num_training_batches == 2  # train_size 16, batch 8
    assert not calls  # neither the scale-factor estimate nor the steps ran the encoder
    assert 0 < float(objects["model"].net.scale_factor) < 100 and "val/loss" in trainer.callback_metrics


@pytest.mark.parametrize("objective", [["model/objective=rectified_flow", "model.objective.shift=auto"],
                                       ["model/objective=edm"]], ids=["rectified_flow_auto_shift", "edm"])
def test_other_objectives_train_from_the_cache_with_posthoc_ema(tmp_path, cache, objective):
    """The cache's image size (data.image_size null) reaches the objective: rectified flow's shift=auto is Flux's
    for the cache's 8x8 latents (16 tokens of 2x2); the post-hoc EMA keeps its snapshots."""
    from sdlight.diffusion.rectified_flow import shift_for_tokens

    _, objects = train_tiny_text_ldm(tmp_path, [*TRAIN, f"data.root={cache}", *objective,
                                                "callbacks=[default,posthoc_ema]", "callbacks.posthoc_ema.every_n_steps=1"])
    net = objects["model"].net
    assert objects["trainer"].state.finished and net.image_size == 32
    if net.objective.name == "rectified_flow":
        assert net.objective.shift == pytest.approx(shift_for_tokens(16, 0.5, 1.15, 256, 4096))
    snapshots = sorted(p.name for p in (tmp_path / "checkpoints" / "posthoc_ema").iterdir())
    assert len(snapshots) == 4 and snapshots[-1] == "sigma_rel_0.1_step_0000002.safetensors"


def test_a_run_with_another_first_stage_stops_at_once(tmp_path, cache):
    cfg = compose_train(["+experiment=quickstart_ldm", *TRAIN, f"data.root={cache}", "data.batch_size=4",
                         f"model.first_stage.ckpt={random_stage1_checkpoint(tmp_path / 'other.ckpt', seed=1)}"],
                        tmp_path)
    from sdlight.train import train

    with pytest.raises(UsageError, match=r"another autoencoder.*other\.ckpt"):
        train(cfg)


def test_ddp_ranks_read_different_cached_samples_and_a_run_resumes(tmp_path, cache):
    from omegaconf import open_dict

    from sdlight.train import train

    vae = random_stage1_checkpoint(tmp_path / "vae.ckpt")
    base = ["+experiment=quickstart_ldm", *TRAIN, f"data.root={cache}", f"model.first_stage.ckpt={vae}",
            "data.batch_size=4", "data.train_size=16", "data.val_size=4", "trainer.max_epochs=1",
            "model.sample_every_n_steps=0", "callbacks=none", "trainer.num_sanity_val_steps=0"]
    cfg = compose_train([*base, "trainer=ddp_sim", "trainer.sync_batchnorm=false", "+trainer.limit_val_batches=0"],
                        tmp_path / "ddp")
    with open_dict(cfg):
        cfg.callbacks = {"keys": {"_target_": "imagefiles.KeyRecorder", "out": str(tmp_path)}}
    train(cfg)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 8 and set(seen[0]) != set(seen[1])

    cfg = compose_train([*base, "callbacks=default", "~callbacks.rich_progress_bar", "~callbacks.model_summary"],
                        tmp_path / "run")
    _, first = train(cfg)
    scale = float(first["model"].net.scale_factor)
    resumed = compose_train([*base, "trainer.max_epochs=2", f"ckpt_path={tmp_path / 'run/checkpoints/last.ckpt'}"],
                            tmp_path / "resumed")
    _, objects = train(resumed)
    assert objects["trainer"].current_epoch == 2 and objects["trainer"].global_step == 8
    assert float(objects["model"].net.scale_factor) == scale  # kept from the checkpoint, not estimated again


def test_fid_skips_latent_data_saying_why(cache):
    from types import SimpleNamespace

    from sdlight.callbacks.fid import FIDCallback

    callback = FIDCallback(num_samples=4, feature_extractor=torch.nn.Flatten())
    trainer = SimpleNamespace(datamodule=LatentsDataModule(root=str(cache)))
    with pytest.warns(UserWarning, match="no real images, so FID is skipped"):
        assert callback.evaluate(trainer, None) == {}
