"""Provenance: what made an artifact, and the one rule that decides whether it can stand for another.

Every reuse, refuse or rebuild decision asks `Provenance.diff`: the engine build (is this folder the one asked
for?), its export stages, calibration sets, FP8 quantization inputs, stored DP schedules and the TensorRT
version check. Each difference is named the way the CLI prints it (`batch: built 1:16:64, asked 1:8:32`).
A decision that depends on fewer things compares fewer fields (`fields=`): a DP schedule does not depend on
the engines' precision, a calibration set not on the batch profile. Torch-free.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Iterable

from pathlib import Path

from .artifacts import folder_identity
from .config import Config, ModelConfig, SamplerConfig
from .errors import ArtifactError
from .specs import BatchProfile

WEIGHT_KINDS = ("ema", "raw")  # which weights of an official Lightning checkpoint (random: no checkpoint)
FIELDS = ("weights", "model", "sampler", "precision", "batch", "vae", "options", "platform")
IDENTITY = ("weights", "model")  # the same model: weights and architecture


def _pairs(d: dict | Iterable | None) -> tuple[tuple[str, str], ...]:
    items = d.items() if isinstance(d, dict) else (d or ())
    return tuple(sorted((str(k), str(v)) for k, v in items))


@dataclass(frozen=True)
class Provenance:
    """What made an artifact. `weights` is the checkpoint's sha256 (or `random-seed-N`) with the checkpoint
    part used (`weights_kind`: ema | raw | random); `vae` identifies the VAE weights (None: no VAE graph);
    `options` are the build settings that change the artifact (FP8 recipe, high precision, calibration,
    TensorRT optimization level, ...); `platform` is what TensorRT plans are tied to (version, GPU, compute
    capability), empty for ONNX graphs."""

    weights: str
    weights_kind: str
    model: ModelConfig
    sampler: SamplerConfig
    precision: str | None = None
    batch: BatchProfile | None = None
    vae: str | None = None
    options: tuple[tuple[str, str], ...] = field(default=())
    platform: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self):
        object.__setattr__(self, "options", _pairs(self.options))
        object.__setattr__(self, "platform", _pairs(self.platform))

    def replace(self, **changes) -> "Provenance":
        return dataclasses.replace(self, **changes)

    def diff(self, asked: "Provenance", fields: Iterable[str] = FIELDS) -> list[str]:
        """Each difference between this artifact (built) and what is asked, as `name: built X, asked Y`;
        [] when it can stand for it. `fields` limits the comparison to what the decision depends on."""
        out: list[str] = []
        for name in fields:
            mine, theirs = getattr(self, name), getattr(asked, name)
            if name == "weights":
                if (self.weights, self.weights_kind) != (asked.weights, asked.weights_kind):
                    out.append(f"weights: built {_short(self.weights)} ({self.weights_kind}), "
                               f"asked {_short(asked.weights)} ({asked.weights_kind})")
            elif name in ("model", "sampler"):
                out += [f"{name}.{f.name}: built {getattr(mine, f.name)}, asked {getattr(theirs, f.name)}"
                        for f in dataclasses.fields(mine) if getattr(mine, f.name) != getattr(theirs, f.name)]
            elif name in ("options", "platform"):
                a, b = dict(mine), dict(theirs)
                verb = "running" if name == "platform" else "asked"
                out += [f"{k}: built {a.get(k)}, {verb} {b.get(k)}" for k in sorted(set(a) | set(b))
                        if a.get(k) != b.get(k)]
            elif mine != theirs:
                out.append(f"{name}: built {mine}, asked {theirs}")
        return out

    def same_model(self, other: "Provenance") -> bool:
        return not self.diff(other, IDENTITY)

    def to_dict(self) -> dict:
        return {"weights": self.weights, "weights_kind": self.weights_kind, "model": dataclasses.asdict(self.model),
                "sampler": dataclasses.asdict(self.sampler), "precision": self.precision,
                "batch": str(self.batch) if self.batch is not None else None, "vae": self.vae,
                "options": dict(self.options), "platform": dict(self.platform)}

    @staticmethod
    def from_dict(d: dict, where: str = "provenance") -> "Provenance":
        try:
            sampler = dict(d["sampler"])
            sampler["guidance_interval"] = tuple(sampler["guidance_interval"])
            return Provenance(weights=d["weights"], weights_kind=d["weights_kind"], model=ModelConfig(**d["model"]),
                              sampler=SamplerConfig(**sampler), precision=d.get("precision"),
                              batch=BatchProfile.parse(d["batch"]) if d.get("batch") else None, vae=d.get("vae"),
                              options=d.get("options") or {}, platform=d.get("platform") or {})
        except (KeyError, TypeError) as e:
            raise ArtifactError(where, "a ddt-export provenance record", f"missing or malformed key {e}")


def _short(sha: str) -> str:
    return sha[:12] if len(sha) == 64 else sha


@dataclass(frozen=True)
class Source:
    """Where the weights came from (informational; identity is `Provenance.weights`)."""

    path: str | None = None
    seed: int | None = None  # random weights
    hub: dict | None = None  # {"repo", "file", "revision" (commit sha), "sha256"} for hf:// checkpoints

    def to_dict(self) -> dict:
        return {"path": self.path, "seed": self.seed, "hub": self.hub}


@dataclass(frozen=True)
class WeightsRef:
    """A checkpoint as the stages refer to it: its identity (sha256 or random-seed-N, the part used) and source."""

    sha256: str
    kind: str  # ema | raw | random
    source: Source = field(default_factory=Source)


@dataclass(frozen=True)
class FolderRef(os.PathLike):
    """A weights folder whose identity is over the files that are used, not everything beside them (a VAE in
    a Hub snapshot, `export.hub.resolve_vae`): its path (what `Path(ref)` gives), identity and Hub origin."""

    path: str
    identity: str
    hub: dict | None = None

    def __fspath__(self) -> str:
        return self.path


def vae_identity(vae) -> str | None:
    """The VAE's provenance identity: a FolderRef's own, else the sha256 over the folder's files."""
    if vae is None:
        return None
    return vae.identity if isinstance(vae, FolderRef) else folder_identity(Path(vae))


def provenance_for(cfg: Config, weights: WeightsRef, precision: str | None, batch: BatchProfile | None = None,
                   vae: Path | FolderRef | None = None, options: dict | None = None,
                   platform: dict | None = None) -> Provenance:
    """The provenance of an artifact made from these inputs; the VAE is identified by its folder's contents."""
    return Provenance(weights=weights.sha256, weights_kind=weights.kind, model=cfg.model, sampler=cfg.sampler,
                      precision=precision, batch=batch, vae=vae_identity(vae),
                      options=options or {}, platform=platform or {})
