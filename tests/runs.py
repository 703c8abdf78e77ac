"""`generate` with keyword arguments, for tests: the request's fields go into a `RequestInput`, the rest into
`RunOptions` (the library takes the two records; the tests read better flat)."""
from __future__ import annotations

import dataclasses

from ddt_export.runtime.generate.generate import RunOptions, generate
from ddt_export.runtime.sampling.request import RequestInput

REQUEST_FIELDS = {f.name for f in dataclasses.fields(RequestInput)}


def run_generate(folder, *, executor=None, progress=None, say=lambda m: None, **kw):
    given = {k: v for k, v in kw.items() if k in REQUEST_FIELDS}
    if given.get("classes") is not None:
        given["classes"] = tuple(given["classes"])
    options = RunOptions(**{k: v for k, v in kw.items() if k not in REQUEST_FIELDS})
    return generate(folder, RequestInput(**given), options, executor=executor, progress=progress, say=say)
