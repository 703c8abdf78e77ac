"""Model and sampler configuration: frozen dataclasses, named presets, and loaders.

`load_config(spec)` takes a preset name (`ddt-xl-256`), an official DDT YAML
(configs/repa_improved_ddt_xlen22de6_256.yaml: model.denoiser.init_args, model.diffusion_sampler.init_args,
data.latent_shape) or a config JSON this tool wrote (`Config.to_json`). Torch-free: the runtime reads it too.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError

LATENT_SCALE = 0.18215  # sd-vae-ft-ema scaling_factor; the official LatentVAE divides latents by it
TIME_FREQ_DIM = 256  # sinusoidal timestep features (the model's t_embedder input; the FLOP model counts it)
DEFAULT_MODEL = "ddt-tiny-digits"  # the bundled trained model: every command's default
# The official step functions (stateful_flow_matching/sampling.py), restated in `core.sampling.STEP_FNS`.
STEP_FN_NAMES = ("ode", "sde_mean", "sde", "sde_preserve")
# Solvers: `euler` (the official EulerSampler) or `adams:K`, the official AdamLMSampler of order K
# (stateful_flow_matching/adam_sampling.py; K = 1 is Euler). Encoder forecast orders: 0 reuses the last state
# (the official), 1 and 2 extrapolate it from the last 2 or 3 recomputed states.
SOLVERS = ("euler", "adams:K")
MAX_ADAMS_ORDER = 4  # the official pre_integral.py integrates Lagrange polynomials of order 1..4
FORECAST_ORDERS = (0, 1, 2)
ASSETS = Path(__file__).resolve().parents[1] / "assets"  # bundled weights, feature extractor, statistics


@dataclass(frozen=True)
class ModelConfig:
    """DDT architecture, named as the official `DDT.__init__` arguments."""

    in_channels: int = 4
    hidden_size: int = 1152
    num_groups: int = 16  # attention heads
    num_blocks: int = 28
    num_encoder_blocks: int = 22
    patch_size: int = 2
    num_classes: int = 1000  # class `num_classes` is the null (unconditional) class
    latent_size: int = 32  # latents are in_channels x latent_size x latent_size
    latent_scale: float | None = LATENT_SCALE  # None: pixel space, no VAE

    def __post_init__(self):
        checks = [
            ("num_encoder_blocks", 0 < self.num_encoder_blocks < self.num_blocks,
             f"in (0, num_blocks={self.num_blocks})", self.num_encoder_blocks),
            ("hidden_size", self.hidden_size % self.num_groups == 0,
             f"a multiple of num_groups={self.num_groups}", self.hidden_size),
            ("head_dim", (self.hidden_size // max(self.num_groups, 1)) % 4 == 0,
             "a multiple of 4 (2-D RoPE splits it in quarters)", self.hidden_size // max(self.num_groups, 1)),
            ("latent_size", self.latent_size % self.patch_size == 0,
             f"a multiple of patch_size={self.patch_size}", self.latent_size),
        ]
        for name, ok, expected, actual in checks:
            if not ok:
                raise ConfigError(f"model.{name}", expected, actual)

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_groups

    @property
    def grid(self) -> int:  # tokens per side
        return self.latent_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size ** 2

    @property
    def mlp_hidden(self) -> int:  # official FeedForward: int(2 * int(4C) / 3)
        return int(2 * int(self.hidden_size * 4.0) / 3)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.latent_size, self.latent_size)


def solver_order(solver: str, field: str = "sampler.solver") -> int:
    """The multistep order of a solver name: `euler` -> 1, `adams:K` -> K in 1..MAX_ADAMS_ORDER."""
    words = f"euler | adams:K with K in 1..{MAX_ADAMS_ORDER}"
    if solver == "euler":
        return 1
    head, sep, tail = str(solver).partition(":")
    if head != "adams" or not sep or not (tail.isascii() and tail.isdigit()) or not 1 <= int(tail) <= MAX_ADAMS_ORDER:
        raise ConfigError(field, words, solver)
    return int(tail)


@dataclass(frozen=True)
class SamplerConfig:
    """The official EulerSampler settings (stateful_flow_matching/sampling.py), the solver (Euler or the official
    AdamLMSampler's multistep order) and the encoder forecast order."""

    num_steps: int = 250
    guidance: float = 2.0
    guidance_interval: tuple[float, float] = (0.3, 1.0)  # CFG applied only where lo < t < hi
    timeshift: float = 1.0
    last_step: float = 0.04
    step_fn: str = "ode"
    state_refresh_rate: int = 1
    solver: str = "euler"  # euler | adams:K (K = 1..4)
    forecast: int = 0  # 0: reuse the last encoder state (official); 1, 2: extrapolate it in t

    def __post_init__(self):
        interval = tuple(self.guidance_interval)
        if len(interval) != 2:
            raise ConfigError("sampler.guidance_interval", "(lo, hi)", self.guidance_interval)
        numbers = {"guidance": self.guidance, "timeshift": self.timeshift, "last_step": self.last_step,
                   "guidance_interval": interval}
        for name, value in numbers.items():  # NaN passes every comparison below: refuse it first
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in np.atleast_1d(value).tolist()):
                raise ConfigError(f"sampler.{name}", "finite numbers", value)
        if not interval[0] <= interval[1]:
            raise ConfigError("sampler.guidance_interval", "(lo, hi) with lo <= hi", interval)
        if self.num_steps < 1:
            raise ConfigError("sampler.num_steps", ">= 1", self.num_steps)
        if not 0.0 < self.last_step < 1.0:
            raise ConfigError("sampler.last_step", "in (0, 1)", self.last_step)
        if self.step_fn not in STEP_FN_NAMES:
            raise ConfigError("sampler.step_fn", "one of " + "|".join(STEP_FN_NAMES), self.step_fn)
        if self.timeshift <= 0:
            raise ConfigError("sampler.timeshift", "> 0", self.timeshift)
        if self.state_refresh_rate < 1:
            raise ConfigError("sampler.state_refresh_rate", ">= 1", self.state_refresh_rate)
        if solver_order(self.solver) > 1 and self.step_fn != "ode":  # the official AdamLMSampler asserts it
            raise ConfigError("sampler.step_fn", f"ode with solver {self.solver} (multistep solvers are ODE solvers)",
                              self.step_fn)
        if isinstance(self.forecast, bool) or self.forecast not in FORECAST_ORDERS:
            raise ConfigError("sampler.forecast", " | ".join(map(str, FORECAST_ORDERS)), self.forecast)

    @property
    def order(self) -> int:
        """The solver's multistep order (1: Euler)."""
        return solver_order(self.solver)


