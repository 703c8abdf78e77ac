"""Request and response bodies of the HTTP API: pydantic models whose field constraints are the validation and
the OpenAPI schema at once. The request model is built per app (`request_model`), because its limits (classes,
images per request, steps) come from the engines' manifest and the server's flags.

Every 422 names the field, the expected value and the actual one (`validation_message`), like the CLI's errors.
The words and the ranges are the request record's (`runtime.sampling.request.EXPECTED`, `MAX_*`), and the
schedule's grammar is checked by the record's one parser when the body is resolved (its InputError is the 422),
so the CLI and the API refuse the same values with the same sentence. No field names a file: the schedule is
`all | uniform:R | dp:K` only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..runtime.sampling.grammar import schedule_words
from ..runtime.sampling.request import EXPECTED, MAX_CFG, MAX_SEED, MAX_TIMESHIFT

MAX_NAME = 200
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


@dataclass(frozen=True)
class Limits:
    num_classes: int
    max_images: int  # per request (--max-images-per-request)
    max_steps: int  # (--max-steps)


def expectations(lim: Limits) -> dict[str, str]:
    """What each field must be, in words: the 422 messages say it, and the OpenAPI descriptions."""
    return {
        "class": f"a class id in [0, {lim.num_classes}) or a class name (GET /v1/info lists them)",
        "num": f"an integer in [1, {lim.max_images}] (--max-images-per-request)",
        "seed": EXPECTED["seed"],
        "steps": f"an integer in [1, {lim.max_steps}] (--max-steps)",
        "cfg": EXPECTED["cfg"],
        "schedule": f"{schedule_words(files=False)} (the encoder's recompute steps)",
        "interval": EXPECTED["interval"],
        "timeshift": EXPECTED["timeshift"],
        "solver": EXPECTED["solver"],
        "forecast": EXPECTED["forecast"],
        "plan": "the name of a plan stored with the engines (GET /v1/info lists them); fixes steps, solver, "
                "forecast, schedule, timeshift and interval",
        "stream": "true or false (true: Server-Sent Events, progress per step, then the result)",
        "deadline_ms": EXPECTED["deadline_ms"],
        "max_fid_delta": EXPECTED["max_fid_delta"],
        "quality": EXPECTED["quality"],
        "priority": EXPECTED["priority"] + " (admission order; under load, low ones are moved to cheaper plans "
                                           "first)",
    }


def descriptions(lim: Limits, defaults: dict) -> dict[str, str]:
    """The expectations and, where the manifest gives one, the default."""
    out = expectations(lim)
    for k in ("steps", "cfg", "schedule", "interval", "timeshift", "solver", "forecast"):
        out[k] += f"; default {defaults[k]} (the manifest's)"
    return out


def request_model(lim: Limits, defaults: dict) -> type[BaseModel]:
    """The POST /v1/generate body for these limits. Unknown fields, NaN/Inf, strings for numbers: refused."""
    say = descriptions(lim, defaults)
    unit = Annotated[float, Field(ge=0.0, le=1.0)]
    fields: dict[str, Any] = {
        "class_": (Union[Annotated[int, Field(ge=0, lt=lim.num_classes)], Annotated[str, Field(min_length=1,
                   max_length=MAX_NAME)]], Field(alias="class", description=say["class"], examples=[3])),
        "num": (int, Field(1, ge=1, le=lim.max_images, description=say["num"])),
        "seed": (int, Field(0, ge=0, le=MAX_SEED, description=say["seed"])),
        "steps": (Optional[int], Field(None, ge=1, le=lim.max_steps, description=say["steps"])),
        "cfg": (Optional[float], Field(None, ge=0.0, le=MAX_CFG, description=say["cfg"])),
        "schedule": (Optional[str], Field(None, max_length=MAX_NAME, description=say["schedule"],
                                          examples=["uniform:2"])),
        "interval": (Optional[list[unit]], Field(None, min_length=2, max_length=2, description=say["interval"])),
        "timeshift": (Optional[float], Field(None, gt=0.0, le=MAX_TIMESHIFT, description=say["timeshift"])),
        "solver": (Optional[str], Field(None, max_length=MAX_NAME, description=say["solver"],
                                        examples=["adams:3"])),
        "forecast": (Optional[int], Field(None, ge=0, le=2, description=say["forecast"])),
        "plan": (Optional[str], Field(None, max_length=MAX_NAME, description=say["plan"], examples=["fast"])),
        "stream": (bool, Field(False, description=say["stream"])),
        "deadline_ms": (Optional[float], Field(None, gt=0.0, description=say["deadline_ms"], examples=[2000])),
        "max_fid_delta": (Optional[float], Field(None, ge=0.0, description=say["max_fid_delta"], examples=[2.0])),
        "quality": (Optional[Literal["exact", "adaptive"]], Field(None, description=say["quality"])),
        "priority": (Optional[Literal["low", "normal", "high"]], Field(None, description=say["priority"])),
    }
    model = create_model("GenerateRequest", __config__=ConfigDict(**STRICT, populate_by_name=False,
                                                                  title="GenerateRequest"), **fields)
    model.__doc__ = "Sample `num` images of one class, as `ddt-export generate --class C --num N --seed S ...`."
    return model


class Settings(BaseModel):
    """The request as resolved: every default filled in from the manifest."""

    class_: int = Field(alias="class", serialization_alias="class")
    class_name: str
    num: int
    seed: int
    steps: int
    cfg: float
    schedule: str
    recompute_steps: list[int]
    interval: list[float]
    timeshift: float
    solver: str
    forecast: int
    plan: Optional[str] = Field(None, description="the stored plan that set the sampler and schedule, if any")
    model_config = ConfigDict(populate_by_name=True)


class Timings(BaseModel):
    queue_s: float = Field(description="arrival to admission into the batch")
    sampling_s: float = Field(description="admission to the last step")
    vae_s: float = Field(description="the batched VAE call (0 without a VAE graph)")
    total_s: float = Field(description="arrival to answer, inside the server")


class Slo(BaseModel):
    target_s: Optional[float] = Field(description="its SLO: deadline_ms, else --slo-scale x its solo latency")
    solo_s: Optional[float] = Field(description="the predicted solo latency of the plan asked for (the cost curve)")
    met: Optional[bool] = Field(description="answered within target_s (arrival to images ready, in the server)")
    priority: str


class Served(BaseModel):
    plan: Optional[str] = Field(description="the stored plan it ran (null: the settings it gave)")
    fid_delta: Optional[float] = Field(description="that plan's measured dFID (0 for the model's own sampler; "
                                       "null: unknown)")
    degraded: bool = Field(description="moved to a cheaper plan within its budget, to meet its SLO under load")
    asked_plan: Optional[str] = Field(description="the plan it asked for")
    switched_at_step: Optional[int] = Field(description="the step boundary of the move (0: before its first step)")
    slo: Slo


class GenerateResponse(BaseModel):
    id: str
    images: list[str] = Field(description="base64 PNGs, one per image, at the model's resolution")
    labels: list[int]
    settings: Settings = Field(description="what it ran (the plan it was moved to, if moved)")
    timings: Timings
    served: Served
    batching: str = Field(description="the server's policy: step | fair | slo | request | single (auto: the one chosen)")


class ErrorResponse(BaseModel):
    error: str = Field(description="the error type (InputError, QueueFull, ShuttingDown, NumericsError, ...)")
    message: str = Field(description="names the thing, the expected value and the actual one")


class Info(BaseModel):
    model: str
    precision: str
    backend: str
    batching: str
    row_budget: int
    image: dict[str, int]
    classes: list[str]
    defaults: dict[str, Any]
    limits: dict[str, int]
    plans: list[dict[str, Any]] = Field(description="the plans stored with the engines (`ddt-export tune`): name, "
                                        "settings, what they were measured to cost")
    plans_refused: dict[str, str] = Field(description="plans in the folder that cannot be used here, and why")
    batching_asked: str = Field(description="--batching as given (auto: `batching` is the simulator's choice)")
    batching_choice: Optional[dict[str, Any]] = Field(description="auto: each step-level policy's simulated SLO "
                                                      "attainment and p99 slowdown on the cost curve")
    slo_scale: float
    adapt: str = Field(description="where a late request that allows a trade goes: cheapest | least-dfid (--adapt)")
    cost_curve: dict[str, Any] = Field(description="seconds per graph call by rows, fitted at start-up or read")
    cost_calibration: Optional[dict[str, Any]] = Field(
        None, description="a curve measured at start-up, corrected while serving: k (the scheduler uses the curve "
        "x k: measured / predicted seconds of its recent iterations), iterations seen; null for a stated curve")
    frontier: list[dict[str, Any]] = Field(description="the plans a request may be moved to under load (measured "
                                           "dFID), least dFID first")
    adaptive_budget: Optional[float] = Field(description="quality: adaptive = max_fid_delta of the fast plan's dFID")
    frontier_note: Optional[str] = Field(description="why there is no frontier, when there is none")
    priorities: list[str]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    backend: str


def validation_message(errors: list[dict], lim_words: dict[str, str], fields: list[str]) -> str:
    """pydantic errors -> 'FIELD: expected ..., got ...' (one per field, '; '-joined)."""
    out, seen = [], set()
    for e in errors:
        loc = [p for p in e.get("loc", ()) if p != "body"]
        kind, value = e.get("type", ""), e.get("input")
        if kind == "json_invalid":
            out.append(f"body: expected valid JSON, got {e.get('ctx', {}).get('error', 'invalid JSON')}")
            break
        if not loc:
            out.append(f"body: expected a JSON object with the fields {', '.join(fields)}, got "
                       f"{type(value).__name__}")
            break
        field = str(loc[0])
        if field in seen:
            continue
        seen.add(field)
        if kind == "extra_forbidden":
            out.append(f"{field}: expected no such field (the fields: {', '.join(fields)}), got {_show(value)}")
        elif kind == "missing" and len(loc) == 1:
            out.append(f"{field}: expected {lim_words.get(field, 'a value')}, got nothing (required)")
        else:
            out.append(f"{field}: expected {lim_words.get(field, e.get('msg', ''))}, got {_show(value)}")
    return "; ".join(out) or "body: expected a valid request"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
