"""AutoencoderLoss against closed forms and an independent autograd recomputation (float64, tiny shapes)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdlight.losses import AutoencoderLoss, hinge_d_loss, vanilla_d_loss

B, C, H, W = 2, 3, 8, 8


class StandInPosterior:
    """Any object with ``kl()`` giving one KL value per sample."""

    def __init__(self, kl: torch.Tensor):
        self._kl = kl

    def kl(self) -> torch.Tensor:
        return self._kl


def tiny_discriminator() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 3, padding=1))


class Setup:
    """A tiny "decoder" whose last conv weight plays the VAE decoder's last layer."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.decoder = nn.Conv2d(4, 3, 3, padding=1).double()
        with torch.no_grad():
            for p in self.decoder.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        self.z = torch.randn(B, 4, H, W, generator=g, dtype=torch.float64)
        self.x = torch.rand(B, C, H, W, generator=g, dtype=torch.float64) * 2 - 1
        self.posterior = StandInPosterior(torch.tensor([3.0, 5.0], dtype=torch.float64))

    def recon(self) -> torch.Tensor:
        return self.decoder(self.z)


def make_loss(**kwargs) -> AutoencoderLoss:
    kwargs.setdefault("perceptual_weight", 0.0)
    return AutoencoderLoss(tiny_discriminator(), **kwargs).double()


