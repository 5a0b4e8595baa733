"""CLIP score: how well generated images match their prompts, ``100 · max(cos(image, text), 0)`` averaged.

The definition of Hessel et al. (2021) with w = 100, as in torchmetrics' ``CLIPScore``, computed with an
open_clip model (image and text towers). The model lives in the callback: it is not part of the module's
``state_dict`` nor of its checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning as L
import open_clip
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode

from sdlight.callbacks.sampling import SampleEvaluationCallback, condition_keys, to_unit_range
from sdlight.conditioning.open_clip_weights import find_open_clip_weights
from sdlight.conditioning.text import quiet_open_clip


def load_open_clip_model(arch: str = "ViT-B-32", pretrained: str | None = "laion2b_s34b_b79k",
                         checkpoint_path: str | os.PathLike | None = None) -> nn.Module:
    """Build ``arch`` with both towers and load its weights (located first: missing files fail fast).

    The file comes from ``checkpoint_path``, open_clip's cache, or :func:`sdlight.weights.resolve_weights`; the
    release's image mean / std are attached as the model's preprocessing config.
    """
    path = find_open_clip_weights(arch, pretrained, checkpoint_path)
    with quiet_open_clip():
        model = open_clip.create_model(arch, pretrained=None)
    open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    release = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}
    preprocess = dict(open_clip.get_model_preprocess_cfg(model))
    preprocess.update({k: release[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in release})
    open_clip.set_model_preprocess_cfg(model, preprocess)
    return model.eval().requires_grad_(False)


def clip_preprocess(images: Tensor, model: nn.Module) -> Tensor:
    """open_clip's eval preprocessing on a batch in [0, 1], on its device (``image_transform(is_train=False)``).

    Resize (bicubic by default, antialiased like PIL) by the shortest side, centre crop, clamp to [0, 1] as a
    PIL round trip would, then the model's mean / std. ``resize_mode`` "squash" and "longest" (zero padding)
    are supported as in open_clip.
    """
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    th, tw = (size, size) if isinstance(size, int) else tuple(size)
    mean = cfg.get("mean") or open_clip.constants.OPENAI_DATASET_MEAN
    std = cfg.get("std") or open_clip.constants.OPENAI_DATASET_STD
    mode = InterpolationMode.BILINEAR if cfg.get("interpolation") == "bilinear" else InterpolationMode.BICUBIC
    resize_mode = cfg.get("resize_mode") or "shortest"
    h, w = images.shape[-2:]
    x = images.float()
    if resize_mode == "squash":
        x = TF.resize(x, [th, tw], mode, antialias=True)
    else:
        ratio = max(h / th, w / tw) if resize_mode == "longest" else min(h / th, w / tw)
        x = TF.resize(x, [round(h / ratio), round(w / ratio)], mode, antialias=True)
        x = TF.center_crop(x, [th, tw])  # pads with zeros where the image is smaller ("longest")
    return TF.normalize(x.clamp(0, 1), list(mean), list(std))


@torch.no_grad()
def clip_scores(model: nn.Module, tokenizer, images: Tensor, prompts: Sequence[str]) -> Tensor:
    """Per-image ``100 · max(cos(image, prompt), 0)`` for images ``(B, 3, H, W)`` in [-1, 1]."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    device = next(model.parameters()).device
    pixels = clip_preprocess(to_unit_range(images.to(device)), model)
    image_features = F.normalize(model.encode_image(pixels).float(), dim=-1)
    text_features = F.normalize(model.encode_text(tokenizer(list(prompts)).to(device)).float(), dim=-1)
    return 100 * (image_features * text_features).sum(-1).clamp(min=0)


class CLIPScoreCallback(SampleEvaluationCallback):
    """Logs ``val/clip_score`` of ``num_samples`` images generated from the val prompts (``prompt_key``).

    The images are generated from the same val items' ``condition_keys`` entries (the prompts themselves for a
    text-conditioned module). ``model=`` injects an open_clip model (both towers) instead of loading
    ``arch`` / ``pretrained`` / ``checkpoint_path``.
    """

    def __init__(self, every_n_steps: int | None = 5000, num_samples: int = 1000, batch_size: int = 50,
                 steps: int | None = 50, guidance_scale: float | None = None, seed: int = 0, use_ema: bool = True,
                 at_train_end: bool = True, arch: str = "ViT-B-32", pretrained: str | None = "laion2b_s34b_b79k",
                 checkpoint_path: str | os.PathLike | None = None, model: nn.Module | None = None,
                 prompt_key: str = "text") -> None:
        super().__init__(every_n_steps, num_samples, batch_size, steps, guidance_scale, seed, use_ema, at_train_end)
        self.arch, self.pretrained, self.checkpoint_path = arch, pretrained, checkpoint_path
        self.model, self.prompt_key = model, prompt_key
        self.tokenizer = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "generate"):
            raise TypeError(f"CLIPScoreCallback scores generated samples; {type(pl_module).__name__} has no generate()")
        if self.model is None:
            self.model = load_open_clip_model(self.arch, self.pretrained, self.checkpoint_path)
        self.model.eval().requires_grad_(False)
        with quiet_open_clip():
            length = getattr(self.model, "context_length", 77)
            self.tokenizer = open_clip.get_tokenizer(self.arch, context_length=length)
        if not condition_keys(pl_module):
            rank_zero_warn("CLIPScoreCallback: the module is unconditional, so its samples ignore the prompts")

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        if self.tokenizer is None:
            self.setup(trainer, pl_module, "fit")
        device = pl_module.device
        self.model.to(device)
        conditions = self.conditions(trainer, list(dict.fromkeys([self.prompt_key, *condition_keys(pl_module)])))
        total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of scores, count
        for chunk, images in self.generate(trainer, pl_module, conditions, "CLIP score: sampling"):
            scores = clip_scores(self.model, self.tokenizer, images, chunk[self.prompt_key])
            total += torch.stack([scores.double().sum(), torch.tensor(len(scores), dtype=torch.float64, device=device)])
        if trainer.world_size > 1:
            total = trainer.strategy.reduce(total, reduce_op="sum")
        return {"val/clip_score": float(total[0] / total[1])}
