"""hf:// checkpoints and VAEs, offline, against a Hub cache laid out as huggingface_hub lays downloads out
(conftest.hub_home: blobs/<sha256>, snapshots/<commit>/..., refs/main). No test here reaches the network."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HUB_COMMIT, hub_add
from ddt_export.core.errors import ArtifactError, CheckpointError, InputError
from ddt_export.core.manifest import read_manifest
from ddt_export.export import hub
from engines_cache import run_cli

ROOT = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_parse_forms():
    assert hub.HubRef.parse("hf://MCG-NJU/DDT-XL-22en6de-R256") == hub.HubRef("MCG-NJU/DDT-XL-22en6de-R256", "", None)
    assert hub.HubRef.parse("hf://o/r/sub/model.ckpt@v1.0") == hub.HubRef("o/r", "sub/model.ckpt", "v1.0")
    assert hub.HubRef.parse("hf://o/r@refs/pr/3") == hub.HubRef("o/r", "", "refs/pr/3")
    assert hub.HubRef.parse(str(Path("hf://o/r/m.pt"))).path == "m.pt"  # pathlib folds hf:// to hf:/
    assert hub.is_hub("hf://o/r") and not hub.is_hub("engines/fp16") and not hub.is_hub(None)
    for bad in ("hf://onlyowner", "hf://o/r@", "hf://o/../x", "hf://-o/r", "hf://o/r/a/../b"):
        with pytest.raises(InputError, match="OWNER/REPO"):
            hub.HubRef.parse(bad)


def test_checkpoint_resolution_offline(hub_offline, official_ckpt):
    ckpt, _, _ = official_ckpt
    for spec in ("hf://ddt-test/tiny-ddt", "hf://ddt-test/tiny-ddt@main", f"hf://ddt-test/tiny-ddt@{HUB_COMMIT}",
                 "hf://ddt-test/tiny-ddt/last.ckpt"):
        got = hub.resolve_checkpoint(spec)
        assert got.file == "last.ckpt" and got.revision == HUB_COMMIT and got.sha256 == sha256(ckpt)
        assert got.path.read_bytes() == ckpt.read_bytes()
        assert got.source.hub == {"repo": "ddt-test/tiny-ddt", "file": "last.ckpt", "revision": HUB_COMMIT,
                                  "sha256": sha256(ckpt)}
    with pytest.raises(CheckpointError, match="exactly one") as e:
        hub.resolve_checkpoint("hf://ddt-test/two-ckpts")
    assert "a.ckpt, sub/b.safetensors" in str(e.value)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE") as e:  # offline, cache miss: repo and file
        hub.resolve_checkpoint("hf://ddt-test/tiny-ddt/other.ckpt")
    assert "ddt-test/tiny-ddt: other.ckpt is not cached" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="nobody/nothing: revision main is not cached"):
        hub.resolve_checkpoint("hf://nobody/nothing")
    with pytest.raises(CheckpointError, match="revision v2 is not cached"):
        hub.resolve_checkpoint("hf://ddt-test/tiny-ddt@v2")


def test_corrupt_blob_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub", reason="hf:// checkpoints need the [export] extra")
    from huggingface_hub import constants

    snap = hub_add(tmp_path / "hub", "ddt-test/bad", {"w.safetensors": b"original"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.resolve_checkpoint("hf://ddt-test/bad").sha256 == hashlib.sha256(b"original").hexdigest()
    (snap / "w.safetensors").resolve().write_bytes(b"bit rot")
    with pytest.raises(ArtifactError, match="cache is corrupt"):
        hub.resolve_checkpoint("hf://ddt-test/bad")


def test_vae_identity_is_over_the_files_used(hub_offline, tmp_path, monkeypatch):
    from huggingface_hub import constants

    home, _ = hub_offline
    ref = hub.resolve_vae("hf://ddt-test/tiny-vae/vae")
    assert Path(ref).name == "vae" and (Path(ref) / "config.json").is_file()
    assert ref.hub["revision"] == HUB_COMMIT and sorted(ref.hub["files"]) == [
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    with pytest.raises(CheckpointError, match="AutoencoderKL folder"):
        hub.resolve_vae("hf://ddt-test/tiny-vae")  # the root holds a README only: name the subfolder
    cache = tmp_path / "hub"  # the same snapshot with another file beside it (a .bin a user fetched too)
    shutil.copytree(home / "hub", cache, symlinks=True)
    hub_add(cache, "ddt-test/tiny-vae", {"vae/diffusion_pytorch_model.bin": b"not used"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    again = hub.resolve_vae("hf://ddt-test/tiny-vae/vae@main")
    assert again.identity == ref.identity and again.hub["files"] == ref.hub["files"]


def test_build_from_hub_records_revision_and_sha256(hub_offline, official_ckpt, tmp_path):
    ckpt, _, _ = official_ckpt
    _, latent_yaml = hub_offline
    out = tmp_path / "b"
    argv = ["build", "--precision", "fp32", "--ckpt", "hf://ddt-test/tiny-ddt@main", "--config", latent_yaml,
            "--vae", "hf://ddt-test/tiny-vae/vae", "--out", out]
    code, text = run_cli(argv)
    assert code == 0, text
    man = read_manifest(out)
    assert man.provenance.weights == sha256(ckpt)  # the identity every staleness decision compares
    assert man.source.hub == {"repo": "ddt-test/tiny-ddt", "file": "last.ckpt", "revision": HUB_COMMIT,
                              "sha256": sha256(ckpt)}
    vae = man.graphs["vae_decoder"].info["hub"]
    assert vae["repo"] == "ddt-test/tiny-vae" and vae["revision"] == HUB_COMMIT and vae["subfolder"] == "vae"
    code, text = run_cli(argv)  # resolved again (offline): the same provenance, so the folder is reused
    assert code == 0 and "reused" in text, text


@pytest.mark.timeout(300)
def test_cli_export_from_hub_offline(hub_home, official_ckpt, tmp_path):
    """HF_HOME and HF_HUB_OFFLINE as a user sets them: read by huggingface_hub itself, in a fresh process."""
    ckpt, _, _ = official_ckpt
    home, latent_yaml = hub_home
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("HF_HUB_CACHE", None)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=240)

    r = cli("export", "--ckpt", "hf://ddt-test/tiny-ddt", "--config", latent_yaml, "--vae",
            "hf://ddt-test/tiny-vae/vae", "--out", tmp_path / "e")
    assert r.returncode == 0, r.stderr
    man = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert man["source"]["hub"]["revision"] == HUB_COMMIT and man["source"]["hub"]["sha256"] == sha256(ckpt)
    assert man["provenance"]["weights"] == sha256(ckpt) and "vae_decoder" in man["graphs"]
    r = cli("export", "--ckpt", "hf://ddt-test/tiny-ddt/missing.ckpt", "--config", latent_yaml, "--out",
            tmp_path / "m")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "ddt-test/tiny-ddt" in lines[0] and "missing.ckpt" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
