"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features"), VGG16 trunk.

Same computation and parameter names as the ``lpips`` package (``scaling_layer``, ``net.slice1..5``,
``lin0..lin4``) and as ``loss.perceptual_loss`` in CompVis checkpoints. The network is a frozen metric: it
is rebuilt from its released files (the torchvision VGG16 trunk via :mod:`sdlight.weights`, the v0.1 linear
heads shipped with the ``lpips`` package) and never stored in a parent's ``state_dict``.
"""

from __future__ import annotations

import importlib.util
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from sdlight.weights import KNOWN, load_state_dict, resolve_weights

__all__ = ["LPIPS", "VGG16Trunk"]

# torchvision ``vgg16().features`` ("D" config); "M" is a 2x2 max-pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Index ranges into ``features`` ending after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
CHANNELS = (64, 128, 256, 512, 512)


class VGG16Trunk(nn.Module):
    """``torchvision.models.vgg16().features[:30]`` cut into five slices; returns the five relu outputs.

    Built here rather than through torchvision so that no 120M-parameter classifier is allocated just to be
    thrown away; layer indices are torchvision's, so ``features.N.*`` keys map one to one.
    """

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_ch = v
        for i, (start, stop) in enumerate(_SLICES, start=1):
            # Keep torchvision's indices as child names (slice2.5.weight == features.5.weight).
            self.add_module(f"slice{i}", nn.Sequential(OrderedDict((str(j), layers[j]) for j in range(start, stop))))

    def load_torchvision(self, state_dict: dict[str, Tensor]) -> None:
        """Load a torchvision VGG16 state dict (``features.N.*`` keys; classifier keys are ignored)."""
        index_to_slice = {j: i for i, (start, stop) in enumerate(_SLICES, start=1) for j in range(start, stop)}
        ours = {}
        for key, value in state_dict.items():
            if not key.startswith("features."):
                continue
            index, rest = key[len("features.") :].split(".", 1)
            if int(index) in index_to_slice:  # indices past relu5_3 (the last pool) hold nothing anyway
                ours[f"slice{index_to_slice[int(index)]}.{index}.{rest}"] = value
        self.load_state_dict(ours, strict=True)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for i in range(1, len(_SLICES) + 1):
            x = getattr(self, f"slice{i}")(x)
            feats.append(x)
        return feats


class ScalingLayer(nn.Module):
    """Maps [-1, 1] inputs to the ImageNet statistics the VGG trunk expects (constants of the lpips package)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """Non-negative 1x1 conv to one channel; the dropout only keeps the released key ``model.1.weight``."""

    def __init__(self, chn_in: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, 1, kernel_size=1, bias=False))
        with torch.no_grad():  # LPIPS training keeps the heads >= 0, so that the distance is >= 0
            self.model[1].weight.abs_()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _normalize(x: Tensor, eps: float = 1e-10) -> Tensor:
    # eps outside the sqrt, as in the lpips package
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def _packaged_heads() -> Path | None:
    """``<lpips package>/weights/v0.1/vgg.pth`` without importing lpips (which would pull in torchvision)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
    return path if path.is_file() else None


class LPIPS(nn.Module):
    """LPIPS v0.1 with the VGG16 trunk: ``forward(x, y)`` -> distance of shape (B, 1, 1, 1), inputs in [-1, 1].

    Args:
        trunk_path: the torchvision VGG16 file (``vgg16-397923af.pth``) or a directory holding it; None looks
            in ``$SDLIGHT_WEIGHTS`` and the torch hub cache, then downloads when online.
        pretrained: False builds a randomly initialised trunk and heads without reading any file. Only for
            tests (random LPIPS is no perceptual metric).
        heads_path: the v0.1 linear heads (``vgg.pth``); None uses the copy shipped with the ``lpips`` package.

    The network is frozen and stays in eval mode whatever ``train()`` says. Its weights are left out of
    ``state_dict()`` (also of any parent module) and ``load_state_dict`` of a parent ignores whatever is
    stored under its prefix, e.g. the ``loss.perceptual_loss.*`` entries of CompVis checkpoints.
    """

    def __init__(
        self,
        trunk_path: str | os.PathLike | None = None,
        pretrained: bool = True,
        heads_path: str | os.PathLike | None = None,
    ):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Trunk()
        for i, ch in enumerate(CHANNELS):
            self.add_module(f"lin{i}", NetLinLayer(ch))
        if pretrained:
            vgg = KNOWN["vgg16"]
            self.net.load_torchvision(load_state_dict(resolve_weights(vgg.filename, url=vgg.url, path=trunk_path)))
            self.load_heads(heads_path)
        self.requires_grad_(False)
        self.eval()
        # Pretrained metric network: reloaded from its files, never checkpointed.
        self.register_state_dict_post_hook(_drop_own_keys)
        self.register_load_state_dict_pre_hook(_keep_own_weights)

    def load_heads(self, path: str | os.PathLike | None = None) -> None:
        """Load the released linear heads (keys ``lin{i}.model.1.weight``)."""
        if path is None:
            path = _packaged_heads()
        if path is None:
            heads = KNOWN["lpips_vgg"]
            path = resolve_weights(heads.filename, url=heads.url)
        state = load_state_dict(path)
        for i in range(len(CHANNELS)):
            getattr(self, f"lin{i}").load_state_dict({"model.1.weight": state[f"lin{i}.model.1.weight"]})

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        fx, fy = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        total = 0.0
        for i, (a, b) in enumerate(zip(fx, fy)):
            diff = (_normalize(a) - _normalize(b)).pow(2)
            total = total + getattr(self, f"lin{i}")(diff).mean(dim=(2, 3), keepdim=True)
        return total


def _drop_own_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in [k for k in metadata if k == prefix[:-1] or k.startswith(prefix)]:
            del metadata[key]


def _keep_own_weights(
    module: nn.Module, state_dict: dict, prefix: str, *args  # local_metadata, strict, missing, unexpected, errors
) -> None:
    # Replace whatever the checkpoint has under our prefix by our current tensors: a missing entry is then not
    # "missing", a stale or differently shaped one is not loaded. (load_state_dict works on a copy of the dict.)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    for name, sub in module.named_modules(prefix=prefix[:-1]):
        dot = f"{name}." if name else ""
        for key, param in sub._parameters.items():
            if param is not None:
                state_dict[dot + key] = param.detach()
        for key, buf in sub._buffers.items():
            if buf is not None and key not in sub._non_persistent_buffers_set:
                state_dict[dot + key] = buf.detach()
