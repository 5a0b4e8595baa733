"""Export entry point: a trained latent diffusion model as a diffusers folder or one single-file SD checkpoint.

    python -m sdlight.export ckpt=PATH format=diffusers out=DIR   # StableDiffusion(XL)Pipeline.from_pretrained
    python -m sdlight.export ckpt=PATH format=single_file out=FILE.safetensors   # ComfyUI, AUTOMATIC1111

EMA weights by default (``use_ema=false`` for the raw ones), ``dtype=fp16|bf16|fp32``. Files are written with
safetensors and json only: neither diffusers nor transformers is needed to export.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor

from sdlight import convert, convert_sd3, convert_sdxl
from sdlight.convert_transformer import diffusers_transformer
from sdlight.checkpoints import save_safetensors
from sdlight.pretrained import CONDITIONING_FILE, OBJECTIVE_METADATA
from sdlight.checkpoints import load_latent_diffusion
from sdlight.diffusion import sampler_name
from sdlight.errors import UsageError
from sdlight.hydra_utils import CONFIG_PATH, register_resolvers, user_errors
from sdlight.models import LatentDiffusionModel
from sdlight.nn.unet import UNetModel

log = logging.getLogger("sdlight")
register_resolvers()
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMATS = ("diffusers", "single_file")
DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers these configs are written for
SCHEDULERS = {  # our samplers' diffusers counterparts, configured to take the same steps
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": True, "clip_sample": False}),
    "ddpm": ("DDPMScheduler", {"variance_type": "fixed_small", "clip_sample": False}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                 "lower_order_final": True, "final_sigmas_type": "zero"}),
    "euler": ("EulerDiscreteScheduler", {"final_sigmas_type": "zero"}),
}


def _cast(sd: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Floating tensors in ``dtype``, contiguous and unshared (safetensors refuses shared storage)."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().clone() for k, v in sd.items()}


def compvis_weights(model: LatentDiffusionModel) -> dict[str, Tensor]:
    """The backbone, VAE and condition encoder under their CompVis names (the weights the model holds: a
    checkpoint's EMA ones when it was loaded with them)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))}


def text_export(model: LatentDiffusionModel) -> tuple[dict[str, Tensor], dict[str, Any], Any] | None:
    """(Hugging Face CLIPTextModel weights, its config, the open_clip tokenizer) for an open_clip text tower whose
    diffusers counterpart exists; None for every other condition encoder."""
    from open_clip.tokenizer import SimpleTokenizer
    from open_clip.transformer import QuickGELU

    encoder = model.cond_stage_model.single
    if not hasattr(encoder, "tower") or not isinstance(getattr(encoder.tokenizer, "tokenizer", None), SimpleTokenizer):
        return None
    tower = encoder.tower
    block = tower.transformer.resblocks[0]
    layers = len(tower.transformer.resblocks) - (encoder.layer == "penultimate")  # SD 2 drops the last block
    sd = {k: v.detach() for k, v in tower.state_dict().items()}
    config = convert.hf_clip_text_config(sd, block.attn.num_heads, layers, isinstance(block.mlp.gelu, QuickGELU))
    return convert.open_clip_to_hf(sd, layers), config, encoder.tokenizer


def single_file(model: LatentDiffusionModel, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The state dict of an original SD checkpoint: ``model.diffusion_model.*``, ``first_stage_model.*`` and
    ``cond_stage_model.*`` as SD 1.x (Hugging Face CLIP, ``transformer.text_model.*``) or SD 2.x (open_clip,
    ``model.*``) tools read them, SD-XL's ``conditioner.embedders.*`` for a model with SD-XL's text towers, or
    SD3's ``text_encoders.*`` for a transformer with SD3's, plus CompVis' schedule buffers, ``scale_factor`` and
    (when not 0) ``shift_factor``; no optimizer, discriminator or LPIPS."""
    sd = compvis_weights(model)
    encoder = model.cond_stage_model.single
    sd3 = convert_sd3.sd3_text_encoder(model.cond_stage_model)
    if sd3 is not None and not isinstance(model.model.diffusion_model, UNetModel):  # SD3 tools: text_encoders.*
        sd = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
        sd.update(convert_sd3.sd3_single_file_text(sd3))
    elif convert_sdxl.sdxl_text_encoder(model.cond_stage_model) is not None:  # SD-XL's: generative-models' names
        sd = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
        sd.update(convert_sdxl.sgm_conditioner(model.cond_stage_model))
    elif hasattr(encoder, "tower") and encoder.layer == "last":  # the SD 1.x text encoder: Hugging Face layout
        sd = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
        tower = {k: v.detach() for k, v in encoder.tower.state_dict().items()}
        layers = len(encoder.tower.transformer.resblocks)
        sd.update({"cond_stage_model.transformer." + k: v
                   for k, v in convert.open_clip_to_hf(tower, layers, "text_model.").items()})
    out = _cast(sd, dtype)
    out["scale_factor"] = model.scale_factor.detach().float().clone()
    if float(model.shift_factor):  # SD3 / Flux latents; absent means 0, so SD 1.x / 2.x / XL files stay as they were
        out["shift_factor"] = model.shift_factor.detach().float().clone()
    schedule = getattr(model.objective, "schedule", None)
    if schedule is not None:  # kept in float32: tools read the noise schedule from these (CompVis' names)
        ab = schedule.alphas_cumprod
        out.update({"betas": schedule.betas.float(), "alphas_cumprod": ab.float(),
                    "alphas_cumprod_prev": torch.cat([ab.new_ones(1), ab[:-1]]).float()})
    return out


def objective_metadata(model: LatentDiffusionModel) -> dict[str, str]:
    """The objective's settings in a weights file's metadata, which ``model.init_from`` restores (diffusers and
    other tools ignore it)."""
    return {OBJECTIVE_METADATA: json.dumps(model.objective.settings())}


def scheduler_config(model: LatentDiffusionModel) -> dict[str, Any]:
    """The diffusers scheduler of the model's objective and sampler (DDIM if the sampler has no counterpart),
    with its timestep spacing."""
    name = sampler_name(model.sampler) or "ddim"
    own = model.objective.diffusers_scheduler(name)  # another process than DDPM's: its own scheduler classes
    if own is not None:
        return {"_class_name": own, "_diffusers_version": DIFFUSERS_VERSION, **model.objective.scheduler_config()}
    cls, extra = SCHEDULERS.get(name, SCHEDULERS["ddim"])
    spacing = getattr(model.sampler, "keywords", {}).get("spacing", "leading")
    return {"_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION,
            **model.objective.scheduler_config(spacing), **extra}


def tokenizer_files(tokenizer: Any, out: Path) -> None:
    """open_clip's CLIP BPE tokenizer as a Hugging Face ``CLIPTokenizer`` folder, padding as ours does: with id 0
    ("!", SD 2's and SD-XL bigG's choice) or with ``<|endoftext|>`` (``pad_with_eot``, SD-XL's CLIP-L); the
    contexts of padding positions then match training."""
    tok = tokenizer.tokenizer
    out.mkdir(parents=True, exist_ok=True)
    # open_clip spells the two special tokens <start_of_text> / <end_of_text>; same ids, CLIP's original names
    names = {tok.sot_token_id: "<|startoftext|>", tok.eot_token_id: "<|endoftext|>"}
    vocab = {names.get(i, t): i for t, i in tok.encoder.items()}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>" if getattr(tokenizer, "pad_id", 0) == tok.eot_token_id else "!"}
    _json(out / "special_tokens_map.json", special)
    _json(out / "tokenizer_config.json", {"tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.max_length,
                                          "do_lower_case": True, "errors": "replace", **special})


def _json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


def _sdxl_text(encoder: Any, out: Path, dtype: torch.dtype, scheduler: str) -> list[str]:
    """SD-XL's text_encoder/, text_encoder_2/, their tokenizers and the pipeline's model_index.json."""
    for tower, suffix in zip(encoder.towers, ("", "_2")):
        weights, config = convert_sdxl.hf_text_model(tower)
        save_safetensors(_cast(weights, dtype), out / f"text_encoder{suffix}" / "model.safetensors")
        _json(out / f"text_encoder{suffix}" / "config.json", config)
        tokenizer_files(tower.tokenizer, out / f"tokenizer{suffix}")
    _json(out / "model_index.json", convert_sdxl.model_index(scheduler, encoder.null_text == "zeros",
                                                              DIFFUSERS_VERSION))
    return ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]


def _sd3_text(encoder: Any, out: Path, dtype: torch.dtype, scheduler: str) -> list[str]:
    """SD3's text_encoder/, text_encoder_2/ (CLIP), text_encoder_3/ (T5), their tokenizers and the pipeline's
    model_index.json; a README when the pipeline's defaults would not sample what sdlight samples (a null
    caption of zeros: the pipeline's default negative is the empty caption encoded; T5 tokens other than 256)."""
    for tower, suffix in zip(encoder.towers, ("", "_2")):
        weights, config = convert_sdxl.hf_text_model(tower)
        save_safetensors(_cast(weights, dtype), out / f"text_encoder{suffix}" / "model.safetensors")
        _json(out / f"text_encoder{suffix}" / "config.json", config)
        tokenizer_files(tower.tokenizer, out / f"tokenizer{suffix}")
    weights, config = convert_sd3.hf_t5(encoder.t5)
    save_safetensors(_cast(weights, dtype), out / "text_encoder_3" / "model.safetensors")
    _json(out / "text_encoder_3" / "config.json", config)
    encoder.t5.tokenizer.save_pretrained(out / "tokenizer_3")
    _json(out / "model_index.json", convert_sd3.model_index(scheduler, type(encoder.t5.tokenizer).__name__,
                                                            DIFFUSERS_VERSION))
    notes = []
    if encoder.null_text == "zeros":
        notes.append("This model was trained with zeros as its null caption (SD3's). `StableDiffusion3Pipeline` "
                     "encodes the empty caption for guidance unless it is given negative embeddings: pass "
                     "`negative_prompt_embeds=torch.zeros_like(prompt_embeds)` and `negative_pooled_prompt_embeds="
                     "torch.zeros_like(pooled_prompt_embeds)` to sample what sdlight samples.")
    if encoder.t5.max_length != 256:
        notes.append(f"Its T5 reads {encoder.t5.max_length} tokens: pass `max_sequence_length="
                     f"{encoder.t5.max_length}` to the pipeline (its default is 256).")
    if notes:
        (out / "README.md").write_text("# Exported by sdlight\n\n" + "\n\n".join(notes) + "\n")
    return ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"]


def write_diffusers(model: LatentDiffusionModel, out: str | Path, dtype: torch.dtype = torch.float32) -> list[str]:
    """Writes the diffusers folder; returns the component folders written. Models with diffusers text encoders
    get a ``model_index.json`` (a whole ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` for SD-XL's
    two towers and size conditions, ``StableDiffusion3Pipeline`` for an MMDiT with SD3's three); the others get
    unet/ (a transformer backbone: transformer/, as ``SD3Transformer2DModel`` or ``PixArtTransformer2DModel``),
    vae/, scheduler/ and their own condition encoder's weights in ``sdlight_conditioning.safetensors``."""
    out = Path(out)
    sd = compvis_weights(model)
    vae = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    backbone = model.model.diffusion_model
    vae_cfg = model.first_stage_model.config
    vae_json = {**convert.diffusers_vae_config(vae_cfg, float(model.scale_factor), float(model.shift_factor)),
                "_diffusers_version": DIFFUSERS_VERSION}
    sdxl, sd3, why_not = None, None, ""
    if isinstance(backbone, UNetModel):
        if model.concat_stage is None and convert_sdxl.sdxl_text_encoder(model.cond_stage_model) is not None:
            try:
                sdxl = convert_sdxl.sdxl_pipeline_parts(model.cond_stage_model, backbone.config)
            except convert.ConversionError as err:  # SD-XL-like but not what the pipeline runs: the parts, saying why
                why_not = f" ({err})"
        denoiser, (weights, config) = "unet", _diffusers_unet(model, sd, text_time=sdxl is not None)
        if sdxl is not None:
            config = convert_sdxl.text_time_unet_config(config, sdxl[1])
    else:  # checked before anything is written
        denoiser, (weights, config) = "transformer", diffusers_transformer(backbone, model.latent_shape[-1])
        config = {**config, "_diffusers_version": DIFFUSERS_VERSION}
        if config["_class_name"] == "SD3Transformer2DModel" and model.concat_stage is None and \
                convert_sd3.sd3_text_encoder(model.cond_stage_model) is not None:
            try:
                sd3 = convert_sd3.sd3_pipeline_parts(model.cond_stage_model, backbone.config,
                                                     scheduler_config(model)["_class_name"])
            except convert.ConversionError as err:
                why_not = f" ({err})"
    vae_weights = convert.apply_map(vae, convert.vae_key_map(vae, len(vae_cfg["ch_mult"])), squeeze=True)
    for name, part, part_config in ((denoiser, weights, config), ("vae", vae_weights, vae_json)):
        (out / name).mkdir(parents=True, exist_ok=True)
        save_safetensors(_cast(part, dtype), out / name / "diffusion_pytorch_model.safetensors",
                         objective_metadata(model) if name == denoiser else None)
        _json(out / name / "config.json", part_config)
    scheduler = scheduler_config(model)
    _json(out / "scheduler" / "scheduler_config.json", scheduler)
    written = [denoiser, "vae", "scheduler"]
    if sdxl is not None:
        return written + _sdxl_text(sdxl[0], out, dtype, scheduler["_class_name"])
    if sd3 is not None:
        return written + _sd3_text(sd3, out, dtype, scheduler["_class_name"])
    text = text_export(model) if model.concat_stage is None and denoiser == "unet" else None
    if text is not None:
        text_weights, text_config, tokenizer = text
        (out / "text_encoder").mkdir(parents=True, exist_ok=True)
        save_safetensors(_cast(text_weights, dtype), out / "text_encoder" / "model.safetensors")
        _json(out / "text_encoder" / "config.json", text_config)
        tokenizer_files(tokenizer, out / "tokenizer")
        _json(out / "model_index.json", {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", scheduler["_class_name"]], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [None, None],
            "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False})
        return written + ["text_encoder", "tokenizer"]
    cond = {k[len("cond_stage_model."):]: v for k, v in sd.items() if k.startswith("cond_stage_model.")}
    if cond:
        save_safetensors(_cast(cond, dtype), out / CONDITIONING_FILE)
        written.append(CONDITIONING_FILE)
    encoder = " + ".join(type(e).__name__ for e in model.cond_stage_model.embedders) or "nothing"
    denoiser_class = config.get("_class_name", "UNet2DConditionModel")
    (out / "README.md").write_text(
        f"# Exported by sdlight\n\nThis model is conditioned by sdlight's {encoder}"
        f"{' with concatenated inputs (' + type(model.concat_stage).__name__ + ')' if model.concat_stage else ''}"
        f", which has no diffusers pipeline counterpart{why_not}, so there is no model_index.json. Load the parts "
        f"on their own: `{denoiser_class}.from_pretrained(DIR, subfolder=\"{denoiser}\")`, "
        f"`AutoencoderKL.from_pretrained(DIR, subfolder=\"vae\")`, "
        f"`{scheduler['_class_name']}.from_pretrained(DIR, subfolder=\"scheduler\")`; the "
        f"condition encoder's weights are in {CONDITIONING_FILE} (sdlight's key names), and `model.init_from=DIR` "
        "reads the whole folder back into sdlight.\n")
    return written


def _diffusers_unet(model: LatentDiffusionModel, sd: dict[str, Tensor], text_time: bool
                    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(weights, config) of the UNet as diffusers' ``UNet2DConditionModel`` (``text_time``: SD-XL's vector
    input as its ``add_embedding``)."""
    backbone = model.model.diffusion_model
    unet = {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    config = {**convert.diffusers_unet_config(backbone.config), "_diffusers_version": DIFFUSERS_VERSION}
    if model.concat_stage is not None:
        config["in_channels"] = backbone.config["in_channels"]  # z_t plus the concatenated channels
    return convert.apply_map(unet, convert.unet_key_map(unet, backbone.config, text_time)), config


def check_options(cfg: DictConfig) -> None:
    """Every option checked before the checkpoint is read."""
    if cfg.format not in FORMATS:
        raise UsageError(f"format={cfg.format}: choose diffusers (a folder) or single_file (one .safetensors)")
    if cfg.dtype not in DTYPES:
        raise UsageError(f"dtype={cfg.dtype}: choose one of {', '.join(DTYPES)}")
    out = Path(str(cfg.out))
    if cfg.format == "single_file" and out.suffix != ".safetensors":
        raise UsageError(f"out={out}: format=single_file writes one file; give a name ending in .safetensors")
    if cfg.format == "diffusers" and (out.is_file() or (out.is_dir() and any(out.iterdir()))):
        raise UsageError(f"out={out}: format=diffusers writes a folder; give a new or empty directory")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def main(cfg: DictConfig) -> None:
    with user_errors():
        check_options(cfg)
        model, weights = load_latent_diffusion(cfg.ckpt, cfg.use_ema)
        dtype, out = DTYPES[cfg.dtype], Path(str(cfg.out))
        if cfg.format == "single_file":
            save_safetensors(single_file(model, dtype), out, objective_metadata(model))
            log.info(f"Wrote {out} ({weights}, {cfg.dtype}, sampler: {sampler_name(model.sampler)})")
            return
        parts = write_diffusers(model, out, dtype)
    log.info(f"Wrote {', '.join(parts)} to {out} ({weights}, {cfg.dtype})")


if __name__ == "__main__":
    main()
