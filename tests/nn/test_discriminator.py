"""PatchGAN discriminator and ActNorm against closed-form shape arithmetic and a float64 functional recomputation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdlight.nn.discriminator import ActNorm, NLayerDiscriminator, weights_init


def layer_specs(n_layers: int) -> list[tuple[int, int]]:
    """(kernel, stride) of every conv: n_layers stride-2 convs, then two stride-1 convs (all 4x4, pad 1)."""
    return [(4, 2)] * n_layers + [(4, 1)] * 2


def out_size(size: int, n_layers: int) -> int:
    for k, s in layer_specs(n_layers):
        size = (size + 2 * 1 - k) // s + 1
    return size


def receptive_field(n_layers: int) -> int:
    r = 1
    for k, s in reversed(layer_specs(n_layers)):
        r = r * s + (k - s)
    return r


@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("size", [(32, 32), (37, 50)])
def test_patch_grid_shape(n_layers, size):
    d = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=n_layers).eval()
    with torch.no_grad():
        y = d(torch.randn(2, 3, *size))
    assert y.shape == (2, 1, out_size(size[0], n_layers), out_size(size[1], n_layers))


def test_receptive_field_matches_closed_form():
    assert [receptive_field(n) for n in (1, 2, 3)] == [16, 34, 70]  # pix2pix's 70x70 PatchGAN for n_layers=3
    torch.manual_seed(0)
    for n_layers in (1, 2, 3):
        d = NLayerDiscriminator(input_nc=1, ndf=8, n_layers=n_layers).eval()
        x = torch.randn(1, 1, 96, 96, requires_grad=True)
        y = d(x)
        c = y.shape[-1] // 2  # a central logit, whose field lies fully inside the image
        y[0, 0, c, c].backward()
        rows = x.grad[0, 0].abs().sum(1).nonzero()
        cols = x.grad[0, 0].abs().sum(0).nonzero()
        assert rows.max() - rows.min() + 1 == receptive_field(n_layers)
        assert cols.max() - cols.min() + 1 == receptive_field(n_layers)


def test_state_dict_layout_matches_compvis():
    ndf = 64
    batch = NLayerDiscriminator(input_nc=3, ndf=ndf, n_layers=3, norm="batch").state_dict()
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    expected = (["main.0.weight", "main.0.bias", "main.2.weight"] + [f"main.3.{k}" for k in bn] + ["main.5.weight"]
                + [f"main.6.{k}" for k in bn] + ["main.8.weight"] + [f"main.9.{k}" for k in bn]
                + ["main.11.weight", "main.11.bias"])
    assert list(batch) == expected
    shapes = {"main.0.weight": (64, 3, 4, 4), "main.2.weight": (128, 64, 4, 4), "main.5.weight": (256, 128, 4, 4),
              "main.8.weight": (512, 256, 4, 4), "main.11.weight": (1, 512, 4, 4), "main.9.running_var": (512,)}
    assert {k: tuple(batch[k].shape) for k in shapes} == shapes

    act = NLayerDiscriminator(input_nc=3, ndf=ndf, n_layers=3, norm="actnorm").state_dict()
    for i in (3, 6, 9):
        assert {f"main.{i}.loc", f"main.{i}.scale", f"main.{i}.initialized"} <= set(act)
        assert f"main.{i - 1}.bias" in act  # convs before ActNorm keep their bias
    assert "main.2.bias" not in batch


def test_width_is_capped_at_8_ndf():
    d = NLayerDiscriminator(input_nc=3, ndf=4, n_layers=5)
    widths = [m.out_channels for m in d.main if isinstance(m, nn.Conv2d)]
    assert widths == [4, 8, 16, 32, 32, 32, 1]


def test_init_statistics():
    torch.manual_seed(0)
    d = NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3)
    convs = [m for m in d.main if isinstance(m, nn.Conv2d)]
    for conv in convs:
        w = conv.weight.detach().double()
        n = w.numel()
        assert abs(w.mean()) < 5 * 0.02 / n**0.5
        assert abs(w.std() - 0.02) < 5 * 0.02 / (2 * n) ** 0.5
    for bn in [m for m in d.main if isinstance(m, nn.BatchNorm2d)]:
        w = bn.weight.detach().double()
        assert abs(w.mean() - 1.0) < 5 * 0.02 / w.numel() ** 0.5
        assert 0.01 < w.std() < 0.03
        assert (bn.bias == 0).all()
    # weights_init alone: convs and BatchNorm (incl. SyncBatchNorm) are touched; ActNorm and Linear are not
    torch.manual_seed(1)
    conv, sync_bn, act, lin = nn.Conv2d(64, 64, 3), nn.SyncBatchNorm(256), ActNorm(8), nn.Linear(4, 4)
    lin_before = lin.weight.detach().clone()
    for m in (conv, sync_bn, act, lin):
        weights_init(m)
    assert abs(conv.weight.std().item() - 0.02) < 0.001
    assert abs(sync_bn.weight.mean().item() - 1.0) < 0.01 and (sync_bn.bias == 0).all()
    assert (act.loc == 0).all() and (act.scale == 1).all()
    assert torch.equal(lin.weight, lin_before)


def test_actnorm_data_dependent_init():
    torch.manual_seed(0)
    norm = ActNorm(5)
    x = 3.0 * torch.randn(4, 5, 6, 7) + torch.arange(5.0).view(1, 5, 1, 1)
    y = norm(x)
    assert norm.initialized.item() == 1
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(5), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.std(dim=(0, 2, 3)), torch.ones(5), rtol=0, atol=1e-5)

    # CompVis formula in float64: loc = -mean, scale = 1 / (std + 1e-6) with the unbiased std
    flat = x.double().transpose(0, 1).reshape(5, -1)
    torch.testing.assert_close(norm.loc.detach().double().flatten(), -flat.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm.scale.detach().double().flatten(), 1 / (flat.std(1) + 1e-6), rtol=1e-6,
                               atol=1e-6)

    # later batches are normalised with the stored parameters, not re-initialised
    loc = norm.loc.detach().clone()
    x2 = torch.randn(4, 5, 6, 7)
    torch.testing.assert_close(norm(x2), norm.scale * (x2 + loc))
    torch.testing.assert_close(norm.loc.detach(), loc)

    # eval mode never initialises; 2-D inputs are accepted
    fresh = ActNorm(5).eval()
    fresh(x)
    assert fresh.initialized.item() == 0
    flat_norm = ActNorm(3)
    v = flat_norm(torch.randn(64, 3) * 2 + 1)
    assert v.shape == (64, 3)
    torch.testing.assert_close(v.mean(0), torch.zeros(3), rtol=0, atol=1e-5)


def functional_forward_f64(d: NLayerDiscriminator, x: torch.Tensor) -> torch.Tensor:
    """Re-run the Sequential from its state dict with torch.nn.functional, in float64 (eval-mode norms)."""
    sd = {k: v.double() for k, v in d.state_dict().items()}
    h = x.double()
    for i, layer in enumerate(d.main):
        if isinstance(layer, nn.Conv2d):
            h = F.conv2d(h, sd[f"main.{i}.weight"], sd.get(f"main.{i}.bias"), stride=layer.stride, padding=1)
        elif isinstance(layer, nn.BatchNorm2d):
            h = F.batch_norm(h, sd[f"main.{i}.running_mean"], sd[f"main.{i}.running_var"], sd[f"main.{i}.weight"],
                             sd[f"main.{i}.bias"], training=False, eps=layer.eps)
        elif isinstance(layer, ActNorm):
            h = sd[f"main.{i}.scale"] * (h + sd[f"main.{i}.loc"])
        else:
            h = torch.where(h > 0, h, 0.2 * h)
    return h


@pytest.mark.parametrize("norm", ["batch", "actnorm"])
def test_forward_against_functional_float64(norm):
    torch.manual_seed(0)
    d = NLayerDiscriminator(input_nc=3, ndf=16, n_layers=2, norm=norm)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        d(x)  # one training step: ActNorm initialises, BatchNorm updates its running statistics
        d.eval()
        y = d(x)
    assert y.shape == (3, 1, 6, 6)
    expected = functional_forward_f64(d, x)
    assert ((y.double() - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_bad_arguments_and_sync_batchnorm():
    with pytest.raises(ValueError, match="norm"):
        NLayerDiscriminator(norm="instance")
    with pytest.raises(ValueError, match="n_layers"):
        NLayerDiscriminator(n_layers=0)
    d = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=2)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(d)
    assert list(synced.state_dict()) == list(NLayerDiscriminator(input_nc=3, ndf=8, n_layers=2).state_dict())
