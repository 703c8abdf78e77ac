"""DDT-XL/2 at full size (slow: about 2.5 minutes and 8 GiB on 2 cores). Run with `pytest -m slow`."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")


@pytest.mark.slow
def test_xl_256_export_random_weights(tmp_path):
    import onnx

    from runs import run_export_checkpoint as export_checkpoint
    from ddt_export.core.manifest import read_manifest

    out = tmp_path / "xl"
    man = export_checkpoint(None, "ddt-xl-256", out, random_weights=True)
    assert (out / "encoder.onnx.data").is_file()  # 2 GB of encoder weights: external data
    g = onnx.load(str(out / "encoder.onnx"), load_external_data=False)
    dims = [d.dim_param or d.dim_value for d in g.graph.output[0].type.tensor_type.shape.dim]
    assert dims[1:] == [256, 1152]
    assert all(rec.parity["vs_pytorch"]["max_rel_err"] < 1e-4 for rec in man.graphs.values())
    assert read_manifest(out).config.name == "ddt-xl-256"
