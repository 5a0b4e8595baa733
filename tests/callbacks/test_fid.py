"""FIDCallback through a real Trainer: FID / KID against float64 references, the real-statistics cache, rFID,
fast failure without the Inception weights, and the Inception's paper settings."""

import time

import lightning as L
import numpy as np
import pytest
import scipy.linalg
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from sdlight.callbacks.fid import FIDCallback, InceptionFeatures, extractor_id
from sdlight.weights import WeightsNotFoundError

DIM = 12  # features = the 3x2x2 pixels of an image, mapped to [0, 1]


def gaussian(n, seed, mean, scale):
    """n samples of a correlated Gaussian in [0, 1]^DIM (well inside: no clamping)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(DIM, DIM, generator=g, dtype=torch.float64) * scale / DIM**0.5
    x = mean + torch.randn(n, DIM, generator=g, dtype=torch.float64) @ mixing.T
    assert 0.05 < x.min() and x.max() < 0.95
    return x.float()


class GaussianImagesTestDataset(Dataset):
    def __init__(self, n=40, seed=0):
        self.features = gaussian(n, seed, 0.5, 0.06)

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return {"image": self.features[i].view(3, 2, 2) * 2 - 1, "label": i % 3}


class FlattenTestExtractor(torch.nn.Module):
    """Tiny stand-in for the Inception: features are the pixels; counts the images it sees."""

    num_features = DIM

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # gives it weights for extractor_id to hash
        self.images_seen = 0

    def forward(self, x):
        self.images_seen += len(x)
        return x.flatten(1) * self.scale


class TrainingTestModule(L.LightningModule):
    """The least a LightningModule needs to train for a few steps on the Gaussian images."""

    condition_keys = ["label"]

    def __init__(self, val_size=40):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.val_size = val_size

    def training_step(self, batch, batch_idx):
        return self.layer(batch["image"].flatten(1)[:, :2]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.layer.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(GaussianImagesTestDataset(16, seed=1), batch_size=4)

    def val_dataloader(self):
        return DataLoader(GaussianImagesTestDataset(self.val_size), batch_size=8)


class GaussianGeneratorTestModule(TrainingTestModule):
    """Test double of the stage-2 module: ``generate`` draws images from another Gaussian and keeps them."""

    def __init__(self, val_size=40):
        super().__init__(val_size)
        g = torch.Generator().manual_seed(7)
        self.mixing = torch.randn(DIM, DIM, generator=g) * 0.08 / DIM**0.5
        self.shift = 0.45 + 0.1 * torch.rand(DIM, generator=g)
        self.generated = []

    def generate(self, conditions, num_samples=None, *, steps=None, guidance_scale=None, generator=None,
                 use_ema=True):
        x = self.shift + torch.randn(num_samples, DIM, generator=generator) @ self.mixing.T
        self.generated.append(x)
        return x.view(-1, 3, 2, 2) * 2 - 1


class ShrinkingTestAutoencoder(torch.nn.Module):
    def forward(self, x, sample_posterior=True):
        assert not sample_posterior  # rFID uses the posterior mode
        return x * 0.8, None


class ReconstructingTestModule(TrainingTestModule):
    """Test double of the autoencoder stage: no ``generate``, an ``.autoencoder`` that shrinks its input."""

    def __init__(self, val_size=40):
        super().__init__(val_size)
        self.autoencoder = ShrinkingTestAutoencoder()


def reference_fid(real, fake):
    """Fréchet distance of two sample sets in float64 with scipy's matrix square root."""
    real, fake = real.double().numpy(), fake.double().numpy()
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def reference_kid(real, fake):
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3, over the full sets, float64."""
    x, y = real.double().numpy(), fake.double().numpy()
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def fit(module, callback, tmp_path, max_steps=2):
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=CSVLogger(tmp_path), callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module)
    return trainer


def test_fid_and_kid_match_float64_references_and_stay_out_of_the_module(tmp_path):
    module = GaussianGeneratorTestModule(val_size=40)
    keys_before = set(module.state_dict())
    extractor = FlattenTestExtractor()
    callback = FIDCallback(every_n_steps=2, num_samples=40, batch_size=16, feature_extractor=extractor,
                           cache_dir=tmp_path / "stats", kid=True, kid_subsets=3, kid_subset_size=1000)
    trainer = fit(module, callback, tmp_path, max_steps=2)

    assert callback.evaluations == 1  # at step 2; not again at the end of training at step 2
    real = GaussianImagesTestDataset(40).features
    fake = torch.cat(module.generated)
    assert fake.shape == (40, DIM)
    fid = float(trainer.callback_metrics["val/fid"])
    assert fid == pytest.approx(reference_fid(real, fake), rel=1e-6)
    assert fid > 1e-3
    # subset_size is capped at the 40 samples, so every "subset" is the full set: KID is exact, its std 0
    assert float(trainer.callback_metrics["val/kid_mean"]) == pytest.approx(reference_kid(real, fake), rel=1e-6)
    assert float(trainer.callback_metrics["val/kid_std"]) == pytest.approx(0, abs=1e-9)
    assert "val/fid" in (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    # the feature network lives in the callback: not in the module, its state_dict or the callback's state
    assert set(module.state_dict()) == keys_before
    assert all(m is not extractor for m in module.modules())
    assert callback.state_dict() == {}


def test_real_statistics_are_computed_once_and_cached(tmp_path):
    def run(**kwargs):
        extractor = FlattenTestExtractor()
        callback = FIDCallback(every_n_steps=None, num_samples=24, batch_size=8, feature_extractor=extractor,
                               cache_dir=tmp_path / "stats", **kwargs)
        trainer = fit(GaussianGeneratorTestModule(val_size=40), callback, tmp_path, max_steps=1)
        return extractor.images_seen, float(trainer.callback_metrics["val/fid"])

    seen, first = run()
    assert seen == 24 + 24  # real statistics (num_real defaults to num_samples) + samples
    (cached,) = (tmp_path / "stats").glob("*.pt")
    seen, second = run()
    assert seen == 24 and second == first  # cache hit: only the samples go through the network
    assert len(list((tmp_path / "stats").glob("*.pt"))) == 1
    # another number of real images is other statistics; KID needs the features, which that file lacks
    assert run(num_real=32)[0] == 32 + 24
    assert run(num_real=32, kid=True, kid_subset_size=8)[0] == 32 + 24
    assert run(num_real=32, kid=True, kid_subset_size=8)[0] == 24
    assert len(list((tmp_path / "stats").glob("*.pt"))) == 2
    # real images beyond the val set's size are not invented
    with pytest.warns(UserWarning, match="val set has 40"):
        assert run(num_real=100)[0] == 40 + 24


def test_cache_key_depends_on_extractor_and_dataset(tmp_path):
    callback = FIDCallback(num_samples=8, feature_extractor=FlattenTestExtractor(), cache_dir=tmp_path)
    loader = DataLoader(GaussianImagesTestDataset(40), batch_size=8)
    fields = callback.cache_fields(loader, 8)
    assert fields["resolution"] == [2, 2] and fields["num_real"] == 8
    other_data = callback.cache_fields(DataLoader(GaussianImagesTestDataset(40, seed=5), batch_size=8), 8)
    assert callback.cache_path(other_data) != callback.cache_path(fields)
    other = FlattenTestExtractor()
    with torch.no_grad():
        other.scale.fill_(2.0)
    assert extractor_id(other) != extractor_id(FlattenTestExtractor()) == fields["extractor"]


def test_rfid_of_reconstructions_for_the_autoencoder_stage(tmp_path):
    module = ReconstructingTestModule(val_size=20)
    assert not hasattr(module, "generate") and hasattr(module, "autoencoder")
    callback = FIDCallback(every_n_steps=None, num_samples=50, batch_size=8, feature_extractor=FlattenTestExtractor())
    trainer = fit(module, callback, tmp_path, max_steps=1)
    assert "val/fid" not in trainer.callback_metrics
    real = GaussianImagesTestDataset(20).features  # capped at the val set: each image against its reconstruction
    fake = ((real * 2 - 1) * 0.8 + 1) / 2
    assert float(trainer.callback_metrics["val/rfid"]) == pytest.approx(reference_fid(real, fake), rel=1e-6)


def test_missing_inception_offline_fails_fast_and_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("SDLIGHT_OFFLINE", "1")
    monkeypatch.setenv("SDLIGHT_WEIGHTS", str(tmp_path / "empty"))
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        callback = FIDCallback(num_samples=8)
        start = time.perf_counter()
        with pytest.raises(WeightsNotFoundError, match="pt_inception"):
            callback.setup(None, GaussianGeneratorTestModule(), "fit")
        assert time.perf_counter() - start < 2.0
        with pytest.raises(WeightsNotFoundError, match="does not exist"):
            FIDCallback(weights_path=tmp_path / "nope.pth").setup(None, GaussianGeneratorTestModule(), "fit")
        # through the Trainer: the run stops at setup, before any training step
        module = GaussianGeneratorTestModule()
        with pytest.raises(WeightsNotFoundError):
            fit(module, FIDCallback(num_samples=8), tmp_path)
        assert module.global_step == 0
    finally:
        torch.hub.set_dir(hub)


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory):
    """A pt_inception-shaped file with random weights (the released file cannot be downloaded here)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe
    from torchmetrics.image.fid import NoTrainInceptionV3

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "load_state_dict_from_url", lambda *args, **kwargs: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, strict=True: None)
        torch.manual_seed(0)
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    path = tmp_path_factory.mktemp("weights") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return path


