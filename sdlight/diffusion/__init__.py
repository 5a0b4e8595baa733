"""Diffusion math over plain tensors: schedules, the forward process, objectives, loss weighting, grids, samplers,
guidance."""

from .guidance import cfg_denoiser, rescale_guidance
from .process import (
    PREDICTION_TYPES,
    canonical_prediction_type,
    diffusers_prediction_type,
    get_v,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_sample,
    score_from_eps,
    to_x0_eps,
    training_target,
)
from .draw import Draws
from .grids import (
    GRIDS,
    FlowPath,
    Grid,
    VEPath,
    VPPath,
    exponential_sigmas,
    karras_sigmas,
    make_sigmas,
    nearest_timestep,
    sigma_to_t,
)
from .objectives import DDPM, Objective, objective_from_settings
from .edm import EDM
from .rectified_flow import RectifiedFlow
from .samplers import (
    SAMPLERS,
    inpaint_callback,
    make_timesteps,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_heun,
    sample_unipc,
    sampler_name,
    sampler_options,
)
from .schedules import SCHEDULES, NoiseSchedule, at, make_betas, rescale_zero_terminal_snr
from .weighting import WEIGHTINGS, diffusion_loss, loss_weight

# the objectives by config name (model/objective=NAME)
OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (DDPM, RectifiedFlow, EDM)}

__all__ = [
    "NoiseSchedule", "make_betas", "rescale_zero_terminal_snr", "at", "SCHEDULES",
    "q_sample", "predict_x0_from_eps", "predict_eps_from_x0", "predict_x0_from_v", "predict_eps_from_v", "get_v",
    "score_from_eps", "to_x0_eps", "training_target", "canonical_prediction_type",
    "diffusers_prediction_type", "PREDICTION_TYPES",
    "loss_weight", "diffusion_loss", "WEIGHTINGS",
    "make_timesteps", "sample_ddpm", "sample_ddim", "sample_dpmpp_2m", "sample_euler", "inpaint_callback", "SAMPLERS",
    "sampler_name", "sampler_options", "sample_heun", "sample_dpmpp_2m_sde", "sample_unipc",
    "make_sigmas", "karras_sigmas", "exponential_sigmas", "sigma_to_t", "nearest_timestep", "GRIDS", "Grid", "VPPath",
    "FlowPath", "VEPath", "Objective", "objective_from_settings", "DDPM", "RectifiedFlow", "EDM", "OBJECTIVES", "Draws",
    "cfg_denoiser", "rescale_guidance",
]
