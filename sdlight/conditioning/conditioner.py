"""A list of condition encoders, each reading its own batch entry, dropped on its own, and routed to the UNet.

Stability's generative-models ``GeneralConditioner``, kept small. Each encoder's ``route`` says where its output
goes: ``crossattn`` outputs ``(B, L, D)`` are joined along the tokens into ``context``, ``vector`` outputs are
flattened to ``(B, D)`` and joined along the channels into ``y`` (the UNet's ``label_emb``, with
``num_classes: sequential`` and ``adm_in_channels`` their total width), ``concat`` outputs ``(B, C, h, w)`` are
joined along the channels and concatenated to the UNet's input. An encoder with several ``routes`` returns
``{route: tensor}`` (SD-XL's text towers: tokens to the context, a pooled vector to ``y``, in encoder order).

With a single encoder the state dict keys are that encoder's own (``cond_stage_model.transformer…`` as in
CompVis checkpoints); with several they are ``embedders.N.…`` (as SGM's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sdlight.diffusion.draw import Draws

from .base import ConditionEncoder

OUTPUTS = {"crossattn": "context", "vector": "y", "concat": "concat"}  # route → keyword of the UNet wrapper
EMBEDDERS = "embedders."


def _flatten_single(module: "Conditioner", state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    if len(module.embedders) != 1:
        return
    inner = prefix + EMBEDDERS + "0."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _nest_single(module: "Conditioner", state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    if len(module.embedders) != 1:
        return
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + EMBEDDERS)]:
        state_dict[prefix + EMBEDDERS + "0." + key[len(prefix):]] = state_dict.pop(key)


class Conditioner(nn.Module):
    """Encodes the condition entries of a batch into the UNet wrapper's ``context`` / ``y`` / ``concat``.

    Encoders without an ``input_key`` (:class:`NoConditioning`) are left out: a conditioner without encoders is
    an unconditional model. Two encoders may not read the same entry (their drops would not be independent).
    """

    def __init__(self, embedders: Sequence[ConditionEncoder]) -> None:
        super().__init__()
        embedders = [e for e in embedders if e.input_key is not None]
        keys = [e.input_key for e in embedders]
        if len(set(keys)) != len(keys):
            raise ValueError(f"two condition encoders read the same batch entry: {keys}")
        for e in embedders:
            for route in e.routes:
                if route not in OUTPUTS:
                    raise ValueError(f"{type(e).__name__}: unknown route {route!r}; one of {sorted(OUTPUTS)}")
        self.embedders = nn.ModuleList(embedders)
        self.register_state_dict_post_hook(_flatten_single)
        self.register_load_state_dict_pre_hook(_nest_single)

    @classmethod
    def join(cls, first: ConditionEncoder | None, more: Sequence[ConditionEncoder] | Mapping[str, ConditionEncoder]
             = ()) -> "Conditioner":
        """``first`` (may be None) and ``more`` (a list, or a dict by name: a config's), in this order."""
        more = list(more.values()) if isinstance(more, Mapping) else list(more or [])
        return cls([*([first] if first is not None else []), *more])

    @property
    def input_keys(self) -> list[str]:
        """The batch entries read, in order; empty for an unconditional model."""
        return [e.input_key for e in self.embedders]

    @property
    def single(self) -> ConditionEncoder | None:
        """The encoder when there is exactly one (what released single-encoder checkpoints hold), else None."""
        return self.embedders[0] if len(self.embedders) == 1 else None

    def trainable_part(self) -> nn.Module | None:
        """The encoders that train, for an EMA copy that leaves frozen towers out: the conditioner itself when
        every encoder trains (its own state dict keys), else a module holding only those, under the keys they
        have here (``embedders.<i>.…``); None when none trains."""
        trains = [any(p.requires_grad for p in e.parameters()) for e in self.embedders]
        if all(trains) or not any(trains):
            return self if any(trains) else None
        part = nn.Module()
        part.embedders = nn.ModuleDict({str(i): e for i, (e, t) in enumerate(zip(self.embedders, trains)) if t})
        return part

    def values(self, conditions: Any, device: torch.device | str | None = None,
               partial: bool = False) -> dict[str, Any]:
        """The entries each encoder reads, prepared for it (captions as lists, ids as tensors on ``device``).

        ``conditions`` is a batch (a mapping with at least :attr:`input_keys`, or some of them if ``partial``)
        or, for a model with one encoder without a ``default``, that encoder's values alone (prompts, labels,
        attribute rows). An absent entry whose encoder has a ``default`` gets it, once per sample.
        """
        if not isinstance(conditions, Mapping):
            required = [e for e in self.embedders if e.default is None]
            if len(required) != 1:
                raise ValueError(f"this model reads {self.input_keys or 'no condition'}: give a dict with those keys"
                                 if self.embedders else "this model is unconditional: give no conditions")
            conditions = {required[0].input_key: conditions}
        absent = [e for e in self.embedders if conditions.get(e.input_key) is None]
        out = {e.input_key: e.prepare(conditions[e.input_key], device) for e in self.embedders if e not in absent}
        if out and not partial:  # an encoder's default stands in for its entry, as many times as the others'
            n = len(next(iter(out.values())))
            out.update({e.input_key: e.prepare([e.default] * n, device) for e in absent if e.default is not None})
        missing = [e.input_key for e in absent if e.input_key not in out]
        if missing and not partial:
            raise KeyError(f"the model is conditioned on {self.input_keys}; {missing} missing (given: "
                           f"{sorted(conditions)})")
        sizes = {k: len(v) for k, v in out.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"conditions of different lengths: {sizes}")
        return out

    def drop(self, values: Mapping[str, Any], default_rate: float,
             draws: Draws | torch.Generator | None = None) -> dict[str, Any]:
        """Each encoder's values replaced by its null per sample, with its own ``drop_rate`` (``default_rate``
        where that is None), drawn independently in encoder order."""
        return {e.input_key: e.drop(values[e.input_key], default_rate if e.drop_rate is None else e.drop_rate,
                                    draws)
                for e in self.embedders}

    def null_like(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The unconditional branch of guidance: each encoder's null, except those never dropped in training
        (``drop_rate=0``), whose null the model has not seen; they keep their values."""
        return {e.input_key: values[e.input_key] if e.drop_rate == 0 else e.null_like(values[e.input_key])
                for e in self.embedders}

    def forward(self, values: Mapping[str, Any], concat: Tensor | None = None) -> dict[str, Tensor | None]:
        """``{"context": (B, L, D) | None, "y": (B, D) | None, "concat": (B, C, h, w) | None}``, the keyword
        arguments of the UNet wrapper; ``concat``: channels made elsewhere (inpainting, super-resolution inputs),
        placed first."""
        parts: dict[str, list[Tensor]] = {out: [] for out in OUTPUTS.values()}
        if concat is not None:
            parts["concat"].append(concat)
        for e in self.embedders:
            out = e(values[e.input_key])
            for route, emb in (out.items() if isinstance(out, Mapping) else [(e.route, out)]):
                if route == "vector":
                    emb = emb.flatten(1)
                elif route == "crossattn" and emb.ndim == 2:
                    emb = emb[:, None]  # one token
                parts[OUTPUTS[route]].append(emb)
        return {out: (torch.cat(embs, dim=1) if len(embs) > 1 else embs[0]) if embs else None
                for out, embs in parts.items()}

