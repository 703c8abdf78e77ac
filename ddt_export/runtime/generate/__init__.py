"""Batch generation: a request's samples cut into chunks, streamed to a run folder, resumable, sharded over
executors (`chunks.LocalExecutor` here, `ddt_export.scale.ray_data.RayExecutor` on a Ray cluster)."""
