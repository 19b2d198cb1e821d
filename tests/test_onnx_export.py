"""FP32 export: BN folded, checker-valid, outputs within 1e-4 of torch, dynamic batch."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from deploycraft.onnx_io import export_onnx, op_counts, relative_error
from deploycraft.quant.graph import fold_bn
from deploycraft.runtime.ort import OrtRunner


def test_fp32_export_matches_torch(tmp_path, tiny_resnet):
    path = tmp_path / "m.onnx"
    export_onnx(fold_bn(tiny_resnet), torch.randn(2, 3, 16, 16), path, metadata={"deploycraft.arch": "resnet20"})
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert op_counts(proto).get("BatchNormalization", 0) == 0
    assert {p.key: p.value for p in proto.metadata_props}["deploycraft.arch"] == "resnet20"
    runner = OrtRunner(path)
    for bs in (1, 7):
        x = torch.randn(bs, 3, 16, 16)
        with torch.no_grad():
            ref = tiny_resnet(x).numpy()
        assert relative_error(runner(x.numpy()), ref) < 1e-4


def test_relative_error_definition():
    a, b = np.array([1.0, 2.0]), np.array([1.0, 4.0])
    assert relative_error(a, b) == 0.5
