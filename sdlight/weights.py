"""Where pretrained files come from: an explicit path, ``$SDLIGHT_WEIGHTS``, the torch hub cache, or a download.

Metric and perceptual networks (LPIPS' VGG16 trunk, the FID Inception) need released weights. On a machine
without internet the lookup must fail at once with a message that says which file is missing and how to
supply it, instead of hanging in download retries. Resolution order of :func:`resolve_weights`:

1. an explicit ``path`` (a file, or a directory holding ``filename``) — it must exist;
2. ``$SDLIGHT_WEIGHTS/<filename>``;
3. the torch hub cache, ``torch.hub.get_dir()/checkpoints/<filename>`` (where torchvision and torchmetrics
   download to, so files fetched by those libraries are found too);
4. when online (see :func:`is_offline`) and the URL's host answers a quick probe: download into the hub cache;
5. otherwise :class:`WeightsNotFoundError`.

Hugging Face hub files (open_clip text encoders) are resolved by their own libraries.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

__all__ = [
    "KNOWN",
    "WeightFile",
    "WeightsNotFoundError",
    "is_offline",
    "load_state_dict",
    "resolve_weights",
    "weights_dir",
]

_TRUE = {"1", "true", "yes", "on"}
_OFFLINE_VARS = ("SDLIGHT_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
PROBE_TIMEOUT_S = 1.5


class WeightsNotFoundError(FileNotFoundError):
    """A pretrained file could not be found locally and could not be downloaded."""


@dataclass(frozen=True)
class WeightFile:
    """One released file: its canonical file name, where it is published, and what it is."""

    filename: str
    url: str | None
    sha256: str | None  # prefix of the sha256 digest, checked on download (torch hub convention)
    description: str
    aliases: tuple[str, ...] = ()  # other names the same file is cached under by other tools


KNOWN: dict[str, WeightFile] = {
    "vgg16": WeightFile(
        "vgg16-397923af.pth",
        "https://download.pytorch.org/models/vgg16-397923af.pth",
        "397923af",
        "torchvision VGG16 ImageNet classifier; its `features` are the LPIPS trunk",
    ),
    "lpips_vgg": WeightFile(
        "lpips-vgg-v0.1.pth",
        "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
        None,
        "LPIPS v0.1 linear heads lin0..lin4 for the VGG16 trunk (also shipped inside the `lpips` package)",
    ),
    "pt_inception": WeightFile(
        "pt_inception-2015-12-05-6726825d.pth",
        # the asset torch-fidelity itself downloads (its release names the file weights-inception-...)
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        None,
        "FID InceptionV3 (TF 2015-12-05 graph ported to PyTorch), used by torchmetrics / torch-fidelity",
        # torch-fidelity (and so torchmetrics) caches it under this name
        aliases=("weights-inception-2015-12-05-6726825d.pth",),
    ),
}


def _entry(filename: str) -> WeightFile | None:
    if filename in KNOWN:
        return KNOWN[filename]
    return next((w for w in KNOWN.values() if filename == w.filename or filename in w.aliases), None)


def weights_dir() -> Path | None:
    """The directory named by ``$SDLIGHT_WEIGHTS``, or None when unset."""
    value = os.environ.get("SDLIGHT_WEIGHTS", "").strip()
    return Path(value).expanduser() if value else None


def is_offline() -> bool:
    """True when any of ``SDLIGHT_OFFLINE``, ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` is truthy."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in _OFFLINE_VARS)


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connect to the URL's host. Run in a thread so a hanging DNS lookup also counts against it."""
    parsed = urlparse(url)
    if not parsed.hostname:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result = [False]

    def probe() -> None:
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout):
                result[0] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0]


def resolve_weights(
    filename: str, *, url: str | None = None, path: str | os.PathLike | None = None
) -> Path:
    """Return a local path to the pretrained file ``filename`` (a file name or a :data:`KNOWN` key).

    ``path`` is an explicit file (or a directory containing ``filename``) and wins over everything else;
    ``url`` defaults to the registry's URL. Raises :class:`WeightsNotFoundError` quickly when the file is
    nowhere local and cannot be downloaded.
    """
    entry = _entry(filename)
    if entry is not None:
        filename, url = entry.filename, url or entry.url
    names = (filename, *(entry.aliases if entry else ()))

    if path is not None:
        explicit = Path(path).expanduser()
        for candidate in (explicit, *(explicit / n for n in names)):
            if candidate.is_file():
                return candidate
        raise WeightsNotFoundError(
            f"Pretrained weights {filename!r}: the explicit path {str(explicit)!r} does not exist "
            f"(or is a directory without {filename!r})."
        )

    searched: list[str] = []
    env_dir = weights_dir()
    if env_dir is None:
        searched.append("$SDLIGHT_WEIGHTS (unset)")
    hub = _hub_checkpoints()
    for directory in [d for d in (env_dir, hub) if d is not None]:
        for name in names:
            candidate = directory / name
            if candidate.is_file():
                return candidate
            searched.append(str(candidate))

    if url is None:
        reason = "no download URL is known for it"
    elif is_offline():
        flags = ", ".join(f"{v}={os.environ[v]}" for v in _OFFLINE_VARS if os.environ.get(v, "").lower() in _TRUE)
        reason = f"downloads are disabled ({flags})"
    elif not _reachable(url):
        reason = f"{urlparse(url).hostname} is unreachable (no network?)"
    else:
        destination = hub / filename
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(destination), hash_prefix=entry.sha256 if entry else None)
            return destination
        except Exception as err:  # HTTP errors, hash mismatch, interrupted transfer
            reason = f"the download failed: {err}"

    # one line: the command-line tools print user errors as a single line
    what = f" ({entry.description})" if entry is not None else ""
    raise WeightsNotFoundError(
        f"Pretrained weights {filename!r}{what} not found and not downloaded: {reason}. To supply it: fetch "
        f"{url or '(no known URL)'} on a machine with internet and put it in a directory named by "
        f"SDLIGHT_WEIGHTS=/dir (or in {hub}), or pass the file's path explicitly (the module's *_path option). "
        f"Searched: {', '.join(searched)}.")


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load a state dict on CPU through the package's one reader (:func:`sdlight.checkpoints.read_checkpoint`:
    safetensors, or ``weights_only=True``). A Lightning/CompVis checkpoint is unwrapped to its state dict."""
    from sdlight.checkpoints import read_checkpoint, state_dict_of

    return state_dict_of(read_checkpoint(path))
