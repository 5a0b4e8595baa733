"""LPIPS against the `lpips` package, with a random-init VGG16 trunk (no ImageNet weights exist offline)."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from torch import nn

from sdlight.losses import LPIPS
from sdlight.weights import KNOWN, WeightsNotFoundError

lpips_pkg = pytest.importorskip("lpips")


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    """The lpips package's LPIPS-VGG with a random-init trunk (pnet_rand) and its released v0.1 heads."""
    torch.manual_seed(0)
    with warnings.catch_warnings():  # torchvision's deprecation of `pretrained=False`, used inside lpips
        warnings.simplefilter("ignore", UserWarning)
        return lpips_pkg.LPIPS(net="vgg", pnet_rand=True, pretrained=True, verbose=False).eval()


@pytest.fixture(scope="module")
def random_trunk_file(reference, tmp_path_factory):
    """The reference's random-init trunk saved in the torchvision VGG16 layout (``features.N.*``)."""
    state = {f"features.{k.split('.', 1)[1]}": v for k, v in reference.net.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files carry the classifier: must be ignored
    path = tmp_path_factory.mktemp("weights") / KNOWN["vgg16"].filename
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def random_metric() -> LPIPS:
    """Our LPIPS with a random-init trunk and random (non-negative) heads."""
    torch.manual_seed(0)
    return LPIPS(pretrained=False)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1  # 16 px: 1x1 features at relu5_3
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return x, y


def _offline_empty(monkeypatch, tmp_path):
    monkeypatch.setenv("SDLIGHT_OFFLINE", "1")
    monkeypatch.setenv("SDLIGHT_WEIGHTS", str(tmp_path / "empty_weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)


def test_matches_lpips_package_with_copied_random_trunk(reference, images):
    ours = LPIPS(pretrained=False)
    ours.net.load_state_dict(reference.net.state_dict())  # same slice/index names as the lpips package
    ours.load_heads()  # the v0.1 heads shipped with the lpips package
    for i in range(5):
        assert torch.equal(getattr(ours, f"lin{i}").model[1].weight, reference.lins[i].model[1].weight)
    x, y = images
    with torch.no_grad():
        expected = reference(x, y)
        got = ours(x, y)
    assert got.shape == expected.shape == (2, 1, 1, 1)
    assert expected.min() > 0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_trunk_loaded_from_torchvision_file(reference, random_trunk_file, images, monkeypatch, tmp_path):
    _offline_empty(monkeypatch, tmp_path)
    x, y = images
    with torch.no_grad():
        expected = reference(x, y)
        explicit = LPIPS(trunk_path=random_trunk_file)(x, y)
        torch.testing.assert_close(explicit, expected, atol=1e-5, rtol=1e-5)
        # found through $SDLIGHT_WEIGHTS as well
        monkeypatch.setenv("SDLIGHT_WEIGHTS", str(random_trunk_file.parent))
        torch.testing.assert_close(LPIPS()(x, y), expected, atol=1e-5, rtol=1e-5)


def test_identical_images_give_zero_and_distance_is_symmetric(random_metric, images):
    metric = random_metric
    assert all(getattr(metric, f"lin{i}").model[1].weight.min() >= 0 for i in range(5))
    x, y = images
    with torch.no_grad():
        assert metric(x, x).abs().max() == 0
        d = metric(x, y)
        assert (d > 0).all()
        torch.testing.assert_close(metric(y, x), d)


def test_frozen_eval_and_differentiable_in_its_inputs(random_metric, images):
    metric = random_metric
    assert not any(p.requires_grad for p in metric.parameters())
    metric.train()
    assert not any(m.training for m in metric.modules())  # dropout of the heads stays off
    x, y = images
    y = y.clone().requires_grad_(True)
    metric(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in metric.parameters())


class _Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 2)
        self.perceptual_loss = LPIPS(pretrained=False)


def test_kept_out_of_parent_state_dict():
    parent = _Parent()
    state = parent.state_dict()
    assert set(state) == {"proj.weight", "proj.bias"}
    assert parent.perceptual_loss.state_dict() == {}

    before = parent.perceptual_loss.lin0.model[1].weight.clone()
    fresh = _Parent()
    fresh.load_state_dict(state, strict=True)  # absence of LPIPS keys is fine
    # CompVis checkpoints hold loss.perceptual_loss.* (possibly other values/shapes): ignored, not loaded
    junk = dict(state)
    junk["perceptual_loss.lin0.model.1.weight"] = torch.full((1, 64, 1, 1), 7.0)
    junk["perceptual_loss.net.slice1.0.weight"] = torch.zeros(1)
    junk["perceptual_loss.scaling_layer.shift"] = torch.zeros(3)
    result = parent.load_state_dict(junk, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(parent.perceptual_loss.lin0.model[1].weight, before)
    # still moved with its parent
    parent.to(torch.float64)
    assert parent.perceptual_loss.net.slice1[0].weight.dtype == torch.float64


def test_missing_trunk_offline_raises_fast(monkeypatch, tmp_path):
    _offline_empty(monkeypatch, tmp_path)
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        LPIPS()
    assert time.perf_counter() - start < 2.0
    assert KNOWN["vgg16"].filename in str(info.value)
    assert KNOWN["vgg16"].url in str(info.value)
