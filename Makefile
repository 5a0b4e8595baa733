# `make quickstart` and `make test` each install what they need first (into the active Python environment).
PYTHON ?= python3
PYTEST_ARGS ?=
STAMP := .make/installed

.PHONY: install quickstart quickstart-long test test-all test-slow clean

# Reinstall when pyproject.toml changed, or when this Python imports sdlight from somewhere else (another
# checkout, a moved directory, a fresh virtualenv): a stamp alone would leave `python -m sdlight.train` broken.
IMPORTS_HERE := import pathlib, sdlight.conf as c; assert pathlib.Path(c.__path__[0]).resolve() == pathlib.Path('conf').resolve()

install:
	@if [ ! -f $(STAMP) ] || [ pyproject.toml -nt $(STAMP) ] || ! $(PYTHON) -c "$(IMPORTS_HERE)" 2>/dev/null; then \
		$(PYTHON) -m pip install -e ".[dev]" && mkdir -p .make && touch $(STAMP); \
	fi

QUICKSTART := logs/quickstart
VAE_ARGS ?=
LDM_ARGS ?=

## Train the embedded quickstart end to end on the CPU (no download, no GPU): the autoencoder (stage 1), the
## text-conditioned latent diffusion model on its latents (stage 2), then a grid of samples for a few prompts.
quickstart: install
	$(PYTHON) -m sdlight.train +experiment=quickstart_vae hydra.run.dir=$(QUICKSTART)/vae $(VAE_ARGS)
	$(PYTHON) -m sdlight.train +experiment=quickstart_ldm hydra.run.dir=$(QUICKSTART)/ldm \
		model.first_stage.ckpt=$(QUICKSTART)/vae/checkpoints/last.ckpt $(LDM_ARGS)
	$(PYTHON) -m sdlight.sample ckpt=$(QUICKSTART)/ldm/checkpoints/last.ckpt \
		prompts_file=conf/prompts/quickstart.txt num_samples=4 steps=50 seed=0 hydra.run.dir=$(QUICKSTART)/samples
	@echo "Samples: $(QUICKSTART)/samples/grid.png (one row per prompt of conf/prompts/quickstart.txt)"

## The quickstart at about twice the budget (~19 min on 2 CPU cores): a longer VAE and LDM that follow the shape
## prompts ~90 % of the time instead of ~80 % (BENCHMARKS.md, "Quickstart: adherence against training time").
quickstart-long:
	$(MAKE) quickstart QUICKSTART=logs/quickstart_long \
		VAE_ARGS="data.batch_size=16 trainer.max_epochs=12 model.loss.disc_start=800 model.loss.disc_warmup_steps=200" \
		LDM_ARGS="trainer.max_epochs=6"

## The test suite CI runs (slow end-to-end tests excluded). pytest's exit code 5 (no tests collected) is turned
## into a failure with a message: a suite that ran nothing must not pass.
test: install
	@HF_HUB_OFFLINE=1 WANDB_MODE=offline SDLIGHT_OFFLINE=1 $(PYTHON) -m pytest -m "not slow and not gpu" -n 2 \
		$(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): failing"; fi; exit $$rc

## Only the slow end-to-end tests (training runs that prove the models learn).
test-slow: install
	HF_HUB_OFFLINE=1 WANDB_MODE=offline SDLIGHT_OFFLINE=1 $(PYTHON) -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

test-all: install
	HF_HUB_OFFLINE=1 WANDB_MODE=offline SDLIGHT_OFFLINE=1 $(PYTHON) -m pytest -m "not gpu" -n 2 $(PYTEST_ARGS)

clean:
	rm -rf .make logs .pytest_cache build dist *.egg-info
