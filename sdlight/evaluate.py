"""Evaluation entry point: ``python -m sdlight.evaluate ckpt=PATH 'metrics=[fid,clip_score,adherence]' num_samples=M``.

The scores are the training callbacks' own (``sdlight/callbacks/``), run once on a model rebuilt from its
checkpoint, so a number printed here and the same number logged during training mean the same thing. A latent
diffusion checkpoint generates ``num_samples`` images for the conditions of the first ``num_samples`` val items;
an autoencoder checkpoint is scored by rFID (and KID) of its val reconstructions. The val set comes from the
datamodule config stored in the checkpoint, with overrides. Samples are generated once and shared by the
metrics that need them. Results are printed as a table and written to ``<out>/metrics.json``.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from sdlight.checkpoints import CheckpointError, load_autoencoder, load_latent_diffusion, read_checkpoint
from sdlight.errors import UsageError
from sdlight.hydra_utils import CONFIG_PATH, register_resolvers, user_errors

log = logging.getLogger("sdlight")
register_resolvers()

METRICS = ("fid", "kid", "clip_score", "adherence", "digits")
RECONSTRUCTION_METRICS = ("fid", "kid")  # what an autoencoder checkpoint can be scored by
_LOADER_KEYS = ("batch_size", "num_workers")  # the `data` placeholders of conf/evaluate.yaml


def check_metrics(metrics: str | Sequence[str]) -> list[str]:
    """The requested metric names, deduplicated; a clear error for unknown ones."""
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    names = list(dict.fromkeys(str(n).strip() for n in names))
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise UsageError(f"metrics=[{','.join(names)}]: unknown {', '.join(unknown) or 'empty list'}; choose from "
                         f"{', '.join(METRICS)}, e.g. 'metrics=[fid,clip_score,adherence]'")
    return names


class ReconstructionModule(L.LightningModule):
    """A trained autoencoder as the FID callback scores a stage-1 model: reconstructions of the val images."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)


def _peek(path: str | Path) -> dict[str, Any]:
    """The checkpoint's dict, memory-mapped where possible so a multi-GB file is not read twice."""
    return read_checkpoint(path, mmap=True)


def load_model(path: str | Path, device: str | torch.device | None = "auto", use_ema: bool = True
               ) -> tuple[nn.Module, str, dict[str, Any]]:
    """``(model on device, "ldm" | "autoencoder", the checkpoint's stored run config)``; a latent diffusion model
    with its EMA weights when ``use_ema`` and it has them (``model.weights`` says which)."""
    from sdlight.sampling_checks import resolve_device

    ckpt = _peek(path)
    config = (ckpt.get("sdlight") or {}).get("config") or {}
    if "autoencoder_config" in (ckpt.get("hyper_parameters") or {}):
        return ReconstructionModule(load_autoencoder(path)).to(resolve_device(device)), "autoencoder", config
    model, which = load_latent_diffusion(path, use_ema)
    model.weights = which
    return model.to(resolve_device(device)).eval(), "ldm", config


def data_config(stored: Mapping[str, Any] | None, override: Mapping[str, Any] | None) -> dict[str, Any]:
    """The datamodule config: ``override`` alone when it has a ``_target_`` (a whole other dataset config), else
    the checkpoint's ``stored`` one with the non-null values of ``override`` replacing its own."""
    override = dict(override or {})
    if "_target_" in override:
        return {k: v for k, v in override.items() if not (k in _LOADER_KEYS and v is None)}
    if not stored or "_target_" not in stored:
        raise CheckpointError("the checkpoint stores no data config (it was not saved by `sdlight.train`): "
                              "name one with `data=NAME` (e.g. data=shapes)")
    return {**stored, **{k: v for k, v in override.items() if v is not None}}


def val_data(config: Mapping[str, Any]) -> tuple[L.LightningDataModule, torch.utils.data.DataLoader]:
    """(the datamodule of ``config``, set up for validation; its val loader)."""
    datamodule: L.LightningDataModule = hydra.utils.instantiate(dict(config))
    datamodule.prepare_data()
    datamodule.setup("validate")
    return datamodule, datamodule.val_dataloader()