class StopForward(Exception):
    pass


def test_inception_features_quantise_like_png_and_resize_without_antialias(random_inception_file, monkeypatch):
    import torchmetrics.image.fid as tm_fid
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    monkeypatch.setenv("SDLIGHT_WEIGHTS", str(random_inception_file.parent))
    callback = FIDCallback(num_samples=8)
    callback.setup(None, GaussianGeneratorTestModule(), "fit")  # the file is found through $SDLIGHT_WEIGHTS
    features = callback.extractor
    assert isinstance(features, InceptionFeatures) and features.num_features == 2048
    assert features.net.use_antialias is False and features.net.features_list == ["2048"]
    assert extractor_id(features) == InceptionFeatures.extractor_id
    saved = torch.load(random_inception_file, weights_only=True)
    for name, value in features.net.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)

    # what reaches the network's first layer: stop the forward there (a full Inception pass is slow on CPU)
    captured = {}

    def resize_spy(x, size, align_corners):
        captured.update(x=x.clone(), size=size, align_corners=align_corners)
        raise StopForward

    monkeypatch.setattr(tm_fid, "interpolate_bilinear_2d_like_tensorflow1x", resize_spy)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(StopForward):
        features(images)
    assert captured["size"] == (299, 299) and captured["align_corners"] is False
    rounded = (images * 255).round()
    torch.testing.assert_close(captured["x"], rounded, rtol=0, atol=0)  # rounded like a PNG, not floored
    assert not torch.equal(captured["x"], (images * 255).floor())
    # and that resize is TF1's bilinear, not torch's antialiased one
    tf1 = interpolate_bilinear_2d_like_tensorflow1x(rounded, size=(299, 299), align_corners=False)
    antialiased = torch.nn.functional.interpolate(rounded, size=(299, 299), mode="bilinear", antialias=True)
    assert (tf1 - antialiased).abs().max() > 1


