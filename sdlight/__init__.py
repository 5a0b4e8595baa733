"""sdlight: train Stable-Diffusion-style latent diffusion models with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # lazy: `import sdlight` stays light; the pipeline pulls in torch and the models (not Lightning, not Hydra)
    if name == "Pipeline":
        from sdlight.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'sdlight' has no attribute {name!r}")
