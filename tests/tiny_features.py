"""A tiny feature extractor for FID in tests (validate, tune): (N, 8, 8, 3) uint8 -> (N, 16), the tanh of a fixed
random projection of the [-1, 1] pixels, as an ONNX graph run by the project's own `OnnxFeatures`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ddt_export.evaluate.features import OnnxFeatures


class TinyFeatures(OnnxFeatures):
    """(N, 8, 8, 3) uint8 -> (N, 16): tanh of a random projection of the [-1, 1] pixels."""

    name = "tiny"

    def preprocess(self, images):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 127.5 - 1.0


def tiny_features(folder: Path) -> TinyFeatures:
    """The graph written to folder/tiny_features.onnx (weights from default_rng(0)), loaded."""
    w = np.random.default_rng(0).standard_normal((3 * 8 * 8, 16)).astype(np.float32) / 8.0
    g = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["h"]),
         helper.make_node("Tanh", ["h"], ["features"])], "tiny_features",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(w, "w")])
    path = Path(folder) / "tiny_features.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)
    return TinyFeatures(path)
