"""The production runtime: numpy and onnxruntime only (tensorrt/cuda-python lazily, for TensorRT folders).

Four subpackages, in import order (an import-linter contract): `graphs` (engine folders and backends) <
`sampling` (requests, plans, the one step, the loops, schedules) < `generate` (batch runs) | `batching`
(step-level serving). Never imports torch (a contract too; tests/test_no_torch.py runs `generate`, `schedule`
and `fid` with torch made unimportable).
"""
from .graphs.engines import Engines, call_graph, load_engines
from .sampling.host import record_states, sample
from .sampling.plan import Step, plan_steps, saved_fraction, work_rows

__all__ = ["Engines", "load_engines", "call_graph", "sample", "record_states", "plan_steps", "work_rows",
           "saved_fraction", "Step"]
