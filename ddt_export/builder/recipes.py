"""FP8 recipes: which block GEMMs get FP8 Q/DQ and how their activation scales are calibrated. Torch-free.

A recipe is a frozen dataclass, named presets plus JSON files (`--fp8-recipe NAME|FILE`):

    {"name": "mine", "quantize": ["*@all"], "exclude": ["adaLN@decoder"], "calibration": "max",
     "calibration_rows": "all"}

A rule is `ROLES[@BLOCKS]`: ROLES a comma list of qkv, proj, w1, w2, w3, adaLN, or the aliases ffn (w1,w2,w3)
and * (all six); BLOCKS a comma list of all, encoder, decoder, first, middle, last or block indices (negative
from the end; default all). A block GEMM is FP8 when a `quantize` rule matches it and no `exclude` rule does.
`calibration`: ModelOpt's ONNX FP8 path offers `max` and `entropy` only (modelopt/onnx/quantization/fp8.py,
`quantize`: "entropy" selects onnxruntime's Entropy calibrator, any other string MinMax; percentile is not
reachable, so it is refused here rather than silently run as max). `calibration_rows`: the calibration rows
the scales are computed on: all steps, or only the steps inside (guided) or outside (unguided) the guidance
interval.

The recipe is recorded in the quantized graphs' manifest and, as `key()`, in the build options of the
provenance: a folder built with another recipe is refused or rebuilt, never reused.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..core.config import ModelConfig, SamplerConfig
from ..core.errors import ConfigError
from ..core.flops import Fp8Share, fp8_share
from ..core.sampling import in_guidance_interval, step_times

ROLES = {"qkv": "attn.qkv", "proj": "attn.proj", "w1": "mlp.w1", "w2": "mlp.w2", "w3": "mlp.w3",
         "adaLN": "adaLN_modulation"}
ALIASES = {"ffn": ("w1", "w2", "w3"), "*": tuple(ROLES)}
BLOCK_WORDS = ("all", "encoder", "decoder", "first", "middle", "last")
CALIBRATION_METHODS = ("max", "entropy")
CALIBRATION_ROWS = ("all", "guided", "unguided")
KEYS = ("name", "description", "quantize", "exclude", "calibration", "calibration_rows")


def _split_rule(rule: str, where: str) -> tuple[list[str], list[str]]:
    if not isinstance(rule, str) or not rule.strip():
        raise ConfigError(where, "a rule ROLES[@BLOCKS], e.g. ffn@decoder", repr(rule))
    roles, _, blocks = rule.partition("@")
    roles_l = [r.strip() for r in roles.split(",")]
    blocks_l = [b.strip() for b in (blocks or "all").split(",")]
    for r in roles_l:
        if r not in ROLES and r not in ALIASES:
            raise ConfigError(f"{where} ({rule!r})", "roles from " + ", ".join([*ROLES, *ALIASES]), repr(r))
    for b in blocks_l:
        if b not in BLOCK_WORDS and not b.lstrip("-").isdigit():
            raise ConfigError(f"{where} ({rule!r})", "blocks from " + ", ".join(BLOCK_WORDS) + " or an index",
                              repr(b))
    return roles_l, blocks_l


def _blocks(word: str, cfg: ModelConfig, where: str) -> list[int]:
    n, e = cfg.num_blocks, cfg.num_encoder_blocks
    named = {"all": range(n), "encoder": range(e), "decoder": range(e, n), "first": [0], "middle": [(n - 1) // 2],
             "last": [n - 1]}
    if word in named:
        return list(named[word])
    i = int(word)
    if not -n <= i < n:
        raise ConfigError(where, f"a block index in [-{n}, {n}) for this model", i)
    return [i % n]


def _rule_sites(rule: str, cfg: ModelConfig, where: str) -> set[tuple[int, str]]:
    roles, blocks = _split_rule(rule, where)
    names = {ROLES[x] for r in roles for x in ALIASES.get(r, (r,))}
    return {(b, role) for word in blocks for b in _blocks(word, cfg, where) for role in names}


@dataclass(frozen=True)
class Recipe:
    name: str
    quantize: tuple[str, ...] = ("*@all",)
    exclude: tuple[str, ...] = ()
    calibration: str = "max"
    calibration_rows: str = "all"
    description: str = field(default="", compare=False)

    def __post_init__(self):
        where = f"fp8 recipe {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"{where}: name", "a non-empty string", repr(self.name))
        for key in ("quantize", "exclude"):
            rules = getattr(self, key)
            if isinstance(rules, str) or not all(isinstance(r, str) for r in rules):
                raise ConfigError(f"{where}: {key}", "a list of rules ROLES[@BLOCKS]", repr(rules))
            object.__setattr__(self, key, tuple(rules))
            for i, r in enumerate(self.__dict__[key]):
                _split_rule(r, f"{where}: {key}[{i}]")
        if not self.quantize:
            raise ConfigError(f"{where}: quantize", "at least one rule", "none")
        if self.calibration not in CALIBRATION_METHODS:
            raise ConfigError(f"{where}: calibration", " | ".join(CALIBRATION_METHODS), repr(self.calibration),
                              "ModelOpt's ONNX FP8 path offers max and entropy only "
                              "(modelopt/onnx/quantization/fp8.py quantize)")
        if self.calibration_rows not in CALIBRATION_ROWS:
            raise ConfigError(f"{where}: calibration_rows", " | ".join(CALIBRATION_ROWS), repr(self.calibration_rows))

    def sites(self, cfg: ModelConfig) -> set[tuple[int, str]]:
        """The (block, role) GEMMs this recipe puts in FP8 on a model; ConfigError when that is none."""
        where = f"fp8 recipe {self.name!r}"
        inc = set().union(*(_rule_sites(r, cfg, f"{where}: quantize[{i}]") for i, r in enumerate(self.quantize)))
        exc = set().union(*(_rule_sites(r, cfg, f"{where}: exclude[{i}]") for i, r in enumerate(self.exclude)))
        out = inc - exc
        if not out:
            raise ConfigError(where, "at least one block GEMM in FP8", "none left after its exclude rules")
        return out

    def share(self, cfg: ModelConfig) -> Fp8Share:
        return fp8_share(cfg, self.sites(cfg))

    def key(self) -> str:
        """What the build options record (and the provenance compares): everything that changes the graphs."""
        return (f"{self.name}: quantize {','.join(self.quantize)}; exclude {','.join(self.exclude) or '-'}; "
                f"calibration {self.calibration}; rows {self.calibration_rows}")

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "quantize": list(self.quantize),
                "exclude": list(self.exclude), "calibration": self.calibration,
                "calibration_rows": self.calibration_rows}

    @staticmethod
    def from_dict(d: dict, where: str = "fp8 recipe") -> "Recipe":
        if not isinstance(d, dict):
            raise ConfigError(where, "a JSON object with keys " + ", ".join(KEYS), type(d).__name__)
        unknown = sorted(set(d) - set(KEYS))
        if unknown:
            raise ConfigError(where, "keys from " + ", ".join(KEYS), ", ".join(unknown))
        if "name" not in d:
            raise ConfigError(where, "a name", "no 'name' key")
        return Recipe(**{k: tuple(v) if k in ("quantize", "exclude") and isinstance(v, list) else v
                         for k, v in d.items()})


def phase_steps(sampler: SamplerConfig, rows: str) -> set[int] | None:
    """The sampling steps whose calibration rows a recipe uses (None: all)."""
    if rows == "all":
        return None
    t, _ = step_times(sampler)
    guided = {i for i in range(sampler.num_steps) if in_guidance_interval(t[i], sampler.guidance_interval)}
    return guided if rows == "guided" else set(range(sampler.num_steps)) - guided


# ------------------------------------------------------------------------------------------ presets

# From benchmarks/fp8_sensitivity.py (docs/fp8.md): on the bundled digits model FP8 on qkv, proj or the decoder's
# adaLN alone raises FID (spreads the samples); on the FFNs, w1/w3, w2 or the encoder's adaLN alone lowers it.
PRESETS: dict[str, Recipe] = {r.name: r for r in (
    Recipe("ffn+qkv", quantize=("ffn", "qkv"),
           description="the FFN (w1/w2/w3) and attention qkv of every block; proj and adaLN_modulation stay in the "
                       "high precision"),
    Recipe("decoder+ffn", quantize=("*@decoder", "ffn@encoder"),
           description="every decoder block GEMM and the encoder's FFN (w1/w2/w3); the encoder's qkv, proj and "
                       "adaLN stay in the high precision"),
    Recipe("all", description="every block GEMM (qkv, proj, w1/w2/w3, adaLN) in encoder and decoder"),
    Recipe("decoder+w1w3", quantize=("*@decoder", "w1,w3@encoder"),
           description="every decoder block GEMM and the encoder's w1/w3"),
    Recipe("w1w3+adaLN", quantize=("w1,w3", "adaLN"), description="w1/w3 and adaLN_modulation of every block"),
    Recipe("ffn", quantize=("ffn",), description="the FFN (w1/w2/w3) of every block"),
)}
# The default: the largest FP8 share (81%) whose dFID against fp32 is within noise on the digits model (issue 15):
# 3 seeds x 2000 samples, dFID +0.066, +0.002, -0.033, mean |dFID| 0.034, paired 95% interval [-0.063, +0.088].
DEFAULT_RECIPE = "ffn+qkv"


def parse_recipe(spec: str | Path | None) -> Recipe:
    """A preset name or a recipe JSON file (see the module doc); None: the default recipe."""
    spec = DEFAULT_RECIPE if spec is None else spec
    if str(spec) in PRESETS:
        return PRESETS[str(spec)]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError("--fp8-recipe", f"a recipe name ({', '.join(PRESETS)}) or a recipe .json file", str(spec))
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--fp8-recipe {path}", "valid JSON", str(e))
    return Recipe.from_dict(doc, f"--fp8-recipe {path}")

