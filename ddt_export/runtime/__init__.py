"""The production runtime: numpy and onnxruntime only (tensorrt/cuda-python lazily, for TensorRT folders).

Never imports torch (an import-linter contract, `lint-imports`; tests/test_no_torch.py runs `generate`,
`schedule` and `fid` with torch made unimportable).
"""
from .engines import Engines, load_engines
from .host import Step, call_graph, plan_steps, record_states, sample, saved_fraction, work_rows

__all__ = ["Engines", "load_engines", "sample", "record_states", "plan_steps", "work_rows", "saved_fraction",
           "Step", "call_graph"]
