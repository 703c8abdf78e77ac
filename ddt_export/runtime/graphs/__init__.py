"""Graphs and backends: an engine folder's graphs behind one interface (`Engines`, `GraphRunner`), the backend
registry (ONNX Runtime, TensorRT) and TensorRT's plain-function decisions. The lowest runtime layer."""
