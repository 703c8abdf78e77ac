"""What the server reads once from the engine folder and the flags, before any port is bound (`read_site`): the
manifest, the request limits, the class names, the request defaults, the stored plans and their frontier, the
request body's model. Bad folders and flags fail here (ConfigError), so `serve` exits before it binds a port."""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..core.classes import ClassNames
from ..core.errors import ConfigError
from ..core.manifest import read_manifest
from ..runtime.graphs.engines import NO_ENGINES_HINT, load_engines
from ..runtime.sampling.grammar import default_schedule
from ..runtime.sampling.plans import read_plans
from . import schemas as S
from .levels import frontier_plans, start_curve
from .metrics import Metrics
from .settings import CFG_ROWS, ServeSettings


def _limits(manifest, settings: ServeSettings) -> S.Limits:
    top = manifest.batch.max
    given = settings.max_images_per_request
    images = max(1, top // CFG_ROWS) if given is None else given  # 0 is refused, never the default
    if not 1 <= images <= top:
        raise ConfigError("--max-images-per-request", f"1..{top} (the engines' batch.max; a guided image takes "
                          f"{CFG_ROWS} rows)", images)
    return S.Limits(manifest.config.model.num_classes, images, settings.max_steps)



@dataclass(frozen=True)
class Site:
    """What `create_app` reads once from the folder and the flags, before any port is bound; the routes use it."""

    engines_dir: Path
    manifest: Any
    settings: ServeSettings
    lim: S.Limits
    classes: ClassNames
    defaults: dict
    plans: dict  # name -> Plan: what /v1/info lists (a request reads its plan again)
    refused_plans: list
    frontier: Any  # the plans a request may be moved to under load (a measured dFID)
    curve: Any  # the cost curve given with --cost-curve; None: measured in the lifespan
    words: dict
    Req: Any  # the request body's pydantic model
    field_names: list
    metrics: Metrics
    opener: Callable

    @property
    def cfg(self):
        return self.manifest.config


def read_site(engines_dir: Path, settings: ServeSettings, open_engines: Optional[Callable]) -> Site:
    """The folder's manifest, limits, class names, defaults and plans, and the flags, checked (ConfigError)."""
    engines_dir = Path(engines_dir)
    manifest = read_manifest(engines_dir, NO_ENGINES_HINT)
    lim = _limits(manifest, settings)
    if settings.trace is not None and not Path(settings.trace).parent.is_dir():
        raise ConfigError("--trace", "a file in an existing folder", str(settings.trace))
    classes = (ClassNames.load(settings.class_names, lim.num_classes) if settings.class_names is not None
               else ClassNames.ids(lim.num_classes))
    sampler = manifest.config.sampler
    defaults = {"steps": sampler.num_steps, "cfg": sampler.guidance, "schedule": default_schedule(sampler),
                "interval": list(sampler.guidance_interval), "timeshift": sampler.timeshift, "num": 1, "seed": 0,
                "solver": sampler.solver, "forecast": sampler.forecast}
    plans, refused_plans = read_plans(engines_dir, manifest)
    words = S.expectations(lim)
    Req = S.request_model(lim, defaults)
    return Site(engines_dir, manifest, settings, lim, classes, defaults, plans, refused_plans, frontier_plans(plans),
                start_curve(settings.cost_curve), words, Req, [f.alias or n for n, f in Req.model_fields.items()],
                Metrics(), open_engines or (lambda folder: load_engines(folder, settings.backend)))
