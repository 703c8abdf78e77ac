"""Sampling past one process: the Ray adapters. Ray is imported only inside `scale.ray_data`, lazily, and only
when asked for (`generate --ray`); it is the `[ray]` extra, never in the base install."""
from __future__ import annotations

from ..core.errors import InputError
from ..core.log import Say


def executor_for(ray: bool, address: str | None, workers: int | None, say: Say):
    """The executor `runtime.generate` runs its chunks on: None (this process) or a Ray actor pool."""
    if workers is not None and workers < 1:
        raise InputError("--workers", ">= 1", workers)
    if not ray:
        given = [f for f, v in (("--ray-address", address), ("--workers", workers)) if v is not None]
        if given:
            raise InputError(" and ".join(given), "used with --ray", "no --ray")
        return None
    from .ray_data import RayExecutor

    return RayExecutor(address=address, workers=workers, say=say)