def test_d_losses_closed_form():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.3, 1.5])
    # hinge: relu(1 - real) = [0, .5, 2], relu(1 + fake) = [0, 1.3, 2.5]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.8 / 3), abs=1e-6)
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * (sum(softplus(-r) for r in real.tolist()) / 3 + sum(softplus(f) for f in fake.tolist()) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("kind, fn", [("hinge", hinge_d_loss), ("vanilla", vanilla_d_loss)])
def test_discriminator_part(kind, fn):
    s = Setup()
    loss_fn = make_loss(disc_loss=kind, disc_start=5, disc_factor=0.7)
    recon = s.recon()
    logits_real, logits_fake = loss_fn.discriminator(s.x), loss_fn.discriminator(recon)
    loss, log = loss_fn(s.x, recon, None, "discriminator", global_step=5)
    torch.testing.assert_close(loss, 0.7 * fn(logits_real, logits_fake))
    assert set(log) == {"train/disc_loss", "train/logits_real", "train/logits_fake"}
    torch.testing.assert_close(log["train/logits_fake"], logits_fake.mean().detach())
    # the generator gets no gradient from the discriminator's loss
    loss.backward()
    assert all(p.grad is None for p in s.decoder.parameters())
    assert loss_fn(s.x, recon, None, 1, global_step=4)[0].item() == 0.0  # before disc_start (optimizer_idx 1)


def expected_generator(s: Setup, loss_fn: AutoencoderLoss, step: int, rec: str = "l1"):
    """Independent recomputation: CompVis formula, adaptive weight from separate autograd graphs."""
    logvar = loss_fn.logvar.detach().double()

    def nll_of(recon):
        d = s.x - recon
        pix = d.abs() if rec == "l1" else d.pow(2)
        return (pix / logvar.exp() + logvar).sum() / B

    def g_of(recon):
        return -loss_fn.discriminator(recon).mean()

    (grad_nll,) = torch.autograd.grad(nll_of(s.recon()), s.decoder.weight)
    (grad_g,) = torch.autograd.grad(g_of(s.recon()), s.decoder.weight)
    raw = (grad_nll.norm() / (grad_g.norm() + 1e-4)).item()
    d_weight = min(max(raw, 0.0), loss_fn.d_weight_max) * loss_fn.disc_weight
    factor = loss_fn.adversarial_factor(step)
    with torch.no_grad():
        recon = s.recon()
        nll, g = nll_of(recon).item(), g_of(recon).item()
    kl = s.posterior.kl().mean().item()
    return dict(total=nll + loss_fn.kl_weight * kl + d_weight * factor * g, nll=nll, kl=kl, g=g, raw=raw,
                d_weight=d_weight, factor=factor)


def test_adaptive_weight_and_total_match_independent_autograd():
    s = Setup()
    loss_fn = make_loss(disc_start=0, disc_weight=0.5, kl_weight=0.01, logvar_init=0.3)
    ref = expected_generator(s, loss_fn, step=10)
    loss, log = loss_fn(s.x, s.recon(), s.posterior, "generator", global_step=10, last_layer=s.decoder.weight)
    assert ref["factor"] == 1.0 and ref["d_weight"] > 0
    assert log["train/d_weight"].item() == pytest.approx(ref["d_weight"], rel=1e-5)
    assert log["train/d_weight_clamped"].item() == 0.0
    assert loss.item() == pytest.approx(ref["total"], rel=1e-9)
    assert log["train/nll"].item() == pytest.approx(ref["nll"], rel=1e-6)
    assert log["train/g_loss"].item() == pytest.approx(ref["g"], rel=1e-6)
    assert log["train/total"].item() == pytest.approx(ref["total"], rel=1e-6)
    # the weight is detached: the gradient of the loss is nll' + kl' + d_weight * g'
    (grad,) = torch.autograd.grad(loss, s.decoder.weight)
    recon = s.recon()
    nll = (((s.x - recon).abs() / math.exp(0.3)) + 0.3).sum() / B
    adversarial = ref["d_weight"] * -loss_fn.discriminator(recon).mean()
    (expected_grad,) = torch.autograd.grad(nll + adversarial, s.decoder.weight)
    torch.testing.assert_close(grad, expected_grad)


def test_adaptive_weight_clamp_is_applied_and_logged():
    s = Setup()
    loss_fn = make_loss(disc_weight=0.5, d_weight_max=1e-3)
    ref = expected_generator(s, loss_fn, step=0)
    assert ref["raw"] > 1e-3
    _, log = loss_fn(s.x, s.recon(), s.posterior, "generator", global_step=0, last_layer=s.decoder.weight)
    assert log["train/d_weight"].item() == pytest.approx(0.5 * 1e-3)
    assert log["train/d_weight_clamped"].item() == 1.0


def test_warmup_schedule():
    loss_fn = make_loss(disc_start=10, disc_warmup_steps=4, disc_factor=0.8)
    got = [loss_fn.adversarial_factor(step) for step in (0, 9, 10, 11, 12, 13, 14, 15, 1000)]
    assert got == pytest.approx([0, 0, 0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    assert [loss_fn.discriminator_factor(step) for step in (9, 10, 11)] == [0.0, 0.8, 0.8]  # D trains at once
    no_ramp = make_loss(disc_start=10, disc_warmup_steps=0)
    assert [no_ramp.adversarial_factor(step) for step in (9, 10)] == [0.0, 1.0]

    s = Setup()
    for step in (9, 12):
        ref = expected_generator(s, loss_fn, step)
        loss, log = loss_fn(s.x, s.recon(), s.posterior, "generator", global_step=step, last_layer=s.decoder.weight)
        assert log["train/disc_factor"].item() == pytest.approx(ref["factor"])
        assert loss.item() == pytest.approx(ref["total"], rel=1e-9)
        if step < 10:  # the adversarial term is off: the weight is not even computed
            assert log["train/d_weight"].item() == 0.0
            assert loss.item() == pytest.approx(ref["nll"] + loss_fn.kl_weight * ref["kl"], rel=1e-12)


@pytest.mark.parametrize("learn", [True, False])
def test_logvar_learnable_or_fixed(learn):
    s = Setup()
    loss_fn = make_loss(learn_logvar=learn, logvar_init=0.7)
    assert "logvar" in loss_fn.state_dict()
    loss, log = loss_fn(s.x, s.recon(), s.posterior, "generator", global_step=0, last_layer=s.decoder.weight)
    assert log["train/logvar"].item() == pytest.approx(0.7)
    generator_params = list(loss_fn.generator_parameters())
    if learn:
        assert len(generator_params) == 1 and generator_params[0] is loss_fn.logvar
        loss.backward()
        # d/dlogvar of sum(rec * exp(-logvar) + logvar) / B
        rec_sum = (s.x - s.recon()).abs().sum().item() / B
        expected = -rec_sum * math.exp(-loss_fn.logvar.item()) + C * H * W
        assert loss_fn.logvar.grad.item() == pytest.approx(expected, rel=1e-9)
    else:
        assert generator_params == []
        assert all(p is not loss_fn.logvar for p in loss_fn.parameters())
    disc = list(loss_fn.discriminator_parameters())
    assert len(disc) == 4 and not any(p is loss_fn.logvar for p in disc)


def test_rec_loss_l1_vs_l2_closed_form():
    s = Setup()
    values = {}
    for rec in ("l1", "l2"):
        loss_fn = make_loss(rec_loss=rec, disc_start=100, logvar_init=0.0)
        recon = s.recon().detach()
        loss, log = loss_fn(s.x, recon, s.posterior, "generator", global_step=0)
        d = (s.x - recon).numpy()
        pix = abs(d) if rec == "l1" else d**2
        assert log["train/rec"].item() == pytest.approx(pix.mean(), rel=1e-6)
        assert log["train/nll"].item() == pytest.approx(pix.sum() / B, rel=1e-6)
        values[rec] = loss.item()
    assert values["l1"] != pytest.approx(values["l2"], rel=1e-3)
    with pytest.raises(ValueError):
        make_loss(rec_loss="huber")


def test_kl_term_is_weighted_batch_mean():
    s = Setup()
    loss_fn = make_loss(kl_weight=0.1, disc_start=100)
    loss, log = loss_fn(s.x, s.recon(), s.posterior, "generator", global_step=0)
    assert log["train/kl"].item() == pytest.approx(4.0)  # mean of [3, 5]
    assert (loss - log["train/nll"]).item() == pytest.approx(0.1 * 4.0, rel=1e-6)


def test_kl_with_diagonal_gaussian_posterior():
    distributions = pytest.importorskip("sdlight.nn.distributions")
    g = torch.Generator().manual_seed(5)
    params = torch.randn(B, 8, 4, 4, generator=g, dtype=torch.float64)
    posterior = distributions.DiagonalGaussianDistribution(params)
    mean, logvar = params[:, :4], params[:, 4:]
    expected = (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).sum(dim=(1, 2, 3)).mean().item()
    s = Setup()
    _, log = make_loss(disc_start=100)(s.x, s.recon(), posterior, "generator", global_step=0)
    assert log["train/kl"].item() == pytest.approx(expected, rel=1e-6)


class MeanSquarePerceptual(nn.Module):
    """Stand-in perceptual distance with LPIPS' output shape (B, 1, 1, 1)."""

    def forward(self, x, y):
        return (x - y).pow(2).mean(dim=(1, 2, 3), keepdim=True)


def test_perceptual_term_counts_per_pixel_as_in_compvis():
    s = Setup()
    perceptual = MeanSquarePerceptual()
    loss_fn = AutoencoderLoss(tiny_discriminator(), perceptual, perceptual_weight=2.0, disc_start=100).double()
    recon = s.recon().detach()
    _, log = loss_fn(s.x, recon, s.posterior, "generator", global_step=0)
    d = s.x - recon
    p = d.pow(2).mean(dim=(1, 2, 3))
    assert log["train/perceptual"].item() == pytest.approx(p.mean().item(), rel=1e-6)
    expected = (d.abs().sum() + 2.0 * C * H * W * p.sum()).item() / B
    assert log["train/nll"].item() == pytest.approx(expected, rel=1e-6)


def test_perceptual_weight_zero_never_builds_the_network():
    def factory():
        raise AssertionError("perceptual network built although perceptual_weight=0")

    loss_fn = AutoencoderLoss(tiny_discriminator(), factory, perceptual_weight=0.0)
    assert loss_fn.perceptual_loss is None
    built = []
    loss_fn = AutoencoderLoss(tiny_discriminator(), lambda: built.append(1) or MeanSquarePerceptual())
    assert built == [1] and isinstance(loss_fn.perceptual_loss, MeanSquarePerceptual)
    assert AutoencoderLoss(tiny_discriminator(), MeanSquarePerceptual(), perceptual_weight=0).perceptual_loss is None
    with pytest.raises(ValueError, match="perceptual_weight"):
        AutoencoderLoss(tiny_discriminator(), None, perceptual_weight=1.0)


def test_validation_without_grad_skips_adaptive_weight():
    s = Setup()
    loss_fn = make_loss(disc_start=0)
    with torch.no_grad():
        loss, log = loss_fn(s.x, s.recon(), s.posterior, "generator", global_step=10,
                            last_layer=s.decoder.weight, split="val")
    assert log["val/d_weight"].item() == 0.0
    assert loss.item() == pytest.approx(log["val/nll"].item() + loss_fn.kl_weight * 4.0, rel=1e-6)
    assert all(k.startswith("val/") for k in log)
    assert {k.split("/")[1] for k in log} == {"total", "rec", "perceptual", "nll", "kl", "logvar", "d_weight",
                                               "d_weight_clamped", "disc_factor", "g_loss"}
    loss_fn.eval()  # eval mode with grad but no last_layer: 0 as well
    _, log = loss_fn(s.x, s.recon(), s.posterior, "generator", global_step=10)
    assert log["train/d_weight"].item() == 0.0
    loss_fn.train()
    with pytest.raises(ValueError, match="last_layer"):
        loss_fn(s.x, s.recon(), s.posterior, "generator", global_step=10)


def test_pixel_weights_weigh_the_nll():
    s = Setup()
    loss_fn = make_loss(disc_start=100)
    recon = s.recon().detach()
    plain, log = loss_fn(s.x, recon, s.posterior, "generator", global_step=0)
    weighted, wlog = loss_fn(s.x, recon, s.posterior, "generator", global_step=0, weights=torch.full((B, 1, H, W), 3.0))
    assert (weighted - loss_fn.kl_weight * 4.0).item() == pytest.approx(3 * (plain - loss_fn.kl_weight * 4.0).item())
    assert wlog["train/nll"] == log["train/nll"]  # the logged nll stays unweighted


def test_state_dict_keys_and_compvis_perceptual_keys_ignored():
    from sdlight.losses import LPIPS

    loss_fn = AutoencoderLoss(tiny_discriminator(), LPIPS(pretrained=False))
    keys = set(loss_fn.state_dict())
    assert "logvar" in keys and all(k == "logvar" or k.startswith("discriminator.") for k in keys)
    compvis = dict(loss_fn.state_dict())
    compvis["perceptual_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    without = make_loss().float()
    result = without.load_state_dict(compvis, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loss_fn.load_state_dict(compvis, strict=True)
    assert loss_fn.perceptual_loss.lin0.model[1].weight.abs().sum() > 0  # pretrained heads kept


def test_with_patchgan_and_gaussian_posterior():
    discriminator = pytest.importorskip("sdlight.nn.discriminator")
    distributions = pytest.importorskip("sdlight.nn.distributions")
    torch.manual_seed(0)
    decoder = nn.Conv2d(4, 3, 3, padding=1)
    params = torch.randn(B, 8, 8, 8)
    posterior = distributions.DiagonalGaussianDistribution(params)
    x = torch.rand(B, 3, 8, 8) * 2 - 1
    loss_fn = AutoencoderLoss(discriminator.NLayerDiscriminator(3, ndf=8, n_layers=1), perceptual_weight=0.0,
                              disc_start=0, disc_warmup_steps=10)
    recon = decoder(posterior.sample())
    loss, log = loss_fn(x, recon, posterior, "generator", global_step=5, last_layer=decoder.weight)
    assert torch.isfinite(loss) and log["train/disc_factor"].item() == pytest.approx(0.5)
    assert log["train/d_weight"].item() > 0
    loss.backward()
    assert decoder.weight.grad is not None and loss_fn.logvar.grad is not None
    d_loss, _ = loss_fn(x, recon, posterior, "discriminator", global_step=5)
    d_loss.backward()
    assert next(loss_fn.discriminator.parameters()).grad is not None


# --- configs ----------------------------------------------------------------------------------------------

CONF = Path(__file__).resolve().parents[2] / "conf" / "model" / "loss"


def _instantiate(name: str, **overrides):
    hydra_utils = pytest.importorskip("hydra.utils")
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg, hydra_utils.instantiate(cfg)


def test_l1_kl_config_builds_without_weights(monkeypatch):
    import sdlight.losses.lpips as lpips_module

    monkeypatch.setattr(lpips_module.LPIPS, "__init__", lambda *a, **k: pytest.fail("LPIPS built"))
    cfg, loss_fn = _instantiate("l1_kl")
    assert isinstance(loss_fn, AutoencoderLoss) and loss_fn.perceptual_loss is None
    assert loss_fn.discriminator.main[0].out_channels == 32
    assert (loss_fn.disc_start, loss_fn.disc_warmup_steps, loss_fn.kl_weight) == (50001, 1000, 1e-6)
    assert isinstance(loss_fn.logvar, nn.Parameter)


def test_lpips_patchgan_config(monkeypatch, tmp_path):
    import sdlight.losses.lpips as lpips_module
    from sdlight.weights import WeightsNotFoundError

    cfg, _ = _instantiate("lpips_patchgan", **{"perceptual_weight": 0.0, "discriminator.ndf": 8})
    assert cfg.perceptual._target_ == "sdlight.losses.LPIPS" and cfg.perceptual.trunk_path is None
    assert (cfg.rec_loss, cfg.disc_loss, cfg.disc_weight, cfg.disc_start) == ("l1", "hinge", 0.5, 50001)
    # offline with no VGG16 file anywhere: a clear error, not a hang
    monkeypatch.setenv("SDLIGHT_OFFLINE", "1")
    monkeypatch.setenv("SDLIGHT_WEIGHTS", str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    with pytest.raises(Exception) as info:
        _instantiate("lpips_patchgan", **{"discriminator.ndf": 8})
    chain, err = [], info.value
    while err is not None:
        chain.append(err)
        err = err.__cause__ or err.__context__
    assert any(isinstance(e, WeightsNotFoundError) for e in chain)
    # with an explicit trunk file the LPIPS node is built by the loss
    monkeypatch.setattr(lpips_module.VGG16Trunk, "load_torchvision", lambda self, sd: None)
    trunk = tmp_path / "vgg16-397923af.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, trunk)
    _, loss_fn = _instantiate("lpips_patchgan", **{"discriminator.ndf": 8, "perceptual.trunk_path": str(trunk)})
    assert isinstance(loss_fn.perceptual_loss, lpips_module.LPIPS)


# --- one backward pass through LPIPS and the discriminator (single_backward) -----------------------------------

def _generator_grads(single: bool, learn_logvar: bool = True, **call):
    """Loss, log and gradients of a tiny encoder → Gaussian posterior → two-conv decoder under the full loss
    (random-init LPIPS, PatchGAN), float64, computed with ``single_backward`` on or off."""
    from sdlight.losses import LPIPS
    from sdlight.nn.discriminator import NLayerDiscriminator
    from sdlight.nn.distributions import DiagonalGaussianDistribution

    torch.manual_seed(0)
    encoder = nn.Conv2d(3, 8, 3, padding=1)
    decoder = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.SiLU(), nn.Conv2d(6, 3, 3, padding=1))
    loss_fn = AutoencoderLoss(NLayerDiscriminator(3, ndf=8, n_layers=1), LPIPS(pretrained=False), kl_weight=0.1,
                              logvar_init=0.2, learn_logvar=learn_logvar, disc_start=0, disc_warmup_steps=4,
                              single_backward=single)
    encoder, decoder, loss_fn = encoder.double(), decoder.double(), loss_fn.double()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    posterior = DiagonalGaussianDistribution(encoder(x))
    rec = decoder(posterior.mode())
    loss, log = loss_fn(x, rec, posterior, "generator", global_step=2, last_layer=decoder[-1].weight, **call)
    loss.backward()
    trained = [*encoder.parameters(), *decoder.parameters(), *loss_fn.generator_parameters()]
    d_grads = [p.grad for p in loss_fn.discriminator.parameters()]
    return loss.detach(), log, [p.grad for p in trained], d_grads


@pytest.mark.parametrize("learn_logvar", [True, False])
def test_single_backward_gives_compvis_value_weight_and_gradients(learn_logvar, monkeypatch):
    ref_loss, ref_log, ref_grads, ref_d = _generator_grads(False, learn_logvar)
    # the single pass never takes the adaptive weight's separate backward passes
    monkeypatch.setattr(AutoencoderLoss, "adaptive_weight", lambda *a: pytest.fail("two-pass adaptive weight"))
    loss, log, grads, d_grads = _generator_grads(True, learn_logvar)
    assert ref_log["train/disc_factor"].item() == 0.5 and ref_log["train/d_weight"].item() > 0
    assert loss.item() == ref_loss.item()  # the same value, exactly
    for key in ("train/d_weight", "train/nll", "train/g_loss", "train/total", "train/kl"):
        torch.testing.assert_close(log[key], ref_log[key], rtol=1e-10, atol=0)
    assert len(grads) == len(ref_grads) == 4 + 2 + (1 if learn_logvar else 0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    # the generator's loss leaves no gradient on the discriminator (CompVis' graph does, if D is not frozen)
    assert all(g is None for g in d_grads) and all(g is not None for g in ref_d)


def test_single_backward_falls_back_to_compvis_graph_with_pixel_weights(monkeypatch):
    calls = []
    real = AutoencoderLoss.adaptive_weight
    monkeypatch.setattr(AutoencoderLoss, "adaptive_weight", lambda *a: calls.append(1) or real(*a))
    weights = torch.ones(1, 1, 16, 16, dtype=torch.float64)
    _, log, grads, _ = _generator_grads(True, weights=weights)
    assert calls == [1] and log["train/d_weight"].item() > 0 and all(g is not None for g in grads)
