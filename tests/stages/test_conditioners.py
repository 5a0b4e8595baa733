"""Several condition encoders in one latent diffusion model: text + class (through the UNet's ``y``), text +
size micro-conditioning; dropping per encoder; checkpoints of the single-encoder layout."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from sdlight.conditioning import ClassEmbedder, SizeEmbedder
from sdlight.data.shapes import NUM_CLASSES, ShapesDataset
from sdlight.diffusion import NoiseSchedule
from sdlight.diffusion.samplers import sample_ddim
from sdlight.stages.diffusion import LatentDiffusion

from .conftest import SIZE, tiny_conditioning, tiny_trainer, tiny_unet, tiny_vae

LABEL_DIM, SIZE_DIM = 8, 4


class SizedShapes(Dataset):
    """Shapes with SD-XL's micro-conditioning entries: the original size and the crop's top-left corner."""

    def __init__(self, n: int):
        self.shapes = ShapesDataset("train", n, image_size=SIZE)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> dict:
        return {**self.shapes[i], "original_size": torch.tensor([SIZE * (1 + i % 3), SIZE]),
                "crop_coords": torch.tensor([i % 2, 0])}


def model(*conditioners, seed: int = 0, **kwargs) -> LatentDiffusion:
    """Text (cross-attention) plus ``conditioners``; the UNet takes ``y`` of their total width."""
    width = sum(LABEL_DIM if isinstance(c, ClassEmbedder) else c.output_dim for c in conditioners)
    unet = tiny_unet(seed=seed, num_classes="sequential", adm_in_channels=width) if width else tiny_unet(seed=seed)
    defaults = dict(schedule=NoiseSchedule.make("linear", 1000, 1e-4, 2e-2), image_size=SIZE, scale_factor=0.5,
                    optimizer=partial(torch.optim.AdamW, lr=1e-3), sampler=partial(sample_ddim, steps=2),
                    sample_every_n_steps=0, ema_decay=0.99, p_uncond=0.2)
    return LatentDiffusion(unet=unet, conditioning=tiny_conditioning("text", seed), conditioners=conditioners,
                           first_stage=tiny_vae(seed), **{**defaults, **kwargs})


def class_vector(**options) -> ClassEmbedder:
    return ClassEmbedder(NUM_CLASSES, LABEL_DIM, route="vector", **options)


def sizes() -> list[SizeEmbedder]:
    return [SizeEmbedder("original_size", dim=SIZE_DIM), SizeEmbedder("crop_coords", dim=SIZE_DIM)]


@pytest.mark.parametrize("extra", ["class", "sizes"])
def test_text_plus_another_encoder_trains_and_samples(tmp_path, extra):
    conditioners = [class_vector()] if extra == "class" else sizes()
    module = model(*conditioners)
    trained = [*module.net.model.diffusion_model.label_emb.parameters(),
               *module.net.cond_stage_model.embedders[1:].parameters()]
    before = [p.detach().clone() for p in trained]
    tiny_trainer(tmp_path, max_steps=3).fit(module, DataLoader(SizedShapes(8), batch_size=4))
    assert all(not torch.equal(b, a) for b, a in zip(before, trained))  # y reached the UNet and trained it
    conditions = {"text": ["a red circle", "a blue square"], "label": [1, 5],
                  "original_size": [[32, 16], [16, 16]], "crop_coords": [[0, 0], [1, 0]]}
    images = module.generate({k: conditions[k] for k in module.condition_keys},
                             generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, SIZE, SIZE) and torch.isfinite(images).all()


def test_the_class_vector_changes_the_unet_output():
    module = model(class_vector(), ema_decay=None).double()
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = module.generate({"text": ["a red circle"] * 2, "label": [1, 1]}, x_T=x_T, return_latents=True)
    b = module.generate({"text": ["a red circle"] * 2, "label": [1, 7]}, x_T=x_T, return_latents=True)
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1], atol=1e-4)


def test_each_encoder_drops_at_its_own_rate(tmp_path):
    # the caption is never dropped, the class always: the UNet sees real contexts and the null class's vector
    module = model(class_vector(drop_rate=1.0), p_uncond=0.5)
    module.net.cond_stage_model.embedders[0].drop_rate = 0.0
    seen = []
    module.net.model.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs), with_kwargs=True)
    batch = next(iter(DataLoader(SizedShapes(4), batch_size=4)))
    with torch.no_grad():
        module.net.losses(batch, p_uncond=module.p_uncond)
        text, label = module.net.cond_stage_model.embedders
        torch.testing.assert_close(seen[0]["context"], text(batch["text"]))
        torch.testing.assert_close(seen[0]["y"], label(label.null_like(batch["label"]))[:, 0])
        module.net.losses(batch)  # validation: nothing dropped
        torch.testing.assert_close(seen[1]["y"], label(batch["label"])[:, 0])


def test_a_checkpoint_of_the_single_encoder_layout_loads():
    """Before the conditioner, ``cond_stage_model`` was the encoder itself: its keys, in the model and its EMA."""
    old = model(seed=1, ema_decay=0.9)
    old.model_ema.update_parameters(old._ema_parts)
    encoder = old.net.cond_stage_model.embedders[0]
    state = {k: v for k, v in old.state_dict().items()
             if not k.startswith(("cond_stage_model.", "model_ema.module.1."))}
    for k, v in encoder.state_dict().items():
        state[f"cond_stage_model.{k}"] = v
        state[f"model_ema.module.1.{k}"] = v + 1.0
    assert any(k.startswith("cond_stage_model.token_embedding") for k in state)
    new = model(seed=2, ema_decay=0.9)
    new.load_state_dict(state, strict=True)
    torch.testing.assert_close(new.net.cond_stage_model.embedders[0].token_embedding.weight, encoder.token_embedding.weight)
    ema_text = new.model_ema.module[1].embedders[0]
    torch.testing.assert_close(ema_text.token_embedding.weight, encoder.token_embedding.weight + 1.0)
    assert set(new.state_dict()) == set(state)  # and it saves them under the same names
    assert new.hparams["condition_key"] == "text" and new.hparams["condition_keys"] == ["text"]


def test_the_config_adds_a_class_through_y_to_the_text_model(train_cfg, vae_ckpt, tmp_path):
    from sdlight.train import train

    from .test_diffusion import quickstart

    overrides = quickstart(vae_ckpt, callbacks=False) + [
        "+debug=fdr", "trainer.detect_anomaly=false", "model.sample_every_n_steps=1", "model.sampler.steps=2",
        "model.num_log_samples=2", "+model/conditioning@model.conditioners.label=class",
        "model.conditioners.label.num_classes=24", "model.conditioners.label.route=vector",
        "model.conditioners.label.embed_dim=16", "model.unet.num_classes=sequential",
        "+model.unet.adm_in_channels=16", "model.log_conditions=null"]
    metrics, objects = train(train_cfg(overrides))
    module = objects["model"]
    assert module.condition_keys == ["text", "label"]
    assert module.net.cond_stage_model.embedders[1].route == "vector"
    assert module.net.model.diffusion_model.label_emb[0][0].in_features == 16
    assert torch.isfinite(torch.tensor(float(metrics["train/loss"])))
    assert len(list((tmp_path / "images").glob("samples_*.png"))) == 1  # a grid from the batch's text and labels


def test_the_pipeline_takes_one_entry_per_encoder():
    from sdlight.errors import UsageError
    from sdlight.pipeline import Pipeline

    pipe = Pipeline(model(class_vector(), ema_decay=None).net, device="cpu")
    result = pipe({"text": ["a red circle"], "label": [1, 5]}, num_samples=2, steps=2)  # one caption, shared
    assert len(result.images) == 4
    assert result.conditions == [{"text": "a red circle", "label": label} for label in (1, 1, 5, 5)]
    with pytest.raises(UsageError, match=r"conditioned on text \(prompt=\); class labels 0-23 \(label=\); label= "
                                         "missing"):
        pipe({"text": ["a red circle"]})
    with pytest.raises(UsageError, match=r"label=30: this model has 24 classes \(0-23\)"):
        pipe({"text": ["a"], "label": [30]})
    with pytest.raises(UsageError, match=r", not attributes="):
        pipe({"text": ["a"], "label": [1], "attributes": [[0, 0, 0, 0]]})
    with pytest.raises(UsageError, match="give prompt= and label="):
        pipe(["a red circle"])
    with pytest.raises(UsageError, match="differ in length"):
        pipe({"text": ["a", "b"], "label": [1, 2, 3]})


def test_negative_prompts_pair_with_their_conditions(monkeypatch):
    from sdlight.pipeline import Pipeline

    pipe = Pipeline(model(class_vector(), ema_decay=None).net, device="cpu")
    seen = {}
    monkeypatch.setattr(pipe.model, "generate", lambda conditions, n, negative=None, **kw: (
        seen.update(conditions=conditions, negative=negative), torch.zeros(n, 3, SIZE, SIZE))[1])
    pipe({"text": ["a", "b"], "label": [1, 2]}, num_samples=2, negative=["not a", "not b"])
    assert seen["conditions"]["text"] == ["a", "a", "b", "b"]
    assert seen["negative"] == ["not a", "not a", "not b", "not b"]


def test_a_text_and_class_checkpoint_samples_through_the_pipeline_and_the_cli(tmp_path):
    from omegaconf import OmegaConf

    from sdlight.pipeline import Pipeline
    from sdlight.sample import conditions_from

    from ..conftest import train_tiny_text_ldm

    train_tiny_text_ldm(tmp_path, ["logger=none", "+model/conditioning@model.conditioners.label=class",
                                   "model.conditioners.label.num_classes=24", "model.conditioners.label.route=vector",
                                   "model.conditioners.label.embed_dim=16", "model.unet.num_classes=sequential",
                                   "+model.unet.adm_in_channels=16"])
    pipe = Pipeline.from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", device="cpu")
    assert pipe.model.condition_keys == ["text", "label"]
    conditions = conditions_from(OmegaConf.create({"prompt": "a red circle", "label": [3, 4]}))
    assert conditions == {"text": ["a red circle"], "label": [3, 4]}
    sizes = OmegaConf.create({"conditions": {"original_size": [64, 64], "crop_coords": [[0, 0], [8, 8]]}})
    assert conditions_from(sizes) == {"original_size": [[64, 64]], "crop_coords": [[0, 0], [8, 8]]}
    result = pipe(conditions, num_samples=1, steps=2)
    assert len(result.images) == 2 and result.conditions[1] == {"text": "a red circle", "label": 4}


def test_the_ema_leaves_a_frozen_encoder_out_and_keeps_the_checkpoint_names():
    module = model(class_vector())
    text, label = module.net.cond_stage_model.embedders
    text.requires_grad_(False)  # as a pretrained tower
    module = LatentDiffusion(unet=module.net.model.diffusion_model, conditioning=text, conditioners=[label],
                             first_stage=module.net.first_stage_model, schedule=module.net.objective.schedule,
                             optimizer=partial(torch.optim.AdamW, lr=1e-3), image_size=SIZE, scale_factor=0.5,
                             ema_decay=0.9)
    ema_keys = [k for k in module.state_dict() if k.startswith("model_ema.module.1.")]
    assert ema_keys == ["model_ema.module.1.embedders.1.embedding.weight"]  # as cond_stage_model.embedders.1.*
    averaged = sum(p.numel() for p in module.model_ema.module.parameters())
    assert averaged == sum(p.numel() for p in [*module.net.model.parameters(), *label.parameters()])
    with torch.no_grad():
        module.model_ema.module[1].embedders["1"].embedding.weight.add_(1.0)
        module.model_ema.n_averaged.fill_(1)
        before = label.embedding.weight.clone()
        with module.ema_weights():
            torch.testing.assert_close(label.embedding.weight, before + 1.0)
        torch.testing.assert_close(label.embedding.weight, before)


def test_an_unconditional_model_refuses_conditions_in_any_form():
    from .conftest import tiny_ldm

    module = tiny_ldm("none")
    for conditions in (["a red circle"], {"text": ["a red circle"]}):
        with pytest.raises(ValueError, match="unconditional"):
            module.generate(conditions)


def test_a_checkpoint_file_of_the_previous_layout_samples(tiny_text_ldm, tmp_path):
    """The file as the single-encoder code wrote it: no model.conditioners in its config, no condition_keys in
    its hyperparameters, the encoder's keys right under cond_stage_model."""
    from sdlight.checkpoints import read_checkpoint
    from sdlight.pipeline import Pipeline

    ckpt = read_checkpoint(tiny_text_ldm[0])
    del ckpt["sdlight"]["config"]["model"]["conditioners"]
    del ckpt["hyper_parameters"]["condition_keys"]
    assert "cond_stage_model.token_embedding.weight" in ckpt["state_dict"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    pipe = Pipeline.from_checkpoint(tmp_path / "old.ckpt", device="cpu")
    new = Pipeline.from_checkpoint(tiny_text_ldm[0], device="cpu")
    torch.testing.assert_close(pipe.model.cond_stage_model.single.token_embedding.weight,
                               ckpt["state_dict"]["cond_stage_model.token_embedding.weight"])
    a = pipe(["a red circle"], steps=2).images[0]
    b = new(["a red circle"], steps=2).images[0]
    assert list(a.getdata()) == list(b.getdata())
