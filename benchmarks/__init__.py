"""The project's benchmarks: one folder per study (its scripts, raw JSON/PNG, README with the current result),
`common/` for what several studies share, and `results.md`, the table of current numbers. Not installed with
the package; each script runs as `python benchmarks/<study>/<script>.py` from the repository root."""
