"""The library's record-taking entry points with keyword arguments, for tests: each call's keywords are split
into the records the library takes (`RequestInput` and `RunOptions` for generate, `BuildOptions` for build,
`RequestInput` and `ValidateOptions` for validate, `BenchOptions`, `ExportOptions`). The tests read better flat;
a keyword neither record has is a TypeError, as it would be in the library."""
from __future__ import annotations

import dataclasses

from ddt_export.runtime.generate.generate import RunOptions, generate
from ddt_export.runtime.sampling.request import RequestInput

REQUEST_FIELDS = {f.name for f in dataclasses.fields(RequestInput)}


def _request(kw: dict) -> tuple[RequestInput, dict]:
    given = {k: kw.pop(k) for k in list(kw) if k in REQUEST_FIELDS}
    if given.get("classes") is not None:
        given["classes"] = tuple(given["classes"])
    return RequestInput(**given), kw


def run_generate(folder, *, executor=None, progress=None, say=lambda m: None, **kw):
    given, rest = _request(kw)
    return generate(folder, given, RunOptions(**rest), executor=executor, progress=progress, say=say)


def run_build(precision, *, out=None, say=lambda m: None, progress=None, **kw):
    from ddt_export.builder.engine import BuildOptions, build

    return build(precision, BuildOptions(**kw), out=out, say=say, progress=progress)


def run_validate(folder, *, progress=None, say=lambda m: None, **kw):
    from ddt_export.evaluate.validate import ValidateOptions, validate

    given, rest = _request(kw)
    return validate(folder, given, ValidateOptions(**rest), progress=progress, say=say)


def run_bench(folder, *, say=lambda m: None, **kw):
    from ddt_export.evaluate.bench import BenchOptions, bench

    return bench(folder, BenchOptions(**kw), say=say)


def run_export_model(model, cfg, out, *, weights, progress=None, **kw):
    from ddt_export.export.exporter import ExportOptions, export_model

    return export_model(model, cfg, out, weights, ExportOptions(**kw), progress=progress)


def run_export_checkpoint(ckpt, config, out, *, weights="ema", trust=False, random_weights=False, progress=None,
                          **kw):
    from ddt_export.export.exporter import ExportOptions, export_checkpoint

    return export_checkpoint(ckpt, config, out, weights="random" if random_weights else weights, trust=trust,
                             options=ExportOptions(**kw), progress=progress)
