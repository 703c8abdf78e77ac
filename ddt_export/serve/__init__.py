"""The HTTP server: FastAPI + uvicorn over the runtime's step-level batching scheduler. Torch-free.

`create_app(engines_dir, settings)` (app.py) is the factory that `ddt-export serve` runs under uvicorn
(server.py) and that a Ray Serve deployment can wrap; service.py is the batch loop; schemas.py the request and
response bodies; metrics.py the Prometheus metrics; static/index.html the web page. Needs the `[serve]` extra.
"""
