"""The HTTP app: FastAPI over the step-level batch loop. `create_app(engines_dir, settings)` is the factory a
uvicorn server (`ddt-export serve`) or a Ray Serve deployment wraps.

    POST /v1/generate   JSON in; JSON out (base64 PNGs, labels, resolved settings, timings), or with
                        "stream": true Server-Sent Events: `queued`, `progress` per step, then `result` | `error`
    GET  /v1/info       the model, its class names, the defaults and limits (what the page builds its form from)
    GET  /health        200 once the engines are loaded and the loop runs; 503 while shutting down
    GET  /metrics       Prometheus text
    GET  /              the web page
    GET  /docs, /redoc  the OpenAPI schema (/openapi.json) in Swagger UI / ReDoc, their assets served from the
                        package (fastapi-offline, in the [serve] extra): no CDN, so they work with no internet

The engines are opened and closed in the lifespan; one background task runs the batch loop (`Service`);
handlers validate, resolve, enqueue and await. Every error is the JSON `{"error", "message"}`: 422
(InputError/ConfigError/validation, and bodies that cannot be parsed: not UTF-8, nested too deep; field,
expected, actual), 503 with Retry-After (queue full, shutting down), 500 (a request's tensors went non-finite, an
engine call failed), and the HTTP errors of the framework (404, 405) in the same shape. The process imports no
torch.
"""
import asyncio
import base64
import json
import logging
import threading
from contextlib import asynccontextmanager
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..core.errors import ConfigError, DDTExportError, InputError
from ..core.images import png_bytes
from ..runtime.batching.calibrate import Calibration
from ..runtime.batching.engine import Engine
from ..runtime.batching.runner import ModelRunner
from ..runtime.batching.scheduler import QueueFull, Scheduler, SloModel, Status
from ..runtime.sampling.plans import lookup
from ..runtime.sampling.request import API, RequestInput, resolve
from ..runtime.sampling.schedules import resolve_schedule
from . import schemas as S
from .levels import body_terms, decide, option_input, served, terms_for
from .metrics import CONTENT_TYPE
from .service import RETRY_AFTER_S, Outcome, Service, ShuttingDown, Ticket
from .settings import ServeSettings
from .site import Site, read_site

log = logging.getLogger("ddt_export.serve")


