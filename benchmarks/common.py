"""What the benchmarks share: our networks at a config's architecture, the same weights in diffusers' classes
(converted with diffusers' own converters for original SD files), and A/B timing alternated in one process.

Alternating rounds (A, B, A, B, …) and taking each side's median keeps a ratio fair on a machine whose load
changes while it runs; absolute figures on a shared machine are not.
"""

from __future__ import annotations

import importlib.resources
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch import nn

from sdlight.nn.autoencoder import AutoencoderKL
from sdlight.nn.unet import UNetModel


def config(group: str, name: str, keep_target: bool = False) -> dict:
    """A ``conf/model/<group>/<name>.yaml`` as plain constructor arguments (``_target_`` dropped unless
    ``keep_target``)."""
    text = importlib.resources.files("sdlight.conf").joinpath(f"model/{group}/{name}.yaml").read_text()
    cfg = {k: v for k, v in OmegaConf.to_container(OmegaConf.create(text)).items()
           if not k.startswith("_") or (keep_target and k == "_target_")}
    if cfg.get("in_channels", 0) is None:  # derived by the model from its latents: 4 here
        cfg["in_channels"] = 4
    return cfg


def randomize_(module: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Small noise on every weight: zero-initialised output layers would make agreement checks vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def build_unet(name: str = "tiny", **overrides) -> tuple[UNetModel, dict]:
    params = {**config("unet", name), "use_checkpoint": False, **overrides}
    torch.manual_seed(0)
    return randomize_(UNetModel(**params)), params


def build_vae(name: str = "kl_f4_tiny", **overrides) -> tuple[AutoencoderKL, dict]:
    params = {**config("autoencoder", name), **overrides}
    torch.manual_seed(0)
    return randomize_(AutoencoderKL(**params)), params


def diffusers_unet(ours: UNetModel, params: dict) -> nn.Module:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    # the VAE's ch_mult only tells diffusers the latent/pixel size ratio (8)
    ldm = {"model": {"params": {"unet_config": {"params": params},
                                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    sd = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    cfg = create_unet_diffusers_config_from_ldm(ldm, sd, image_size=params["image_size"] * 8)
    theirs = UNet2DConditionModel(**cfg)
    theirs.load_state_dict(convert_ldm_unet_checkpoint(sd, cfg), strict=True)
    return theirs


def diffusers_vae(ours: AutoencoderKL, params: dict) -> nn.Module:
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    if params.get("attn_resolutions"):
        raise ValueError("diffusers' converter maps the mid-block attention only; pick a config without attn_resolutions")
    original = {"model": {"params": {"first_stage_config": {"params": {"ddconfig": params}}}}}
    sd = ours.state_dict()
    cfg = create_vae_diffusers_config_from_ldm(original, sd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = DiffusersAutoencoderKL(**cfg)
    theirs.load_state_dict(convert_ldm_vae_checkpoint(sd, cfg), strict=True)
    return theirs


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest resident set size seen while the block runs, above its value at the start (sampled every 2 ms
    by a thread: torch releases the GIL inside its kernels). An estimate: the allocator may keep pages."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def delta(self) -> int:
        return self.peak - self.start


@dataclass
class Timing:
    seconds: list[float]  # per step, one entry per round
    peak_bytes: int  # above the start (CPU: RSS; CUDA: max allocated)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternate(steps: dict[str, Callable[[], object]], rounds: int = 5, iters: int = 2, warmup: int = 1,
              device: torch.device = torch.device("cpu")) -> dict[str, Timing]:
    """Each step ``warmup`` times, then ``rounds`` rounds in which every step runs ``iters`` times in turn."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in steps}
    peaks = dict.fromkeys(steps, 0)
    for _ in range(rounds):
        for name, fn in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            with PeakRSS() as rss:
                start = time.perf_counter()
                for _ in range(iters):
                    fn()
                _sync(device)
                times[name].append((time.perf_counter() - start) / iters)
            peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else rss.delta
            peaks[name] = max(peaks[name], peak)
    return {k: Timing(times[k], peaks[k]) for k in steps}
