"""The forward process and conversions between the model parametrisations.

With ``a = alpha_bar_t`` the forward process is ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``. A network may predict
eps, x0, or the velocity ``v = sqrt(a) eps - sqrt(1 - a) x0`` (Salimans & Ho, 2022); each determines the others
given x_t. ``t`` is always a (B,) tensor of integer training timesteps (an int is broadcast).
"""

import torch
from torch import Tensor

from .schedules import NoiseSchedule, at

PREDICTION_TYPES = ("eps", "v", "x0")
# the one table of names: ours and diffusers' (configs written for either tool work; export writes diffusers')
DIFFUSERS_PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
_ALIASES = {theirs: ours for ours, theirs in DIFFUSERS_PREDICTION_TYPES.items()}


def canonical_prediction_type(prediction_type: str) -> str:
    """'eps' | 'v' | 'x0' for our names or diffusers' ('epsilon', 'v_prediction', 'sample')."""
    name = _ALIASES.get(prediction_type, prediction_type)
    if name not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES} "
                         f"(or diffusers' {tuple(_ALIASES)})")
    return name


def diffusers_prediction_type(prediction_type: str) -> str:
    """diffusers' name ('epsilon' | 'v_prediction' | 'sample') for any spelling ``canonical_prediction_type`` takes."""
    return DIFFUSERS_PREDICTION_TYPES[canonical_prediction_type(prediction_type)]


def q_sample(x0: Tensor, t: Tensor | int, noise: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Draw x_t from q(x_t | x_0) with the given noise."""
    return at(schedule.sqrt_alphas_cumprod, t, x0) * x0 + at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def predict_x0_from_eps(x_t: Tensor, t: Tensor | int, eps: Tensor, schedule: NoiseSchedule) -> Tensor:
    return (x_t - at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / at(schedule.sqrt_alphas_cumprod, t, x_t)


def predict_eps_from_x0(x_t: Tensor, t: Tensor | int, x0: Tensor, schedule: NoiseSchedule) -> Tensor:
    return (x_t - at(schedule.sqrt_alphas_cumprod, t, x_t) * x0) / at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)


def predict_x0_from_v(x_t: Tensor, t: Tensor | int, v: Tensor, schedule: NoiseSchedule) -> Tensor:
    return at(schedule.sqrt_alphas_cumprod, t, x_t) * x_t - at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v


def predict_eps_from_v(x_t: Tensor, t: Tensor | int, v: Tensor, schedule: NoiseSchedule) -> Tensor:
    return at(schedule.sqrt_alphas_cumprod, t, x_t) * v + at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t


def get_v(x0: Tensor, noise: Tensor, t: Tensor | int, schedule: NoiseSchedule) -> Tensor:
    """The velocity target ``sqrt(a) eps - sqrt(1 - a) x0``."""
    return at(schedule.sqrt_alphas_cumprod, t, x0) * noise - at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0


def score_from_eps(eps: Tensor, t: Tensor | int, schedule: NoiseSchedule) -> Tensor:
    """The score of q(x_t): ``grad log q(x_t) = -eps / sqrt(1 - a)``."""
    return -eps / at(schedule.sqrt_one_minus_alphas_cumprod, t, eps)


def to_x0_eps(
    model_output: Tensor, x_t: Tensor, t: Tensor | int, schedule: NoiseSchedule, prediction_type: str = "eps"
) -> tuple[Tensor, Tensor]:
    """(x0, eps) implied by a model output of the given prediction type."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "eps":
        return predict_x0_from_eps(x_t, t, model_output, schedule), model_output
    if kind == "v":
        return predict_x0_from_v(x_t, t, model_output, schedule), predict_eps_from_v(x_t, t, model_output, schedule)
    return model_output, predict_eps_from_x0(x_t, t, model_output, schedule)


def training_target(
    x0: Tensor, noise: Tensor, t: Tensor | int, schedule: NoiseSchedule, prediction_type: str = "eps"
) -> Tensor:
    """What the network should output at x_t = q_sample(x0, t, noise)."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "eps":
        return noise
    if kind == "v":
        return get_v(x0, noise, t, schedule)
    return x0

