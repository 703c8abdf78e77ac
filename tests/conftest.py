"""Shared fixtures: tiny configs, a tiny exported engine folder, an official-format Lightning checkpoint.

Works without torch (the production install: base + [serve,test,cuda-check]): the fixtures that export graphs then take
them from $DDT_TEST_ARTIFACTS (written by `python tests/make_artifacts.py DIR` in an environment with torch;
scripts/test-torch-free.sh does both), and those that need the PyTorch model skip with the reason.
"""
from __future__ import annotations

import importlib.util
import os
import textwrap
from pathlib import Path

import pytest

from ddt_export.core.config import Config, ModelConfig, SamplerConfig

HAVE_TORCH = importlib.util.find_spec("torch") is not None
ARTIFACTS = os.environ.get("DDT_TEST_ARTIFACTS")  # prebuilt engine folders for a run without torch
TINY_FOLDER, DIGITS_FOLDER = "tiny-fp32", "digits-fp16"  # their names in ARTIFACTS (tests/make_artifacts.py)


def need_torch(what: str):
    """torch, or a skip naming what needs it (a run without torch: the production install)."""
    return pytest.importorskip("torch", reason=f"{what} needs the [export] extra (torch)")


def prebuilt(name: str) -> Path:
    """A folder of $DDT_TEST_ARTIFACTS, for a run without torch (else a skip with the reason)."""
    if not ARTIFACTS or not (Path(ARTIFACTS) / name / "manifest.json").is_file():
        pytest.skip(f"no torch to export {name}, and no prebuilt one in $DDT_TEST_ARTIFACTS "
                    "(python tests/make_artifacts.py DIR)")
    return Path(ARTIFACTS) / name

# Subprocess tests: a child gets CHILD_TIMEOUT seconds (about 10x what it takes on an idle 2-core machine, so a
# busy CI machine is not a failure) and the test CHILD_TIMEOUT + 60 (pytest-timeout), so a hung child fails with
# its output instead of stalling the suite. Every other test has pyproject's global limit.
CHILD_TIMEOUT = 300

# 4 blocks (3 encoder + 1 decoder), 16 tokens: every path of the real model, milliseconds per call.
TINY = Config(
    "tiny-test",
    ModelConfig(in_channels=4, hidden_size=64, num_groups=4, num_blocks=4, num_encoder_blocks=3, patch_size=2,
                num_classes=10, latent_size=8, latent_scale=None),
    SamplerConfig(num_steps=20, guidance=3.0, guidance_interval=(0.3, 1.0), last_step=0.04),
)

OFFICIAL_YAML = """\
model:
  denoiser:
    class_path: src.models.denoiser.decoupled_improved_dit.DDT
    init_args:
      in_channels: 4
      patch_size: 2
      num_groups: 4
      hidden_size: 64
      num_blocks: 4
      num_encoder_blocks: 3
      num_classes: 10
  diffusion_sampler:
    class_path: src.diffusion.stateful_flow_matching.sampling.EulerSampler
    init_args:
      num_steps: 20
      guidance: 3.0
      timeshift: 1.0
      state_refresh_rate: 1
      guidance_interval_min: 0.3
      guidance_interval_max: 1.0
      last_step: 0.04
      step_fn: src.diffusion.stateful_flow_matching.sampling.ode_step_fn
data:
  latent_shape: [4, 8, 8]
"""


def train_digits():
    """scripts/train_digits.py as a module: the real digits as the model was trained on them, the SVC check."""
    import sys

    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import train_digits as module

    return module


def tiny_model(seed: int = 0, cfg: Config = TINY):
    torch = need_torch("the tiny PyTorch model")
    from ddt_export.export.model import DDT

    torch.manual_seed(seed)
    return DDT(cfg.model).eval()


@pytest.fixture(scope="session")
def tiny_cfg() -> Config:
    return TINY


def export_tiny(out: Path):
    """The tiny test engines: a random (seed 0) tiny DDT's fp32 graphs in `out`; returns the model."""
    from ddt_export.export.exporter import random_weights_ref
    from runs import run_export_model as export_model

    model = tiny_model(0)
    export_model(model, TINY, out, weights=random_weights_ref(0))
    return model


@pytest.fixture(scope="session")
def tiny_engines(tmp_path_factory):
    """(folder, fp32 reference model): encoder/decoder graphs of a random tiny DDT, exported once per session.
    Without torch: the prebuilt folder and no model (a test that needs the model asks `need_torch` first)."""
    if not HAVE_TORCH:
        return prebuilt(TINY_FOLDER), None
    out = tmp_path_factory.mktemp("engines") / "fp32"
    return out, export_tiny(out)