def _error(status: int, e: Exception, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": type(e).__name__, "message": str(e)}, status_code=status, headers=headers)


def _failed(outcome) -> JSONResponse:
    """A request that ended without images: 503 (Retry-After) when the server stopped it, else 500."""
    if isinstance(outcome.error, ShuttingDown):
        return _error(503, outcome.error, {"Retry-After": str(RETRY_AFTER_S)})
    return _error(500, outcome.error)


def unparsable_body(exc: HTTPException) -> Optional[InputError]:
    """The body errors FastAPI answers with a bare 400 ('There was an error parsing the body'), named."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return InputError("body", "JSON in UTF-8", f"bytes that are not UTF-8 (byte {cause.start}: "
                          f"{cause.object[cause.start:cause.start + 1]!r})")
    if isinstance(cause, RecursionError):
        return InputError("body", "a JSON object of the request's fields (nested a few levels)",
                          "JSON nested too deep to parse")
    if isinstance(cause, (ValueError, TypeError)):
        return InputError("body", "a JSON object of the request's fields", f"{type(cause).__name__}: "
                          f"{str(cause)[:120]}")
    return None


def _make_app(**kwargs) -> FastAPI:
    """The FastAPI object: /docs and /redoc with their assets served from the package (fastapi-offline); without
    it, /docs is a plain page pointing at /openapi.json (never a CDN that needs the internet)."""
    try:
        from fastapi_offline import FastAPIOffline
    except ImportError:
        app = FastAPI(docs_url=None, redoc_url=None, **kwargs)

        @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
        async def docs():
            return HTMLResponse(NO_VIEWER)

        return app
    return FastAPIOffline(**kwargs)


NO_VIEWER = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>ddt-export API</title></head>
<body><h1>ddt-export API</h1><p>The OpenAPI schema is <a href="/openapi.json">/openapi.json</a>. The interactive
viewer needs the fastapi-offline package (part of <code>pip install 'ddt-export[serve]'</code>), which serves
Swagger UI from the package, with no internet.</p></body></html>"""


def _sse(event: str, data) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


ERRORS = {422: {"model": S.ErrorResponse, "description": "invalid request: names the field, expected, actual"},
          503: {"model": S.ErrorResponse, "description": "queue full or shutting down; see Retry-After"},
          500: {"model": S.ErrorResponse, "description": "non-finite tensors in this request, or an engine failure"}}


def create_app(engines_dir: Path, settings: ServeSettings = ServeSettings(), *,
               open_engines: Optional[Callable] = None) -> FastAPI:
    """The app for one engine folder. The manifest is read now (bad folders and flags fail here, before any
    port is bound); the engines are opened in the lifespan (`open_engines(folder)`, default `load_engines`)."""
    site = read_site(engines_dir, settings, open_engines)
    app = _make_app(title="ddt-export serve", version="0.1.0", lifespan=_lifespan(site),
                    description=f"DDT ({site.cfg.name}) sampling with step-level continuous batching. "
                                + site.words["class"])
    app.state.metrics, app.state.classes, app.state.limits = site.metrics, site.classes, site.lim
    _error_handlers(app, site)
    _generate_route(app, site)
    _info_routes(app, site)
    return app


def _lifespan(site: Site):
    """Open the engines, choose the batching policy (`decide`: `auto` fits the cost curve), start the batch loop;
    on the way out, drain it and close the engines."""
    settings = site.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engines = await asyncio.to_thread(site.opener, site.engines_dir)
        levels = await asyncio.to_thread(decide, engines, settings.batching, site.curve, site.lim.max_images,
                                         site.frontier, "measured at start-up" if site.curve is None
                                         else str(settings.cost_curve))
        scheduler = Scheduler(engines.max_batch, levels.policy, settings.max_delay_ms / 1000.0, settings.max_queue,
                              SloModel(levels.curve, settings.slo_scale, settings.adapt))
        if site.curve is None:  # measured at start-up: corrected against the loop's own iterations while serving
            levels.calibration = Calibration(levels.curve)
        trace_file = open(settings.trace, "a", buffering=1) if settings.trace is not None else None
        trace = (lambda rec: trace_file.write(json.dumps(rec) + "\n")) if trace_file is not None else None
        service = Service(Engine(scheduler, ModelRunner(engines), calibration=levels.calibration), site.metrics,
                          trace=trace)
        service.start()
        app.state.service, app.state.engines, app.state.levels = service, engines, levels
        log.info("serving %s (%s, %s), batching %s", site.engines_dir, site.cfg.name, engines.backend_name,
                 levels.policy)
        try:
            yield
        finally:
            await service.close()
            engines.close()
            if trace_file is not None:
                trace_file.close()

    return lifespan


def _error_handlers(app: FastAPI, site: Site) -> None:
    """Every error in the API's shape {"error", "message"}: 422 for the request's faults, 503 with Retry-After for
    a full queue or a drain, 500 for the server's; the framework's own (404, 405) the same way."""
    metrics = site.metrics

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        metrics.requests.labels("invalid").inc()
        return JSONResponse({"error": "InputError",
                             "message": S.validation_message(exc.errors(), site.words, site.field_names)}, 422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        """The framework's own errors in the API's shape; a body it could not parse is the request's 422."""
        named = unparsable_body(exc) if exc.status_code == 400 else None
        if named is not None:
            metrics.requests.labels("invalid").inc()
            return _error(422, named)
        name = "".join(w.capitalize() for w in str(HTTPStatus(exc.status_code).phrase).split())
        return JSONResponse({"error": name, "message": f"{request.method} {request.url.path}: {exc.detail}"},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(DDTExportError)
    async def refused(request: Request, exc: DDTExportError):
        if isinstance(exc, (QueueFull, ShuttingDown)):
            metrics.requests.labels("rejected").inc()
            metrics.slo_missed.inc()  # refused: its SLO is missed
            return _error(503, exc, {"Retry-After": str(RETRY_AFTER_S)})
        if isinstance(exc, (InputError, ConfigError)):
            metrics.requests.labels("invalid").inc()
            return _error(422, exc)
        metrics.requests.labels("failed").inc()
        return _error(500, exc)


class Requests:
    """A body -> the one request record and its serving terms; an outcome -> the answer (JSON or SSE)."""

    def __init__(self, site: Site):
        self.site = site
        self.schedule_lock = threading.Lock()  # one dp:K template trajectory at a time

    async def resolve_one(self, engines, given: RequestInput):
        site = self.site
        request = resolve(site.cfg, given, API, lookup(site.engines_dir, site.manifest, API.plan))
        if request.schedule.kind != "dp":
            return resolve_schedule(request, engines, log.info)

        def locked():  # may run the template trajectory: off the event loop, one at a time
            with self.schedule_lock:
                return resolve_schedule(request, engines, log.info)

        return await asyncio.to_thread(locked)

    async def resolve_body(self, engines, body):
        """The body -> the one request record (its checks word their errors with the API's field names) and its
        serving terms: priority, deadline, and the frontier plans within its dFID budget, resolved with its class,
        num, seed and cfg."""
        t, names = body_terms(body, self.site.frontier)
        label = (self.site.classes.resolve(body.class_, API.classes),)
        given = RequestInput(classes=label, num=body.num, seed=body.seed, steps=body.steps,
                             cfg=body.cfg, schedule=body.schedule, interval=body.interval, timeshift=body.timeshift,
                             solver=body.solver, forecast=body.forecast, plan=body.plan)
        request = await self.resolve_one(engines, given)
        options = [(n, await self.resolve_one(engines, option_input(body, label, n))) for n in names]
        return request, terms_for(t, body, request, options, self.site.plans)

    def payload(self, ticket: Ticket, outcome: Outcome, policy: str) -> dict:
        spec = ticket.request.sample  # what it ran: the plan it was moved to, if it was
        s, label = spec.sampler, int(spec.labels[0])
        return {"id": ticket.id, "images": [base64.b64encode(png_bytes(im)).decode() for im in outcome.images],
                "labels": spec.labels.tolist(), "batching": policy, "timings": outcome.timings,
                "served": served(ticket.request),
                "settings": {"class": label, "class_name": self.site.classes.labels[label], "num": spec.num,
                             "seed": spec.seed, "steps": s.num_steps, "cfg": s.guidance,
                             "schedule": str(spec.schedule), "recompute_steps": list(spec.recompute),
                             "interval": list(s.guidance_interval), "timeshift": s.timeshift, "solver": s.solver,
                             "forecast": s.forecast, "plan": spec.plan}}

    @staticmethod
    async def answered(ticket: Ticket, request: Request) -> Optional[Outcome]:
        """The outcome, or None when the client disconnected first (the request is then cancelled)."""
        async def gone():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watch = asyncio.ensure_future(gone())
        try:
            done, _ = await asyncio.wait({ticket.future, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if ticket.future in done:
            return ticket.future.result()
        request.app.state.service.cancel(ticket)
        return None

    async def stream(self, ticket: Ticket, service: Service, policy: str):
        try:
            req = ticket.request
            yield _sse("queued", {"id": ticket.id, "waiting": len(service.engine.scheduler.waiting), "plan": req.plan,
                                  "fid_delta": req.dfid})
            while True:
                kind, data = await ticket.events.get()
                if kind == "progress":
                    yield _sse("progress", data)
                    continue
                if data.status is Status.DONE:
                    yield _sse("result", await asyncio.to_thread(self.payload, ticket, data, policy))
                elif data.error is not None:
                    status = 503 if isinstance(data.error, ShuttingDown) else 500
                    yield _sse("error", {"status": status, "error": type(data.error).__name__,
                                         "message": str(data.error)})
                return
        finally:  # the client went away (the server cancels this generator) or the stream ended
            service.cancel(ticket)


def _generate_route(app: FastAPI, site: Site) -> None:
    handle = Requests(site)
    Req = site.Req

    @app.post("/v1/generate", response_model=S.GenerateResponse, responses={
        **ERRORS, 200: {"description": "the images (JSON), or with stream: true an SSE stream of `queued`, "
                        "`progress` ({step, steps}) and then `result` (this JSON) or `error` events",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
    async def generate(body: Req, request: Request):  # type: ignore[valid-type]
        """Sample `num` images of one class: equal, pixel for pixel, to `ddt-export generate` with the same
        class, num, seed, steps, cfg and schedule, whatever else shares the batch."""
        service: Service = request.app.state.service
        policy = request.app.state.levels.policy
        if service.draining:
            raise ShuttingDown("server", "accepting requests", "shutting down (SIGTERM)")
        spec, terms = await handle.resolve_body(request.app.state.engines, body)
        ticket = service.submit(spec, stream=body.stream, terms=terms)
        if body.stream:
            return StreamingResponse(handle.stream(ticket, service, policy), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        outcome = await handle.answered(ticket, request)
        if outcome is None:
            return Response(status_code=499)  # nobody is listening; for the access log
        if outcome.status is not Status.DONE:
            return _failed(outcome)
        return JSONResponse(await asyncio.to_thread(handle.payload, ticket, outcome, policy))


def _info_routes(app: FastAPI, site: Site) -> None:
    """/v1/info, /health, /metrics and the page."""
    cfg, lim = site.cfg, site.lim

    @app.get("/v1/info", response_model=S.Info)
    async def info(request: Request):
        """The model, its class names in id order, the request defaults and limits, the batching policy."""
        engines = request.app.state.engines
        side, channels = site.manifest.dims.image
        levels = request.app.state.levels
        return {"model": cfg.name, "precision": site.manifest.precision, "backend": engines.backend_name,
                "batching": levels.policy, **levels.info(site.settings.slo_scale), "adapt": site.settings.adapt,
                "row_budget": engines.max_batch,
                "image": {"side": side, "channels": channels}, "classes": site.classes.labels,
                "defaults": site.defaults,
                "limits": {"max_images": lim.max_images, "max_steps": lim.max_steps,
                           "num_classes": lim.num_classes},
                "plans": [{"name": p.name, "settings": p.label(), "measured": p.measured}
                          for p in site.plans.values()],
                "plans_refused": site.refused_plans}

    @app.get("/health", response_model=S.Health, responses={503: {"model": S.ErrorResponse}})
    async def health(request: Request):
        """200 once the engines are loaded and the batch loop runs; 503 while shutting down."""
        service: Service = request.app.state.service
        if not service.healthy:
            why = "shutting down" if service.draining else "the batch loop stopped"
            return _error(503, ShuttingDown("server", "serving", why), {"Retry-After": str(RETRY_AFTER_S)})
        return {"status": "ok", "model": cfg.name, "backend": request.app.state.engines.backend_name}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}},
                                                                   "description": "Prometheus text format"}})
    async def prometheus():
        """Prometheus metrics: ddt_requests_total{status}, ddt_request_seconds, ddt_queue_seconds,
        ddt_active_requests, ddt_waiting_requests, ddt_iteration_requests, ddt_iteration_rows{graph}, ..."""
        return Response(site.metrics.render(), media_type=CONTENT_TYPE)

    page = resources.files("ddt_export.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        """The web page: class picker, steps, CFG, images, seed, schedule, live progress, gallery."""
        return HTMLResponse(page)