class SavingGeneratorTestModule(GaussianGeneratorTestModule):
    """Under DDP the samples are drawn in other processes: each rank writes its own to ``out_dir``."""

    def __init__(self, out_dir, val_size=40):
        super().__init__(val_size)
        self.out_dir = str(out_dir)

    def generate(self, conditions, num_samples=None, **kwargs):
        images = super().generate(conditions, num_samples, **kwargs)
        torch.save(torch.cat(self.generated), f"{self.out_dir}/fake_rank{self.global_rank}.pt")
        return images


def test_ddp_two_ranks_split_the_work_and_count_real_statistics_once(tmp_path):
    import csv

    module = SavingGeneratorTestModule(tmp_path, val_size=40)
    callback = FIDCallback(every_n_steps=None, num_samples=25, num_real=31, batch_size=8,
                           feature_extractor=FlattenTestExtractor(), cache_dir=tmp_path / "stats", kid=True,
                           kid_subsets=2, kid_subset_size=1000)

    def ddp_fit(module, callback, devices=2):
        version = len(list(tmp_path.glob("logs/*")))  # fixed here: the forked ranks would each pick one
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto",
                            max_steps=1,
                            logger=CSVLogger(tmp_path, name="logs", version=version), callbacks=[callback],
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0)
        trainer.fit(module)
        with open(tmp_path / "logs" / f"version_{version}" / "metrics.csv") as f:
            return next(r for r in csv.DictReader(f) if r.get("val/fid"))

    row = ddp_fit(module, callback)
    fakes = [torch.load(tmp_path / f"fake_rank{r}.pt") for r in range(2)]
    assert [len(f) for f in fakes] == [16, 9]  # 25 samples in chunks of 8: two chunks a rank
    assert not torch.allclose(fakes[0][:9], fakes[1])  # each chunk its own noise
    fake = torch.cat(fakes)
    real = GaussianImagesTestDataset(40).features[:31]
    assert float(row["val/fid"]) == pytest.approx(reference_fid(real, fake), rel=1e-5)
    # KID: the 31 real features were shared out over the ranks and are gathered back in order; subset_size is
    # capped at 25; the subsets come from torch's RNG seeded with the callback's seed, as replayed here
    torch.manual_seed(0)
    subsets = [(torch.randperm(31)[:25], torch.randperm(25)[:25]) for _ in range(2)]
    want = np.mean([reference_kid(real[r], fake[f]) for r, f in subsets])
    assert float(row["val/kid_mean"]) == pytest.approx(want, rel=1e-5)
    (cached,) = (tmp_path / "stats").glob("*.pt")
    stats = torch.load(cached, weights_only=True)
    assert int(stats["n"]) == 31 and stats["features"].shape == (31, DIM)
    torch.testing.assert_close(stats["features"], real)
    torch.testing.assert_close(stats["sum"], real.double().sum(0))
    torch.testing.assert_close(stats["cov_sum"], real.double().T @ real.double())
    # a second run finds the cache (rank 0 reads it, then broadcasts): the same numbers, the file untouched
    modified = cached.stat().st_mtime_ns
    again = ddp_fit(SavingGeneratorTestModule(tmp_path, val_size=40), FIDCallback(
        every_n_steps=None, num_samples=25, num_real=31, batch_size=8, feature_extractor=FlattenTestExtractor(),
        cache_dir=tmp_path / "stats", kid=True, kid_subsets=2, kid_subset_size=1000))
    assert float(again["val/fid"]) == pytest.approx(float(row["val/fid"]), rel=1e-9)
    assert float(again["val/kid_mean"]) == pytest.approx(float(row["val/kid_mean"]), rel=1e-9)
    assert cached.stat().st_mtime_ns == modified
    # one process samples the same chunks from the same generators: the same images, FID and KID
    one = SavingGeneratorTestModule(tmp_path / "one", val_size=40)
    (tmp_path / "one").mkdir()
    single = ddp_fit(one, FIDCallback(every_n_steps=None, num_samples=25, num_real=31, batch_size=8,
                                      feature_extractor=FlattenTestExtractor(), cache_dir=tmp_path / "stats1",
                                      kid=True, kid_subsets=2, kid_subset_size=1000), devices=1)
    torch.testing.assert_close(torch.load(tmp_path / "one" / "fake_rank0.pt"), fake, rtol=0, atol=0)
    for key in ("val/fid", "val/kid_mean", "val/kid_std"):
        assert float(single[key]) == pytest.approx(float(row[key]), rel=1e-9), key
