"""CLIPScoreCallback on a tiny random open_clip model: the formula against a float64 recomputation, open_clip's
own preprocessing, weight loading, and fast failure offline."""

import json
import time

import lightning as L
import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from sdlight.callbacks.clip_score import CLIPScoreCallback, clip_preprocess, clip_scores, load_open_clip_model
from sdlight.weights import WeightsNotFoundError

TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PROMPTS = ["a red circle", "a blue square at the top", "a green triangle", "an orange diamond on black",
           "a purple square", "a yellow circle at the left"]


def tiny_clip(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(TINY_CFG["embed_dim"], CLIPVisionCfg(**TINY_CFG["vision_cfg"]), CLIPTextCfg(**TINY_CFG["text_cfg"]))
    return model.eval()


class PromptsTestDataset(Dataset):
    def __len__(self):
        return len(PROMPTS)

    def __getitem__(self, i):
        return {"image": torch.zeros(3, 24, 24), "text": PROMPTS[i], "label": i}


def prompt_image(prompt: str) -> torch.Tensor:
    """A deterministic 24 px image in [-1, 1] for a prompt (seeded by its characters)."""
    g = torch.Generator().manual_seed(sum(map(ord, prompt)))
    return torch.rand(3, 24, 24, generator=g) * 2 - 1


class PromptImagesTestModule(L.LightningModule):
    """Test double of a text-conditioned stage-2 module: one fixed image per prompt."""

    condition_keys = ["text"]

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.prompts_seen = []

    def training_step(self, batch, batch_idx):
        return self.layer(torch.ones(1, 2)).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(PromptsTestDataset(), batch_size=2)

    def val_dataloader(self):
        return DataLoader(PromptsTestDataset(), batch_size=4)

    def generate(self, conditions, num_samples=None, *, steps=None, guidance_scale=None, generator=None,
                 use_ema=True):
        self.prompts_seen += list(conditions["text"])
        return torch.stack([prompt_image(p) for p in conditions["text"]])


def reference_scores(model, images, prompts):
    """100 * max(cos, 0) in float64, from open_clip's encoders."""
    with torch.no_grad():
        image = model.encode_image(clip_preprocess((images + 1) / 2, model)).double()
        text = model.encode_text(open_clip.tokenize(prompts)).double()
    cos = (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1))
    return cos, 100 * cos.clamp(min=0)


def test_clip_score_callback_matches_the_formula(tmp_path):
    model = tiny_clip(seed=3)
    module = PromptImagesTestModule()
    keys_before = set(module.state_dict())
    callback = CLIPScoreCallback(every_n_steps=2, num_samples=6, batch_size=4, model=model)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    assert module.prompts_seen == PROMPTS
    cos, scores = reference_scores(model, torch.stack([prompt_image(p) for p in PROMPTS]), PROMPTS)
    assert (cos > 0).any() and (cos < 0).any()  # the clamp at 0 is exercised
    assert float(trainer.callback_metrics["val/clip_score"]) == pytest.approx(float(scores.mean()), rel=1e-5)
    assert set(module.state_dict()) == keys_before and callback.state_dict() == {}


def test_per_image_scores_and_prompt_count_check():
    model = tiny_clip(seed=3)
    images = torch.stack([prompt_image(p) for p in PROMPTS])
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    got = clip_scores(model, tokenizer, images, PROMPTS)
    torch.testing.assert_close(got.double(), reference_scores(model, images, PROMPTS)[1], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="prompts"):
        clip_scores(model, tokenizer, images, PROMPTS[:2])


@pytest.mark.parametrize("size", [24, 12])
def test_preprocessing_matches_open_clips_pil_pipeline(size):
    """Down- and up-sampling: our tensor path against open_clip's own eval transform on PIL images."""
    model = tiny_clip()
    open_clip.set_model_preprocess_cfg(model, {"size": 16, "mean": open_clip.constants.OPENAI_DATASET_MEAN,
                                               "std": open_clip.constants.OPENAI_DATASET_STD,
                                               "interpolation": "bicubic", "resize_mode": "shortest"})
    # smooth content in [0.2, 0.8]: on pixel noise PIL's clipping between its two resize passes dominates
    coarse = 0.2 + 0.6 * torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    images = (images * 255).round() / 255  # exactly representable as 8-bit PIL images
    preprocess = open_clip.image_transform(16, is_train=False, mean=open_clip.constants.OPENAI_DATASET_MEAN,
                                           std=open_clip.constants.OPENAI_DATASET_STD)
    pils = [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in images]
    want = torch.stack([preprocess(p) for p in pils])
    got = clip_preprocess(images, model)
    assert got.shape == want.shape == (3, 3, 16, 16)
    # in 8-bit levels: PIL rounds its resized pixels, so about one level apart at most (bilinear or a resize
    # without antialiasing are 1.5 to 7 levels away)
    levels = (got - want).abs() * torch.tensor(open_clip.constants.OPENAI_DATASET_STD).view(3, 1, 1) * 255
    assert levels.max() < 1.25 and levels.mean() < 0.4


def test_preprocessing_resize_modes_and_mean_std():
    model = tiny_clip()
    images = torch.rand(2, 3, 16, 32, generator=torch.Generator().manual_seed(1))
    base = {"size": 16, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bilinear"}
    open_clip.set_model_preprocess_cfg(model, {**base, "resize_mode": "squash"})
    squash = clip_preprocess(images, model)
    want = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", antialias=True)
    torch.testing.assert_close(squash, (want.clamp(0, 1) - 0.5) / 0.25)
    open_clip.set_model_preprocess_cfg(model, {**base, "resize_mode": "shortest"})
    torch.testing.assert_close(clip_preprocess(images, model), (images[..., 8:24] - 0.5) / 0.25)  # centre crop
    open_clip.set_model_preprocess_cfg(model, {**base, "resize_mode": "longest"})
    longest = clip_preprocess(images, model)  # the long side to 16 (an 8 x 16 image), then zero padding
    small = torch.nn.functional.interpolate(images, size=(8, 16), mode="bilinear", antialias=True)
    torch.testing.assert_close(longest[..., 4:12, :], (small.clamp(0, 1) - 0.5) / 0.25)
    assert torch.all(longest[..., :4, :] == -2) and torch.all(longest[..., 12:, :] == -2)


def test_missing_weights_offline_fail_fast(offline):
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match="laion/CLIP-ViT-B-32-laion2B-s34B-b79K"):
        CLIPScoreCallback().setup(None, PromptImagesTestModule(), "fit")
    assert time.perf_counter() - start < 2.0
    with pytest.raises(TypeError, match="generate"):
        CLIPScoreCallback(model=tiny_clip()).setup(None, L.LightningModule(), "fit")


def test_loads_both_towers_from_checkpoint_path(tmp_path):
    (tmp_path / "sdlight-clip-score-test.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(tmp_path)
    source = tiny_clip(seed=5)
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = load_open_clip_model("sdlight-clip-score-test", None, path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for name, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
