"""Sampling entry point: ``python -m sdlight.sample ckpt=PATH prompt="..." num_samples=4 steps=50 seed=0``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torchvision
from omegaconf import DictConfig, OmegaConf
from PIL import PngImagePlugin

from sdlight.errors import UsageError
from sdlight.hydra_utils import CONFIG_PATH, register_resolvers, user_errors
from sdlight.pipeline import Pipeline, SampleResult, heatmap_overlay
from sdlight.pixels import to_pil
from sdlight.sampling_checks import SampleRequest, resolve_device

log = logging.getLogger("sdlight")
register_resolvers()


def conditions_from(cfg: DictConfig) -> dict[str, list[Any]] | None:
    """The condition entries asked for on the command line, by batch key: prompt= or prompts_file= (``text``),
    label=, attributes=, and ``+conditions.<key>=`` for any other entry (e.g. a size); None for none."""
    if cfg.get("prompt") is not None and cfg.get("prompts_file") is not None:
        raise UsageError("give prompt= or prompts_file=, not both")
    given: dict[str, list[Any]] = {}
    if cfg.get("prompt") is not None:
        given["text"] = [str(cfg.prompt)]
    if cfg.get("prompts_file") is not None:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise UsageError(f"prompts_file={path}: no such file")
        lines = path.read_text().splitlines()
        prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not prompts:
            raise UsageError(f"prompts_file={path} has no prompts (one per line; # starts a comment)")
        given["text"] = prompts
    if cfg.get("label") is not None:
        labels = OmegaConf.to_container(cfg.label) if OmegaConf.is_list(cfg.label) else [cfg.label]
        if not labels or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise UsageError(f"label={cfg.label}: give a class id or a list of them (label=7, 'label=[1,2]'); "
                             "text models take prompt=")
        given["label"] = labels
    if cfg.get("attributes") is not None:
        attrs = OmegaConf.to_container(cfg.attributes) if OmegaConf.is_list(cfg.attributes) else None
        if not attrs:
            raise UsageError(f"attributes={cfg.attributes}: give a list of ids ('attributes=[0,3,1]') or of lists")
        given["attributes"] = [attrs] if not isinstance(attrs[0], list) else attrs
    for key, value in (cfg.get("conditions") or {}).items():  # one value, or a list with one per condition
        value = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
        given[str(key)] = value if isinstance(value, list) and value and isinstance(value[0], list) else [value]
    return given or None


def grid_scale(size: int, scale: int | None = None, min_side: int = 128) -> int:
    """The grid's integer upscale: ``scale`` if given, else the least that shows each image at ``min_side`` px."""
    if scale is not None:
        if scale < 1:
            raise UsageError(f"grid_scale={scale}: give a whole number >= 1 (or null for automatic)")
        return int(scale)
    return max(1, -(-min_side // size))


def png_text(settings: dict[str, Any], prompt: str | None = None) -> PngImagePlugin.PngInfo:
    """PNG text chunks: the settings as JSON under ``sdlight`` (and the prompt under ``prompt``)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("sdlight", json.dumps(settings, default=str))
    if prompt is not None:
        info.add_text("prompt", prompt)
    return info


def save(result: SampleResult, out: Path, ckpt: str, scale: int | None = None) -> list[Path]:
    """Writes each sample as a PNG with its settings in the PNG text chunks, a grid (upscaled with nearest
    neighbours so that small images can be seen; the single PNGs keep their size), and attention maps."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, cond) in enumerate(zip(result.images, result.conditions)):
        path = out / f"{i:05d}.png"
        image.save(path, pnginfo=png_text({**result.settings, "condition": cond, "index": i, "checkpoint": str(ckpt)},
                                          cond if isinstance(cond, str) else None))
        paths.append(path)
    grid = torchvision.utils.make_grid(
        [torchvision.transforms.functional.to_tensor(im) for im in result.images],
        nrow=max(1, len(result.images) // max(1, len(set(map(str, result.conditions))))), padding=2)
    factor = grid_scale(min(result.images[0].size), scale)
    if factor > 1:
        grid = grid.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)  # nearest: pixels stay sharp
    # the grid's settings too, with every sample's condition in order (row by row)
    meta = {**result.settings, "conditions": result.conditions, "checkpoint": str(ckpt), "scale": factor}
    to_pil(grid[None] * 2 - 1)[0].save(out / "grid.png", pnginfo=png_text(meta))
    if result.attention:
        for i, (tokens, maps) in enumerate(result.attention):
            folder = out / "attention" / f"{i:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            for k, token in enumerate(tokens):
                if token in ("<start_of_text>", "<end_of_text>", "<pad>"):
                    continue
                safe = "".join(ch if ch.isalnum() else "_" for ch in token)
                heatmap_overlay(result.images[i], maps[k]).save(folder / f"{k:02d}_{safe}.png")
    return paths


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
def main(cfg: DictConfig) -> None:
    with user_errors():
        # every option is checked before the checkpoint is read: a typo costs a second, not a model load
        request = SampleRequest(conditions_from(cfg), cfg.num_samples, cfg.steps, cfg.guidance, cfg.guidance_rescale,
                                cfg.negative_prompt, cfg.sampler, cfg.get("sampler_options") or {}, cfg.get("eta"),
                                cfg.seed, cfg.use_ema, cfg.init_image, cfg.strength, cfg.mask, cfg.lowres,
                                cfg.save_attention, cfg.progress, cfg.get("height"), cfg.get("width"))
        grid_scale(1, cfg.get("grid_scale"))
        device = resolve_device(cfg.device)
        pipe = Pipeline.from_checkpoint(cfg.ckpt, device=device, use_ema=cfg.use_ema)
        log.info(f"Loaded {cfg.ckpt} on {pipe.device}")
        result = pipe.run(request)
        paths = save(result, Path(cfg.out), cfg.ckpt, cfg.get("grid_scale"))
    log.info(f"Wrote {len(paths)} samples and grid.png to {cfg.out}")


if __name__ == "__main__":
    main()