@pytest.fixture(scope="session")
def features(tmp_path_factory):
    """The tiny FID feature extractor (`tiny_features.py`) of validate's and tune's tests, written once."""
    from tiny_features import tiny_features

    return tiny_features(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="session")
def official_ckpt(tmp_path_factory) -> tuple[Path, Path, object]:
    """(ckpt, yaml, ema model): a Lightning-format checkpoint as the official trainer saves it.

    `ema_denoiser.*` and `denoiser.*` hold different weights, `diffusion_trainer.*` holds a foreign key.
    """
    torch = need_torch("the official-format checkpoint")
    d = tmp_path_factory.mktemp("official")
    ema, raw = tiny_model(1), tiny_model(2)
    sd = {f"ema_denoiser.{k}": v for k, v in ema.state_dict().items()}
    sd.update({f"denoiser.{k}": v for k, v in raw.state_dict().items()})
    sd["diffusion_trainer.proj.0.weight"] = torch.zeros(3, 3)
    ckpt = d / "last.ckpt"
    torch.save({"state_dict": sd, "global_step": 10, "epoch": 0}, ckpt)
    yaml = d / "repa_improved_ddt_tiny.yaml"
    yaml.write_text(textwrap.dedent(OFFICIAL_YAML))
    return ckpt, yaml, ema


# ------------------------------------------------------------------ a Hugging Face Hub cache, laid out by hand

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"  # refs/main of every test repo
VAE_YAML_LINES = ("  vae:\n    class_path: src.models.vae.LatentVAE\n"
                  "    init_args: {weight_path: stabilityai/sd-vae-ft-ema}\n")


def hub_add(cache: Path, repo: str, files: dict[str, bytes], commit: str = HUB_COMMIT, ref: str = "main") -> Path:
    """Put `files` into `cache` (an HF_HUB_CACHE) as huggingface_hub lays a download out: blobs named by their
    sha256 (as LFS files are), snapshots/<commit>/<name> symlinks to them, refs/<ref> holding the commit."""
    import hashlib
    import os

    root = Path(cache) / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return root / "snapshots" / commit


@pytest.fixture(scope="session")
def hub_home(tmp_path_factory, official_ckpt):
    """An HF_HOME whose hub/ cache holds, at HUB_COMMIT: ddt-test/tiny-ddt (the official-format Lightning
    checkpoint and a README), ddt-test/tiny-vae (a tiny diffusers AutoencoderKL in vae/), ddt-test/two-ckpts
    (two checkpoints: no single candidate). Also the tiny YAML with the official LatentVAE line. Read it with
    HF_HUB_OFFLINE=1: no network."""
    torch = need_torch("the tiny VAE")
    diffusers = pytest.importorskip("diffusers")
    home = tmp_path_factory.mktemp("hf_home")
    ckpt, yaml, _ = official_ckpt
    hub_add(home / "hub", "ddt-test/tiny-ddt", {"last.ckpt": ckpt.read_bytes(), "README.md": b"# tiny DDT\n"})
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.18215)
    local = tmp_path_factory.mktemp("vae_local")
    vae.save_pretrained(local)
    hub_add(home / "hub", "ddt-test/tiny-vae", {f"vae/{p.name}": p.read_bytes() for p in local.iterdir()}
            | {"README.md": b"# tiny VAE\n"})
    hub_add(home / "hub", "ddt-test/two-ckpts", {"a.ckpt": b"a", "sub/b.safetensors": b"b"})
    latent_yaml = home / "tiny_latent.yaml"
    latent_yaml.write_text(yaml.read_text().replace("model:\n", "model:\n" + VAE_YAML_LINES, 1))
    return home, latent_yaml


@pytest.fixture
def hub_offline(hub_home, monkeypatch):
    """This process's huggingface_hub pointed at hub_home's cache, offline (it read the environment at import)."""
    from huggingface_hub import constants

    home, latent_yaml = hub_home
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home, latent_yaml


@pytest.fixture(scope="session")
def digits_engines(tmp_path_factory):
    """The bundled digits model's fp16 engines, `ddt-export build --precision fp16 --out DIR`, built once (without
    torch: the prebuilt folder)."""
    if not HAVE_TORCH:
        return prebuilt(DIGITS_FOLDER)
    from engines_cache import run_cli

    out = tmp_path_factory.mktemp("digits-engines") / "fp16"
    code, text = run_cli(["build", "--precision", "fp16", "--out", out])
    assert code == 0, text
    return out
