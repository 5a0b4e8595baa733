"""Resolution of pretrained files: order of places, offline fail-fast, download path, state-dict loading."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdlight import weights
from sdlight.weights import KNOWN, WeightsNotFoundError, is_offline, load_state_dict, resolve_weights, weights_dir

VGG = KNOWN["vgg16"]


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No offline flags, no $SDLIGHT_WEIGHTS, a private torch hub dir; returns the hub checkpoints dir."""
    for name in ("SDLIGHT_WEIGHTS", "SDLIGHT_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    assert str(hub).startswith(str(tmp_path))
    return hub


def _touch(path: Path, content: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_registry_entries():
    assert VGG.filename == "vgg16-397923af.pth"
    assert VGG.url == "https://download.pytorch.org/models/vgg16-397923af.pth"
    assert VGG.sha256 == "397923af"
    inception = KNOWN["pt_inception"]
    assert inception.filename == "pt_inception-2015-12-05-6726825d.pth"
    assert inception.url.startswith("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/")
    assert all(w.description for w in KNOWN.values())


@pytest.mark.parametrize("value, expected", [("1", True), ("TRUE", True), ("yes", True), ("on", True),
                                             ("0", False), ("", False), ("false", False)])
@pytest.mark.parametrize("var", ["SDLIGHT_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_is_offline(env, monkeypatch, var, value, expected):
    assert not is_offline()
    monkeypatch.setenv(var, value)
    assert is_offline() is expected


def test_weights_dir(env, monkeypatch, tmp_path):
    assert weights_dir() is None
    monkeypatch.setenv("SDLIGHT_WEIGHTS", str(tmp_path))
    assert weights_dir() == tmp_path


def test_explicit_path_wins(env, monkeypatch, tmp_path):
    explicit = _touch(tmp_path / "mine.pth")
    monkeypatch.setenv("SDLIGHT_WEIGHTS", str(tmp_path / "envdir"))
    _touch(tmp_path / "envdir" / VGG.filename)
    _touch(env / VGG.filename)
    assert resolve_weights(VGG.filename, url=VGG.url, path=explicit) == explicit
    # a directory holding the file works too
    _touch(tmp_path / "dir" / VGG.filename)
    assert resolve_weights(VGG.filename, path=tmp_path / "dir") == tmp_path / "dir" / VGG.filename


def test_explicit_missing_path_raises_naming_it(env, tmp_path):
    missing = tmp_path / "nope" / "vgg.pth"
    with pytest.raises(WeightsNotFoundError, match="nope"):
        resolve_weights(VGG.filename, url=VGG.url, path=missing)
    _touch(env / VGG.filename)  # an explicit path never falls back to the caches
    with pytest.raises(WeightsNotFoundError):
        resolve_weights(VGG.filename, path=missing)


def test_env_dir_before_hub_cache(env, monkeypatch, tmp_path):
    in_env = _touch(tmp_path / "envdir" / VGG.filename)
    in_hub = _touch(env / VGG.filename)
    monkeypatch.setenv("SDLIGHT_WEIGHTS", str(tmp_path / "envdir"))
    assert resolve_weights(VGG.filename) == in_env
    in_env.unlink()
    assert resolve_weights(VGG.filename) == in_hub


def test_registry_key_and_alias(env):
    # torch-fidelity caches the FID Inception under another name: it is found under that name too
    cached = _touch(env / "weights-inception-2015-12-05-6726825d.pth")
    assert resolve_weights("pt_inception") == cached
    assert resolve_weights("pt_inception-2015-12-05-6726825d.pth") == cached


def test_offline_fails_fast_with_helpful_message(env, monkeypatch):
    monkeypatch.setenv("SDLIGHT_OFFLINE", "1")
    monkeypatch.setattr(weights, "_reachable", lambda url, timeout=0: pytest.fail("probed while offline"))
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights(VGG.filename, url=VGG.url)
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    for part in (VGG.filename, VGG.url, str(env / VGG.filename), "SDLIGHT_WEIGHTS", "SDLIGHT_OFFLINE=1", "path"):
        assert part in message
    assert isinstance(info.value, FileNotFoundError)


def test_unreachable_host_fails_without_download(env, monkeypatch):
    probes = []
    monkeypatch.setattr(weights, "_reachable", lambda url, timeout=0: probes.append(url) or False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("download attempted"))
    with pytest.raises(WeightsNotFoundError, match="unreachable"):
        resolve_weights(VGG.filename, url=VGG.url)
    assert probes == [VGG.url]


def test_download_into_hub_cache_when_reachable(env, monkeypatch):
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        Path(dst).write_bytes(b"weights")

    monkeypatch.setattr(weights, "_reachable", lambda url, timeout=0: True)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    path = resolve_weights(VGG.filename)  # URL taken from the registry
    assert path == env / VGG.filename and path.read_bytes() == b"weights"
    assert calls == [(VGG.url, str(env / VGG.filename), "397923af")]
    assert resolve_weights(VGG.filename) == path and len(calls) == 1  # cached now


def test_failed_download_is_reported(env, monkeypatch):
    def broken(url, dst, hash_prefix=None, progress=True):
        raise RuntimeError('invalid hash value (expected "397923af", got "deadbeef")')

    monkeypatch.setattr(weights, "_reachable", lambda url, timeout=0: True)
    monkeypatch.setattr(torch.hub, "download_url_to_file", broken)
    with pytest.raises(WeightsNotFoundError, match="invalid hash"):
        resolve_weights(VGG.filename)


def test_no_url_known(env):
    with pytest.raises(WeightsNotFoundError, match="no download URL"):
        resolve_weights("some-unknown-file.pth")


def test_probe_is_a_quick_local_connect():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        assert weights._reachable(f"http://127.0.0.1:{port}/file.pth")
    finally:
        server.close()
    start = time.perf_counter()
    assert not weights._reachable(f"http://127.0.0.1:{port}/file.pth")  # nothing listens any more
    assert not weights._reachable("not a url")
    assert time.perf_counter() - start < 2 * weights.PROBE_TIMEOUT_S


def test_load_state_dict_formats(tmp_path):
    sd = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    torch.save({"state_dict": sd, "global_step": 7, "epoch": 1}, tmp_path / "w.ckpt")
    for name in ("w.safetensors", "w.pth", "w.ckpt"):
        loaded = load_state_dict(tmp_path / name)
        assert loaded.keys() == sd.keys(), name
        for k in sd:
            assert torch.equal(loaded[k], sd[k]) and loaded[k].device.type == "cpu"
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(TypeError):
        load_state_dict(tmp_path / "list.pth")
