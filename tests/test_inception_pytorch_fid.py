"""Our FID Inception rebuild against pytorch-fid itself, block by block, on shared random weights.

pytorch-fid builds its network from torchvision's Inception3 classes and patches four of them
(`fid_inception_v3`). It is installed beside the project, not into it (`pip install --no-deps --target
.pytorch-fid torchvision==0.28.0 pytorch-fid==0.3.0`, the README's set-up): PyPI's torchvision ships a C extension
for the CUDA build of torch, and installed into the environment it would break diffusers' import. The child
process below defines the two operator schemas torchvision's fake-kernel registration needs (nms, qnms: never
called, no kernel is registered) so that its pure-Python model classes import, builds pytorch-fid's network with
our state dict (instead of downloading the official one), and compares every block with ours.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import CHILD_TIMEOUT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PYTORCH_FID = ROOT / ".pytorch-fid"

CHILD = textwrap.dedent("""
    import json, sys
    import torch
    lib = torch.library.Library("torchvision", "DEF")  # schemas only: torchvision's meta registration needs them
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torch.nn.functional as F
    import pytorch_fid.inception as pf
    from ddt_export.export.inception import FIDInceptionV3

    torch.manual_seed(0)
    ours = FIDInceptionV3().eval()
    for m in ours.modules():  # random batch-norm statistics too, so every parameter matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1); m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5); m.bias.data.uniform_(-0.1, 0.1)
    state = ours.state_dict()
    pf.load_state_dict_from_url = lambda *a, **k: state  # pytorch-fid's own construction, our weights
    theirs = pf.InceptionV3([pf.InceptionV3.DEFAULT_BLOCK_INDEX], resize_input=True, normalize_input=True).eval()
    net = pf.fid_inception_v3().eval()
    net.load_state_dict(state)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    out = {}
    with torch.no_grad():
        image = torch.rand(2, 3, 64, 80)
        x = 2 * F.interpolate(image, size=(299, 299), mode="bilinear", align_corners=False) - 1
        pools = {"Conv2d_2b_3x3": "maxpool1", "Conv2d_4a_3x3": "maxpool2"}
        for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]:
            ref = getattr(net, name)(x)  # the same input to both: the error of this block alone
            out[name] = rel(getattr(ours, name)(x), ref)
            x = F.max_pool2d(ref, kernel_size=3, stride=2) if name in pools else ref
        out["pool_3 end to end"] = rel(ours(image), theirs(image)[0].flatten(1))
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.timeout(CHILD_TIMEOUT + 60)
def test_rebuild_equals_pytorch_fid_block_by_block():
    if not (PYTORCH_FID / "pytorch_fid").is_dir():
        pytest.skip(f"pytorch-fid is not installed beside the project ({PYTORCH_FID}): run the README's set-up")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(PYTORCH_FID)]))
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=CHILD_TIMEOUT, cwd=ROOT,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    errs = json.loads(r.stdout.split("RESULT ", 1)[1])
    print("\nmax rel error vs pytorch-fid:", {k: f"{v:.1e}" for k, v in errs.items()})
    assert len(errs) == 17
    assert all(errs[k] < 1e-5 for k in errs if k != "pool_3 end to end"), errs  # the same ops, the same order
    assert errs["pool_3 end to end"] < 1e-5, errs