def check_metric_data(names: Sequence[str], datamodule: Any, loader: torch.utils.data.DataLoader,
                      truth_key: str = "attributes") -> None:
    """The metrics that read samples with an oracle fit the val data, checked before anything is sampled:
    ``adherence`` reads shapes scenes (the val items' ``truth_key`` must encode them), ``digits`` the digits 0-9."""
    from sdlight.callbacks.adherence import max_shapes_of
    from sdlight.callbacks.sampling import load_items

    if not {"adherence", "digits"} & set(names):
        return
    given, data = f"metrics=[{','.join(names)}]", type(datamodule).__name__
    item = next(load_items(loader, range(1), batch_size=1))
    if "adherence" in names:
        try:
            max_shapes_of(torch.as_tensor(item[truth_key]))
        except (KeyError, ValueError):
            raise UsageError(f"{given}: adherence reads shapes scenes (colour, shape, position, background) back from "
                             f"the samples, and the val data ({data}) has no shapes attributes: score it on the "
                             "shapes data (data=shapes); digit models are scored by metrics=[digits]") from None
    if "digits" in names:
        classes = getattr(datamodule, "num_classes", None)
        label = torch.as_tensor(item.get("label", -1)).flatten().tolist()
        if (classes is not None and classes != 10) or not all(0 <= v <= 9 for v in label):
            found = f"{classes} classes" if classes is not None else f"labels {label}"
            raise UsageError(f"{given}: digits reads the samples as the handwritten digits 0-9, and the val data "
                             f"({data}, {found}) is not digit data: score it on the digits data (data=digits); "
                             "shapes models are scored by metrics=[adherence]")


def _fingerprint(value: Any) -> Any:
    """A hashable, exact summary of a ``generate`` argument (tensors by dtype, shape and content digest)."""
    if isinstance(value, Tensor):
        data = value.detach().cpu().contiguous()
        return ("tensor", str(data.dtype), tuple(data.shape),
                hashlib.sha256(data.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest())
    if isinstance(value, (list, tuple)):
        return tuple(_fingerprint(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _fingerprint(v)) for k, v in value.items()))
    if callable(value):
        return ("callable", id(value))
    return value


class SampleSet:
    """The model's images for the metrics of one evaluation: each metric asks for the images of its conditions
    (``callback.images = sample_set``), and the metrics that ask for the same ones (same conditions, count and
    generator state) get the same images, sampled once.

    Such a request is served from memory with what sampling would return, and the generator is moved on to the
    state that sampling would leave it in. Each result is kept for ``uses - 1`` more requests and within
    ``max_bytes`` (beyond that, the images are sampled again).
    """

    def __init__(self, model: nn.Module, *, steps: int | None, guidance: float | None, sampler: Callable | None,
                 uses: int = 1, max_bytes: float = 4 * 2**30):
        self.model, self.steps, self.guidance, self.sampler = model, steps, guidance, sampler
        self.uses, self.max_bytes = uses, max_bytes
        self.entries: dict[Any, tuple[Tensor, Tensor | None, int]] = {}
        self.bytes = 0
        self.hits = self.calls = 0

    def __call__(self, model: nn.Module, conditions: Any, n: int, generator: torch.Generator | None) -> Tensor:
        self.calls += 1
        state = generator.get_state() if generator is not None else None
        key = (_fingerprint(conditions), n, _fingerprint(state))
        if key in self.entries:
            images, state_after, left = self.entries.pop(key)
            if left > 1:
                self.entries[key] = (images, state_after, left - 1)
            else:
                self.bytes -= images.numel() * images.element_size()
            if generator is not None:
                generator.set_state(state_after)
            self.hits += 1
            return images.to(self.model.device)
        images = self.model.generate(conditions, n, steps=self.steps, guidance_scale=self.guidance,
                                     generator=generator, sampler=self.sampler)
        size = images.numel() * images.element_size()
        if self.uses > 1 and self.bytes + size <= self.max_bytes:
            self.entries[key] = (images.cpu(), generator.get_state() if generator is not None else None,
                                 self.uses - 1)
            self.bytes += size
        return images


