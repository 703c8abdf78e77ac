"""The typed errors a user can cause. Each names the thing, the expected value and the actual one.

The CLI catches `DDTExportError` and prints its message on one line, without a traceback, exit code 2.
Asserts stay for internal invariants only.
"""
from __future__ import annotations


class DDTExportError(Exception):
    """Base class: something the user gave us is not what it must be."""

    def __init__(self, thing: str, expected: object, actual: object, hint: str = ""):
        self.thing, self.expected, self.actual, self.hint = thing, expected, actual, hint
        msg = f"{thing}: expected {expected}, got {actual}"
        super().__init__(msg + (f" ({hint})" if hint else ""))

    def __reduce__(self):  # pickled with its fields (a Ray worker's error reaches the driver as itself)
        return type(self), (self.thing, self.expected, self.actual, self.hint)


class ConfigError(DDTExportError):
    """A config (preset, YAML, JSON, CLI option) is malformed or does not fit the model."""


class CheckpointError(DDTExportError):
    """A checkpoint is missing, unreadable, or does not match the config."""


class ArtifactError(DDTExportError):
    """An artifact folder or file is missing, foreign, stale or half-written."""


class InputError(DDTExportError):
    """Sampler inputs (classes, noise, schedule, batch) are out of range or of the wrong shape."""


class NumericsError(DDTExportError):
    """A tensor went non-finite, or an engine's output is farther from the reference than its tolerance."""


class BackendError(DDTExportError):
    """A runtime backend (onnxruntime provider, TensorRT, CUDA) is unavailable or failed."""
