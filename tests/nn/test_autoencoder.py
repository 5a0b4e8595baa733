"""AutoencoderKL and DiagonalGaussianDistribution against diffusers, torch.distributions and float64 math."""

import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sdlight.nn.autoencoder import AttnBlock, AutoencoderKL
from sdlight.nn.distributions import DiagonalGaussianDistribution

CONF = Path(__file__).resolve().parents[2] / "conf" / "model" / "autoencoder"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Move every parameter off its default init, so GroupNorm affines and biases are exercised too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------------------------------------------
# diffusers reference
# --------------------------------------------------------------------------------------------------------------

ATTN_KEY = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.attn\.(\d+)\.(norm|q|k|v|proj_out)\.(weight|bias)$")
ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def to_diffusers(model: AutoencoderKL, ddconfig: dict):
    """Convert our state dict with diffusers' own converter for original SD VAE files and load it strictly."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        create_vae_diffusers_config_from_ldm,
    )

    sd = model.state_dict()
    original = {"model": {"params": {"first_stage_config": {"params": {"ddconfig": ddconfig}}}}}
    config = create_vae_diffusers_config_from_ldm(original, sd)
    converted = convert_ldm_vae_checkpoint(sd, config)

    # diffusers' converter only knows the mid-block attention; inner attention levels exist in diffusers as
    # Attn{Down,Up}*Block2D (single head, same math), so map those keys by hand.
    n_levels = len(ddconfig["ch_mult"])
    attn_res = ddconfig.get("attn_resolutions", [])
    level_has_attn = [ddconfig["resolution"] // 2**i in attn_res for i in range(n_levels)]
    config["down_block_types"] = ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in level_has_attn]
    config["up_block_types"] = ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in level_has_attn[::-1]]
    for key in [k for k in converted if ATTN_KEY.match(k)]:
        tensor = converted.pop(key)
        part, level, idx, name, kind = ATTN_KEY.match(key).groups()
        if part == "encoder.down":
            new = f"encoder.down_blocks.{level}.attentions.{idx}.{ATTN_NAMES[name]}.{kind}"
        else:
            new = f"decoder.up_blocks.{n_levels - 1 - int(level)}.attentions.{idx}.{ATTN_NAMES[name]}.{kind}"
        converted[new] = tensor[:, :, 0, 0] if tensor.ndim == 4 and name != "norm" else tensor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = DiffusersAutoencoderKL(**config)
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


ARCHS = {
    # two levels, one block, 3 -> 3 channels
    "ch32_12": dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, embed_dim=4, in_channels=3, out_ch=3,
                    resolution=16, attn_resolutions=[]),
    # three levels, two blocks, wider latent, different in/out channels
    "ch64_112": dict(ch=64, ch_mult=[1, 1, 2], num_res_blocks=2, z_channels=8, embed_dim=8, in_channels=1,
                     out_ch=2, resolution=16, attn_resolutions=[]),
    # attention inside the innermost downsampled level (8 px), as in the VQ/KL f16 models
    "ch32_12_attn8": dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, embed_dim=4, in_channels=3,
                          out_ch=3, resolution=16, attn_resolutions=[8]),
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_matches_diffusers(name):
    args = ARCHS[name]
    torch.manual_seed(0)
    model = AutoencoderKL(**args, dropout=0.0, double_z=True).eval()
    perturb_(model, seed=1)
    ddconfig = {k: v for k, v in args.items() if k != "embed_dim"}
    ref = to_diffusers(model, ddconfig)

    x = torch.randn(2, args["in_channels"], 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        post, ref_post = model.encode(x), ref.encode(x).latent_dist
        assert rel_err(post.mean, ref_post.mean) <= 1e-5
        assert rel_err(post.logvar, ref_post.logvar) <= 1e-5

        z = torch.randn_like(post.mean)
        assert rel_err(model.decode(z), ref.decode(z).sample) <= 1e-5

        # full forward with a sampled posterior: same generator -> same noise -> same reconstruction
        ours, _ = model(x, sample_posterior=True, generator=torch.Generator().manual_seed(3))
        theirs = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
        assert rel_err(ours, theirs) <= 1e-5


def test_inner_attention_is_present_where_configured():
    model = AutoencoderKL(**ARCHS["ch32_12_attn8"])
    keys = model.state_dict().keys()
    assert "encoder.down.1.attn.0.q.weight" in keys and "encoder.down.0.attn.0.q.weight" not in keys
    # decoder levels have num_res_blocks + 1 blocks, each followed by attention at 8 px
    assert {"decoder.up.1.attn.0.proj_out.weight", "decoder.up.1.attn.1.proj_out.weight"} <= set(keys)
    assert not any(k.startswith("decoder.up.0.attn") for k in keys)


def reference_attention_f64(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    """Single-head spatial self-attention written out in float64: GroupNorm by hand, softmax(QK^T / sqrt(c)) V."""
    x = x.double()
    b, c, h, w = x.shape
    groups = x.reshape(b, 32, -1)
    mean, var = groups.mean(-1, keepdim=True), groups.var(-1, unbiased=False, keepdim=True)
    xn = ((groups - mean) / torch.sqrt(var + 1e-6)).reshape(b, c, h, w)
    xn = xn * block.norm.weight.double()[:, None, None] + block.norm.bias.double()[:, None, None]

    def proj(conv, t):
        return torch.einsum("oc,bcn->bon", conv.weight.double()[:, :, 0, 0], t.reshape(b, c, -1)) + \
            conv.bias.double()[None, :, None]

    q, k, v = proj(block.q, xn), proj(block.k, xn), proj(block.v, xn)  # (b, c, n)
    attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)  # (b, n_query, n_key)
    out = torch.einsum("bij,bcj->bci", attn, v)
    return x + proj(block.proj_out, out).reshape(b, c, h, w)


def test_attention_block_against_float64():
    torch.manual_seed(0)
    block = AttnBlock(64)
    perturb_(block, seed=4, scale=0.2)  # sharpen the softmax so a wrong scale or axis would show
    x = torch.randn(2, 64, 6, 5)
    with torch.no_grad():
        expected = reference_attention_f64(block, x)
        assert rel_err(block(x).double(), expected) <= 1e-5
        assert rel_err(block.double()(x.double()), expected) <= 1e-12


def test_sd_kl_f8_keys_load_into_diffusers_sd_vae():
    """The kl_f8 config has SD's exact parameter layout: every key maps 1:1 onto diffusers' SD VAE."""
    import yaml

    args = yaml.safe_load((CONF / "kl_f8.yaml").read_text())
    assert args.pop("_target_") == "sdlight.nn.autoencoder.AutoencoderKL"
    assert args == dict(embed_dim=4, double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                        ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    with torch.device("meta"):
        model = AutoencoderKL(**args)
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 83_653_863  # SD v1/v2 VAE
    expected_shapes = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.proj_out.bias": (512,),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.3.block.2.conv1.weight": (512, 512, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.2.norm2.bias": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert "encoder.down.3.downsample.conv.weight" not in sd and "decoder.up.0.upsample.conv.weight" not in sd

    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = DiffusersAutoencoderKL(
            block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        )
    converted = convert_ldm_vae_checkpoint(sd, {"down_block_types": [0] * 4, "up_block_types": [0] * 4})
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == ref_shapes


@pytest.mark.parametrize("config, factor", [("kl_f4_tiny", 4), ("kl_f8_tiny", 8)])
def test_config_latent_shapes(config, factor):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    model = instantiate(OmegaConf.load(CONF / f"{config}.yaml")).eval()
    assert isinstance(model, AutoencoderKL)
    assert model.downsample_factor == factor and model.latent_channels == 4
    x = torch.randn(2, 3, 32, 48)  # non-square on purpose
    with torch.no_grad():
        rec, post = model(x)
    assert post.mean.shape == (2, 4, 32 // factor, 48 // factor) == post.sample().shape
    assert rec.shape == x.shape


def test_forward_modes_and_last_layer():
    torch.manual_seed(0)
    model = AutoencoderKL(**ARCHS["ch32_12"])
    x = torch.randn(1, 3, 8, 8)
    rec_mode, post = model(x, sample_posterior=False)
    torch.testing.assert_close(rec_mode, model.decode(post.mode()))
    rec_a, _ = model(x, generator=torch.Generator().manual_seed(5))
    rec_b, _ = model(x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(rec_a, rec_b)
    assert not torch.allclose(rec_a, rec_mode)

    last = model.get_last_layer()
    assert last is model.decoder.conv_out.weight
    (rec_a.square().mean() + post.kl().mean()).backward()
    assert last.grad is not None and last.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    args = dict(ARCHS["ch32_12_attn8"], resolution=8)
    model = AutoencoderKL(**args).train()
    x = torch.randn(2, 3, 8, 8)

    def grads():
        model.zero_grad()
        rec, post = model(x, generator=torch.Generator().manual_seed(0))
        (rec.square().mean() + post.kl().mean()).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_gradient_checkpointing(True)
    ckpt = grads()
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(**dict(ARCHS["ch32_12"], double_z=False))
    with pytest.raises(ValueError, match="attn_type"):
        AutoencoderKL(**ARCHS["ch32_12"], attn_type="linear")
    no_attn = AutoencoderKL(**ARCHS["ch32_12"], attn_type="none")
    assert not any("attn" in k for k in no_attn.state_dict())


# --------------------------------------------------------------------------------------------------------------
# DiagonalGaussianDistribution
# --------------------------------------------------------------------------------------------------------------

def random_params(seed: int, shape=(3, 8, 5, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape[0], shape[1] // 2, *shape[2:], generator=g, dtype=torch.float64)
    logvar = 2.0 * torch.rand(mean.shape, generator=g, dtype=torch.float64) - 1.5
    return torch.cat([mean, logvar], dim=1)


def test_kl_against_closed_form_and_torch_distributions():
    p, q = DiagonalGaussianDistribution(random_params(0)), DiagonalGaussianDistribution(random_params(1))
    N = torch.distributions.Normal

    # KL(N(mu, s^2) || N(0, 1)) = -log s + (s^2 + mu^2) / 2 - 1/2, per element
    s = torch.exp(0.5 * p.logvar)
    closed = (-torch.log(s) + (s**2 + p.mean**2) / 2 - 0.5).sum(dim=(1, 2, 3))
    torch_kl = torch.distributions.kl_divergence(N(p.mean, s), N(0.0, 1.0)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(p.kl(), closed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p.kl(), torch_kl, rtol=1e-12, atol=1e-12)
    assert p.kl().shape == (3,)

    # KL(p || q) = log(s_q / s_p) + (s_p^2 + (mu_p - mu_q)^2) / (2 s_q^2) - 1/2
    sq = torch.exp(0.5 * q.logvar)
    closed_pq = (torch.log(sq / s) + (s**2 + (p.mean - q.mean) ** 2) / (2 * sq**2) - 0.5).sum(dim=(1, 2, 3))
    torch.testing.assert_close(p.kl(q), closed_pq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        p.kl(q), torch.distributions.kl_divergence(N(p.mean, s), N(q.mean, sq)).sum(dim=(1, 2, 3)))
    torch.testing.assert_close(p.kl(p), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_nll_against_normal_log_prob():
    p = DiagonalGaussianDistribution(random_params(2))
    x = torch.randn(p.mean.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = -torch.distributions.Normal(p.mean, p.std).log_prob(x)
    torch.testing.assert_close(p.nll(x), ref.sum(dim=(1, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p.nll(x, dims=[1, 2]), ref.sum(dim=(1, 2)), rtol=1e-12, atol=1e-12)


def test_logvar_is_clamped_and_properties_consistent():
    params = torch.zeros(1, 2, 1, 3, dtype=torch.float64)
    params[0, 1] = torch.tensor([-100.0, 0.5, 100.0])
    p = DiagonalGaussianDistribution(params)
    torch.testing.assert_close(p.logvar[0, 0, 0], torch.tensor([-30.0, 0.5, 20.0], dtype=torch.float64))
    torch.testing.assert_close(p.var, torch.exp(p.logvar))
    torch.testing.assert_close(p.std, torch.sqrt(p.var))
    assert p.mode() is p.mean


def test_sample_statistics_and_reparameterisation():
    mean = torch.tensor([-1.0, 0.0, 2.0]).view(1, 3, 1, 1).expand(4, 3, 64, 64)
    logvar = torch.log(torch.tensor([0.25, 1.0, 4.0])).view(1, 3, 1, 1).expand(4, 3, 64, 64)
    params = torch.cat([mean, logvar], dim=1).double().requires_grad_(True)
    p = DiagonalGaussianDistribution(params)
    x = p.sample(torch.Generator().manual_seed(0))
    n = x[:, 0].numel()  # 16384 draws per channel
    emp_mean, emp_std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    true_std = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    # 5 standard errors: mean se = s / sqrt(n), std se ~ s / sqrt(2n)
    assert ((emp_mean - torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)).abs() < 5 * true_std / n**0.5).all()
    assert ((emp_std - true_std).abs() < 5 * true_std / (2 * n) ** 0.5).all()

    # exactly mean + std * eps with eps from the generator, and differentiable in mean and logvar
    eps = torch.randn(p.mean.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(x, p.mean + p.std * eps)
    x.sum().backward()
    torch.testing.assert_close(params.grad[:, :3], torch.ones_like(mean, dtype=torch.float64))
    torch.testing.assert_close(params.grad[:, 3:], (0.5 * p.std * eps).detach())


def test_deterministic_and_to():
    params = random_params(4)
    d = DiagonalGaussianDistribution(params, deterministic=True)
    torch.testing.assert_close(d.sample(), d.mean)
    assert (d.kl() == 0).all() and d.kl().shape == (3,)
    p32 = DiagonalGaussianDistribution(params).to(torch.float32)
    assert p32.mean.dtype == torch.float32
    torch.testing.assert_close(p32.kl().double(), DiagonalGaussianDistribution(params).kl(), rtol=1e-5, atol=1e-5)
