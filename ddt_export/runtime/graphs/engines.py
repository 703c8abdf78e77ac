"""Engines: the graphs of one artifact folder behind one small interface; backend and loop chosen once, at load.

    with load_engines("engines/default") as engines:      # manifest read and verified, backend opened
        s = engines.encoder(x, t, y)                        # one graph call each, I/O checked against the specs
        v = engines.decoder(x, s)
        img = engines.vae_decoder(latent)                   # None when the folder has no VAE graph
        out = call_graph(engines, "decoder", {"x": x, "s": s})   # any row count: split at batch.max
        latents = runtime.sample(engines, noise, labels, sampler, schedule)   # host or device loop

`load_engines` picks the backend the manifest names (`backends.REGISTRY`) and, when that backend has a
device-resident loop and the folder's sampler can run on it, records that loop (`Engines.loop`) for the
sampling layer (`device_loop=False` keeps the host loop). `close()` (or the `with` block) frees the backend's
resources and whatever the sampling layer attached (`attach`: the device loop's buffers).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from ...core.config import Config
from ...core.errors import ArtifactError, BackendError, InputError
from ...core.manifest import Manifest, read_manifest, verify_graphs
from ...core.specs import DECODER, ENCODER, SPECS, VAE_DECODER, Dims, GraphSpec
from .backends import CHOICES, GraphRunner, OrtBackend, backend_class
from .trt_plan import unusable_reason

DEFAULT_ENGINES = Path("engines/default")  # where `build` points its last build; what the sampling commands read
NO_ENGINES_HINT = "build them first: ddt-export build --precision fp16 (or pass --engines DIR)"

Observer = Callable[[str, int, dict], None]  # (graph, step, inputs) before every graph call


class Graphs(Protocol):
    """What the sampling code needs of a folder's graphs: `Engines`, and the wrappers that time or record its
    calls (bench, tests). `run(graph, feeds)` is one checked call of at most `max_batch` rows."""

    config: Config
    max_batch: int
    min_batch: int

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Engines:
    """The loaded graphs of one folder; each method is one graph call with checked shapes and dtypes."""

    def __init__(self, folder: Path, manifest: Manifest, backend, runners: dict[str, GraphRunner],
                 device_loop: bool = True):
        self.folder, self.manifest, self.backend = Path(folder), manifest, backend
        self.backend_name = backend.describe()
        self._runners = runners
        self._attached: dict[str, object] = {}
        self._attach_lock = threading.Lock()
        self.dims: Dims = manifest.dims
        self.vae_decoder: Callable[[np.ndarray], np.ndarray] | None = (
            self._vae_decoder if VAE_DECODER.name in runners else None)
        caps = backend.capabilities
        # the loop `runtime.sample` runs, decided here once: "device" (the backend's device-resident loop) or "host"
        self.loop = ("device" if device_loop and caps.device_loop
                     and manifest.config.sampler.step_fn in caps.device_step_fns else "host")

    @property
    def config(self) -> Config:
        return self.manifest.config

    @property
    def max_batch(self) -> int:
        return self.manifest.batch.max

    @property
    def min_batch(self) -> int:
        return self.manifest.batch.min

    def runner(self, graph: str) -> GraphRunner:
        """The backend's runner of one graph (KeyError when the folder has no such graph)."""
        return self._runners[graph]

    def attach(self, name: str, make: Callable[[], object]):
        """The object attached under `name`, made by `make()` the first time; closed (`close()`) with the engines.
        The sampling layer keeps its device loop here, so it is made once per engine set (also when two threads
        ask at once)."""
        with self._attach_lock:
            if name not in self._attached:
                self._attached[name] = make()
            return self._attached[name]

    def encoder(self, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        """x (B, C, H, W) float32, t (B,) float32, y (B,) int64 -> s (B, L, D) float32."""
        return self.run(ENCODER.name, {"x": x, "t": t, "y": y})["s"]

    def decoder(self, x: np.ndarray, s: np.ndarray) -> np.ndarray:
        """x (B, C, H, W) float32, s (B, L, D) float32 -> v (B, C, H, W) float32."""
        return self.run(DECODER.name, {"x": x, "s": s})["v"]

    def _vae_decoder(self, latent: np.ndarray) -> np.ndarray:
        """latent (B, C, H, W) float32, the sampler's output as is -> image (B, IC, IH, IH) float32 in about [-1, 1]."""
        return self.run(VAE_DECODER.name, {"latent": latent})["image"]

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call of `graph` (a `core.specs` name) with 1..max_batch rows; inputs and outputs checked."""
        return self._call(SPECS[graph], feeds)

    def _call(self, spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = feeds[spec.inputs[0].name].shape[0] if feeds[spec.inputs[0].name].ndim else -1
        if not 1 <= batch <= self.max_batch:
            raise InputError(f"{spec.name} batch", f"1..{self.max_batch} rows (manifest batch.max)", batch)
        for t in spec.inputs:
            a = feeds[t.name]
            want = t.shape(self.dims, batch)
            if not isinstance(a, np.ndarray) or a.dtype != np.dtype(t.dtype) or a.shape != want:
                got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                raise InputError(f"{spec.name} input {t.name}", f"{t.dtype} {want}", got)
        outs = self._runners[spec.name].run(feeds)
        for t in spec.outputs:
            o = outs[t.name]
            want = t.shape(self.dims, batch)
            if o.dtype != np.dtype(t.dtype) or o.shape != want:
                raise ArtifactError(f"{self.folder}: {spec.name} output {t.name}", f"{t.dtype} {want}",
                                    f"{o.dtype} {o.shape}", "the graph does not match its manifest")
        return outs

    def close(self) -> None:
        """Free what is attached (the device loop), the runners, then the backend's own resources; idempotent."""
        for obj in self._attached.values():
            obj.close()
        self._attached = {}
        for r in self._runners.values():
            r.close()
        self._runners = {}
        self.backend.close()

    def __enter__(self) -> "Engines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_engines(folder: Path, backend: str = "auto", providers: Sequence[str] | None = None, *,
                 device_loop: bool = True) -> Engines:
    """Engines of an export/build folder; the backend (and the loop `sample` uses) are chosen here, once."""
    folder = Path(folder)
    if backend not in CHOICES:
        raise BackendError("--backend", " | ".join(CHOICES), backend)
    man = read_manifest(folder, NO_ENGINES_HINT)
    missing = [g for g in (ENCODER.name, DECODER.name) if g not in man.graphs]
    if missing:
        raise ArtifactError(f"{folder}/manifest.json", "encoder and decoder graphs", f"missing {', '.join(missing)}")
    verify_graphs(man, folder)
    name = man.backend if backend == "auto" else backend
    if name != man.backend:
        raise BackendError(f"backend for {folder}", f"{man.backend} (what the folder was built for)", name)
    try:
        impl = OrtBackend(providers) if name == "onnxruntime" else backend_class(name)(folder, man)
    except Exception as e:  # noqa: BLE001 - ImportError, OSError (libnvinfer, libcudart), cuda-python's RuntimeError
        why = unusable_reason(e)
        if not why:
            raise
        raise BackendError(f"{name} backend for {folder}", "its packages importable and a usable device", why,
                           "install the backend's extra ([tensorrt-cu12] or [tensorrt-cu13]), or build an "
                           "onnxruntime folder") from e
    runners: dict = {}
    try:
        runners = impl.open(folder, man)
        return Engines(folder, man, impl, runners, device_loop)
    except BaseException:  # nothing half-open is left behind: runners (device buffers), then the backend
        for r in runners.values():
            r.close()
        impl.close()
        raise


def call_graph(graphs: Graphs, graph: str, inputs: dict[str, np.ndarray], step: int = -1,
               observer: Observer | None = None) -> np.ndarray:
    """The first output of `graph` for any number of rows: one call per chunk of at most max_batch rows (CFG rows
    count), rows padded up to min_batch with copies of the last one (dropped after); outputs concatenated.
    `observer(graph, step, chunk_inputs)` sees every call's inputs first (calibration, validate's parity)."""
    rows = len(next(iter(inputs.values())))
    top, low = graphs.max_batch, graphs.min_batch
    name = SPECS[graph].outputs[0].name
    outs = []
    for lo in range(0, rows, top):
        chunk = {k: v[lo:lo + top] for k, v in inputs.items()}
        n = len(next(iter(chunk.values())))
        if n < low:  # engines built with a minimum batch: pad with copies of the last row, drop them after
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], low - n, axis=0)]) for k, v in chunk.items()}
        if observer is not None:
            observer(graph, step, chunk)
        outs.append(graphs.run(graph, chunk)[name][:n])
    return outs[0] if len(outs) == 1 else np.concatenate(outs)