def _callbacks(names: list[str], common: dict[str, Any], fid: Mapping[str, Any], clip: Mapping[str, Any],
               adherence: Mapping[str, Any], feature_extractor: nn.Module | None, clip_model: nn.Module | None
               ) -> list[L.Callback]:
    from sdlight.callbacks.adherence import PromptAdherenceCallback
    from sdlight.callbacks.clip_score import CLIPScoreCallback
    from sdlight.callbacks.digits import DigitAccuracyCallback
    from sdlight.callbacks.fid import FIDCallback

    out: list[L.Callback] = []
    if "fid" in names or "kid" in names:  # one Inception pass feeds both
        out.append(FIDCallback(**common, weights_path=fid.get("weights_path"), feature_extractor=feature_extractor,
                               cache_dir=fid.get("cache_dir"), num_real=fid.get("num_real"),
                               dataset_id=fid.get("dataset_id"), kid="kid" in names,
                               kid_subsets=fid.get("kid_subsets", 100),
                               kid_subset_size=fid.get("kid_subset_size", 1000)))
    if "clip_score" in names:
        out.append(CLIPScoreCallback(**common, arch=clip.get("arch", "ViT-B-32"),
                                     pretrained=clip.get("pretrained", "laion2b_s34b_b79k"),
                                     checkpoint_path=clip.get("checkpoint_path"), model=clip_model,
                                     prompt_key=clip.get("prompt_key", "text")))
    if "adherence" in names:
        out.append(PromptAdherenceCallback(**common, truth_key=adherence.get("truth_key", "attributes")))
    if "digits" in names:
        out.append(DigitAccuracyCallback(**common))
    return out


def _check_weights(names: list[str], fid: Mapping[str, Any], clip: Mapping[str, Any],
                   feature_extractor: nn.Module | None, clip_model: nn.Module | None) -> None:
    """Locate the pretrained metric networks before the model is loaded: a missing file fails in a second."""
    if ("fid" in names or "kid" in names) and feature_extractor is None:
        from sdlight.weights import resolve_weights

        resolve_weights("pt_inception", path=fid.get("weights_path"))
    if "clip_score" in names and clip_model is None:
        from sdlight.conditioning.open_clip_weights import find_open_clip_weights

        find_open_clip_weights(clip.get("arch", "ViT-B-32"), clip.get("pretrained", "laion2b_s34b_b79k"),
                               clip.get("checkpoint_path"))


def _check_options(num_samples: int, steps: int | None, guidance: float | None, sampler: str | None,
                   options: dict[str, Any], device: Any, batch_size: int) -> None:
    """The sampling options, before the checkpoint is read (against the model's own sampler once it is)."""
    from sdlight.diffusion import SAMPLERS
    from sdlight.sampling_checks import check_sampling_options, resolve_device, resolve_sampler_options

    check_sampling_options(num_samples, steps, guidance, sampler=sampler)
    resolve_sampler_options(sampler, SAMPLERS.get(sampler), options)
    resolve_device(device)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size={batch_size!r}: give a whole number >= 1")


def _sampler(model: nn.Module, name: str | None, options: dict[str, Any]) -> Callable | None:
    """The sampler asked for (None: the model's own), with ``options``, checked against it."""
    from sdlight.diffusion import SAMPLERS
    from sdlight.sampling_checks import resolve_sampler_options

    fn = SAMPLERS[name] if name is not None else None
    if not options:  # the model's configured sampler takes them when no sampler is named
        return fn
    fn = fn or model.sampler
    resolve_sampler_options(name, fn, options)
    return functools.partial(fn, **options)