@dataclass(frozen=True)
class Config:
    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_dict(d: dict) -> "Config":
        try:
            sampler = dict(d.get("sampler", {}))
            if "guidance_interval" in sampler:
                sampler["guidance_interval"] = tuple(sampler["guidance_interval"])
            return Config(name=d["name"], model=ModelConfig(**d["model"]), sampler=SamplerConfig(**sampler))
        except (KeyError, TypeError) as e:
            raise ConfigError("config JSON", "keys name, model{...}, sampler{...} as written by ddt-export", repr(e))


PRESETS: dict[str, Config] = {
    "ddt-xl-256": Config("ddt-xl-256", ModelConfig(latent_size=32)),
    "ddt-xl-512": Config("ddt-xl-512", ModelConfig(latent_size=64)),
    # XL-shaped (28 blocks, 22 encoder) but CPU-sized: for benchmarks of the encoder/decoder split.
    "ddt-xl-cpu": Config("ddt-xl-cpu", ModelConfig(hidden_size=256, num_groups=4, latent_size=32)),
    # The bundled model trained on scikit-learn digits (16x16, 1 channel, pixel space); see ddt_export/assets.
    "ddt-tiny-digits": Config(
        "ddt-tiny-digits",
        ModelConfig(in_channels=1, hidden_size=96, num_groups=4, num_blocks=8, num_encoder_blocks=6,
                    patch_size=2, num_classes=10, latent_size=16, latent_scale=None),
        # CFG 1.5, not the ImageNet 2.0: 500 samples, SVC-recognized 97.8% vs 99.4%, digits FID 4.8 vs 15.3.
        SamplerConfig(num_steps=50, guidance=1.5, guidance_interval=(0.3, 1.0), last_step=0.04),
    ),
}


def _from_official_yaml(path: Path) -> Config:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
        den = doc["model"]["denoiser"]["init_args"]
        smp = doc["model"].get("diffusion_sampler", {}).get("init_args", {})
        latent_shape = doc["data"]["latent_shape"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise ConfigError(f"official YAML {path}", "model.denoiser.init_args and data.latent_shape", repr(e))
    c, h, w = latent_shape
    if h != w:
        raise ConfigError(f"{path}: data.latent_shape", "square latents", latent_shape)
    if c != den.get("in_channels", 4):
        raise ConfigError(f"{path}: data.latent_shape[0]", den.get("in_channels", 4), c)
    vae = doc["model"].get("vae", {}).get("class_path", "")
    model = ModelConfig(
        in_channels=den.get("in_channels", 4), hidden_size=den.get("hidden_size", 1152),
        num_groups=den.get("num_groups", 12), num_blocks=den.get("num_blocks", 18),
        num_encoder_blocks=den.get("num_encoder_blocks", 4), patch_size=den.get("patch_size", 2),
        num_classes=den.get("num_classes", 1000), latent_size=h,
        latent_scale=LATENT_SCALE if vae.endswith("LatentVAE") else None,
    )
    step_fn = str(smp.get("step_fn", "ode_step_fn")).rsplit(".", 1)[-1].removesuffix("_step_fn")
    num_steps = smp.get("num_steps", 250)
    last_step = smp.get("last_step") or 1.0 / num_steps  # official: None -> 1/num_steps
    sampler = SamplerConfig(
        num_steps=num_steps, guidance=float(smp.get("guidance", 1.0)),
        guidance_interval=(float(smp.get("guidance_interval_min", 0.0)), float(smp.get("guidance_interval_max", 1.0))),
        timeshift=float(smp.get("timeshift", 1.0)), last_step=float(last_step), step_fn=step_fn,
        state_refresh_rate=int(smp.get("state_refresh_rate", 1)),
    )
    return Config(name=path.stem, model=model, sampler=sampler)


def load_config(spec: str | Path | None = None) -> Config:
    """A preset name, an official DDT YAML, or a config JSON written by this tool. None: the default model."""
    spec = DEFAULT_MODEL if spec is None else spec
    if str(spec) in PRESETS:
        return PRESETS[str(spec)]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError("--config", f"a preset ({', '.join(PRESETS)}), a .yaml or a .json file", str(spec))
    if path.suffix in (".yaml", ".yml"):
        return _from_official_yaml(path)
    if path.suffix == ".json":
        try:
            return Config.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"config JSON {path}", "valid JSON", str(e))
    raise ConfigError("--config", "a preset name, .yaml/.yml or .json", path.suffix or str(path))


def bundled_weights(cfg: Config) -> Path | None:
    """The weights shipped with the package for a preset (the default model), if any."""
    path = ASSETS / f"{cfg.name}.safetensors"
    return path if path.is_file() else None