def _scored_data(ckpt: str | Path, module: nn.Module, stage: str, stored: dict[str, Any], names: list[str],
                 data: Mapping[str, Any] | None, adherence: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """(the val data config, its loader), checked against the model and the metrics before anything is sampled."""
    if stage == "autoencoder" and not set(names) <= set(RECONSTRUCTION_METRICS):
        raise UsageError(f"{ckpt} is an autoencoder checkpoint: it is scored by rFID / KID of its reconstructions "
                         f"(metrics=[fid] or [fid,kid]); {sorted(set(names) - set(RECONSTRUCTION_METRICS))} "
                         "need a latent diffusion checkpoint")
    data_cfg = data_config(stored.get("data"), data)
    if str(data_cfg.get("_target_", "")).endswith("LatentsDataModule") and {"fid", "kid"} & set(names):
        raise UsageError("this run trained on cached latents (data=latents), and FID/KID compare against real "
                         "images: name the image dataset the cache was made from, e.g. data=folder "
                         "data.root=DIR (or data=shapes)")
    datamodule, loader = val_data(data_cfg)
    check_metric_data(names, datamodule, loader, adherence.get("truth_key", "attributes"))
    image_size = getattr(module, "image_size", None)
    if image_size is not None and data_cfg.get("image_size") not in (None, image_size):
        log.warning(f"the model generates {image_size} px images but the val data is {data_cfg['image_size']} px")
    return data_cfg, loader


def evaluate(ckpt: str | Path, metrics: str | Sequence[str] = ("fid",), num_samples: int = 1000, *,
             batch_size: int = 50, steps: int | None = 50, guidance: float | None = None, sampler: str | None = None,
             sampler_options: Mapping[str, Any] | None = None,
             seed: int = 0, use_ema: bool = True, device: str | torch.device | None = "auto",
             data: Mapping[str, Any] | None = None, fid: Mapping[str, Any] | None = None,
             clip: Mapping[str, Any] | None = None, adherence: Mapping[str, Any] | None = None,
             out: str | Path | None = None, sample_cache_gb: float = 4.0,
             feature_extractor: nn.Module | None = None, clip_model: nn.Module | None = None) -> dict[str, Any]:
    """Scores checkpoint ``ckpt``; returns ``{"scores": {...}, "settings": {...}}`` and writes it to
    ``<out>/metrics.json`` when ``out`` is given.

    ``data`` overrides the checkpoint's datamodule config (see :func:`data_config`); ``fid``, ``clip`` and
    ``adherence`` are the options of those callbacks (the nodes of ``conf/evaluate.yaml``). ``sampler_options``
    go to the sampler (``sampler``, or the model's configured one), as in :class:`sdlight.pipeline.Pipeline`.
    ``feature_extractor`` (images in [0, 1] → ``(B, F)``, with ``num_features``) stands in for the Inception
    and ``clip_model`` for the open_clip model, as in the callbacks.
    """
    from sdlight.callbacks.sampling import StandaloneTrainer
    from sdlight.sampling_checks import given_options

    started = time.perf_counter()
    names = check_metrics(metrics)
    fid, clip, adherence = dict(fid or {}), dict(clip or {}), dict(adherence or {})
    options = given_options(sampler_options)
    _check_options(num_samples, steps, guidance, sampler, options, device, batch_size)
    _check_weights(names, fid, clip, feature_extractor, clip_model)

    module, stage, stored = load_model(ckpt, device, use_ema)
    data_cfg, loader = _scored_data(ckpt, module, stage, stored, names, data, adherence)
    log.info(f"Evaluating {ckpt} ({stage}) on {module.device}: {names}, {num_samples} samples")

    common = dict(every_n_steps=None, num_samples=num_samples, batch_size=batch_size, steps=steps,
                  guidance_scale=guidance, seed=seed, use_ema=use_ema, at_train_end=False)
    callbacks = _callbacks(names, common, fid, clip, adherence, feature_extractor, clip_model)
    trainer = StandaloneTrainer(loader)
    shared = None
    if stage == "ldm":  # every metric callback samples for a diffusion model: the same images for all of them
        shared = SampleSet(module, steps=steps, guidance=guidance, uses=len(callbacks),
                           sampler=_sampler(module, sampler, options), max_bytes=sample_cache_gb * 2**30)
    scores: dict[str, float] = {}
    for callback in callbacks:
        callback.images = shared
        callback.setup(trainer, module, "validate")
        scores.update(callback.run(trainer, module))
    if shared is not None:
        log.info(f"{shared.calls - shared.hits} of {shared.calls} sampling calls ran ({shared.hits} shared)")

    report = {"scores": {k.removeprefix("val/"): v for k, v in scores.items()},
              "settings": _settings(module, stage, ckpt, names, num_samples, batch_size, steps, guidance, sampler,
                                    seed, use_ema, data_cfg, fid, clip, stored)}
    if stage == "ldm":
        report["settings"]["sampler_options"] = options
    report["settings"]["seconds"] = round(time.perf_counter() - started, 2)
    if out is not None:
        path = Path(out) / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        log.info(f"Wrote {path}")
    return report


def _settings(module: L.LightningModule, stage: str, ckpt: str | Path, names: list[str], num_samples: int,
              batch_size: int, steps: int | None, guidance: float | None, sampler: str | None, seed: int,
              use_ema: bool, data_cfg: dict[str, Any], fid: dict[str, Any], clip: dict[str, Any],
              stored: dict[str, Any]) -> dict[str, Any]:
    """What the scores depend on, with the model's defaults filled in where an option was left null."""
    from sdlight import __version__

    settings: dict[str, Any] = {"ckpt": str(ckpt), "stage": stage, "metrics": names, "num_samples": num_samples,
                                "batch_size": batch_size, "seed": seed}
    if stage == "ldm":
        from sdlight.diffusion import sampler_name

        configured = getattr(module.sampler, "keywords", {}) or {}
        name = sampler_name(module.sampler)
        settings.update(
            steps=steps if steps is not None else configured.get("steps"),
            guidance=float(guidance if guidance is not None else module.guidance_scale),
            sampler=sampler or name,
            weights=module.weights, use_ema=module.weights == "EMA weights", condition_keys=module.condition_keys)
    else:
        settings.update(steps=None, guidance=None, sampler=None, use_ema=None)
    if "fid" in names or "kid" in names:
        settings["fid"] = {k: fid.get(k) for k in ("weights_path", "num_real", "cache_dir", "dataset_id")}
    if "clip_score" in names:
        settings["clip"] = {k: clip.get(k) for k in ("arch", "pretrained", "checkpoint_path")}
    settings.update(data=data_cfg, device=str(module.device), task_name=stored.get("task_name"),
                    sdlight_version=__version__, date=datetime.datetime.now().isoformat(timespec="seconds"))
    return settings


def print_report(report: dict[str, Any]) -> None:
    """The scores as a rich table, and the settings that produced them."""
    import rich
    from rich.table import Table

    s = report["settings"]
    table = Table(title=f"{Path(s['ckpt']).name} ({s['stage']})", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in report["scores"].items():
        table.add_row(name, f"{value:.4f}")
    rich.print(table)
    rich.print(f"[dim]{s['num_samples']} samples · steps {s['steps']} · guidance {s['guidance']} · "
               f"sampler {s['sampler']} · seed {s['seed']} · {s['seconds']} s[/dim]")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    def node(name: str) -> dict[str, Any]:
        return OmegaConf.to_container(cfg.get(name), resolve=True) if cfg.get(name) is not None else {}

    with user_errors():
        report = evaluate(cfg.ckpt, list(cfg.metrics) if OmegaConf.is_list(cfg.metrics) else cfg.metrics,
                          cfg.num_samples, batch_size=cfg.batch_size, steps=cfg.steps, guidance=cfg.guidance,
                          sampler=cfg.sampler, sampler_options=node("sampler_options"), seed=cfg.seed,
                          use_ema=cfg.use_ema, device=cfg.device,
                          data=node("data"), fid=node("fid"), clip=node("clip"), adherence=node("adherence"),
                          out=cfg.out, sample_cache_gb=cfg.get("sample_cache_gb", 4.0))
    print_report(report)
    log.info(f"Scores and settings in {Path(cfg.out) / 'metrics.json'}")


if __name__ == "__main__":
    main()
